//! The target's Go runtime, read from outside through `/proc/PID/mem`: the
//! heap sampling rate and the memory profile's buckets, as
//! `runtime.MemProfile` reads them.

use super::{code::function, memory::TargetMemory};
use crate::object::ElfObject;
use iced_x86::{Code, Decoder, DecoderOptions};

/// The runtime's initial `MemProfileRate` (512 KiB), in every release.
const DEFAULT_MEM_PROFILE_RATE: u64 = 512 * 1024;

/// Finds `runtime.MemProfileRate` without a symbol table: the one qword that
/// the `runtime.mallocgc*` functions load RIP-relative and whose initial
/// value in the file is the runtime's default rate.
pub fn find_mem_profile_rate(elf: &ElfObject, pclntab: &super::pclntab::Pclntab) -> Option<u64> {
    use iced_x86::{OpKind, Register};
    let initial = |va: u64| -> Option<u64> {
        Some(u64::from_le_bytes(
            elf.read_at_vaddr(va, 8)?.try_into().ok()?,
        ))
    };
    let mut found = std::collections::BTreeSet::new();
    for (name, entry, end) in pclntab.functions() {
        if !name.starts_with("runtime.mallocgc") {
            continue;
        }
        let Some(f) = function(elf, Some(pclntab), &name) else {
            continue;
        };
        let Some(code) = elf.read_at_offset(f.file_offset, end - entry) else {
            continue;
        };
        let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
        for ins in dec.iter() {
            if ins.code() == Code::Mov_r64_rm64
                && ins.op1_kind() == OpKind::Memory
                && ins.memory_base() == Register::RIP
            {
                let va = ins.ip_rel_memory_address();
                if initial(va) == Some(DEFAULT_MEM_PROFILE_RATE) {
                    found.insert(va);
                }
            }
        }
    }
    (found.len() == 1).then(|| *found.iter().next().unwrap())
}

/// Heap sample scaling, as pprof does for inuse_space: an object of `size`
/// bytes is sampled with probability 1 - exp(-size/rate).
pub fn scale_sample(count: u64, size: u64, rate: u64) -> (f64, f64) {
    if count == 0 || size == 0 {
        return (0.0, 0.0);
    }
    if rate <= 1 {
        return (count as f64, (count * size) as f64);
    }
    let scale = 1.0 / (1.0 - (-(size as f64) / rate as f64).exp());
    (count as f64 * scale, (count * size) as f64 * scale)
}

/// A sampled-heap bucket of the target's runtime: object size and the
/// allocation stack (return addresses, innermost first).
#[derive(Clone, Debug)]
pub struct Bucket {
    pub size: u64,
    pub stack: Vec<u64>,
}

/// Reads the target's Go runtime state through `/proc/PID/mem`.
pub struct RuntimeMem {
    /// Where reads come from: `/proc/PID/mem`, or a buffer in tests.
    reader: Option<Box<dyn TargetMemory + Send + Sync>>,
    /// `/proc/PID/mem` opened for writing, for `runtime.MemProfileRate`.
    mem: Option<std::fs::File>,
    /// Address of `runtime.MemProfileRate` in the target.
    rate_addr: Option<u64>,
    buckets: std::collections::HashMap<u64, Bucket>,
    /// Address of `runtime.mbuckets` in the target and the record layout.
    profile: Option<(u64, MemProfileLayout)>,
    /// The last complete read of the profile: what the final report shows
    /// once the target has exited and its memory is gone.
    last_profile: Vec<BucketCounts>,
}

// runtime.bucket layout, all versions: next, allnext, typ, hash, size, nstk,
// then nstk PCs, then (memory-profile buckets) the memRecord.
const BUCKET_SIZE_OFF: u64 = 32;
const BUCKET_NSTK_OFF: u64 = 40;
const BUCKET_STK_OFF: u64 = 48;
const MAX_BUCKET_STACK: u64 = 128;
/// `bucketType` of memory-profile buckets (memProfile = 1 + iota).
const MEM_PROFILE: u64 = 1;
/// The runtime's `profstackdepth` limit: a larger nstk is a torn read.
const MAX_PROFILE_DEPTH: u64 = 1024;
/// Buckets walked per read at most: the list only grows, but a torn read
/// must not loop forever.
const MAX_BUCKETS: usize = 1 << 20;

/// Where the target's memory profile lives, to read it as
/// `runtime.MemProfile` does instead of probing the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemProfileLayout {
    /// Virtual address of `runtime.mbuckets` in the executable.
    pub mbuckets: u64,
    /// Size of `runtime.memRecordCycle`; its first two words are the
    /// sampled allocation and free counts.
    pub cycle_size: u64,
}

/// One memory-profile bucket's sampled counts, summed over the published
/// cycle and the three in progress (so allocations show at once and frees
/// as the sweeper records them, as with probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketCounts {
    pub addr: u64,
    pub allocs: u64,
    pub frees: u64,
}

