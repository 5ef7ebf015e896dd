//! The wire: every type that leaves the tracer (the JSON Lines stream, the
//! final report, alerts) or comes back in (`tracer report`), and the encoding
//! that keeps the stream small.
//!
//! The stream (schema version [`SCHEMA_VERSION`], `schema/events.schema.json`)
//! writes a site's frames once, in a `site` event, when the site first appears
//! or its description changes (symbolization improved). A `snapshot` event then
//! carries only numbers, for the sites that changed since the previous
//! snapshot, plus the totals every time. The final `report` is
//! self-contained. [`Rebuilder`] turns a recorded stream back into whole
//! snapshots.
//!
//! This module sits at the bottom: it imports nothing else of the crate.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::SystemTime,
};

use serde::{Deserialize, Serialize, Serializer};
use tracer_common::{COUNTERS, CounterClass};

/// Version of the event stream, in the `attached` event. 2: `site` events
/// and snapshots of changed sites only (1 repeated every site with its frames
/// in every snapshot).
pub const SCHEMA_VERSION: u32 = 2;

/// What a site holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// Heap blocks: the malloc family, or Go's sampled heap.
    Heap,
    /// Mappings from mmap/mremap.
    Mmap,
    /// Live goroutines by creation site.
    Goroutine,
    /// Pending Go timers by creation stack.
    Timer,
}

impl SiteKind {
    /// Every kind, in the order the table shows them.
    pub const ALL: [SiteKind; 4] = [Self::Heap, Self::Mmap, Self::Goroutine, Self::Timer];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Heap => "heap",
            Self::Mmap => "mmap",
            Self::Goroutine => "goroutine",
            Self::Timer => "timer",
        }
    }
}

impl From<tracer_common::Kind> for SiteKind {
    fn from(k: tracer_common::Kind) -> Self {
        use tracer_common::Kind;
        match k {
            Kind::Heap | Kind::GoHeap => Self::Heap,
            Kind::Mmap => Self::Mmap,
            Kind::Goroutine => Self::Goroutine,
            Kind::Timer => Self::Timer,
        }
    }
}

impl std::fmt::Display for SiteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// Function name (demangled), or `[unknown]`.
    pub function: String,
    /// Source file, when debug information has it.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Object file the address belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The recorded address (a return address, except in the innermost frame
    /// of entry-probe stacks).
    pub addr: u64,
    /// This frame was inlined into the next (outer) one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
}

impl Frame {
    pub fn unknown(addr: u64, module: Option<String>) -> Self {
        Self {
            function: "[unknown]".into(),
            file: None,
            line: None,
            module,
            addr,
            inlined: false,
        }
    }

    /// `function (file:line)`, with the file's base name only.
    pub fn short(&self) -> String {
        match (&self.file, self.line) {
            (Some(f), Some(l)) => {
                let base = f.rsplit('/').next().unwrap_or(f);
                format!("{} ({base}:{l})", self.function)
            }
            _ => match &self.module {
                Some(m) if self.function == "[unknown]" => {
                    format!("[unknown] ({})", m.rsplit('/').next().unwrap_or(m))
                }
                _ => self.function.clone(),
            },
        }
    }
}

/// A symbolized stack, innermost frame first. Shared: a site's frames are
/// symbolized once and the same stack appears in every snapshot.
pub type Frames = Arc<[Frame]>;

/// One call site in a snapshot: what it is ([`SiteInfo`]) and what it holds
/// ([`SiteNumbers`]), as the final report and alerts carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    /// Stable short id of the site (hash of kind and frames).
    pub site_id: String,
    pub kind: SiteKind,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub alloc_bytes: u64,
    /// Growth of outstanding bytes over the trend window, bytes per second.
    pub growth_bytes_per_s: f64,
    /// Growth of the outstanding count over the trend window, per second
    /// (goroutines and timers grow in count).
    pub growth_count_per_s: f64,
    /// The most the site held at once since attach (as read at snapshots),
    /// and when: the evidence a program's own teardown frees.
    #[serde(default)]
    pub peak: Peak,
    /// Goroutine sites read from the runtime's list: live goroutines by
    /// state ("chan receive", "running"...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub states: BTreeMap<String, u64>,
    /// For goroutine sites: the goroutine's start function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_function: Option<Frame>,
    /// Figures are estimates scaled up from samples (Go's heap profile,
    /// `--sample-bytes`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    /// The recorded stack lacks its outer frames (see README).
    pub truncated: bool,
    /// Innermost first.
    pub frames: Frames,
    /// Where sites of several processes are ranked together (a cgroup's
    /// alert): the process holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessRef>,
}

/// A process, as a cgroup's sites and totals name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub comm: String,
}

/// A cgroup's processes and what they hold, each interval under `--cgroup`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CgroupTotals {
    /// The cgroup's directory.
    pub cgroup: String,
    /// Outstanding bytes of every process traced in it.
    pub total_outstanding_bytes: u64,
    pub processes: Vec<ProcessTotal>,
    /// The cgroup's memory against its limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
}

/// One process of a cgroup: its outstanding bytes as last read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessTotal {
    pub pid: u32,
    pub comm: String,
    pub total_outstanding_bytes: u64,
    /// No longer traced: exited or left the cgroup (its last numbers).
    pub ended: bool,
}

