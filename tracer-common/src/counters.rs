//! The kernel side's counters: one table from which the enum, the count, the
//! names and the lost/activity split are all generated, so the eBPF programs,
//! the JSON stream, the Prometheus endpoint and the table can never disagree.

/// How a counter is shown to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterClass {
    /// Something the kernel side dropped or could not attribute: the totals
    /// are not exact while it is non-zero (`lost` in the JSON stream).
    Lost,
    /// Informational (`activity` in the JSON stream).
    Activity,
    /// Kept for diagnostics only (`-v`), not part of the output.
    Internal,
}

/// One row of the counter table.
#[derive(Clone, Copy, Debug)]
pub struct CounterInfo {
    pub counter: Counter,
    /// The name in the JSON stream (`lost.<name>`, `activity.<name>`) and in
    /// Prometheus labels.
    pub name: &'static str,
    pub class: CounterClass,
    /// For lost counters: what was lost and what to do, as the table's header
    /// says it after the count ("3 blocks untracked (…, raise --max-allocs)").
    pub what: &'static str,
}

macro_rules! counters {
    ($(
        $(#[$doc:meta])*
        $variant:ident = $idx:literal, $name:literal, $class:ident, $what:literal;
    )*) => {
        /// Indexes of the per-CPU counter array. Every path on which the kernel
        /// side drops or cannot attribute something has a counter, so the user
        /// is told.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant = $idx,)*
        }

        /// Every counter, in index order.
        pub const COUNTERS: [CounterInfo; COUNTER_COUNT as usize] = [
            $(CounterInfo {
                counter: Counter::$variant,
                name: $name,
                class: CounterClass::$class,
                what: $what,
            },)*
        ];

        /// Number of entries in the counter array.
        pub const COUNTER_COUNT: u32 = [$($idx),*].len() as u32;
    };
}

