//! Pending timers read from the runtime's per-P timer heaps, so that a
//! timer's stop and firing need no probe: only its creation is trapped (for
//! its stack), and a snapshot retires the timers no heap holds any more.
//!
//! Where things are (verified on 1.21, 1.24 and 1.27 against their DWARF,
//! plain and stripped; see docs/research/go-timer-heaps.md):
//! - `runtime.allp` (`[]*p`): the symbol table, or, stripped, the two
//!   adjacent RIP-relative qword loads (`allp.ptr`, `allp.len`) in
//!   `runtime.preemptall`.
//! - The heap slice inside `p`: DWARF's `p.timers` (`p.timers.heap` from
//!   1.23), or stripped, 8 bytes past the timer lock, whose offset is the
//!   displacement of the first `lea r, [r + disp32]` (disp ≥ 0x1000) in
//!   `runtime.(*p).destroy` (it takes the dying P's timers).
//! - Up to 1.22 the heap holds `*timer`, pending when `status` (u32 at
//!   0x40) is waiting or modified; from 1.23 it holds `timerWhen {*timer,
//!   when}`, pending when `state` (u8 at 9) has `timerHeaped` and not
//!   `timerZombie`.

use std::collections::{HashMap, HashSet};

use iced_x86::{Code, Decoder, DecoderOptions, Register};

use super::{
    code::{function, slice_loaded_by},
    memory::TargetMemory,
    pclntab::Pclntab,
};
use crate::object::ElfObject;

/// A larger P count or heap is a torn read.
const MAX_PS: u64 = 1 << 12;
const MAX_HEAP: u64 = 1 << 24;
/// Heap entries read at a time: memory stays bounded whatever length a heap
/// claims (a torn or forged length fails at the first chunk not there).
const HEAP_CHUNK: u64 = 4096;
/// iovecs per process_vm_readv.
const IOV_MAX: usize = 1024;

/// How to tell a pending timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Go ≤ 1.22: `timer.status` (u32) is timerWaiting (1),
    /// timerModifiedEarlier (7) or timerModifiedLater (8).
    Status { offset: u64 },
    /// Go ≥ 1.23: `timer.state` (u8) has timerHeaped (1), not timerZombie (4).
    State { offset: u64 },
}

/// Where the timer heaps are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerHeapLayout {
    /// The `allp` slice header: pointer at +0, length at +8.
    pub allp: u64,
    /// Offset of the heap slice in `runtime.p`.
    pub heap: u64,
    /// Bytes per heap entry (the timer pointer first).
    pub entry: u64,
    pub pending: Pending,
    /// Offset of `timer.period`; `f` and `arg` follow it.
    pub period: u64,
}

impl TimerHeapLayout {
    /// Finds the layout in `elf` for Go `minor` (1.x).
    pub fn find(
        elf: &ElfObject,
        pclntab: Option<&Pclntab>,
        minor: u32,
        period: u64,
        dwarf_heap: Option<u64>,
    ) -> Option<Self> {
        let allp = elf
            .data_symbol("runtime.allp")
            .map(|s| s.addr)
            .or_else(|| slice_loaded_by(elf, pclntab, "runtime.preemptall"))?;
        let heap = match dwarf_heap {
            Some(h) => h,
            None => timers_lock_offset(elf, pclntab)? + 8,
        };
        let (entry, pending) = if minor >= 23 {
            (16, Pending::State { offset: 9 })
        } else {
            (8, Pending::Status { offset: 0x40 })
        };
        Some(Self {
            allp,
            heap,
            entry,
            pending,
            period,
        })
    }
}

/// The timer lock's offset in `runtime.p`: `(*p).destroy` moves the
/// dying P's timers to the current one, and its first `lea r, [r + disp]`
/// with a large displacement takes the dying P's timer lock (so on every
/// release 1.21–1.27; checked against DWARF in the tests).
fn timers_lock_offset(elf: &ElfObject, pclntab: Option<&Pclntab>) -> Option<u64> {
    let f = function(elf, pclntab, "runtime.(*p).destroy")?;
    let code = elf.read_at_offset(f.file_offset, f.size.min(1024))?;
    Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE)
        .iter()
        .find(|i| {
            i.code() == Code::Lea_r64_m
                && i.memory_base() != Register::RIP
                && i.memory_index() == Register::None
                && i.memory_displacement64() >= 0x1000
        })
        .map(|i| i.memory_displacement64())
}

/// One pending timer: what it will run, which names it without a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PendingTimer {
    /// Code address of the callback: `f`'s code, or for `time.AfterFunc`
    /// timers (`f` is `time.goFunc`) the code of the function it runs, such
    /// as context's cancel closure. 0 when unreadable.
    pub callback: u64,
    /// A channel timer (Go ≥ 1.23 `isChan`).
    pub chan: bool,
}