/// What a site is: written once per site in the stream (`site` event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub pid: u32,
    pub site_id: String,
    pub kind: SiteKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_function: Option<Frame>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    pub truncated: bool,
    /// Innermost first.
    pub frames: Frames,
}

/// What a site holds at one instant: the per-site part of a `snapshot` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteNumbers {
    pub site_id: String,
    #[serde(default)]
    pub peak: Peak,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub alloc_bytes: u64,
    pub growth_bytes_per_s: f64,
    pub growth_count_per_s: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub states: BTreeMap<String, u64>,
}

/// A site's peak since attach: its outstanding bytes (count for goroutine
/// and timer sites) at their highest, and when (RFC 3339).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub bytes: u64,
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl SiteReport {
    /// The frame to name as the culprit: the program's own code nearest the
    /// allocation, past the allocator, its wrappers and standard-library
    /// frames. A site without frames (Go timers no creation stack was
    /// sampled for yet) is named by what it runs.
    pub fn culprit(&self) -> Option<&Frame> {
        self.frames
            .iter()
            .find(|f| is_user_frame(&f.function) && !is_allocator_frame(f))
            .or_else(|| self.frames.iter().find(|f| !is_allocator_frame(f)))
            .or(self.frames.first())
            .or(self.start_function.as_ref())
    }

    /// The frames from the first one outside the allocator and its wrappers
    /// (all of them when every frame is the allocator's).
    pub fn past_allocator(&self) -> &[Frame] {
        let skip = self
            .frames
            .iter()
            .take_while(|f| is_allocator_frame(f))
            .count();
        if skip < self.frames.len() {
            &self.frames[skip..]
        } else {
            &self.frames
        }
    }

    pub fn info(&self, pid: u32) -> SiteInfo {
        SiteInfo {
            pid,
            site_id: self.site_id.clone(),
            kind: self.kind,
            start_function: self.start_function.clone(),
            sampled: self.sampled,
            truncated: self.truncated,
            frames: self.frames.clone(),
        }
    }

    pub fn numbers(&self) -> SiteNumbers {
        SiteNumbers {
            site_id: self.site_id.clone(),
            outstanding_bytes: self.outstanding_bytes,
            outstanding_count: self.outstanding_count,
            allocs: self.allocs,
            frees: self.frees,
            alloc_bytes: self.alloc_bytes,
            growth_bytes_per_s: self.growth_bytes_per_s,
            growth_count_per_s: self.growth_count_per_s,
            peak: self.peak.clone(),
            states: self.states.clone(),
        }
    }

    pub fn from_parts(info: &SiteInfo, n: &SiteNumbers) -> Self {
        Self {
            site_id: n.site_id.clone(),
            kind: info.kind,
            outstanding_bytes: n.outstanding_bytes,
            outstanding_count: n.outstanding_count,
            allocs: n.allocs,
            frees: n.frees,
            alloc_bytes: n.alloc_bytes,
            growth_bytes_per_s: n.growth_bytes_per_s,
            growth_count_per_s: n.growth_count_per_s,
            peak: n.peak.clone(),
            states: n.states.clone(),
            start_function: info.start_function.clone(),
            sampled: info.sampled,
            truncated: info.truncated,
            frames: info.frames.clone(),
            process: None,
        }
    }

    /// The order of a snapshot's sites: most outstanding bytes first.
    pub fn rank(a: &Self, b: &Self) -> std::cmp::Ordering {
        b.outstanding_bytes
            .cmp(&a.outstanding_bytes)
            .then(b.allocs.cmp(&a.allocs))
            .then(a.site_id.cmp(&b.site_id))
    }
}

/// Whether a function is the program's own rather than its language's
/// library: C functions, Go's `main` package, and Go packages under a domain
/// (`github.com/...`), not Go's standard library (`time`, `context`, ...).
pub fn is_user_frame(function: &str) -> bool {
    if function.starts_with('[') {
        return false;
    }
    // Go names are "import/path.Func": the package path ends at the first dot
    // after its last slash.
    let path_end = function.rfind('/').map_or(0, |i| i + 1);
    let Some(dot) = function[path_end..].find('.') else {
        return true; // C
    };
    let pkg = &function[..path_end + dot];
    let first = pkg.split('/').next().unwrap_or(pkg);
    pkg == "main" || first.contains('.')
}

/// Whether a frame belongs to the allocator or one of the wrappers programs
/// put around it (Python's `PyMem_*`/`_PyObject_Malloc`, Redis's `zmalloc*`,
/// GLib's `g_malloc`, C++'s `operator new`, Rust's `__rust_alloc`…): such a
/// frame is where memory is allocated, never who asked for it.
pub fn is_allocator_frame(f: &Frame) -> bool {
    const PREFIXES: &[&str] = &[
        // The C library's allocator and its internals.
        "__libc_malloc",
        "__libc_calloc",
        "__libc_realloc",
        "__libc_memalign",
        "_int_",
        "sysmalloc",
        "tcache_",
        // jemalloc built into a program (tcmalloc and mimalloc are told by
        // their library, below).
        "je_",
        // CPython.
        "PyMem_",
        "_PyMem_",
        "PyObject_Malloc",
        "PyObject_Calloc",
        "PyObject_Realloc",
        "_PyObject_Malloc",
        "_PyObject_Calloc",
        "_PyObject_Realloc",
        "pymalloc_",
        // Redis and friends.
        "zmalloc",
        "zcalloc",
        "zrealloc",
        "ztrymalloc",
        "ztrycalloc",
        "ztryrealloc",
        // GLib.
        "g_malloc",
        "g_try_malloc",
        "g_realloc",
        "g_try_realloc",
        "g_slice_alloc",
        // C++ and Rust.
        "operator new",
        "__rust_alloc",
        "__rust_realloc",
        "__rdl_alloc",
        "__rdl_realloc",
        "alloc::alloc::",
        "<alloc::alloc::Global",
    ];
    const EXACT: &[&str] = &[
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "pvalloc",
        "mmap",
        "mmap64",
        "mremap",
        "xmalloc",
        "xcalloc",
        "xrealloc",
        "xstrdup",
    ];
    let name = f.function.as_str();
    if EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    // Any frame inside an allocator library.
    f.module.as_deref().is_some_and(|m| {
        let base = m.rsplit('/').next().unwrap_or(m);
        [
            "libc.so",
            "libc-",
            "libjemalloc",
            "libtcmalloc",
            "libmimalloc",
        ]
        .iter()
        .any(|lib| base.starts_with(lib))
    })
}