counters! {
    /// Allocation entry probes that fired.
    AllocCalls = 0, "alloc_calls", Activity, "";
    /// Free/munmap entry probes that fired.
    FreeCalls = 1, "free_calls", Activity, "";
    /// Allocations that failed in the target (NULL / MAP_FAILED): not counted.
    FailedAllocs = 2, "failed_allocs", Activity, "";
    /// Live blocks that could not be tracked because the address map was full.
    /// Their bytes are missing from outstanding totals.
    AddrMapFull = 3, "addr_map_full", Lost,
        "blocks untracked (address map full, raise --max-allocs or sample with --sample-bytes)";
    /// Sites that could not be created because the site map was full.
    SiteMapFull = 4, "site_map_full", Lost,
        "allocations unaccounted (site map full, raise --max-sites)";
    /// Stacks that could not be recorded (the kernel's stack table and the
    /// tracer's own both full, or a rare collision in the latter); accounted
    /// under the unknown-stack site.
    StackLost = 5, "stacks_lost", Lost,
        "stacks unrecorded (stack table full, raise --max-stacks)";
    /// Entries that could not be remembered until their return: the
    /// per-thread map was full.
    PendingMapFull = 6, "pending_map_full", Lost,
        "calls lost (thread map full, raise --max-threads)";
    /// Returns whose entry was not seen (attached mid-call) or did not match.
    UnmatchedReturns = 7, "unmatched_returns", Lost, "returns unmatched";
    /// Entries overwritten because their return was never seen (e.g. longjmp).
    StalePending = 8, "stale_entries", Activity, "";
    /// Allocator calls made from inside another probed allocator call (malloc
    /// → mmap) or tail-called by one (reallocarray → realloc): the outer call
    /// accounts them.
    NestedCalls = 9, "nested_calls", Activity, "";
    /// Frees of addresses not allocated since attach (allocated before
    /// attach, or by an untraced allocator).
    UntrackedFrees = 10, "untracked_frees", Activity, "";
    /// munmap calls that covered only part of a tracked mapping away from its
    /// start; the mapping stays accounted whole.
    PartialUnmaps = 11, "partial_unmaps", Activity, "";
    /// Probe hits in another process than the target (the probes are scoped
    /// to it; a non-zero count means the kernel's filter let one through).
    OtherProcess = 12, "other_process", Internal, "";
    /// Goroutines created since attach.
    GoroutinesCreated = 13, "goroutines_created", Activity, "";
    /// Goroutines that exited since attach (including ones created before).
    GoroutinesExited = 14, "goroutines_exited", Activity, "";
    /// Go goroutine/timer/bucket map full.
    GoMapFull = 15, "go_map_full", Lost,
        "Go goroutines/timers/samples untracked (Go map full, raise --max-goroutines or --max-sites)";
    /// Sampled Go heap objects recorded.
    GoSamples = 16, "go_samples", Activity, "";
    /// Sampled Go heap objects freed.
    GoSampleFrees = 17, "go_sample_frees", Activity, "";
    /// Failed reads of Go runtime structures.
    GoReadErrors = 18, "go_read_errors", Lost, "Go runtime structures unreadable";
    /// Timers created since attach.
    TimersCreated = 19, "timers_created", Activity, "";
    /// Timers retired (stopped, or fired for good) since attach.
    TimersRetired = 20, "timers_retired", Activity, "";
    /// Allocations left out by sampling (`--sample-bytes`).
    Unsampled = 21, "unsampled", Activity, "";
    /// Stacks walked by the DWARF unwinder (objects without frame pointers).
    UnwindWalks = 22, "unwind_walks", Activity, "";
    /// Frames whose rule came from the per-pc cache, and those that needed
    /// the table search.
    UnwindCacheHits = 23, "unwind_cache_hits", Activity, "";
    UnwindCacheMisses = 24, "unwind_cache_misses", Activity, "";
    /// DWARF walks that ended early, by reason (each such stack is also
    /// counted as truncated): a pc no table row covers ...
    UnwindNoRule = 25, "unwind_no_rule", Activity, "";
    /// ... a rule the unwinder does not implement ...
    UnwindUnsupported = 26, "unwind_unsupported", Activity, "";
    /// ... a return address outside every executable mapping ...
    UnwindBadReturn = 27, "unwind_bad_return", Activity, "";
    /// ... the target's stack unreadable ...
    UnwindReadFailed = 28, "unwind_read_failed", Activity, "";
    /// ... deeper than the tracer records ...
    UnwindDepth = 29, "unwind_depth", Activity, "";
    /// ... a pc in a mapping not yet known to the unwinder (mapped since the
    /// last refresh, e.g. dlopen).
    UnwindNoMapping = 30, "unwind_no_mapping", Activity, "";
    /// Children of followed processes that could not become targets: the
    /// process map was full.
    ProcessMapFull = 31, "process_map_full", Lost,
        "child processes untraced (process map full, raise --max-processes)";
    /// Children the kernel added as targets (fork following, a cgroup).
    ProcessesFollowed = 32, "processes_followed", Activity, "";
}

impl Counter {
    /// This counter's row of [`COUNTERS`].
    pub const fn info(self) -> &'static CounterInfo {
        &COUNTERS[self as usize]
    }
}

// The table is indexed by the enum: each row must sit at its own index.
const _: () = {
    let mut i = 0;
    while i < COUNTERS.len() {
        assert!(
            COUNTERS[i].counter as usize == i,
            "counter rows out of index order"
        );
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_lost_counters_say_what() {
        for (i, a) in COUNTERS.iter().enumerate() {
            for b in &COUNTERS[i + 1..] {
                assert_ne!(a.name, b.name);
            }
            assert_eq!(
                a.class == CounterClass::Lost,
                !a.what.is_empty(),
                "{}",
                a.name
            );
        }
        assert_eq!(Counter::Unsampled.info().name, "unsampled");
    }
}
