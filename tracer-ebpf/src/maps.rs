//! Every map and global of the kernel side. Their ELF names (the statics'
//! identifiers) are the user side's [`tracer_common::maps`] constants; a unit
//! test of `tracer` checks both agree.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
};
use tracer_common::{
    AllocInfo, COUNTER_COUNT, Counter, DEFAULT_MAX_ALLOCS, DEFAULT_MAX_GOROUTINES,
    DEFAULT_MAX_PROCESSES, DEFAULT_MAX_SITES, DEFAULT_MAX_STACKS, DEFAULT_MAX_THREADS, GoOffsets,
    GoSiteKey, OomVictim, PROBE_SLOTS, Pending, ProcKey, SiteKey, SiteStats, StackBuf,
    unwind::{PcKey, ProcMappings, UnwindRow},
};

use crate::counters::count;

/// Entries allocated as they are inserted, not all at load: see
/// [`ALLOCS`].
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// The traced processes: tgid → [`tracer_common::target`] bits. The
/// uprobes are scoped to their processes already; this tells them apart in
/// the shared maps, guards against a probe shared with another consumer on
/// the same inode, and lets the fork tracepoint add children.
#[map]
pub(crate) static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, NO_PREALLOC);

/// Wakes the collector when a target forks a process it follows or execs
/// (a tgid each): the new image runs unprobed until it is hooked. A full
/// buffer loses only the wakeup (the collector also polls [`TARGETS`]).
#[map]
pub(crate) static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 4096, 0);

/// Page size of the target, for rounding mapping lengths. Set before load.
#[unsafe(no_mangle)]
pub(crate) static PAGE_SIZE: u64 = 4096;

/// Struct offsets of each traced Go process's runtime, by tgid.
#[map]
pub(crate) static GO_RUNTIMES: HashMap<u32, GoOffsets> =
    HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, NO_PREALLOC);

/// Sampling rate in bytes (`--sample-bytes`); 0 traces every allocation.
/// Set before attach; `--max-overhead` raises it while tracing (each kept
/// block stores its weight, so its free subtracts what its allocation added).
#[map]
pub(crate) static SAMPLE_RATE: Array<u64> = Array::with_max_entries(1, 0);

/// Each entry probe's hits, by the slot in its cookie (the overhead
/// estimate prices each hit by the instruction its probe sits on).
#[map]
pub(crate) static PROBE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_SLOTS, 0);

/// Pending timers created since attach: *runtime.timer → creation stack id.
#[map]
pub(crate) static GO_TIMERS: HashMap<ProcKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_GOROUTINES, NO_PREALLOC);

/// Live goroutines created since attach: goid → creation site. Keyed by goid:
/// g structs are reused, goids are not.
#[map]
pub(crate) static GO_GOROUTINES: HashMap<ProcKey, GoSiteKey> =
    HashMap::with_max_entries(DEFAULT_MAX_GOROUTINES, NO_PREALLOC);

/// Goroutines per creation site: outstanding_count = alive, allocs = created,
/// frees = exited.
#[map]
pub(crate) static GO_SITES: HashMap<GoSiteKey, SiteStats> =
    HashMap::with_max_entries(DEFAULT_MAX_SITES, NO_PREALLOC);

/// The Go runtime's memory-profile buckets seen since attach: allocs and
/// frees of sampled objects. The bucket (never freed by the runtime) holds the
/// allocation stack and the object size, read by the collector.
#[map]
pub(crate) static GO_BUCKETS: HashMap<ProcKey, SiteStats> =
    HashMap::with_max_entries(DEFAULT_MAX_SITES, NO_PREALLOC);

/// Allocator calls in flight, per thread. LRU: entries whose return is not
/// probed (OP_NO_RETURN) are never removed, and threads that exit leave theirs
/// behind; the least recently used go first, never a call in flight unless
/// more threads than the map holds are inside the allocator at once.
#[map]
pub(crate) static PENDING: LruHashMap<u64, Pending> =
    LruHashMap::with_max_entries(DEFAULT_MAX_THREADS, 0);

