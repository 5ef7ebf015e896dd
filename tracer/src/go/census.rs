//! Goroutines read from the runtime's own list, `runtime.allgs`, as the
//! goroutine profile does: no probe, no trap per goroutine created or gone.
//!
//! Each snapshot reads `allgs` (a `[]*g`) and, for every g, its status, wait
//! reason, creation pc (`gopc`, the `go` statement) and start pc, in batched
//! `process_vm_readv` calls of only those fields. Live goroutines are counted
//! per (creation pc, start pc) and per state ("chan receive", "running"...).
//!
//! Where things are, for every supported release (verified on 1.21, 1.24 and
//! 1.27 against their DWARF, plain and stripped):
//! - `allgs`: the symbol table's `runtime.allgs`, or, stripped, the two
//!   adjacent RIP-relative qword loads (`allgs.ptr`, `allgs.len`) in
//!   `runtime.forEachG`, found through `.gopclntab`.
//! - wait reason names: `runtime.waitReasonStrings` (`[N]string`), or,
//!   stripped, the array `runtime.waitReason.String` indexes (its first
//!   RIP-relative LEA, its length the immediate of its first `cmp al`). The
//!   numbering changes between releases (1.27 reordered it), so names are
//!   read from the binary, never tabled.
//! - in `runtime.g`: `atomicstatus` = goid - 8, `waitreason` = goid + 24.

use std::collections::{BTreeMap, HashMap};

use iced_x86::{Code, Decoder, DecoderOptions, Register};

use super::{
    code::{function, slice_loaded_by},
    memory::TargetMemory,
    pclntab::Pclntab,
};
use crate::object::ElfObject;

/// `_Gidle`, `_Gdead` and 1.27's `_Gdeadextra`: not goroutines.
const G_IDLE: u32 = 0;
const G_DEAD: u32 = 6;
const G_DEAD_EXTRA: u32 = 11;
const G_WAITING: u32 = 4;
/// Set while the GC scans the stack; the status is in the other bits.
const G_SCAN: u32 = 0x1000;
/// A larger `allglen` is a torn read.
const MAX_GOROUTINES: u64 = 1 << 26;
/// iovecs per process_vm_readv (the kernel's IOV_MAX).
const IOV_MAX: usize = 1024;
/// Entries of `allgs` read at a time by [`read`]: its memory stays bounded
/// whatever length the list claims (a torn or forged length fails at the
/// first chunk that is not there, not after allocating for all of it).
const LIST_CHUNK: usize = 1 << 16;
/// Bytes of a g struct read per goroutine at most: a layout spanning more
/// is not one (a g struct is about 400 bytes).
const MAX_G_SPAN: u64 = 4096;

/// Where the goroutine list and its fields are, in the executable's
/// virtual addresses and `runtime.g` offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CensusLayout {
    /// The `allgs` slice header: pointer at +0, length at +8.
    pub allgs: u64,
    pub status: u64,
    pub waitreason: u64,
    pub gopc: u64,
    pub startpc: u64,
    /// Wait reason names, by number.
    pub wait_reasons: Vec<String>,
}

impl CensusLayout {
    /// Finds the layout in `elf` (symbols, else code through `pclntab`),
    /// with the g offsets of `offsets`.
    pub fn find(
        elf: &ElfObject,
        pclntab: Option<&Pclntab>,
        offsets: &tracer_common::GoOffsets,
    ) -> Option<Self> {
        if offsets.g_goid < 8 || offsets.g_gopc == 0 || offsets.g_startpc == 0 {
            return None;
        }
        let allgs = elf
            .data_symbol("runtime.allgs")
            .map(|s| s.addr)
            .or_else(|| slice_loaded_by(elf, pclntab, "runtime.forEachG"))?;
        let wait_reasons = wait_reason_names(elf, pclntab).unwrap_or_default();
        Some(Self {
            allgs,
            status: offsets.g_goid - 8,
            waitreason: offsets.g_goid + 24,
            gopc: offsets.g_gopc,
            startpc: offsets.g_startpc,
            wait_reasons,
        })
    }