impl RuntimeMem {
    pub fn open(pid: u32, rate_addr: Option<u64>) -> Self {
        let mem = std::fs::File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .or_else(|_| std::fs::File::open(format!("/proc/{pid}/mem")))
            .ok();
        let reader = mem
            .as_ref()
            .and_then(|f| f.try_clone().ok())
            .map(|f| Box::new(f) as Box<dyn TargetMemory + Send + Sync>);
        Self {
            reader,
            mem,
            rate_addr,
            buckets: std::collections::HashMap::new(),
            profile: None,
            last_profile: Vec::new(),
        }
    }

    /// Reads the runtime's state from `memory` instead of a process (tests,
    /// fuzzing); nothing is written.
    pub fn over(memory: impl TargetMemory + Send + Sync + 'static) -> Self {
        Self {
            reader: Some(Box::new(memory)),
            mem: None,
            rate_addr: None,
            buckets: std::collections::HashMap::new(),
            profile: None,
            last_profile: Vec::new(),
        }
    }

    /// Reads the memory profile from `mbuckets_addr` (the runtime address of
    /// `runtime.mbuckets`) from now on.
    pub fn set_profile(&mut self, mbuckets_addr: u64, layout: MemProfileLayout) {
        self.profile = Some((mbuckets_addr, layout));
    }

    pub fn has_profile(&self) -> bool {
        self.profile.is_some()
    }

    /// Every memory-profile bucket and its counts, walked from
    /// `runtime.mbuckets` along `allnext` like `runtime.MemProfile`; the last
    /// complete walk when this one fails (the target exited). Reads race with
    /// the runtime, harmlessly: counts only grow, buckets are never freed, a
    /// new bucket is linked in at the head.
    pub fn mem_buckets(&mut self) -> &[BucketCounts] {
        if let Some(walk) = self.walk_buckets() {
            self.last_profile = walk;
        }
        &self.last_profile
    }

    fn walk_buckets(&self) -> Option<Vec<BucketCounts>> {
        let (head, layout) = self.profile?;
        let word = |b: &[u8], i: usize| {
            u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default())
        };
        let mut out = Vec::new();
        // The runtime's list never loops back: one that does is a torn (or
        // forged) read, and ends where it would.
        let mut seen = std::collections::HashSet::new();
        let mut b = self.read_u64(head)?;
        while b != 0 && out.len() < MAX_BUCKETS && seen.insert(b) {
            let hdr = self.read_bytes(b, BUCKET_STK_OFF as usize)?;
            let (allnext, typ, nstk) = (word(&hdr, 1), word(&hdr, 2), word(&hdr, 5));
            if typ == MEM_PROFILE && nstk <= MAX_PROFILE_DEPTH {
                let rec = self.read_bytes(
                    b.wrapping_add(BUCKET_STK_OFF + 8 * nstk),
                    4 * layout.cycle_size as usize,
                )?;
                let cycle = layout.cycle_size as usize / 8;
                let (mut allocs, mut frees) = (0u64, 0u64);
                for c in 0..4 {
                    allocs = allocs.wrapping_add(word(&rec, c * cycle));
                    frees = frees.wrapping_add(word(&rec, c * cycle + 1));
                }
                out.push(BucketCounts {
                    addr: b,
                    allocs,
                    frees,
                });
            }
            b = allnext;
        }
        Some(out)
    }

    pub fn rate_addr(&self) -> Option<u64> {
        self.rate_addr
    }

    pub fn set_rate_addr(&mut self, addr: u64) {
        self.rate_addr = Some(addr);
    }

    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.reader.as_ref()?.read_u64(addr).ok()
    }

    /// The current `runtime.MemProfileRate`, if its address is known.
    pub fn rate(&self) -> Option<u64> {
        self.read_u64(self.rate_addr?)
    }

    /// Writes `runtime.MemProfileRate` in the target.
    pub fn set_rate(&self, rate: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (Some(mem), Some(addr)) = (self.mem.as_ref(), self.rate_addr) else {
            return Err(std::io::Error::other("runtime.MemProfileRate is not known"));
        };
        mem.write_all_at(&rate.to_le_bytes(), addr)
    }

    /// `len` bytes of the target's memory at `addr`.
    pub fn read_bytes(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        self.reader.as_ref()?.read_vec(addr, len).ok()
    }

    /// A bucket, read once: the runtime never frees or changes buckets.
    pub fn bucket(&mut self, addr: u64) -> Option<&Bucket> {
        if !self.buckets.contains_key(&addr) {
            let size = self.read_u64(addr.wrapping_add(BUCKET_SIZE_OFF))?;
            let nstk = self
                .read_u64(addr.wrapping_add(BUCKET_NSTK_OFF))?
                .min(MAX_BUCKET_STACK);
            let stack = self
                .read_bytes(addr.wrapping_add(BUCKET_STK_OFF), 8 * nstk as usize)?
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .collect();
            self.buckets.insert(addr, Bucket { size, stack });
        }
        self.buckets.get(&addr)
    }
}