/// Kernel counters by name (see `tracer_common::COUNTERS`), for one class.
pub type Counts = BTreeMap<String, u64>;

/// Name of the lost entry counted by the collector, not the kernel: sites
/// whose stack is truncated.
pub const TRUNCATED_STACKS: &str = "truncated_stacks";

/// Everything the kernel side could not account, shown to the user: every
/// counter of class `Lost`, plus [`TRUNCATED_STACKS`]. All zero means the
/// totals are exact.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Lost(pub Counts);

impl Lost {
    /// From the kernel's counter values (indexed by `Counter`) and the
    /// number of truncated sites.
    pub fn from_counters(values: &[u64], truncated_stacks: u64) -> Self {
        let mut m = of_class(values, CounterClass::Lost);
        m.insert(TRUNCATED_STACKS.into(), truncated_stacks);
        Self(m)
    }

    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Each loss with what it means and what to do, in the table's order
    /// (the counters' table, then truncation).
    pub fn described(&self) -> impl Iterator<Item = (&'static str, u64, &'static str)> + '_ {
        COUNTERS
            .iter()
            .filter(|c| c.class == CounterClass::Lost)
            .map(|c| (c.name, self.get(c.name), c.what))
            .chain(std::iter::once((
                TRUNCATED_STACKS,
                self.get(TRUNCATED_STACKS),
                "sites with truncated stacks",
            )))
    }
}

/// Informational counters: every counter of class `Activity`, and the fill
/// of the kernel maps.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Activity {
    #[serde(flatten)]
    pub counts: Counts,
    /// Fill of the address map, 0..1.
    #[serde(default)]
    pub addr_map_fill: f64,
    /// Fill of the site map, 0..1.
    #[serde(default)]
    pub site_map_fill: f64,
}

impl Activity {
    pub fn from_counters(values: &[u64], addr_map_fill: f64, site_map_fill: f64) -> Self {
        Self {
            counts: of_class(values, CounterClass::Activity),
            addr_map_fill,
            site_map_fill,
        }
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

fn of_class(values: &[u64], class: CounterClass) -> Counts {
    COUNTERS
        .iter()
        .filter(|c| c.class == class)
        .map(|c| {
            let v = values.get(c.counter as usize).copied().unwrap_or(0);
            (c.name.to_string(), v)
        })
        .collect()
}

/// The state of the target at one instant, whole (as the sinks see it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the maps were read (the JSON envelope's `ts`).
    #[serde(skip, default = "SystemTime::now")]
    pub ts: SystemTime,
    pub pid: u32,
    /// Sorted by outstanding bytes, descending ([`SiteReport::rank`]).
    pub sites: Vec<SiteReport>,
    pub lost: Lost,
    pub activity: Activity,
    pub total_outstanding_bytes: u64,
    /// The target's memory against its limit (set by the session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
    /// The executable mappings of the modules the sites' frames are in (for
    /// pprof's mapping table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<ModuleMapping>,
    /// What the probes cost the target (see [`crate::overhead`]); absent
    /// until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overhead: Option<Overhead>,
    /// The images the process exec'd away from since attach, oldest first,
    /// each with what it held at the exec (the final report only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_images: Vec<PreviousImage>,
}

/// What the probes cost the target over the last seconds (at most ten).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overhead {
    /// Probed calls per second (allocations, frees, Go runtime events).
    pub calls_per_s: f64,
    /// Probe hits per second: entries and returns.
    pub hits_per_s: f64,
    /// Cost per call, traps and programs, ns.
    pub ns_per_call: f64,
    /// eBPF program time per hit, ns (the kernel's run-time statistics).
    pub bpf_ns_per_hit: f64,
    /// A trap on an instruction the kernel emulates, calibrated on this
    /// machine at start, ns.
    pub trap_ns: f64,
    /// A trap on an instruction it single-steps, ns.
    pub stepped_trap_ns: f64,
    /// A return probe (its entry hit and its return), ns.
    pub return_trap_ns: f64,
    /// CPU the probes take, in cores.
    pub cores: f64,
    /// CPU the target takes, probes included, in cores.
    pub target_cores: f64,
    /// Share of the target's CPU time spent in probes: about the throughput
    /// a CPU-bound target loses.
    pub share_pct: f64,
    /// Extra CPU the target needs for the same work: share / (1 - share).
    pub added_cpu_pct: f64,
    /// The least `share_pct` sampling could reach: the traps on every
    /// entry and the programs that run whatever the rate (frees, the Go
    /// runtime's events). Sampling leaves out return traps only with uprobe
    /// sessions (Linux 6.13+); without them this is `share_pct`, nearly.
    pub floor_share_pct: f64,
    /// Allocation calls whose return probe ran (kept by sampling), percent.
    pub kept_pct: f64,
    /// Seconds the estimate spans.
    pub window_s: f64,
}

