//! Go binaries: detection, runtime version, struct offsets, and where to put
//! probes in runtime functions.
//!
//! Rules (see shared knowledge in the README): never a uretprobe in Go code —
//! return values are read by plain uprobes on every RET instruction, found by
//! decoding the function; "entry" probes go on the first `push rbp` after the
//! stack-growth prologue, which runs once per call (the prologue re-runs after
//! morestack) while the argument registers are still intact.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};
use tracer_common::GoOffsets;

/// A Go release, from `.go.buildinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// As written by the linker, e.g. `go1.22.10` or `go1.23.4 X:nocoverageredesign`.
    pub raw: String,
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Parses `go1.22.10`, `go1.23`, `go1.24rc1`, `go1.26.6 X:foo`.
pub fn parse_version(raw: &str) -> Option<GoVersion> {
    let v = raw.split_whitespace().next()?.strip_prefix("go")?;
    let mut nums = v.split(|c: char| !c.is_ascii_digit());
    let major = nums.next()?.parse().ok()?;
    let minor = nums.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let patch = nums.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    Some(GoVersion {
        major,
        minor,
        patch,
        raw: raw.to_string(),
    })
}

/// The Go version of a Go binary: from `.go.buildinfo` (Go 1.18+, inline
/// strings), or, for a binary whose build info was removed, from the
/// `runtime.buildVersion` string of one that has a `.gopclntab`.
pub fn go_version(file: &object::File) -> Option<GoVersion> {
    if let Some((version, _)) = build_info(file) {
        return parse_version(&version);
    }
    file.section_by_name(".gopclntab")?;
    let mut found = std::collections::BTreeSet::new();
    for section in file.sections() {
        if section
            .name()
            .is_ok_and(|n| n == ".rodata" || n == ".noptrdata")
            && let Ok(data) = section.data()
        {
            found.extend(version_tokens(data));
        }
    }
    // Only an unambiguous answer: every token agrees.
    (found.len() == 1).then(|| parse_version(found.first()?))?
}

/// `go1.N` / `go1.N.M` tokens standing alone in `data`.
fn version_tokens(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = data[i..].windows(4).position(|w| w == b"go1.") {
        let start = i + at;
        let mut end = start + 4;
        while end < data.len() && (data[end].is_ascii_digit() || data[end] == b'.') {
            end += 1;
        }
        let standalone_before = start == 0 || !data[start - 1].is_ascii_alphanumeric();
        let standalone_after = end == data.len() || !data[end].is_ascii_alphanumeric();
        let token = String::from_utf8_lossy(&data[start..end])
            .trim_end_matches('.')
            .to_string();
        if standalone_before && standalone_after && token.len() > 4 {
            out.push(token);
        }
        i = end.max(start + 1);
    }
    out
}

/// The version and module-info strings of `.go.buildinfo`.
pub fn build_info(file: &object::File) -> Option<(String, String)> {
    let section = file.section_by_name(".go.buildinfo")?;
    let data = section.data().ok()?;
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if data.len() < 32 || &data[..14] != MAGIC || data[15] & 2 == 0 {
        return None;
    }
    let mut at = 32;
    let mut next = || -> Option<String> {
        let (len, n) = read_uvarint(data.get(at..)?)?;
        let s = data.get(at + n..at + n + len as usize)?;
        at += n + len as usize;
        Some(String::from_utf8_lossy(s).into_owned())
    };
    let version = next()?;
    let modinfo = next().unwrap_or_default();
    Some((version, modinfo))
}

/// Whether the binary runs with `asynctimerchan=1` (the pre-1.23 channel
/// timers, held by the runtime until they fire): set by a go.mod older than
/// 1.23 through DefaultGODEBUG, or by a //go:debug directive.
pub fn async_timer_chan(modinfo: &str) -> bool {
    modinfo.lines().any(|l| {
        l.split_once("DefaultGODEBUG=")
            .is_some_and(|(_, v)| v.split(',').any(|kv| kv.trim() == "asynctimerchan=1"))
    })
}

fn read_uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The oldest Go minor release whose runtime layout is known (1.21).
pub const OLDEST_MINOR: u32 = 21;

