//! Pending timers read from the runtime's per-P timer heaps, so that a
//! timer's stop and firing need no probe: only its creation is trapped (for
//! its stack), and a snapshot retires the timers no heap holds any more.
//!
//! Where things are (verified on 1.21, 1.24 and 1.27 against their DWARF,
//! plain and stripped; see docs/research/go-timer-heaps.md):
//! - `runtime.allp` (`[]*p`): the symbol table, or, stripped, the two
//!   adjacent RIP-relative qword loads (`allp.ptr`, `allp.len`) in
//!   `runtime.preemptall`.
//! - The heap slice inside `p`: 8 bytes past the timer lock, whose offset is
//!   the displacement of the first two equal `lea r, [r + disp32]` (disp ≥
//!   0x1000) in `runtime.(*p).destroy` (it locks both Ps' timers).
//! - Up to 1.22 the heap holds `*timer`, pending when `status` (u32 at
//!   0x40) is waiting or modified; from 1.23 it holds `timerWhen {*timer,
//!   when}`, pending when `state` (u8 at 9) has `timerHeaped` and not
//!   `timerZombie`.

use std::collections::HashSet;

use iced_x86::{Code, Decoder, DecoderOptions, Register};

use super::{
    code::{function, slice_loaded_by},
    pclntab::Pclntab,
};
use crate::object::ElfObject;

/// A larger P count or heap is a torn read.
const MAX_PS: u64 = 1 << 12;
const MAX_HEAP: u64 = 1 << 24;
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
}

impl TimerHeapLayout {
    /// Finds the layout in `elf` for Go `minor` (1.x).
    pub fn find(elf: &ElfObject, pclntab: Option<&Pclntab>, minor: u32) -> Option<Self> {
        let allp = elf
            .data_symbol("runtime.allp")
            .map(|s| s.addr)
            .or_else(|| slice_loaded_by(elf, pclntab, "runtime.preemptall"))?;
        let heap = timers_lock_offset(elf, pclntab)? + 8;
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
        })
    }
}

/// The timer lock's offset in `runtime.p`: `(*p).destroy` locks (or takes
/// from) both Ps' timers, the first two `lea r, [r + disp]` with one large
/// displacement.
fn timers_lock_offset(elf: &ElfObject, pclntab: Option<&Pclntab>) -> Option<u64> {
    let f = function(elf, pclntab, "runtime.(*p).destroy")?;
    let code = elf.read_at_offset(f.file_offset, f.size.min(1024))?;
    let disps: Vec<u64> = Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE)
        .iter()
        .filter(|i| {
            i.code() == Code::Lea_r64_m
                && i.memory_base() != Register::RIP
                && i.memory_index() == Register::None
                && i.memory_displacement64() >= 0x1000
        })
        .map(|i| i.memory_displacement64())
        .take(2)
        .collect();
    match disps[..] {
        [a, b] if a == b => Some(a),
        _ => None,
    }
}

/// The pending timers of process `pid`, whose `allp` is at `allp` (runtime
/// address).
pub fn pending(pid: u32, allp: u64, layout: &TimerHeapLayout) -> std::io::Result<HashSet<u64>> {
    let hdr = read(pid, allp, 16)?;
    let (ptr, len) = (word(&hdr, 0), word(&hdr, 8));
    if len > MAX_PS {
        return Err(std::io::Error::other(format!(
            "allp length {len}: a torn read"
        )));
    }
    let ps = read(pid, ptr, len as usize * 8)?;
    let mut timers = Vec::new();
    for i in 0..len as usize {
        let p = word(&ps, i * 8);
        if p == 0 {
            continue;
        }
        let heap = read(pid, p + layout.heap, 16)?;
        let (hptr, hlen) = (word(&heap, 0), word(&heap, 8));
        if hlen == 0 {
            continue;
        }
        if hlen > MAX_HEAP {
            return Err(std::io::Error::other(format!(
                "timer heap length {hlen}: a torn read"
            )));
        }
        let entries = read(pid, hptr, (hlen * layout.entry) as usize)?;
        timers.extend(
            entries
                .chunks_exact(layout.entry as usize)
                .map(|e| word(e, 0))
                .filter(|&t| t != 0),
        );
    }
    let (offset, width) = match layout.pending {
        Pending::Status { offset } => (offset, 4),
        Pending::State { offset } => (offset, 1),
    };
    let mut out = HashSet::new();
    for chunk in timers.chunks(IOV_MAX) {
        let mut buf = vec![0u8; chunk.len() * width];
        let mut parts: Vec<(u64, &mut [u8])> = chunk
            .iter()
            .zip(buf.chunks_exact_mut(width))
            .map(|(t, b)| (t + offset, b))
            .collect();
        super::census::read_exact(pid, &mut parts)?;
        drop(parts);
        for (t, b) in chunk.iter().zip(buf.chunks_exact(width)) {
            let pending = match layout.pending {
                Pending::Status { .. } => {
                    matches!(
                        u32::from_le_bytes(b.try_into().unwrap_or_default()),
                        1 | 7 | 8
                    )
                }
                Pending::State { .. } => b[0] & 1 != 0 && b[0] & 4 == 0,
            };
            if pending {
                out.insert(*t);
            }
        }
    }
    Ok(out)
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

fn read(pid: u32, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    super::census::read_exact(pid, &mut [(addr, &mut b[..])])?;
    Ok(b)
}