    /// The name of a goroutine's state: its wait reason when waiting.
    fn state(&self, status: u32, waitreason: u8) -> &str {
        match status {
            1 => "runnable",
            2 => "running",
            3 => "syscall",
            G_WAITING => self
                .wait_reasons
                .get(usize::from(waitreason))
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("waiting"),
            8 => "copystack",
            9 => "preempted",
            10 => "leaked",
            _ => "unknown",
        }
    }
}

/// The wait reason names, from the symbol table's
/// `runtime.waitReasonStrings` or the array `runtime.waitReason.String`
/// indexes.
fn wait_reason_names(elf: &ElfObject, pclntab: Option<&Pclntab>) -> Option<Vec<String>> {
    if let Some(s) = elf.data_symbol("runtime.waitReasonStrings")
        && s.size >= 16
    {
        return string_table(elf, s.addr, s.size / 16);
    }
    let f = function(elf, pclntab, "runtime.waitReason.String")?;
    let code = elf.read_at_offset(f.file_offset, f.size.min(128))?;
    let mut count = None;
    let mut tables = Vec::new();
    for i in Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE).iter() {
        if count.is_none() && i.code() == Code::Cmp_AL_imm8 {
            count = Some(u64::from(i.immediate8()));
        }
        if i.code() == Code::Lea_r64_m && i.memory_base() == Register::RIP {
            tables.push(i.ip_rel_memory_address());
        }
    }
    let count = count?;
    // The function also loads its "unknown wait reason" string: the table
    // is the address that reads as `count` strings, the first one empty.
    tables
        .into_iter()
        .filter_map(|addr| string_table(elf, addr, count))
        .find(|names| {
            names.first().is_some_and(String::is_empty) && names[1..].iter().all(|n| !n.is_empty())
        })
}

/// `count` Go strings (pointer, length) at `addr` of the file.
fn string_table(elf: &ElfObject, addr: u64, count: u64) -> Option<Vec<String>> {
    let table = elf.read_at_vaddr(addr, count.checked_mul(16)?)?;
    table
        .chunks_exact(16)
        .map(|e| {
            let ptr = u64::from_le_bytes(e[..8].try_into().ok()?);
            let len = u64::from_le_bytes(e[8..].try_into().ok()?);
            if len == 0 {
                return Some(String::new());
            }
            if len > 64 {
                return None;
            }
            elf.read_at_vaddr(ptr, len)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        })
        .collect()
}

/// Live goroutines of one (creation pc, start pc), by state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoroutineGroup {
    pub gopc: u64,
    pub startpc: u64,
    pub count: u64,
    pub states: BTreeMap<String, u64>,
}

/// One read of the goroutine list.
#[derive(Clone, Debug, Default)]
pub struct Census {
    pub groups: Vec<GoroutineGroup>,
    /// Entries of `allgs` (dead ones included), and g structs unreadable
    /// (freed stacks never are: g structs are never freed).
    pub allglen: u64,
    pub unreadable: u64,
    /// Entries read for this census (the rest are from earlier reads).
    pub read_now: u64,
    /// Entries never read yet: their goroutines are missing.
    pub unread: u64,
}

/// Goroutines per slice of the list (see [`RollingCensus`]).
const SLICE: usize = 256;

/// Goroutines counted by (creation pc, start pc, status, wait reason).
type RawCounts = HashMap<(u64, u64, u32, u8), u64>;

/// The goroutine list read a slice at a time, within a time budget per
/// snapshot, so that a million goroutines cost a bounded share of a core.
/// `allgs` only grows (g structs are never freed; a dead g is reused in
/// place), so slice i always covers the same entries; each snapshot sums
/// every slice's latest counts. Entries added since the last snapshot are
/// read first: goroutines that pile up outgrow the runtime's free list and
/// land there, so a goroutine leak shows at once; the rest of the budget
/// goes round the older slices. A slice never read is read whatever the
/// budget: a snapshot never leaves goroutines out, so the first one after
/// attach reads the whole list once (about 0.4 s at a million goroutines)
/// and the budget bounds only the re-reads. Below ten thousand goroutines
/// or so every slice is read every time.
#[derive(Debug, Default)]
pub struct RollingCensus {
    /// Per slice: counts, unreadable gs, and how many entries were read.
    slices: Vec<Option<(RawCounts, u64, usize)>>,
    next: usize,
}