/// Runtime struct offsets for a Go version, from the table verified on real
/// binaries of each release (1.21–1.27). Returns whether the version is in
/// the table; a newer one gets the newest entry (and the caller warns).
pub fn offsets_for(v: &GoVersion) -> (GoOffsets, bool) {
    let table: &[(u32, u64, u64, u64, u64)] = &[
        // minor, g.goid, g.gopc, g.startpc, timer.period
        (21, 152, 280, 296, 16),
        (22, 152, 280, 296, 16),
        (23, 160, 288, 304, 24),
        (24, 160, 288, 304, 24),
        (25, 152, 280, 296, 32),
        (26, 152, 288, 304, 32),
        (27, 152, 288, 304, 32),
    ];
    let known = v.major == 1 && table.iter().any(|t| t.0 == v.minor);
    let row = table
        .iter()
        .rev()
        .find(|t| v.major > 1 || t.0 <= v.minor)
        .unwrap_or(&table[0]);
    (
        GoOffsets {
            g_goid: row.1,
            g_gopc: row.2,
            g_startpc: row.3,
            timer_period: row.4,
            ..GoOffsets::default()
        },
        known,
    )
}

/// A function of the binary: virtual address, size, and its bytes' file offset.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Looks up a function: in `.symtab` (kept unless built with `-ldflags=-s`),
/// else in `.gopclntab` (always there).
pub fn function(
    file: &object::File,
    pclntab: Option<&crate::gopclntab::Pclntab>,
    name: &str,
) -> Option<Function> {
    let (addr, size) = match file
        .symbols()
        .find(|s| s.kind() == SymbolKind::Text && s.name() == Ok(name))
    {
        Some(sym) => (sym.address(), sym.size()),
        None => {
            let (entry, end) = pclntab?.find_function(name)?;
            (entry, end - entry)
        }
    };
    let file_offset = file.segments().find_map(|seg| {
        let (off, size) = seg.file_range();
        let va = seg.address();
        (va <= addr && addr < va + size).then(|| addr - va + off)
    })?;
    Some(Function {
        name: name.to_string(),
        addr,
        size,
        file_offset,
    })
}

/// Virtual addresses of every RET instruction in `code` (which starts at `addr`).
pub fn ret_sites(code: &[u8], addr: u64) -> Vec<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for ins in &mut dec {
        if ins.is_invalid() {
            break;
        }
        if ins.flow_control() == FlowControl::Return {
            out.push(ins.ip());
        }
    }
    out
}

/// Virtual address of the first `push rbp` in `code`: past the stack-growth
/// check that morestack re-runs. `None` if the function has none early on.
pub fn after_prologue(code: &[u8], addr: u64) -> Option<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    for ins in dec.iter().take(16) {
        if ins.code() == Code::Push_r64 && ins.op0_register() == iced_x86::Register::RBP {
            return Some(ins.ip());
        }
        if ins.is_invalid() || ins.flow_control() == FlowControl::Return {
            return None;
        }
    }
    None
}

/// Targets of the direct CALL instructions in `code` (which starts at `addr`).
pub fn call_targets(code: &[u8], addr: u64) -> Vec<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for ins in dec.iter() {
        if ins.is_invalid() {
            break;
        }
        if ins.flow_control() == FlowControl::Call && ins.is_call_near() {
            out.push(ins.near_branch_target());
        }
        if ins.flow_control() == FlowControl::Return {
            break;
        }
    }
    out
}

/// Whether `name` is the wrapper Go ≥ 1.22 generates for `go f(args)`.
pub fn is_go_wrapper(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .is_some_and(|last| last.starts_with("gowrap"))
}

/// Bytes of a function from the file image.
pub fn code<'d>(data: &'d [u8], f: &Function) -> Option<&'d [u8]> {
    data.get(f.file_offset as usize..(f.file_offset + f.size) as usize)
}

/// Virtual address of a data symbol (e.g. `runtime.MemProfileRate`).
pub fn data_symbol(file: &object::File, name: &str) -> Option<(u64, u64)> {
    file.symbols()
        .find(|s| s.kind() == SymbolKind::Data && s.name() == Ok(name))
        .map(|s| (s.address(), s.size()))
}

/// The runtime's initial `MemProfileRate` (512 KiB), in every release.
const DEFAULT_MEM_PROFILE_RATE: u64 = 512 * 1024;