#[map]
pub(crate) static ALLOCS: HashMap<ProcKey, AllocInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_ALLOCS, NO_PREALLOC);

#[map]
pub(crate) static SITES: HashMap<SiteKey, SiteStats> =
    HashMap::with_max_entries(DEFAULT_MAX_SITES, NO_PREALLOC);

#[map]
pub(crate) static STACKS: StackTrace = StackTrace::with_max_entries(DEFAULT_MAX_STACKS, 0);

// The kernel's stack table refuses a stack whose hash lands in a bucket
// another stack holds (with S stacks in N buckets, about S - N(1 - e^-S/N)
// of them). Those go to the tracer's own table, keyed by 30 bits of a 64-bit
// hash of the whole stack (compared in full on every hit).

/// Scratch for one stack, per CPU (too large for the BPF stack).
#[map]
pub(crate) static STACK_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

/// Every stack the DWARF unwinder walks, and the kernel table's hash
/// collisions. Preallocated (1 KiB per entry, like the kernel's own stack
/// table): a non-preallocated map allocates each entry from per-CPU caches
/// refilled asynchronously, and a burst of new stacks (thousands of call
/// sites in a second) then failed a few inserts with ENOMEM.
#[map]
pub(crate) static OWN_STACKS: HashMap<u32, StackBuf> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Every object's unwind table; sized by the collector before load.
#[map]
pub(crate) static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, 0);

/// Processes walked by the DWARF unwinder, and their executable mappings.
/// Not preallocated (8 KiB an entry): only the collector inserts.
#[map]
pub(crate) static UNWIND_MAPPINGS: HashMap<u32, ProcMappings> =
    HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The rule found for a pc, so hot allocation sites skip the searches.
#[map]
pub(crate) static UNWIND_CACHE: LruHashMap<PcKey, UnwindRow> = LruHashMap::with_max_entries(16384, 0);

/// A walk's state between steps, per CPU (see [`crate::unwind::Walk`]).
#[map]
pub(crate) static UNWIND_WALK: PerCpuArray<crate::unwind::Walk> = PerCpuArray::with_max_entries(1, 0);

/// A search's state between steps, per CPU.
#[map]
pub(crate) static UNWIND_BISECT: PerCpuArray<crate::unwind::Bisect> =
    PerCpuArray::with_max_entries(1, 0);

/// Targets the OOM killer chose, by tgid.
#[map]
pub(crate) static OOM_VICTIM: HashMap<u32, OomVictim> =
    HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, NO_PREALLOC);

/// Targets' exit statuses (wait(2)'s form), by tgid.
#[map]
pub(crate) static EXIT_STATUS: HashMap<u32, u64> =
    HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, NO_PREALLOC);

/// Offset of `exit_code` in `task_struct`, from the kernel's BTF; 0:
/// unknown. Set before load.
#[unsafe(no_mangle)]
pub(crate) static TASK_EXIT_CODE: u32 = 0;

/// True when the event comes from a traced process.
#[inline(always)]
pub(crate) fn is_target(pid_tgid: u64) -> bool {
    if is_traced((pid_tgid >> 32) as u32) {
        return true;
    }
    count(Counter::OtherProcess);
    false
}

/// Whether process `tgid` is a target.
#[inline(always)]
pub(crate) fn is_traced(tgid: u32) -> bool {
    unsafe { TARGETS.get(&tgid) }.is_some()
}

#[inline(always)]
pub(crate) fn sample_bytes() -> u64 {
    SAMPLE_RATE.get(0).copied().unwrap_or(0)
}

/// The runtime offsets of Go process `tgid`; None (counted) if the
/// collector has not set them.
#[inline(always)]
pub(crate) fn go_offsets(tgid: u32) -> Option<GoOffsets> {
    let o = unsafe { GO_RUNTIMES.get(&tgid) }.copied();
    if o.is_none() {
        count(Counter::GoReadErrors);
    }
    o
}