impl RollingCensus {
    /// Reads every slice never read, then older slices until `budget` is
    /// spent (at least one slice, at most all of them).
    pub fn read(
        &mut self,
        mem: &impl TargetMemory,
        layout: &CensusLayout,
        budget: std::time::Duration,
    ) -> std::io::Result<Census> {
        let started = std::time::Instant::now();
        let (ptr, len) = list_header(mem, layout.allgs)?;
        let len = len as usize;
        // The list's last entry must be there before anything is sized by
        // its length (a torn or forged length would cost memory at once).
        if len > 0 {
            read_words(mem, ptr.wrapping_add((len as u64 - 1) * 8), 1)?;
        }
        let n = len.div_ceil(SLICE);
        self.slices.resize(n, None);
        let size = |i: usize| SLICE.min(len - i * SLICE);
        // New or grown slices first, then round the others.
        let fresh = (0..n).filter(|&i| !matches!(&self.slices[i], Some(s) if s.2 == size(i)));
        let next = self.next;
        let older = (0..n).map(|k| (next + k) % n);
        let mut done = vec![false; n];
        let mut read_now = 0;
        for i in fresh.collect::<Vec<_>>().into_iter().chain(older) {
            if done[i] {
                continue;
            }
            let seen = matches!(&self.slices[i], Some(s) if s.2 == size(i));
            if seen && read_now > 0 && started.elapsed() >= budget {
                continue;
            }
            let lo = i * SLICE;
            let gs = read_words(mem, ptr.wrapping_add(lo as u64 * 8), size(i))?;
            let mut raw = RawCounts::new();
            let unreadable = count_gs(mem, &gs, layout, &mut raw);
            self.slices[i] = Some((raw, unreadable, size(i)));
            done[i] = true;
            read_now += size(i) as u64;
            self.next = (i + 1) % n;
        }
        let mut raw = RawCounts::new();
        let mut unreadable = 0;
        let mut unread = 0;
        for (i, slice) in self.slices.iter().enumerate() {
            match slice {
                Some((r, u, _)) => {
                    for (k, v) in r {
                        *raw.entry(*k).or_default() += v;
                    }
                    unreadable += u;
                }
                None => unread += size(i) as u64,
            }
        }
        let mut census = group(raw, layout, len as u64, unreadable);
        census.read_now = read_now;
        census.unread = unread;
        Ok(census)
    }
}

impl Census {
    /// Goroutines counted over every state.
    pub fn states_total(&self) -> u64 {
        self.groups.iter().flat_map(|g| g.states.values()).sum()
    }
}

/// Reads the whole goroutine list of the process whose memory is `mem`,
/// whose executable's virtual addresses are off by `bias`.
pub fn read(mem: &impl TargetMemory, bias: u64, layout: &CensusLayout) -> std::io::Result<Census> {
    let (ptr, len) = list_header(mem, layout.allgs.wrapping_add(bias))?;
    let mut raw = RawCounts::new();
    let mut unreadable = 0;
    let mut at = 0;
    while at < len as usize {
        let n = LIST_CHUNK.min(len as usize - at);
        let gs = read_words(mem, ptr.wrapping_add(at as u64 * 8), n)?;
        unreadable += count_gs(mem, &gs, layout, &mut raw);
        at += n;
    }
    let mut census = group(raw, layout, len, unreadable);
    census.read_now = len;
    Ok(census)
}