/// Finds `runtime.MemProfileRate` without a symbol table: the one qword that
/// the `runtime.mallocgc*` functions load RIP-relative and whose initial
/// value in the file is the runtime's default rate.
pub fn find_mem_profile_rate(
    file: &object::File,
    data: &[u8],
    pclntab: &crate::gopclntab::Pclntab,
) -> Option<u64> {
    use iced_x86::{OpKind, Register};
    let initial = |va: u64| -> Option<u64> {
        file.segments().find_map(|seg| {
            let (off, size) = seg.file_range();
            let a = seg.address();
            if va < a || va + 8 > a + size {
                return None;
            }
            let at = (off + va - a) as usize;
            Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
        })
    };
    let mut found = std::collections::BTreeSet::new();
    for (name, entry, end) in pclntab.functions() {
        if !name.starts_with("runtime.mallocgc") {
            continue;
        }
        let Some(f) = function(file, Some(pclntab), &name) else {
            continue;
        };
        let Some(code) = data.get(f.file_offset as usize..(f.file_offset + (end - entry)) as usize)
        else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = parse_version("go1.22.10").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 22, 10));
        let v = parse_version("go1.23.4 X:nocoverageredesign").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 23, 4));
        let v = parse_version("go1.24rc1").unwrap();
        assert_eq!((v.major, v.minor), (1, 24));
        assert!(parse_version("devel").is_none());
    }

    #[test]
    fn version_strings_in_data() {
        let data = b"\x00go1.26.5\x00ergo1.2x\x00\tgo1.21.13\n";
        assert_eq!(version_tokens(data), vec!["go1.26.5", "go1.21.13"]);
        assert!(version_tokens(b"nothing here").is_empty());
    }

    #[test]
    fn offsets_table_and_future_versions() {
        let (o, known) = offsets_for(&parse_version("go1.23.9").unwrap());
        assert!(known);
        assert_eq!((o.g_goid, o.g_gopc, o.g_startpc), (160, 288, 304));
        assert_eq!(o.timer_period, 24);
        let (o, known) = offsets_for(&parse_version("go1.21.13").unwrap());
        assert!(known);
        assert_eq!(o.g_goid, 152);
        let (o, known) = offsets_for(&parse_version("go1.31.0").unwrap());
        assert!(!known, "unknown future version");
        assert_eq!(o, offsets_for(&parse_version("go1.27.3").unwrap()).0);
    }

    #[test]
    fn decodes_rets_and_prologue() {
        // mov rax,[r14+16]; cmp rsp,rax; jbe +x; push rbp; mov rbp,rsp;
        // ... ret; ...; ret
        let code = [
            0x49, 0x3b, 0x66, 0x10, // cmp rsp,[r14+16]
            0x76, 0x08, // jbe +8
            0x55, // push rbp
            0x48, 0x89, 0xe5, // mov rbp,rsp
            0x5d, // pop rbp
            0xc3, // ret
            0x90, // nop
            0x5d, // pop rbp
            0xc3, // ret
        ];
        assert_eq!(after_prologue(&code, 0x1000), Some(0x1006));
        assert_eq!(ret_sites(&code, 0x1000), vec![0x100b, 0x100e]);
        assert_eq!(after_prologue(&[0xc3], 0x1000), None);
    }

    #[test]
    fn finds_call_targets_and_wrappers() {
        // call rel32 (+0x10); call [rax] (indirect, skipped); ret
        let code = [0xe8, 0x0b, 0, 0, 0, 0xff, 0x10, 0xc3];
        assert_eq!(call_targets(&code, 0x1000), vec![0x1010]);
        assert!(is_go_wrapper("main.startConsumers.gowrap1"));
        assert!(!is_go_wrapper("main.startConsumers.func1"));
    }

    #[test]
    fn pprof_scaling() {
        assert_eq!(scale_sample(0, 100, 512), (0.0, 0.0));
        assert_eq!(scale_sample(3, 100, 1), (3.0, 300.0));
        // Objects much larger than the rate are always sampled.
        let (n, b) = scale_sample(10, 1 << 30, 512 * 1024);
        assert!((n - 10.0).abs() < 1e-6 && (b - 10.0 * (1u64 << 30) as f64).abs() < 1.0);
        // size == rate: probability 1 - 1/e.
        let (n, _) = scale_sample(1, 1000, 1000);
        assert!((n - 1.0 / (1.0 - (-1.0f64).exp())).abs() < 1e-9);
    }

    #[test]
    fn async_timer_chan_from_default_godebug() {
        let mi = "path\tleaky\nmod\tleaky\t(devel)\t\nbuild\tDefaultGODEBUG=asynctimerchan=1,gotypesalias=0\n";
        assert!(async_timer_chan(mi));
        assert!(!async_timer_chan("build\tDefaultGODEBUG=gotypesalias=0\n"));
        assert!(!async_timer_chan(""));
    }

    #[test]
    fn uvarints() {
        assert_eq!(read_uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(read_uvarint(&[0x96, 0x01]), Some((150, 2)));
        assert_eq!(read_uvarint(&[0x80]), None);
    }
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
        Self {
            mem,
            rate_addr,
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
        let mut b = self.read_u64(head)?;
        while b != 0 && out.len() < MAX_BUCKETS {
            let hdr = self.read_bytes(b, BUCKET_STK_OFF as usize)?;
            let (allnext, typ, nstk) = (word(&hdr, 1), word(&hdr, 2), word(&hdr, 5));
            if typ == MEM_PROFILE && nstk <= MAX_PROFILE_DEPTH {
                let rec = self.read_bytes(
                    b + BUCKET_STK_OFF + 8 * nstk,
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
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        self.mem.as_ref()?.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_le_bytes(b))
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
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; len];
        self.mem.as_ref()?.read_exact_at(&mut b, addr).ok()?;
        Some(b)
    }

    /// A bucket, read once: the runtime never frees or changes buckets.
    pub fn bucket(&mut self, addr: u64) -> Option<&Bucket> {
        if !self.buckets.contains_key(&addr) {
            let size = self.read_u64(addr + BUCKET_SIZE_OFF)?;
            let nstk = self.read_u64(addr + BUCKET_NSTK_OFF)?.min(MAX_BUCKET_STACK);
            let stack = (0..nstk)
                .map(|i| self.read_u64(addr + BUCKET_STK_OFF + 8 * i))
                .collect::<Option<Vec<u64>>>()?;
            self.buckets.insert(addr, Bucket { size, stack });
        }
        self.buckets.get(&addr)
    }
}

/// Runtime struct offsets read from the binary's DWARF, which is right for
/// any release (the per-version table is the fallback for stripped binaries).
pub fn offsets_from_dwarf(file: &object::File) -> Option<GoOffsets> {
    dwarf_facts(file).map(|f| f.offsets)
}

/// What the binary's DWARF says about the runtime's structures.
#[derive(Clone, Copy, Debug)]
pub struct DwarfFacts {
    pub offsets: GoOffsets,
    /// Size of `runtime.memRecordCycle` (32 bytes up to 1.25, 16 since the
    /// byte counts were dropped), needed to read memory-profile records.
    pub mem_record_cycle: Option<u64>,
}

/// Reads [`DwarfFacts`] in one pass over the DWARF units.
pub fn dwarf_facts(file: &object::File) -> Option<DwarfFacts> {
    use gimli::{AttributeValue, EndianSlice, LittleEndian};
    let sections =
        gimli::DwarfSections::load(|id| -> Result<std::borrow::Cow<[u8]>, gimli::Error> {
            Ok(file
                .section_by_name(id.name())
                .and_then(|s| s.uncompressed_data().ok())
                .unwrap_or_default())
        })
        .ok()?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut fields: std::collections::HashMap<(&str, &str), u64> = std::collections::HashMap::new();
    let wanted: &[(&str, &[&str])] = &[
        ("runtime.g", &["goid", "gopc", "startpc"]),
        ("runtime.timer", &["period"]),
        ("runtime.memRecordCycle", &[]),
    ];
    let mut sizes: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut tree = unit.entries_tree(None).ok()?;
        let root = tree.root().ok()?;
        let mut children = root.children();
        while let Ok(Some(node)) = children.next() {
            let entry = node.entry();
            if entry.tag() != gimli::DW_TAG_structure_type {
                continue;
            }
            let Some(name) = entry
                .attr_value(gimli::DW_AT_name)
                .and_then(|v| dwarf.attr_string(&unit, v).ok())
            else {
                continue;
            };
            let Some((strukt, members)) = wanted.iter().find(|(s, _)| s.as_bytes() == name.slice())
            else {
                continue;
            };
            if let Some(AttributeValue::Udata(size)) = entry.attr_value(gimli::DW_AT_byte_size) {
                sizes.insert(strukt, size);
            }
            let mut members_iter = node.children();
            while let Ok(Some(m)) = members_iter.next() {
                let e = m.entry();
                let Some(mname) = e
                    .attr_value(gimli::DW_AT_name)
                    .and_then(|v| dwarf.attr_string(&unit, v).ok())
                else {
                    continue;
                };
                let Some(field) = members.iter().find(|f| f.as_bytes() == mname.slice()) else {
                    continue;
                };
                if let Some(AttributeValue::Udata(off)) =
                    e.attr_value(gimli::DW_AT_data_member_location)
                {
                    fields.insert((strukt, field), off);
                }
            }
        }
    }
    Some(DwarfFacts {
        offsets: GoOffsets {
            g_goid: *fields.get(&("runtime.g", "goid"))?,
            g_gopc: *fields.get(&("runtime.g", "gopc"))?,
            g_startpc: *fields.get(&("runtime.g", "startpc"))?,
            timer_period: *fields.get(&("runtime.timer", "period"))?,
            ..GoOffsets::default()
        },
        mem_record_cycle: sizes.get("runtime.memRecordCycle").copied(),
    })
}