/// The pending timers of the process whose memory is `mem`, whose `allp` is
/// at `allp` (runtime address), with their callbacks. `gofunc` is the
/// runtime address of `time.goFunc` (0 if unknown).
pub fn pending(
    mem: &impl TargetMemory,
    allp: u64,
    gofunc: u64,
    layout: &TimerHeapLayout,
) -> std::io::Result<HashMap<u64, PendingTimer>> {
    if layout.entry < 8 || layout.entry > 64 {
        return Err(std::io::Error::other(format!(
            "timer heap entries of {} bytes: not a timer heap",
            layout.entry
        )));
    }
    let hdr = mem.read_vec(allp, 16)?;
    let (ptr, len) = (word(&hdr, 0), word(&hdr, 8));
    if len > MAX_PS {
        return Err(std::io::Error::other(format!(
            "allp length {len}: a torn read"
        )));
    }
    let ps = mem.read_vec(ptr, len as usize * 8)?;
    // A timer is in one heap: a set, so that heaps aliasing one another (a
    // torn or forged allp) cannot multiply the entries beyond the memory
    // actually read.
    let mut timers = HashSet::new();
    for i in 0..len as usize {
        let p = word(&ps, i * 8);
        if p == 0 {
            continue;
        }
        let heap = mem.read_vec(p.wrapping_add(layout.heap), 16)?;
        let (hptr, hlen) = (word(&heap, 0), word(&heap, 8));
        if hlen == 0 {
            continue;
        }
        if hlen > MAX_HEAP {
            return Err(std::io::Error::other(format!(
                "timer heap length {hlen}: a torn read"
            )));
        }
        let mut at = 0;
        while at < hlen {
            let n = HEAP_CHUNK.min(hlen - at);
            let entries = mem.read_vec(
                hptr.wrapping_add(at * layout.entry),
                (n * layout.entry) as usize,
            )?;
            timers.extend(
                entries
                    .chunks_exact(layout.entry as usize)
                    .map(|e| word(e, 0))
                    .filter(|&t| t != 0),
            );
            at += n;
        }
        if timers.len() as u64 > MAX_HEAP {
            return Err(std::io::Error::other(format!(
                "over {MAX_HEAP} timers: a torn read"
            )));
        }
    }
    let mut timers: Vec<u64> = timers.into_iter().collect();
    timers.sort_unstable();
    // One read per timer, from its start to the end of `arg` and of the
    // status word.
    let (f, arg) = (layout.period + 8, layout.period + 16);
    let span = match layout.pending {
        Pending::Status { offset } => (offset + 4).max(arg + 16),
        Pending::State { offset } => (offset + 2).max(arg + 16),
    } as usize;
    // (timer, f, arg's data word, chan)
    let mut live: Vec<(u64, u64, u64, bool)> = Vec::new();
    for chunk in timers.chunks(IOV_MAX) {
        let mut buf = vec![0u8; chunk.len() * span];
        let mut parts: Vec<(u64, &mut [u8])> = chunk
            .iter()
            .zip(buf.chunks_exact_mut(span))
            .map(|(t, b)| (*t, b))
            .collect();
        mem.read_exact(&mut parts)?;
        drop(parts);
        for (t, b) in chunk.iter().zip(buf.chunks_exact(span)) {
            let (pending, chan) = match layout.pending {
                Pending::Status { offset } => {
                    let o = offset as usize;
                    let status = u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
                    (matches!(status, 1 | 7 | 8), false)
                }
                Pending::State { offset } => {
                    let state = b[offset as usize];
                    (
                        state & 1 != 0 && state & 4 == 0,
                        b[offset as usize + 1] != 0,
                    )
                }
            };
            if pending {
                live.push((*t, word(b, f as usize), word(b, arg as usize + 8), chan));
            }
        }
    }
    // `f` is a *funcval: its code first. AfterFunc's goFunc runs the func
    // value in `arg` (pointer-shaped, so the interface's data word is the
    // *funcval itself).
    let fcode = deref_all(mem, live.iter().map(|l| l.1));
    let inner = deref_all(
        mem,
        live.iter()
            .filter(|l| gofunc != 0 && fcode.get(&l.1) == Some(&gofunc))
            .map(|l| l.2),
    );
    Ok(live
        .into_iter()
        .map(|(t, f, arg, chan)| {
            let code = fcode.get(&f).copied().unwrap_or(0);
            let callback = if gofunc != 0 && code == gofunc {
                inner.get(&arg).copied().unwrap_or(code)
            } else {
                code
            };
            (t, PendingTimer { callback, chan })
        })
        .collect())
}

/// The word at each distinct address in `addrs` (unreadable ones left out).
fn deref_all(mem: &impl TargetMemory, addrs: impl Iterator<Item = u64>) -> HashMap<u64, u64> {
    let mut distinct: Vec<u64> = addrs.filter(|&a| a != 0).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let mut out = HashMap::with_capacity(distinct.len());
    for chunk in distinct.chunks(IOV_MAX) {
        let mut buf = vec![0u8; chunk.len() * 8];
        let mut parts: Vec<(u64, &mut [u8])> = chunk
            .iter()
            .zip(buf.chunks_exact_mut(8))
            .map(|(a, b)| (*a, b))
            .collect();
        if mem.read_exact(&mut parts).is_err() {
            // One bad pointer fails the batch: read them one by one.
            for (a, b) in parts.iter_mut() {
                if mem.read_exact(&mut [(*a, &mut **b)]).is_err() {
                    b.fill(0);
                }
            }
        }
        drop(parts);
        out.extend(
            chunk
                .iter()
                .zip(buf.chunks_exact(8))
                .map(|(a, b)| (*a, word(b, 0)))
                .filter(|(_, v)| *v != 0),
        );
    }
    out
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}
