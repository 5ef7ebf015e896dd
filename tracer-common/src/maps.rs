//! Names of the kernel side's maps and globals: the ELF symbols the user side
//! sizes, overrides and takes out of the loaded object.
//!
//! The eBPF side's `#[map]` (and `#[no_mangle]` on a global) takes the name
//! from the static's identifier, so each constant here must equal its
//! static's name there; `tracer`'s unit tests check every one against the
//! embedded object, and that the object has no map or global missing here.

// Globals (read-only data), set by the loader before the object reaches the
// kernel.

/// `u64`: the target's page size, for rounding mapping lengths.
pub const PAGE_SIZE: &str = "PAGE_SIZE";
/// `u32`: offset of `exit_code` in the kernel's `task_struct` (from its
/// BTF); 0: unknown, the exit status is not recorded.
pub const TASK_EXIT_CODE: &str = "TASK_EXIT_CODE";

// Maps.

/// Hash map: tgid → [`target`](crate::target) bits. Only the processes
/// here count; the fork tracepoint adds the children of those that follow
/// forks.
pub const TARGETS: &str = "TARGETS";
/// Hash map: tgid → [`GoOffsets`](crate::GoOffsets), the struct offsets of
/// that Go process's runtime.
pub const GO_RUNTIMES: &str = "GO_RUNTIMES";
/// Ring buffer of `u32` tgids: a target forked a followed child or exec'd.
pub const PROC_EVENTS: &str = "PROC_EVENTS";

/// Array of one `u64`: the heap sampling rate in bytes (`--sample-bytes`;
/// 0 traces every allocation). A map, not a global: `--max-overhead` raises
/// it while tracing.
pub const SAMPLE_RATE: &str = "SAMPLE_RATE";

/// Per-CPU array of `u64`, indexed by a cookie's slot
/// ([`cookie`](crate::cookie)): each entry probe's hits.
pub const PROBE_HITS: &str = "PROBE_HITS";
/// Hash map: pending Go timer ([`ProcKey`](crate::ProcKey)) → creation stack id.
pub const GO_TIMERS: &str = "GO_TIMERS";
/// Hash map: live goroutine id ([`ProcKey`](crate::ProcKey)) → [`GoSiteKey`](crate::GoSiteKey).
pub const GO_GOROUTINES: &str = "GO_GOROUTINES";
/// Hash map: [`GoSiteKey`](crate::GoSiteKey) → [`SiteStats`](crate::SiteStats).
pub const GO_SITES: &str = "GO_SITES";
/// Hash map: Go memory-profile bucket ([`ProcKey`](crate::ProcKey)) → [`SiteStats`](crate::SiteStats).
pub const GO_BUCKETS: &str = "GO_BUCKETS";
/// LRU hash map: thread → [`Pending`](crate::Pending) allocator call.
pub const PENDING: &str = "PENDING";
/// Hash map: live block ([`ProcKey`](crate::ProcKey)) → [`AllocInfo`](crate::AllocInfo).
pub const ALLOCS: &str = "ALLOCS";
/// Hash map: [`SiteKey`](crate::SiteKey) → [`SiteStats`](crate::SiteStats).
pub const SITES: &str = "SITES";
/// The kernel's stack table (stack id → instruction pointers).
pub const STACKS: &str = "STACKS";
/// Per-CPU array of one [`StackBuf`](crate::StackBuf): scratch for a stack.
pub const STACK_SCRATCH: &str = "STACK_SCRATCH";
/// Hash map: own stack id ([`STACK_ID_OWN`](crate::STACK_ID_OWN) set) →
/// [`StackBuf`](crate::StackBuf), for stacks the kernel's table refused.
pub const OWN_STACKS: &str = "OWN_STACKS";
/// Per-CPU array of `u64`, indexed by [`Counter`](crate::Counter).
pub const COUNTERS: &str = "COUNTERS";
/// Hash map: tgid → [`OomVictim`](crate::OomVictim), for targets the OOM
/// killer chose.
pub const OOM_VICTIM: &str = "OOM_VICTIM";
/// Hash map: tgid → `u64`, a target's exit status as wait(2) reports it.
pub const EXIT_STATUS: &str = "EXIT_STATUS";
/// Array of [`UnwindRow`](crate::unwind::UnwindRow): every object's unwind
/// table, one after another (shared by the processes mapping the object).
pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
/// Hash map: tgid → [`ProcMappings`](crate::unwind::ProcMappings); a process
/// present here has its stacks walked by the DWARF unwinder.
pub const UNWIND_MAPPINGS: &str = "UNWIND_MAPPINGS";
/// LRU hash map: [`PcKey`](crate::unwind::PcKey) → the
/// [`UnwindRow`](crate::unwind::UnwindRow) that applies at that pc.
pub const UNWIND_CACHE: &str = "UNWIND_CACHE";
/// Per-CPU array of one walk state (kernel-side only).
pub const UNWIND_WALK: &str = "UNWIND_WALK";
/// Per-CPU array of one search state (kernel-side only).
pub const UNWIND_BISECT: &str = "UNWIND_BISECT";

/// Every global above.
pub const GLOBALS: [&str; 2] = [PAGE_SIZE, TASK_EXIT_CODE];

/// Every map above.
pub const MAPS: [&str; 23] = [
    TARGETS,
    PROC_EVENTS,
    GO_RUNTIMES,
    SAMPLE_RATE,
    PROBE_HITS,
    GO_TIMERS,
    GO_GOROUTINES,
    GO_SITES,
    GO_BUCKETS,
    PENDING,
    ALLOCS,
    SITES,
    STACKS,
    STACK_SCRATCH,
    OWN_STACKS,
    COUNTERS,
    OOM_VICTIM,
    EXIT_STATUS,
    UNWIND_ROWS,
    UNWIND_MAPPINGS,
    UNWIND_CACHE,
    UNWIND_WALK,
    UNWIND_BISECT,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_global_names_are_distinct() {
        let all = || GLOBALS.iter().chain(MAPS.iter());
        for (i, a) in all().enumerate() {
            assert!(!all().skip(i + 1).any(|b| b == a), "{a} listed twice");
        }
    }
}
