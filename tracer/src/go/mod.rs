//! Everything Go, behind one type: [`GoTarget`], the Go side of a traced
//! process. The session asks it for the kernel's runtime offsets, lets it
//! settle the heap sampling rate, and the collector asks it for Go sites.
//!
//! - [`version`]: which release built the binary; struct offsets (DWARF, or
//!   the per-release table).
//! - [`plan`]: which runtime functions get probes, and where.
//! - [`code`](mod@code): functions in the binary and where probes go in them.
//! - [`pclntab`]: our own `.gopclntab` reader (names, lines, inlining) for
//!   stripped binaries.
//! - [`runtime`]: the target's runtime read through `/proc/PID/mem`.
//! - [`memory`]: the target's memory as those readers see it (a buffer in
//!   tests and fuzzing).
//! - `sites`: goroutine and sampled-heap sites.

pub mod census;
pub mod code;
pub mod memory;
pub mod pclntab;
pub mod plan;
pub mod runtime;
mod sites;
pub mod timers;
pub mod version;

use std::collections::HashMap;

pub use census::{Census, CensusLayout, GoroutineGroup};
pub use code::{Function, after_prologue, call_targets, code, function, is_go_wrapper, ret_sites};
pub use memory::{BufferMemory, ProcessMemory, TargetMemory};
pub use runtime::{
    Bucket, BucketCounts, MemProfileLayout, RuntimeMem, find_mem_profile_rate, scale_sample,
};
pub use timers::{Pending, PendingTimer, TimerHeapLayout};
pub use version::{
    DwarfFacts, GoVersion, OLDEST_MINOR, async_timer_chan, build_info, dwarf_facts, go_version,
    offsets_for, offsets_from_dwarf, parse_version,
};

use crate::{kernel::Kernel, probes::GoPlan, sink::Sink, symbolize::Frame, target::Maps};

/// Default Go heap sampling rate, the runtime's own default.
pub const DEFAULT_GO_SAMPLE_RATE: u64 = 512 * 1024;

/// How the tracer may touch the target's heap sampling.
#[derive(Clone, Copy, Debug, Default)]
pub struct SamplingPolicy {
    /// Rate to set (bytes); None: only turn sampling on (at 512 KiB) when the
    /// binary has it off.
    pub rate: Option<u64>,
    /// Never write to the target's memory.
    pub no_write: bool,
    /// Leave what was written in place when detaching (by default the
    /// target's original rate is written back).
    pub keep_writes: bool,
}

/// The Go side of one traced process: its plan (functions, offsets), its
/// runtime's memory, and what the collector keeps between intervals.
pub struct GoTarget {
    pub plan: GoPlan,
    pub mem: RuntimeMem,
    /// Sampling rate last read from the target (for scaling).
    pub rate: u64,
    /// Resolved goroutine start functions by startpc.
    starts: HashMap<u64, Frame>,
    /// Symbolized creation sites by gopc.
    creators: HashMap<u64, crate::schema::Frames>,
    /// Symbolized heap profile bucket stacks (and whether truncated), by
    /// bucket address: buckets are never freed or changed.
    bucket_frames: HashMap<u64, (crate::schema::Frames, bool)>,
    /// The sampling policy still waits for the executable to be mapped.
    policy_pending: bool,
    /// The target's own rate, when the tracer changed it: what detaching
    /// writes back.
    original_rate: Option<u64>,
    pid: u32,
    /// Runtime address of `runtime.allgs`, once the executable is mapped.
    allgs_addr: Option<u64>,
    /// The last goroutine census: what the final report shows once the
    /// target has exited.
    last_census: Option<Census>,
    /// The census taken at our own child's exit stop (`run`), if any.
    exit_census: Option<ExitCensus>,
    /// Runtime address of `runtime.allp`, once the executable is mapped.
    allp_addr: Option<u64>,
    /// Timers retired by the scans, per creation stack id, since attach.
    retired: HashMap<u32, u64>,
    /// Runtime address of `time.goFunc`.
    gofunc_addr: Option<u64>,
    /// Per timer callback, the pending timers of each creation stack the
    /// sampled probe last saw: how unseen timers of that callback are split.
    timer_weights: HashMap<u64, HashMap<u32, u64>>,
    last_timers: Option<TimerCensus>,
    /// When the timer-creation sampling windows started.
    sampling_since: Option<std::time::Instant>,
    /// The goroutine list, read a slice at a time.
    rolling: census::RollingCensus,
    /// (entries read, entries, never read) when the last census read only
    /// part of the list.
    census_progress: Option<(u64, u64, u64)>,
    census_noticed: bool,
    /// Whether a failing goroutine-list read was logged.
    census_warned: bool,
    /// Whether [`GoTarget::resolve`] was ever given the target's maps.
    maps_seen: bool,
    /// Time per snapshot for reading the goroutine list.
    census_budget: std::time::Duration,
}