/// An executable the traced process replaced by exec, and its sites as the
/// exec found them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviousImage {
    pub exe: String,
    /// When the tracer saw the exec.
    #[serde(serialize_with = "ser_ts", deserialize_with = "de_ts")]
    pub replaced_at: SystemTime,
    pub total_outstanding_bytes: u64,
    /// Most outstanding bytes first.
    pub sites: Vec<SiteReport>,
}

/// Where a module's code was mapped in the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleMapping {
    /// The path as the target sees it (frames' `module`).
    pub path: String,
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
}

/// A short id that stays the same for a site across runs of the same binary.
pub fn site_id<'f>(kind: SiteKind, frames: impl IntoIterator<Item = &'f Frame>) -> String {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(kind.as_str().as_bytes());
    for f in frames {
        eat(f.function.as_bytes());
        eat(&f.line.unwrap_or(0).to_le_bytes());
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Which memory controller governs the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    CgroupV2,
    CgroupV1,
    System,
}

/// Memory usage and limit at one instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryState {
    pub scope: Scope,
    /// The cgroup directory, for cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Working set: charged memory minus reclaimable page cache.
    pub usage_bytes: u64,
    /// Hard limit (memory.max / limit_in_bytes / MemTotal+SwapTotal).
    pub limit_bytes: Option<u64>,
    /// v2 memory.high (throttling starts there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_bytes: Option<u64>,
    /// v2: times the cgroup went over memory.high and its allocations were
    /// throttled into direct reclaim (memory.events `high`), since the
    /// cgroup was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_events: Option<u64>,
    /// OOM kills counted by the cgroup (memory.events / memory.oom_control).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    /// PSI "some" avg10, where the kernel has PSI live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_some_avg10: Option<f64>,
}

/// Alert severities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Warning,
    Critical,
}

/// The memory status attached to every snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    #[serde(flatten)]
    pub state: MemoryState,
    /// Estimated seconds until the limit at the current trend.
    pub eta_s: Option<f64>,
    /// Robust (Theil–Sen) growth of usage over the window.
    pub growth_bytes_per_s: Option<f64>,
    pub level: Level,
}

/// An alert, as the sinks receive it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Alert {
    pub pid: u32,
    /// `ok` marks the end of an alert (resolved).
    pub severity: Level,
    pub reason: String,
    pub eta_s: Option<f64>,
    pub usage_bytes: u64,
    pub limit_bytes: Option<u64>,
    pub memory: MemoryState,
    /// Top growing call sites over the trend window (none when the
    /// target is not the cause).
    pub top_sites: Vec<SiteReport>,
    /// At system scope: the target's own growth (resident memory), bytes
    /// per second, against which the system's trend is attributed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_growth_bytes_per_s: Option<f64>,
    /// At system scope when the target's own growth explains less than
    /// half of the trend: the processes growing fastest instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub growing_processes: Vec<GrowingProcess>,
    /// Taken from the JSON envelope.
    #[serde(skip, default = "SystemTime::now")]
    pub ts: SystemTime,
}

/// A process whose resident memory grows, over the trend window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrowingProcess {
    pub pid: u32,
    pub comm: String,
    pub rss_bytes: u64,
    pub growth_bytes_per_s: f64,
}

/// The record of the kernel's OOM kill of the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OomKill {
    pub pid: u32,
    /// `oom:mark_victim tracepoint` or `cgroup oom_kill counter`.
    pub detected_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anon_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shmem_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_vm_bytes: Option<u64>,
    /// The last memory status before the kill.
    pub memory: Option<MemoryStatus>,
    /// Who held the memory at the moment of death (the final snapshot's top sites).
    pub top_sites: Vec<SiteReport>,
}

/// A probe that is live in the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProbe {
    pub function: String,
    pub path: String,
    pub offset: u64,
    pub program: String,
}

/// What the user is told once every probe is live.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attached {
    /// [`SCHEMA_VERSION`] of the stream that follows (absent: version 1).
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    pub pid: u32,
    /// For a child the session follows (`--follow-forks`, `run`): the
    /// process it was born of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_pid: Option<u32>,
    pub comm: String,
    pub exe: String,
    /// The Go release that built the target, for Go programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_version: Option<String>,
    pub probes: Vec<AttachedProbe>,
    /// How the target's stacks are walked: present when the kernel walks
    /// them with DWARF unwind tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwind: Option<UnwindInfo>,
    /// The kernel traced on, and the features of it the tracer uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelInfo>,
    /// The URL of the metrics endpoint (`--prometheus`), with the port the
    /// tracer bound: the one to scrape when the port asked for was 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// The running kernel and the optional features the tracer found in it
