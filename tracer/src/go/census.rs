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

use std::collections::BTreeMap;

use iced_x86::{Code, Decoder, DecoderOptions, Register};

use super::{
    code::{function, slice_loaded_by},
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
}

/// Reads the goroutine list of process `pid`, whose executable's virtual
/// addresses are off by `bias`.
pub fn read(pid: u32, bias: u64, layout: &CensusLayout) -> std::io::Result<Census> {
    let mut hdr = [0u8; 16];
    read_exact(pid, &mut [(layout.allgs.wrapping_add(bias), &mut hdr[..])])?;
    let ptr = u64::from_le_bytes(hdr[..8].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(hdr[8..].try_into().unwrap_or_default());
    if len > MAX_GOROUTINES {
        return Err(std::io::Error::other(format!(
            "allgs length {len}: a torn read"
        )));
    }
    let mut gs = vec![0u8; len as usize * 8];
    read_exact(pid, &mut [(ptr, &mut gs[..])])?;
    let gs: Vec<u64> = gs
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    // One read per g, from its status to its start pc: half the iovecs of
    // two reads of only those fields, which costs more than the bytes
    // between them (measured at 1M goroutines).
    let lo = layout.status.min(layout.gopc);
    let hi = (layout.waitreason + 1).max(layout.startpc + 8);
    let span = (hi - lo) as usize;
    let at = |off: u64| (off - lo) as usize;
    // Counted by raw (status, wait reason), named once at the end.
    let mut raw: std::collections::HashMap<(u64, u64, u32, u8), u64> =
        std::collections::HashMap::new();
    let mut unreadable = 0;
    for chunk in gs.chunks(IOV_MAX) {
        let mut buf = vec![0u8; span * chunk.len()];
        let mut parts: Vec<(u64, &mut [u8])> = chunk
            .iter()
            .zip(buf.chunks_exact_mut(span))
            .map(|(g, b)| (g + lo, b))
            .collect();
        if read_exact(pid, &mut parts).is_err() {
            // One bad g fails the batch: read them one by one.
            for (g, b) in parts.iter_mut() {
                if read_exact(pid, &mut [(*g, &mut **b)]).is_err() {
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
    Ok(Census {
        groups: groups.into_values().collect(),
        allglen: len,
        unreadable,
    })
}

/// Reads every (address, buffer) pair of process `pid` in one
/// process_vm_readv; an error unless all bytes came.
pub(super) fn read_exact(pid: u32, parts: &mut [(u64, &mut [u8])]) -> std::io::Result<()> {
    let want: usize = parts.iter().map(|(_, b)| b.len()).sum();
    let local: Vec<libc::iovec> = parts
        .iter_mut()
        .map(|(_, b)| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let remote: Vec<libc::iovec> = parts
        .iter()
        .map(|(a, b)| libc::iovec {
            iov_base: *a as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: the local iovecs point into live buffers of their lengths;
    // the remote ones are only read by the kernel, in the other process.
    let n = unsafe {
        libc::process_vm_readv(
            pid as libc::pid_t,
            local.as_ptr(),
            local.len() as libc::c_ulong,
            remote.as_ptr(),
            remote.len() as libc::c_ulong,
            0,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != want {
        return Err(std::io::Error::other("short read"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = read(std::process::id(), 0, &l).unwrap();
        assert_eq!(c.allglen, 3);
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.groups[0].count, 2);
        assert_eq!(c.groups[0].states.get("IO wait"), Some(&2));
    }
}