/// Pending timers of one snapshot (see [`GoTarget::timer_census`]).
#[derive(Clone, Debug, Default)]
pub struct TimerCensus {
    /// Per creation stack id.
    pub by_stack: HashMap<u32, TimerCount>,
    /// Timers no sampled creation names, per callback code address.
    pub by_callback: HashMap<u64, u64>,
    /// Timers retired since attach, per creation stack id.
    pub retired: HashMap<u32, u64>,
}

/// Pending timers of one creation stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerCount {
    /// Whose creation the probe saw.
    pub seen: u64,
    /// Unseen timers with the same callback, this stack's share.
    pub estimated: u64,
}

/// The timer-creation sampling windows: (first window after attach, later
/// windows, their period). `TRACER_GO_TIMER_STACKS=always` keeps the probe
/// attached (every creation stack exact, a trap per timer).
fn timer_sample_windows() -> (
    std::time::Duration,
    std::time::Duration,
    std::time::Duration,
) {
    use std::time::Duration;
    if std::env::var_os("TRACER_GO_TIMER_STACKS").is_some_and(|v| v == "always") {
        return (Duration::MAX, Duration::ZERO, Duration::from_secs(1));
    }
    (
        Duration::from_secs(3),
        Duration::from_secs(1),
        Duration::from_secs(20),
    )
}

/// Splits `n` in proportion to `weights`, exactly (largest remainder;
/// ties to the smaller key, so the split is stable).
fn apportion(n: u64, weights: &HashMap<u32, u64>) -> Vec<(u32, u64)> {
    let total: u64 = weights.values().sum();
    if total == 0 {
        return Vec::new();
    }
    let mut keys: Vec<(u32, u64)> = weights.iter().map(|(k, w)| (*k, *w)).collect();
    keys.sort_unstable();
    let mut out: Vec<(u32, u64, u128)> = keys
        .iter()
        .map(|&(k, w)| {
            let x = u128::from(n) * u128::from(w);
            (k, (x / u128::from(total)) as u64, x % u128::from(total))
        })
        .collect();
    let given: u64 = out.iter().map(|o| o.1).sum();
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&a, &b| out[b].2.cmp(&out[a].2).then(out[a].0.cmp(&out[b].0)));
    for &i in order.iter().take((n - given) as usize) {
        out[i].1 += 1;
    }
    out.into_iter()
        .map(|(k, v, _)| (k, v))
        .filter(|o| o.1 > 0)
        .collect()
}

/// Where the census taken at a `run` child's exit stop lands.
pub type ExitCensus = std::sync::Arc<std::sync::Mutex<Option<Census>>>;

use crate::process::ExitHook;

impl GoTarget {
    /// The Go side of `pid`, whose executable is mapped as `maps` says (empty
    /// in `run` before exec).
    pub fn new(pid: u32, plan: GoPlan, maps: &Maps) -> Self {
        let mut go = Self {
            plan,
            mem: RuntimeMem::open(pid, None),
            rate: DEFAULT_GO_SAMPLE_RATE,
            starts: HashMap::new(),
            creators: HashMap::new(),
            bucket_frames: HashMap::new(),
            policy_pending: true,
            original_rate: None,
            pid,
            allgs_addr: None,
            last_census: None,
            exit_census: None,
            allp_addr: None,
            retired: HashMap::new(),
            gofunc_addr: None,
            timer_weights: HashMap::new(),
            last_timers: None,
            sampling_since: None,
            rolling: Default::default(),
            census_progress: None,
            census_noticed: false,
            census_warned: false,
            maps_seen: false,
            census_budget: std::time::Duration::from_millis(5),
        };
        go.resolve(maps);
        go
    }