/// (each missing one has a fallback, told in a notice).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `uname -r`.
    pub release: String,
    /// `uprobe_multi` links (Linux 6.6+): a file's probes attach and detach
    /// as one; else one perf event each, ~0.1 s apiece to detach.
    pub batched_uprobes: bool,
    /// Uprobe sessions (Linux 6.13+): sampled-out calls skip their return
    /// probe. Absent when not sampling (not needed, not tried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uprobe_sessions: Option<bool>,
}

/// The DWARF unwind tables loaded into the kernel for one process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnwindInfo {
    /// Rows of the files the process maps (16 bytes each in the kernel).
    pub rows: u64,
    /// Kernel memory those rows take.
    pub bytes: u64,
    /// Code files walked with their tables.
    pub files: u64,
    /// Code files walked with frame pointers instead (Go, no call-frame
    /// information, or tables that did not fit).
    pub frame_pointer_files: Vec<String>,
}

fn schema_v1() -> u32 {
    1
}

/// Why tracing ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `--duration` elapsed.
    Duration,
    /// Ctrl-C / SIGTERM.
    Interrupted,
    /// The target process exited.
    TargetExited,
    /// The process left the cgroup traced (`--cgroup`).
    LeftCgroup,
    /// `tracer report`: the recording stops without a final report (the
    /// tracer was killed or the stream cut).
    Recorded,
}

impl EndReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Duration => "duration elapsed",
            Self::Interrupted => "interrupted",
            Self::TargetExited => "target exited",
            Self::LeftCgroup => "left the cgroup",
            Self::Recorded => "the recording ends without a final report",
        }
    }
}

/// How the traced process ended, when it did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exit {
    pub pid: u32,
    /// Exit code, when known (we are its parent in `tracer run`).
    pub code: Option<i32>,
    /// Terminating signal, when known.
    pub signal: Option<i32>,
}

/// Something the user must know about what the tracer did or could not do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Notice {
    pub pid: u32,
    pub message: String,
}

/// The per-interval event: numbers of the sites that changed since the
/// previous snapshot, and the totals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDelta {
    pub pid: u32,
    /// Sites whose numbers changed since the previous snapshot (every site
    /// in the first one); the others hold what they last held.
    pub sites: Vec<SiteNumbers>,
    /// Sites gone since the previous snapshot (merged into another after
    /// better symbolization).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// How many sites there are now, changed or not.
    pub site_count: usize,
    pub total_outstanding_bytes: u64,
    pub lost: Lost,
    pub activity: Activity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overhead: Option<Overhead>,
    /// Present when the mappings changed since the previous snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mappings: Option<Vec<ModuleMapping>>,
}

/// The final event: the last snapshot whole, frames included.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub reason: EndReason,
    pub elapsed_s: f64,
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

/// One line of the stream, without its envelope (`type` and `ts`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Attached(Attached),
    Notice(Notice),
    Site(SiteInfo),
    Snapshot(SnapshotDelta),
    Alert(Alert),
    OomKill(OomKill),
    TargetExited(Exit),
    Report(Report),
    Cgroup(CgroupTotals),
}

/// A line of the stream: an event and when it happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(serialize_with = "ser_ts", deserialize_with = "de_ts")]
    pub ts: SystemTime,
    #[serde(flatten)]
    pub event: Event,
    /// `--label` pairs, on every line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// RFC 3339 timestamps with millisecond precision, UTC.
pub fn ser_ts<S: Serializer>(ts: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*ts).to_string())
}

fn de_ts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)
}

/// Turns whole snapshots into the stream's events: `site` events for sites
/// new or changed in description, and a snapshot of changed numbers. A
/// session traces several processes (followed children, a cgroup's): the
/// deltas are per process, as a reader rebuilds them (a forked child's
/// sites have its parent's ids).
#[derive(Default)]
pub struct Encoder {
    processes: HashMap<u32, EncoderState>,
}

/// What the stream said so far about one process.
#[derive(Default)]
struct EncoderState {
    infos: HashMap<String, SiteInfo>,
    numbers: HashMap<String, SiteNumbers>,
    mappings: Vec<ModuleMapping>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The events for `snap`, in order: its new `site` events, then the
    /// `snapshot`.
    pub fn encode(&mut self, snap: &Snapshot) -> Vec<Event> {
        self.processes.entry(snap.pid).or_default().encode(snap)
    }
}

impl EncoderState {
    fn encode(&mut self, snap: &Snapshot) -> Vec<Event> {
        let mut events = Vec::new();
        let mut changed = Vec::new();
        let mut now: HashSet<&str> = HashSet::with_capacity(snap.sites.len());
        for site in &snap.sites {
            now.insert(&site.site_id);
            let info = site.info(snap.pid);
            let info_changed = self.infos.get(&site.site_id) != Some(&info);
            if info_changed {
                self.infos.insert(site.site_id.clone(), info.clone());
                events.push(Event::Site(info));
            }
            let numbers = site.numbers();
            if info_changed || self.numbers.get(&site.site_id) != Some(&numbers) {
                self.numbers.insert(site.site_id.clone(), numbers.clone());
                changed.push(numbers);
            }
        }
        let mut removed: Vec<String> = self
            .numbers
            .keys()
            .filter(|id| !now.contains(id.as_str()))
            .cloned()
            .collect();
        removed.sort();
        for id in &removed {
            self.numbers.remove(id);
            self.infos.remove(id);
        }
        let mappings = (snap.mappings != self.mappings).then(|| {
            self.mappings = snap.mappings.clone();
            snap.mappings.clone()
        });
        events.push(Event::Snapshot(SnapshotDelta {
            pid: snap.pid,
            sites: changed,
            removed,
            site_count: snap.sites.len(),
            total_outstanding_bytes: snap.total_outstanding_bytes,
            lost: snap.lost.clone(),
            activity: snap.activity.clone(),
            memory: snap.memory.clone(),
            overhead: snap.overhead,
            mappings,
        }));
        events
    }
}