/// `allgs`'s pointer and length.
fn list_header(mem: &impl TargetMemory, allgs: u64) -> std::io::Result<(u64, u64)> {
    let mut hdr = [0u8; 16];
    mem.read_exact(&mut [(allgs, &mut hdr[..])])?;
    let ptr = u64::from_le_bytes(hdr[..8].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(hdr[8..].try_into().unwrap_or_default());
    if len > MAX_GOROUTINES {
        return Err(std::io::Error::other(format!(
            "allgs length {len}: a torn read"
        )));
    }
    Ok((ptr, len))
}

fn read_words(mem: &impl TargetMemory, addr: u64, n: usize) -> std::io::Result<Vec<u64>> {
    let mut b = vec![0u8; n * 8];
    mem.read_exact(&mut [(addr, &mut b[..])])?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Counts the live goroutines among the g structs at `gs` into `raw`;
/// returns how many were unreadable. One read per g, from its status to its
/// start pc: half the iovecs of two reads of only those fields, which costs
/// more than the bytes between them. (Reading runs of neighbouring g
/// structs whole, fewer iovecs but three times the bytes, measured 3x
/// slower at 1M goroutines.)
fn count_gs(
    mem: &impl TargetMemory,
    gs: &[u64],
    layout: &CensusLayout,
    raw: &mut RawCounts,
) -> u64 {
    let lo = layout.status.min(layout.gopc).min(layout.startpc);
    let hi = (layout.waitreason.saturating_add(1))
        .max(layout.startpc.saturating_add(8))
        .max(layout.gopc.saturating_add(8))
        .max(layout.status.saturating_add(4));
    if hi - lo > MAX_G_SPAN {
        return gs.len() as u64;
    }
    let span = (hi - lo) as usize;
    let at = |off: u64| (off - lo) as usize;
    let mut unreadable = 0;
    for chunk in gs.chunks(IOV_MAX) {
        let mut buf = vec![0u8; span * chunk.len()];
        let mut parts: Vec<(u64, &mut [u8])> = chunk
            .iter()
            .zip(buf.chunks_exact_mut(span))
            .map(|(g, b)| (g.wrapping_add(lo), b))
            .collect();
        if mem.read_exact(&mut parts).is_err() {
            // One bad g fails the batch: read them one by one.
            for (g, b) in parts.iter_mut() {
                if mem.read_exact(&mut [(*g, &mut **b)]).is_err() {
                    b.fill(0);
                    unreadable += 1;
                }
            }
        }
        drop(parts);
        for g in buf.chunks_exact(span) {
            let word = |off: u64, n: usize| &g[at(off)..at(off) + n];
            let status =
                u32::from_le_bytes(word(layout.status, 4).try_into().unwrap_or_default()) & !G_SCAN;
            if matches!(status, G_IDLE | G_DEAD | G_DEAD_EXTRA) {
                continue;
            }
            let waitreason = g[at(layout.waitreason)];
            let gopc = u64::from_le_bytes(word(layout.gopc, 8).try_into().unwrap_or_default());
            let startpc =
                u64::from_le_bytes(word(layout.startpc, 8).try_into().unwrap_or_default());
            *raw.entry((gopc, startpc, status, waitreason)).or_default() += 1;
        }
    }
    unreadable
}

/// Groups raw counts by (creation pc, start pc), states named.
fn group(raw: RawCounts, layout: &CensusLayout, allglen: u64, unreadable: u64) -> Census {
    let mut groups: BTreeMap<(u64, u64), GoroutineGroup> = BTreeMap::new();
    for ((gopc, startpc, status, waitreason), n) in raw {
        let group = groups
            .entry((gopc, startpc))
            .or_insert_with(|| GoroutineGroup {
                gopc,
                startpc,
                ..GoroutineGroup::default()
            });
        group.count += n;
        *group
            .states
            .entry(layout.state(status, waitreason).to_string())
            .or_default() += n;
    }
    Census {
        groups: groups.into_values().collect(),
        allglen,
        unreadable,
        read_now: 0,
        unread: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::go::memory::ProcessMemory;

    fn layout() -> CensusLayout {
        CensusLayout {
            allgs: 0,
            status: 0x98,
            waitreason: 0xb8,
            gopc: 0x120,
            startpc: 0x130,
            wait_reasons: vec!["".into(), "GC assist marking".into(), "IO wait".into()],
        }
    }

    #[test]
    fn states_are_named_by_status_and_wait_reason() {
        let l = layout();
        assert_eq!(l.state(G_WAITING, 2), "IO wait");
        assert_eq!(l.state(G_WAITING, 99), "waiting");
        assert_eq!(l.state(2, 0), "running");
        assert_eq!(l.state(3, 0), "syscall");
    }

    /// This very process is no Go program, but its memory reads the same
    /// way: a fake goroutine list laid out in a buffer.
    #[test]
    fn reads_a_goroutine_list_laid_out_in_memory() {
        let l = layout();
        let g_size = 0x200usize;
        let mut gs = vec![0u8; g_size * 3];
        let put = |gs: &mut Vec<u8>, i: usize, status: u32, reason: u8, gopc: u64, start: u64| {
            let b = i * g_size;
            gs[b + l.status as usize..][..4].copy_from_slice(&status.to_le_bytes());
            gs[b + l.waitreason as usize] = reason;
            gs[b + l.gopc as usize..][..8].copy_from_slice(&gopc.to_le_bytes());
            gs[b + l.startpc as usize..][..8].copy_from_slice(&start.to_le_bytes());
        };
        put(&mut gs, 0, G_WAITING, 2, 0x1000, 0x2000);
        put(&mut gs, 1, G_WAITING | G_SCAN, 2, 0x1000, 0x2000);
        put(&mut gs, 2, G_DEAD, 0, 0x1000, 0x2000);
        let base = gs.as_ptr() as u64;
        let ptrs: Vec<u64> = (0..3).map(|i| base + (i * g_size) as u64).collect();
        let mut hdr = [0u64; 3];
        hdr[0] = ptrs.as_ptr() as u64;
        hdr[1] = 3;
        hdr[2] = 3;
        let l = CensusLayout {
            allgs: hdr.as_ptr() as u64,
            ..l
        };
        let c = read(&ProcessMemory(std::process::id()), 0, &l).unwrap();
        assert_eq!(c.allglen, 3);
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.groups[0].count, 2);
        assert_eq!(c.groups[0].states.get("IO wait"), Some(&2));
    }

    /// With no time to spare, each read takes one slice: new entries first,
    /// then round the older ones; the sum is whole once every slice is read.
    #[test]
    fn rolling_reads_new_entries_first_and_sums_every_slice() {
        let l = layout();
        let g_size = 0x200usize;
        let n = 2 * SLICE + 10;
        let mut gs = vec![0u8; g_size * (n + SLICE)];
        for i in 0..gs.len() / g_size {
            let b = i * g_size;
            gs[b + l.status as usize..][..4].copy_from_slice(&G_WAITING.to_le_bytes());
            gs[b + l.waitreason as usize] = 2;
            gs[b + l.gopc as usize..][..8].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        let base = gs.as_ptr() as u64;
        let ptrs: Vec<u64> = (0..n + SLICE).map(|i| base + (i * g_size) as u64).collect();
        let mut hdr = [ptrs.as_ptr() as u64, n as u64];
        let l = CensusLayout {
            allgs: hdr.as_ptr() as u64,
            ..l
        };
        let pid = ProcessMemory(std::process::id());
        let mut rolling = RollingCensus::default();
        let zero = std::time::Duration::ZERO;
        let total = |c: &Census| c.groups.iter().map(|g| g.count).sum::<u64>();
        // The first read takes every slice, whatever the budget.
        let c = rolling.read(&pid, &l, zero).unwrap();
        assert_eq!((c.read_now, c.unread), (n as u64, 0));
        assert_eq!(total(&c), n as u64);
        // Then one older slice per read, round the list.
        let c = rolling.read(&pid, &l, zero).unwrap();
        assert_eq!((c.read_now, c.unread), (SLICE as u64, 0));
        assert_eq!(total(&c), n as u64);
        // The list grows: the grown slice is read before any older one.
        hdr[1] = (n + 100) as u64;
        std::hint::black_box(&hdr);
        let c = rolling.read(&pid, &l, zero).unwrap();
        assert_eq!(c.read_now, 110);
        assert_eq!(total(&c), (n + 100) as u64);
        // A generous budget reads everything.
        let c = rolling
            .read(&pid, &l, std::time::Duration::from_secs(60))
            .unwrap();
        assert_eq!(c.read_now, (n + 100) as u64);
        assert_eq!(c.states_total(), (n + 100) as u64);
    }
}