    /// The pending timers, read from the runtime's heaps, by creation stack
    /// where the sampled creation probe saw them: None without the heaps
    /// (the creation, stop and firing probes then count timers in the
    /// kernel). Also retires the tracked timers no heap holds any more.
    ///
    /// A pending timer whose creation was not seen (created before attach,
    /// or while the probe was off) gets the stack of the seen timers with
    /// the same callback, shared in proportion to how many of those are
    /// pending: the count per callback is exact, its split across stacks an
    /// estimate. Callbacks no seen timer names are counted as themselves.
    pub fn timer_census(&mut self, kernel: &mut Kernel) -> Option<TimerCensus> {
        let (Some(layout), Some(allp)) = (self.plan.timer_heaps, self.allp_addr) else {
            return None;
        };
        // Walking an empty hash map still visits all its buckets: skip it
        // while every timer the probe recorded has been retired.
        let created = kernel
            .counters()
            .map_or(u64::MAX, |c| c.get(tracer_common::Counter::TimersCreated));
        let tracked = if created > self.retired.values().sum::<u64>() {
            kernel.go_timers(self.pid).unwrap_or_default()
        } else {
            Vec::new()
        };
        if !tracked.is_empty() {
            // The creation probe fires just before the runtime puts the
            // timer in its heap: the heaps are read a moment after the
            // tracked timers, so a timer absent from them has really left.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let pending = match timers::pending(
            &ProcessMemory(self.pid),
            allp,
            self.gofunc_addr.unwrap_or(0),
            &layout,
        ) {
            Ok(p) => p,
            // Gone, or a torn read: the last census stands.
            Err(e) => {
                log::debug!("pid {}: timer heaps unreadable: {e}", self.pid);
                return self.last_timers.clone();
            }
        };
        let mut by_addr = HashMap::with_capacity(tracked.len());
        for (t, stack) in tracked {
            if pending.contains_key(&t) {
                by_addr.insert(t, stack);
            } else {
                kernel.remove_go_timer(self.pid, t);
                *self.retired.entry(stack).or_default() += 1;
            }
        }
        let count_chan = self.plan.offsets.count_chan_timers != 0;
        // Per callback: pending timers per seen stack, and the unseen.
        let mut seen: HashMap<u64, HashMap<u32, u64>> = HashMap::new();
        let mut unseen: HashMap<u64, u64> = HashMap::new();
        for (t, p) in &pending {
            if p.chan && !count_chan {
                continue; // collectable garbage once unreferenced (Go ≥ 1.23)
            }
            match by_addr.get(t) {
                Some(&stack) => {
                    *seen
                        .entry(p.callback)
                        .or_default()
                        .entry(stack)
                        .or_default() += 1
                }
                None => *unseen.entry(p.callback).or_default() += 1,
            }
        }
        for (cb, stacks) in &seen {
            self.timer_weights.insert(*cb, stacks.clone());
        }
        let mut census = TimerCensus {
            retired: self.retired.clone(),
            ..Default::default()
        };
        for (stack, n) in seen.into_values().flatten() {
            census.by_stack.entry(stack).or_default().seen += n;
        }
        for (cb, n) in unseen {
            match self.timer_weights.get(&cb) {
                Some(w) => {
                    for (stack, share) in apportion(n, w) {
                        census.by_stack.entry(stack).or_default().estimated += share;
                    }
                }
                None => *census.by_callback.entry(cb).or_default() += n,
            }
        }
        self.last_timers = Some(census.clone());
        Some(census)
    }

    /// Time per snapshot for reading the goroutine list (`--go-census-ms`).
    pub fn set_census_budget(&mut self, budget: std::time::Duration) {
        self.census_budget = budget;
    }

    /// Whether the sampled timer-creation probe should be attached now.
    /// Without the heaps it must always be (it alone counts timers); with
    /// them it runs in short windows, first right after attach.
    pub fn timer_sampling(&mut self, now: std::time::Instant) -> bool {
        if self.plan.timer_heaps.is_none() || self.allp_addr.is_none() {
            return true;
        }
        let (first, on, period) = timer_sample_windows();
        let start = *self.sampling_since.get_or_insert(now);
        let t = now.duration_since(start);
        t < first || (t - first).as_nanos() % period.as_nanos() < on.as_nanos()
    }