/// Why a recorded stream cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("snapshot names site {0}, which no earlier `site` event describes")]
    UnknownSite(String),
}

/// Rebuilds whole snapshots from a stream's `site` and `snapshot` events,
/// per process.
#[derive(Default)]
pub struct Rebuilder {
    processes: HashMap<u32, RebuilderState>,
}

#[derive(Default)]
struct RebuilderState {
    infos: HashMap<String, SiteInfo>,
    numbers: HashMap<String, SiteNumbers>,
    mappings: Vec<ModuleMapping>,
}

impl Rebuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Learns (or updates) a site's description.
    pub fn site(&mut self, info: SiteInfo) {
        self.processes
            .entry(info.pid)
            .or_default()
            .infos
            .insert(info.site_id.clone(), info);
    }

    /// The whole snapshot a `snapshot` event stands for.
    pub fn snapshot(
        &mut self,
        delta: SnapshotDelta,
        ts: SystemTime,
    ) -> Result<Snapshot, RebuildError> {
        self.processes
            .entry(delta.pid)
            .or_default()
            .snapshot(delta, ts)
    }
}

impl RebuilderState {
    fn snapshot(&mut self, delta: SnapshotDelta, ts: SystemTime) -> Result<Snapshot, RebuildError> {
        for id in &delta.removed {
            self.numbers.remove(id);
        }
        for n in delta.sites {
            if !self.infos.contains_key(&n.site_id) {
                return Err(RebuildError::UnknownSite(n.site_id));
            }
            self.numbers.insert(n.site_id.clone(), n);
        }
        if let Some(m) = delta.mappings {
            self.mappings = m;
        }
        let mut sites: Vec<SiteReport> = self
            .numbers
            .values()
            .map(|n| SiteReport::from_parts(&self.infos[&n.site_id], n))
            .collect();
        sites.sort_by(SiteReport::rank);
        Ok(Snapshot {
            ts,
            pid: delta.pid,
            sites,
            lost: delta.lost,
            activity: delta.activity,
            total_outstanding_bytes: delta.total_outstanding_bytes,
            memory: delta.memory,
            overhead: delta.overhead,
            mappings: self.mappings.clone(),
            previous_images: Vec::new(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn frame(function: &str, line: u32) -> Frame {
        Frame {
            function: function.into(),
            file: Some("/src/a.c".into()),
            line: Some(line),
            module: Some("/bin/a".into()),
            addr: 0x1000 + u64::from(line),
            inlined: false,
        }
    }

    fn site(kind: SiteKind, frames: Vec<Frame>, bytes: u64, allocs: u64) -> SiteReport {
        SiteReport {
            site_id: site_id(kind, &frames),
            kind,
            outstanding_bytes: bytes,
            outstanding_count: bytes / 10,
            allocs,
            frees: allocs - bytes / 10,
            alloc_bytes: allocs * 10,
            growth_bytes_per_s: 0.0,
            growth_count_per_s: 0.0,
            peak: Default::default(),
            states: BTreeMap::new(),
            start_function: None,
            sampled: false,
            truncated: false,
            frames: frames.into(),
            process: None,
        }
    }

    fn snapshot(secs: u64, sites: Vec<SiteReport>) -> Snapshot {
        let mut sites = sites;
        sites.sort_by(SiteReport::rank);
        Snapshot {
            ts: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            pid: 7,
            total_outstanding_bytes: sites.iter().map(|s| s.outstanding_bytes).sum(),
            sites,
            lost: Lost::from_counters(&[0; 32], 0),
            activity: Activity::from_counters(&[5; 32], 0.5, 0.25),
            memory: None,
            mappings: vec![ModuleMapping {
                path: "/bin/a".into(),
                start: 0x1000,
                end: 0x2000,
                offset: 0,
            }],
            overhead: None,
            previous_images: Vec::new(),
        }
    }

    fn through_the_wire(events: Vec<Event>, ts: SystemTime) -> Vec<Envelope> {
        events
            .into_iter()
            .map(|event| {
                let line = serde_json::to_string(&Envelope {
                    ts,
                    event,
                    labels: Default::default(),
                })
                .unwrap();
                serde_json::from_str(&line).unwrap()
            })
            .collect()
    }

    /// The stream's encoding loses nothing: a rebuilt snapshot equals the
    /// whole one, while unchanged sites are not written again.
    #[test]
    fn snapshots_rebuild_exactly_and_unchanged_sites_are_not_repeated() {
        let leak = |b| {
            site(
                SiteKind::Heap,
                vec![frame("leak", 3), frame("main", 9)],
                b,
                b / 10,
            )
        };
        let churn = site(SiteKind::Heap, vec![frame("churn", 5)], 0, 40);
        let mut late = site(SiteKind::Goroutine, vec![frame("main.go", 2)], 0, 3);
        late.start_function = Some(frame("main.worker", 20));
        let snaps = vec![
            snapshot(1, vec![leak(100), churn.clone()]),
            snapshot(2, vec![leak(200), churn.clone()]),
            snapshot(3, vec![leak(200), churn.clone(), late.clone()]),
            snapshot(4, vec![leak(200), churn.clone(), late.clone()]),
            snapshot(5, vec![leak(200), late.clone()]),
        ];
        let mut enc = Encoder::new();
        let mut dec = Rebuilder::new();
        let mut written = Vec::new();
        for snap in &snaps {
            let mut rebuilt = None;
            for env in through_the_wire(enc.encode(snap), snap.ts) {
                match env.event {
                    Event::Site(info) => {
                        written.push(format!("site {}", info.frames[0].function));
                        dec.site(info)
                    }
                    Event::Snapshot(delta) => {
                        written.push(format!("numbers {}", delta.sites.len()));
                        rebuilt = Some(dec.snapshot(delta, env.ts).unwrap());
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(rebuilt.as_ref(), Some(snap));
        }
        assert_eq!(
            written,
            [
                "site leak",
                "site churn",
                "numbers 2",
                "numbers 1",
                "site main.go",
                "numbers 1",
                "numbers 0",
                "numbers 0",
            ]
        );
    }

    #[test]
    fn a_site_is_described_again_when_its_frames_improve() {
        let mut s = site(SiteKind::Heap, vec![frame("leak", 3)], 10, 1);
        let mut enc = Encoder::new();
        assert_eq!(enc.encode(&snapshot(1, vec![s.clone()])).len(), 2);
        let mut better = s.frames.to_vec();
        better[0].file = Some("/src/better.c".into());
        s.frames = better.into();
        let events = enc.encode(&snapshot(2, vec![s.clone()]));
        assert!(matches!(&events[0], Event::Site(i) if i.frames == s.frames));
    }

    #[test]
    fn numbers_of_an_undescribed_site_are_refused() {
        let s = site(SiteKind::Heap, vec![frame("leak", 3)], 10, 1);
        let mut events = Encoder::new().encode(&snapshot(1, vec![s]));
        let Some(Event::Snapshot(delta)) = events.pop() else {
            panic!("the last event is the snapshot")
        };
        assert!(matches!(
            Rebuilder::new().snapshot(delta, SystemTime::UNIX_EPOCH),
            Err(RebuildError::UnknownSite(_))
        ));
    }

    #[test]
    fn counters_split_into_lost_and_activity_by_the_table() {
        let mut values = [0u64; tracer_common::COUNTER_COUNT as usize];
        values[tracer_common::Counter::AddrMapFull as usize] = 3;
        values[tracer_common::Counter::AllocCalls as usize] = 9;
        let lost = Lost::from_counters(&values, 2);
        assert_eq!(lost.get("addr_map_full"), 3);
        assert_eq!(lost.get(TRUNCATED_STACKS), 2);
        assert!(!lost.0.contains_key("alloc_calls"));
        let act = Activity::from_counters(&values, 0.1, 0.2);
        assert_eq!(act.get("alloc_calls"), 9);
        assert!(!act.counts.contains_key("addr_map_full"));
        let v = serde_json::to_value(&act).unwrap();
        assert_eq!(v["alloc_calls"], 9);
        assert_eq!(v["addr_map_fill"], 0.1);
        assert_eq!(serde_json::from_value::<Activity>(v).unwrap(), act);
    }

    /// The culprit is past the allocator and its wrappers, as users of
    /// Python, Redis, GLib and C++ programs would name it.
    #[test]
    fn culprits_skip_allocator_wrappers() {
        let named = |function: &str, module: &str| Frame {
            function: function.into(),
            file: None,
            line: None,
            module: Some(module.into()),
            addr: 1,
            inlined: false,
        };
        let py = "/usr/bin/python3.11";
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("_PyObject_Malloc", py),
                    ("PyObject_Malloc", py),
                    ("list_resize", py),
                    ("_PyEval_EvalFrameDefault", py),
                ],
                "list_resize",
            ),
            (
                &[
                    ("zmalloc_usable", "/usr/bin/redis-server"),
                    ("ztrymalloc_usable_internal", "/usr/bin/redis-server"),
                    ("createObject", "/usr/bin/redis-server"),
                ],
                "createObject",
            ),
            (
                &[
                    ("malloc", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
                    ("operator new(unsigned long)", "/usr/lib/libstdc++.so.6"),
                    ("Cache::put(int)", "/usr/bin/app"),
                ],
                "Cache::put(int)",
            ),
            (
                &[
                    ("g_malloc0", "/usr/lib/libglib-2.0.so.0"),
                    ("g_slice_alloc0", "/usr/lib/libglib-2.0.so.0"),
                    ("gtk_widget_new", "/usr/lib/libgtk-3.so.0"),
                ],
                "gtk_widget_new",
            ),
            (&[("leak", "/bin/a"), ("main", "/bin/a")], "leak"),
            (&[("malloc", "/lib/libc.so.6")], "malloc"),
        ];
        for (frames, want) in cases {
            let frames: Vec<Frame> = frames.iter().map(|(f, m)| named(f, m)).collect();
            let s = site(SiteKind::Heap, frames, 1, 1);
            assert_eq!(s.culprit().unwrap().function, *want);
            assert_eq!(s.past_allocator()[0].function, *want);
        }
    }

    #[test]
    fn site_ids_are_stable_and_distinct() {
        let a = site_id(SiteKind::Heap, &[frame("leak", 10), frame("main", 3)]);
        assert_eq!(
            a,
            site_id(SiteKind::Heap, &[frame("leak", 10), frame("main", 3)])
        );
        assert_ne!(
            a,
            site_id(SiteKind::Mmap, &[frame("leak", 10), frame("main", 3)])
        );
        assert_ne!(
            a,
            site_id(SiteKind::Heap, &[frame("leak", 11), frame("main", 3)])
        );
        assert_eq!(a.len(), 12);
    }

    /// The schema shipped in `schema/events.schema.json`.
    pub fn validator() -> jsonschema::Validator {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema/events.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        jsonschema::draft202012::new(&schema).expect("the shipped schema is valid")
    }

    pub fn assert_valid(validator: &jsonschema::Validator, line: &str) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{line}\nbreaks the schema: {errors:#?}");
    }

    /// Every kind of event the tracer writes matches the shipped schema, and
    /// the schema refuses what the tracer never writes.
    #[test]
    fn every_event_matches_the_shipped_schema() {
        let v = validator();
        let mut leak = site(
            SiteKind::Heap,
            vec![frame("leak", 3), frame("main", 9)],
            100,
            10,
        );
        let mut inlined = leak.frames.to_vec();
        inlined[0].inlined = true;
        leak.frames = inlined.into();
        let mut g = site(SiteKind::Goroutine, vec![frame("main.main", 2)], 0, 3);
        g.start_function = Some(frame("main.worker", 20));
        g.sampled = true;
        let mut snap = snapshot(1, vec![leak.clone(), g]);
        let state = MemoryState {
            scope: Scope::CgroupV1,
            cgroup: Some("/sys/fs/cgroup/memory/t".into()),
            usage_bytes: 5,
            limit_bytes: Some(10),
            high_bytes: None,
            high_events: None,
            oom_kills: Some(0),
            pressure_some_avg10: None,
        };
        let status = MemoryStatus {
            state: state.clone(),
            eta_s: Some(3.5),
            growth_bytes_per_s: None,
            level: Level::Warning,
        };
        snap.memory = Some(status.clone());
        let mut events = Encoder::new().encode(&snap);
        events.extend([
            Event::Attached(Attached {
                schema_version: SCHEMA_VERSION,
                pid: 7,
                parent_pid: Some(1),
                comm: "a".into(),
                exe: "/bin/a".into(),
                go_version: Some("go1.24.11".into()),
                probes: vec![AttachedProbe {
                    function: "malloc".into(),
                    path: "/lib/libc.so.6".into(),
                    offset: 4,
                    program: "size_arg0".into(),
                }],
                unwind: Some(UnwindInfo {
                    rows: 30_740,
                    bytes: 491_840,
                    files: 3,
                    frame_pointer_files: vec!["/jit".into()],
                }),
                kernel: Some(KernelInfo {
                    release: "6.1.0-57-cloud-amd64".into(),
                    batched_uprobes: false,
                    uprobe_sessions: Some(false),
                }),
                metrics: Some("http://127.0.0.1:9464/metrics".into()),
            }),
            Event::Notice(Notice {
                pid: 7,
                message: "m".into(),
            }),
            Event::Alert(Alert {
                pid: 7,
                severity: Level::Critical,
                reason: "r".into(),
                eta_s: None,
                usage_bytes: 5,
                limit_bytes: None,
                memory: state,
                top_sites: vec![SiteReport {
                    process: Some(ProcessRef {
                        pid: 7,
                        comm: "a".into(),
                    }),
                    ..leak.clone()
                }],
                target_growth_bytes_per_s: Some(1.5),
                growing_processes: vec![GrowingProcess {
                    pid: 8,
                    comm: "hog".into(),
                    rss_bytes: 1 << 30,
                    growth_bytes_per_s: 2e8,
                }],
                ts: SystemTime::UNIX_EPOCH,
            }),
            Event::OomKill(OomKill {
                pid: 7,
                detected_by: "d".into(),
                anon_rss_bytes: Some(1),
                file_rss_bytes: None,
                shmem_rss_bytes: None,
                total_vm_bytes: None,
                memory: Some(status.clone()),
                top_sites: vec![leak],
            }),
            Event::TargetExited(Exit {
                pid: 7,
                code: None,
                signal: Some(9),
            }),
            Event::Cgroup(CgroupTotals {
                cgroup: "/sys/fs/cgroup/memory/app".into(),
                total_outstanding_bytes: 4096,
                processes: vec![ProcessTotal {
                    pid: 7,
                    comm: "a".into(),
                    total_outstanding_bytes: 4096,
                    ended: false,
                }],
                memory: Some(status.clone()),
            }),
            Event::Report(Report {
                reason: EndReason::TargetExited,
                elapsed_s: 1.5,
                snapshot: snap.clone(),
            }),
        ]);
        for event in events {
            let line = serde_json::to_string(&Envelope {
                ts: SystemTime::UNIX_EPOCH,
                event,
                labels: [("cluster".to_string(), "eu1".to_string())].into(),
            })
            .unwrap();
            assert_valid(&v, &line);
        }
        // A version-1 snapshot (whole sites) is not a version-2 one.
        let mut old = serde_json::to_value(&snap).unwrap();
        old["type"] = "snapshot".into();
        old["ts"] = "2026-11-29T00:00:00.000Z".into();
        assert!(!v.is_valid(&old));
    }
}