    /// For `run`: a hook that reads the goroutine list at the child's exit
    /// stop (its memory is still there; a short-lived command may exit
    /// before any interval), and where the result lands (give it to
    /// [`Self::set_exit_census`]). None without a goroutine list.
    pub fn exit_hook(pid: u32, plan: &GoPlan) -> Option<(ExitHook, ExitCensus)> {
        let layout = plan.census.clone()?;
        let plan = plan.clone();
        let slot = ExitCensus::default();
        let out = slot.clone();
        let hook: ExitHook = Box::new(move |maps: &Maps| {
            let Some(addr) = runtime_address(&plan, maps, layout.allgs) else {
                return;
            };
            let layout = CensusLayout {
                allgs: addr,
                ..layout
            };
            if let Ok(c) = census::read(&ProcessMemory(pid), 0, &layout)
                && let Ok(mut slot) = out.lock()
            {
                *slot = Some(c);
            }
        });
        Some((hook, slot))
    }

    /// Uses the census of [`Self::exit_hook`] once the target is gone.
    pub fn set_exit_census(&mut self, slot: ExitCensus) {
        self.exit_census = Some(slot);
    }

    /// The runtime offsets for the kernel side, with the runtime address of
    /// `time.newTimer`, which needs the load bias of a position-independent
    /// executable (known from `maps` once it is mapped).
    pub fn kernel_offsets(plan: &GoPlan, maps: Option<&Maps>) -> tracer_common::GoOffsets {
        let mut off = plan.offsets;
        if let Some((lo, hi)) = plan.newtimer {
            let bias = if plan.pie {
                maps.and_then(|m| runtime_address(plan, m, lo))
                    .map(|a| a - lo)
            } else {
                Some(0)
            };
            match bias {
                Some(b) => {
                    (off.newtimer_lo, off.newtimer_hi) = (lo + b, hi + b);
                    off.sendtime_pc = plan.sendtime.map_or(0, |a| a + b);
                }
                None => log::warn!(
                    "timers of a position-independent Go executable cannot be traced with \
                     `tracer run`; attach to the running process instead"
                ),
            }
        }
        off
    }

    /// Finds `runtime.MemProfileRate` and the memory profile in the target
    /// once its executable is mapped.
    pub fn resolve(&mut self, maps: &Maps) {
        self.maps_seen |= !maps.mappings.is_empty();
        if self.allp_addr.is_none()
            && let Some(t) = &self.plan.timer_heaps
        {
            self.allp_addr = runtime_address(&self.plan, maps, t.allp);
        }
        if self.gofunc_addr.is_none()
            && let Some(f) = self.plan.gofunc
        {
            self.gofunc_addr = runtime_address(&self.plan, maps, f);
        }
        if self.allgs_addr.is_none()
            && let Some(c) = &self.plan.census
        {
            self.allgs_addr = runtime_address(&self.plan, maps, c.allgs);
        }
        if self.mem.rate_addr().is_none()
            && let Some(va) = self.plan.mem_profile_rate
            && let Some(addr) = runtime_address(&self.plan, maps, va)
        {
            self.mem.set_rate_addr(addr);
        }
        if !self.mem.has_profile()
            && let Some(layout) = self.plan.mem_profile
            && let Some(addr) = runtime_address(&self.plan, maps, layout.mbuckets)
        {
            self.mem.set_profile(addr, layout);
        }
    }

    /// Turns Go heap sampling on when the binary has it off, or sets the rate
    /// the user asked for, telling the user either way. Does nothing once
    /// settled; in `run` it waits until the executable is mapped (the
    /// runtime also resets MemProfileRate during start-up).
    pub fn settle_sampling(
        &mut self,
        policy: SamplingPolicy,
        sink: &mut dyn Sink,
        pid: u32,
    ) -> std::io::Result<()> {
        if !self.policy_pending {
            return Ok(());
        }
        if self.plan.mem_profile_rate.is_some() && self.mem.rate_addr().is_none() {
            // `run`: the executable is not mapped yet.
            return Ok(());
        }
        self.policy_pending = false;
        let Some(current) = self.mem.rate() else {
            return sink.notice(
                pid,
                "cannot read runtime.MemProfileRate (stripped binary?): Go heap sites use the \
                 runtime's default rate for scaling",
            );
        };
        let wanted = match policy.rate {
            Some(r) if r != current => r,
            None if current == 0 => DEFAULT_GO_SAMPLE_RATE,
            _ => {
                self.rate = current;
                return Ok(());
            }
        };
        if policy.no_write {
            if current == 0 {
                sink.notice(
                    pid,
                    "Go heap sampling is off in this binary (runtime.MemProfileRate = 0) and \
                     --no-write forbids turning it on: no Go heap sites will be shown",
                )?;
            }
            return Ok(());
        }
        match self.mem.set_rate(wanted) {
            Ok(()) => {
                self.rate = wanted;
                self.original_rate = Some(current);
                sink.notice(
                    pid,
                    &format!(
                        "set the target's Go heap sampling rate (runtime.MemProfileRate) to \
                         {wanted} bytes (it was {current}) until the tracer detaches; \
                         --no-write forbids this, --keep-writes leaves it set"
                    ),
                )
            }
            Err(e) => sink.notice(pid, &format!("cannot set runtime.MemProfileRate: {e}")),
        }
    }

    /// Writes back the target's own heap sampling rate if the tracer changed
    /// it (unless `--keep-writes`), telling the user. The target is still
    /// running: the tracer is detaching from it.
    pub fn restore(
        &mut self,
        policy: SamplingPolicy,
        sink: &mut dyn Sink,
        pid: u32,
    ) -> std::io::Result<()> {
        let Some(original) = self.original_rate else {
            return Ok(());
        };
        if policy.keep_writes {
            return sink.notice(
                pid,
                &format!(
                    "left the target's runtime.MemProfileRate at {} bytes (--keep-writes); it was {original}",
                    self.rate
                ),
            );
        }
        match self.mem.set_rate(original) {
            Ok(()) => {
                self.original_rate = None;
                sink.notice(
                    pid,
                    &format!("restored the target's runtime.MemProfileRate to {original}"),
                )
            }
            Err(e) => sink.notice(
                pid,
                &format!("cannot restore runtime.MemProfileRate to {original}: {e}"),
            ),
        }
    }
}

/// Address of `vaddr` of the executable `go.object` in the running target.
fn runtime_address(go: &GoPlan, maps: &Maps, vaddr: u64) -> Option<u64> {
    let (seg_va, seg_off) = go.first_segment;
    let m = maps
        .mappings
        .iter()
        .find(|m| m.path == go.object.path && m.offset == seg_off)?;
    Some(vaddr - seg_va + m.start)
}

#[cfg(test)]
mod tests {
    use super::version::{read_uvarint, version_tokens};
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

    /// Which row a version gets. The rows' values are not repeated here:
    /// tests/gopclntab.rs checks each against that release's DWARF.
    #[test]
    fn offsets_row_per_release_and_the_newest_for_future_versions() {
        let row = |v: &str| offsets_for(&parse_version(v).unwrap());
        let newest_minor = (OLDEST_MINOR..100)
            .take_while(|m| row(&format!("go1.{m}.0")).1)
            .last()
            .unwrap();
        assert!(newest_minor > OLDEST_MINOR, "a table of one release");
        let newest = row(&format!("go1.{newest_minor}.0")).0;
        // Patch releases share their minor's row.
        for m in OLDEST_MINOR..=newest_minor {
            assert_eq!(row(&format!("go1.{m}.0")), row(&format!("go1.{m}.13")));
        }
        // Layouts do change between releases: not one row for all.
        assert_ne!(row(&format!("go1.{OLDEST_MINOR}.0")).0, newest);
        // Newer than the table: the newest row, and not known (the caller
        // warns).
        for future in [format!("go1.{}.0", newest_minor + 1), "go2.0.0".into()] {
            let (o, known) = row(&future);
            assert!(!known, "{future}");
            assert_eq!(o, newest, "{future}");
        }
        // Older than the table: not known either.
        assert!(!row(&format!("go1.{}.9", OLDEST_MINOR - 1)).1);
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
    fn apportion_is_exact_and_proportional() {
        let w: HashMap<u32, u64> = [(1, 3), (2, 1)].into();
        let mut a = apportion(100, &w);
        a.sort();
        assert_eq!(a, vec![(1, 75), (2, 25)]);
        let w: HashMap<u32, u64> = [(1, 1), (2, 1), (3, 1)].into();
        let a = apportion(10, &w);
        assert_eq!(a.iter().map(|x| x.1).sum::<u64>(), 10);
        assert!(a.iter().all(|x| x.1 == 3 || x.1 == 4));
        assert!(apportion(5, &HashMap::new()).is_empty());
        let w: HashMap<u32, u64> = [(7, 2)].into();
        assert_eq!(apportion(u64::MAX / 2, &w), vec![(7, u64::MAX / 2)]);
    }

    #[test]
    fn uvarints() {
        assert_eq!(read_uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(read_uvarint(&[0x96, 0x01]), Some((150, 2)));
        assert_eq!(read_uvarint(&[0x80]), None);
    }
}
