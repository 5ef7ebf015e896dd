//! The flow, end to end: resolve target → choose probes → load/attach →
//! read maps each interval → symbolize → sinks, until the targets exit, the
//! duration elapses or the user interrupts.
//!
//! A session traces a set of processes (`Traced`, one per pid) with one set
//! of kernel objects; each process has its own collector (symbols, Go side),
//! exit watch and memory watch. This module only orchestrates: process
//! control is in [`crate::process`], the memory watch in [`crate::alert`],
//! Go in [`crate::go`].

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    alert::watch::MemoryWatch,
    cgroup::Cgroup,
    collect::{Collector, Snapshot},
    error::TracerError,
    go::GoTarget,
    kernel::Kernel,
    object::ElfObjects,
    options::Options,
    overhead::Estimator,
    probes::{self, GoPlan, ObjectRef, PlannedProbe},
    process::{self, ExitWatcher, HeldChild, PidFd},
    schema::{Attached, EndReason, Exit, Overhead, PreviousImage, SCHEMA_VERSION},
    sink::Sink,
    symbolize::Symbolizer,
    target::{self, Maps, Target},
    unwind::{Installed, Unwinder},
};

/// Rows the unwind array keeps free for libraries loaded after attach
/// (dlopen), beyond half of what the files mapped at start need.
const UNWIND_HEADROOM: u32 = 1 << 16;

/// The same when children are followed: they exec other programs (a shell
/// wrapper's whole point), whose files are unknown at start. 16 MiB.
const UNWIND_HEADROOM_FOLLOWING: u32 = 1 << 20;

/// Builds the unwind tables of `paths`, and sizes the kernel's row array for
/// them and for libraries loaded later.
fn prepare_unwind<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    opts: &Options,
    sizes: &mut crate::kernel::MapSizes,
) -> Unwinder {
    if opts.frame_pointers_only {
        return Unwinder::disabled();
    }
    let mut unwinder = Unwinder::new();
    // 0: not set by the user (--unwind-rows).
    if sizes.unwind_rows > 0 {
        unwinder.limit(sizes.unwind_rows);
    }
    unwinder.prepare(paths);
    if sizes.unwind_rows == 0 {
        let built = unwinder.capacity_for(0);
        let headroom = if opts.follow_forks {
            UNWIND_HEADROOM_FOLLOWING
        } else {
            UNWIND_HEADROOM
        };
        sizes.unwind_rows = unwinder.capacity_for((built / 2).max(headroom));
    }
    unwinder
}

/// Tells the user how the process's stacks are walked, the first time.
fn unwind_notice(pid: u32, inst: &Installed, sink: &mut dyn Sink) -> std::io::Result<()> {
    if !inst.full.is_empty() {
        sink.notice(
            pid,
            &format!(
                "the unwind tables of {} did not fit (raise --unwind-rows): their frames are \
                 walked with frame pointers",
                inst.full.join(", ")
            ),
        )?;
    }
    log::info!(
        "pid {pid}: DWARF unwind tables {} rows ({:.1} MiB); frame pointers for {}",
        inst.rows,
        inst.bytes() as f64 / (1 << 20) as f64,
        if inst.frame_pointer_files.is_empty() {
            "no file".to_string()
        } else {
            inst.frame_pointer_files.join(", ")
        }
    );
    Ok(())
}

/// Everything to hook in one target.
#[derive(Clone)]
struct Plan {
    probes: Vec<PlannedProbe>,
    go: Option<GoPlan>,
}

/// Allocator probes in every object, Go runtime probes for a Go executable.
/// Each file is opened once, through `elves`, whichever planners read it.
fn make_plan(
    objects: &[ObjectRef],
    exe: &Path,
    elves: &mut ElfObjects,
) -> Result<Option<Plan>, TracerError> {
    let libc = probes::plan_libc(objects, elves)?;
    let go = match objects.iter().find(|o| o.path == exe) {
        Some(obj) => probes::plan_go(obj, elves)?,
        None => None,
    };
    if libc.is_empty() && go.is_none() {
        return Ok(None);
    }
    if let Some(g) = &go
        && !g.known_version
    {
        log::warn!(
            "{} is newer than the Go releases whose runtime layout this tracer knows; \
             using the newest known one (goroutine sites may be wrong)",
            g.version
        );
    }
    let mut all: Vec<PlannedProbe> = go.iter().flat_map(|g| g.probes.clone()).collect();
    all.extend(libc);
    // Frees and exits go live first (stable sort keeps the rest in order).
    all.sort_by_key(|p| !p.frees);
    Ok(Some(Plan { probes: all, go }))
}

/// One traced process and the stages set up for it.
struct Traced {
    pid: u32,
    collector: Collector,
    /// In `run` mode, the watcher of our own child.
    own_child: Option<ExitWatcher>,
    /// The target's memory against its limit; None with `--no-alerts`.
    watch: Option<MemoryWatch>,
    exited: bool,
    /// /proc/PID/maps as last read.
    maps_text: Vec<u8>,
    /// (device, inode) of the executable, to notice an exec.
    exe_id: Option<(u64, u64)>,
    /// The executable as the target names it.
    exe: String,
    /// Images exec'd away from, with their sites at the exec.
    previous_images: Vec<PreviousImage>,
    /// The probes' cost, once the trap is calibrated (first interval).
    overhead: Option<Estimator>,
    /// Whether the user was told the first estimate.
    overhead_told: bool,
    /// The last estimate, for snapshots outside the interval's.
    last_overhead: Option<Overhead>,
    /// Whether its children become targets too.
    follow_forks: bool,
    /// The process the session started from (not a child it followed): the
    /// one whose CPU time the overhead estimate is measured against.
    root: bool,
    /// For a child the session followed, its parent.
    parent: Option<u32>,
    /// Code files already planned for (hooked or found without an
    /// allocator): a file mapped later (dlopen) is planned when it appears.
    planned_files: HashSet<PathBuf>,
    /// The plan hooked, for its forked children (same image, same probes).
    plan: Option<Plan>,
    /// Its last snapshot (a cgroup's totals and alerts rank every
    /// process's sites together).
    last_snap: Option<Snapshot>,
    /// Its CPU time as last read (seconds), kept once it exited.
    last_cpu: f64,
    /// For the root of a session tracing several processes: the CPU time
    /// of all of them, for the overhead estimate.
    session_cpu: Option<f64>,
    comm: String,
}

impl Traced {
    fn new(pid: u32, maps: Maps, plan: Option<&Plan>, opts: &Options) -> Self {
        let go = plan.and_then(|p| p.go.as_ref());
        let planned_files = match plan {
            Some(p) if maps.mappings.is_empty() => {
                p.probes.iter().map(|p| p.object.path.clone()).collect()
            }
            Some(_) => maps
                .executable_objects()
                .iter()
                .map(|m| m.path.clone())
                .collect(),
            None => HashSet::new(),
        };
        let symbols = Symbolizer::with_debug_dirs(maps.clone(), &opts.debug_dirs);
        let mut collector = Collector::new(pid, symbols, opts.trend_window);
        if let Some(plan) = go {
            let mut go = GoTarget::new(pid, plan.clone(), &maps);
            go.set_census_budget(opts.go_census_budget);
            collector = collector.with_go(go);
        }
        Self {
            pid,
            collector,
            own_child: None,
            watch: opts.alerts.as_ref().map(|a| MemoryWatch::new(pid, a)),
            exited: false,
            maps_text: Vec::new(),
            exe_id: exe_id(pid),
            exe: std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            previous_images: Vec::new(),
            overhead: None,
            overhead_told: false,
            last_overhead: None,
            follow_forks: false,
            root: false,
            parent: None,
            planned_files,
            plan: plan.cloned(),
            last_snap: None,
            last_cpu: 0.0,
            session_cpu: None,
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default(),
        }
    }

    /// Starts over on the image `pid` exec'd: a new collector (its symbols,
    /// its Go runtime), the same memory watch and exit watch.
    fn rehook(&mut self, maps: Maps, plan: &Plan, opts: &Options) {
        let fresh = Self::new(self.pid, maps, Some(plan), opts);
        self.collector = fresh.collector;
        self.planned_files = fresh.planned_files;
        self.plan = fresh.plan;
        self.comm = fresh.comm;
        self.maps_text.clear();
        self.exe_id = fresh.exe_id;
        self.exe = fresh.exe;
        // The new kernel objects count from zero.
        self.overhead = self
            .overhead
            .as_ref()
            .map(|e| Estimator::new(e.trap_cost()));
    }

    /// The probes' cost over the last seconds; calibrates the trap first.
    fn measure_overhead(&mut self, kernel: &mut Kernel) -> Option<Overhead> {
        if self.overhead.is_none() {
            match kernel.calibrate() {
                Ok(trap) => {
                    log::info!(
                        "a uprobe hit costs {:.2} µs here ({:.2} µs on a single-stepped \
                         instruction), a return probe {:.2} µs",
                        trap.emulated_ns / 1e3,
                        trap.stepped_ns / 1e3,
                        trap.return_ns / 1e3
                    );
                    self.overhead = Some(Estimator::new(trap));
                }
                Err(e) => {
                    log::warn!(
                        "cannot calibrate the cost of a probe ({}): no overhead estimate",
                        crate::error::chain(&e)
                    );
                    return None;
                }
            }
        }
        let runs = kernel.probe_runs()?;
        // The programs' statistics count every traced process: so does the
        // CPU time they are measured against.
        let cpu = match self.session_cpu {
            Some(total) => total,
            None => crate::overhead::cpu_seconds(self.pid)?,
        };
        self.overhead.as_mut()?.update(Instant::now(), runs, cpu)
    }

    /// Keeps the probes' cost under `--max-overhead`: past it, sampling
    /// starts or its rate rises (enough to bring the estimate to 80% of the
    /// bound, or halfway from the floor); when even the floor no rate
    /// removes is about the bound (or
    /// sampling cannot skip return probes), every probe comes off. Each step
    /// restarts the estimate, so the next one waits for 3 s of evidence.
    fn bound_overhead(
        &mut self,
        kernel: &mut Kernel,
        o: &Overhead,
        snap: &Snapshot,
        opts: &Options,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        /// Rates beyond this leave nearly every call out already.
        const MAX_RATE: u64 = 1 << 30;
        let Some(bound) = opts.max_overhead.map(|b| b * 100.0) else {
            return Ok(());
        };
        if kernel.probes_detached() || o.window_s < 3.0 || o.share_pct <= bound {
            return Ok(());
        }
        let pid = self.pid;
        let rate = kernel.sample_bytes();
        let cost = format!(
            "probes cost {:.0}% of pid {pid}'s CPU time (~{:.1} µs per call × {} calls/s), over \
             --max-overhead {bound:.0}%",
            o.share_pct,
            o.ns_per_call / 1e3,
            human_rate(o.calls_per_s)
        );
        let why_not_sampling = if !kernel.sampling_skips_returns() {
            Some(
                "sampling cannot skip return probes here (uprobe sessions need Linux 6.13+)"
                    .to_string(),
            )
        } else if o.floor_share_pct >= bound * 0.95 || rate >= MAX_RATE {
            Some(format!(
                "even sampling every allocation out would cost ~{:.0}% (the traps on every \
                 entry and free)",
                o.floor_share_pct
            ))
        } else {
            None
        };
        if let Some(why) = why_not_sampling {
            kernel.detach_probes();
            sink.notice(
                pid,
                &format!(
                    "{cost}, and {why}: took every probe off. The sites stay as they were; the \
                     memory watch and its alerts go on"
                ),
            )?;
            return Ok(());
        }
        // Sampling scales what is above the floor, in proportion to the
        // calls it keeps: aim at 80% of the bound, or halfway from the floor
        // to the bound when the floor is close to it.
        let target = (bound * 0.8).max((o.floor_share_pct + bound) / 2.0);
        let variable = (o.share_pct - o.floor_share_pct).max(1e-9);
        let keep = ((target - o.floor_share_pct) / variable).clamp(1e-4, 1.0);
        let wanted = if rate == 0 {
            // Every call kept: a block of s bytes is kept with probability
            // about s / rate, so the rate is the mean size over the share.
            let (bytes, blocks) = snap
                .sites
                .iter()
                .filter(|s| s.kind == crate::schema::SiteKind::Heap)
                .fold((0u64, 0u64), |(b, n), s| (b + s.alloc_bytes, n + s.allocs));
            let mean = bytes as f64 / blocks.max(1) as f64;
            mean.max(1.0) / (keep * o.kept_pct / 100.0).max(1e-6)
        } else {
            rate as f64 / keep
        };
        let new_rate = (wanted as u64)
            .max(rate.saturating_mul(2))
            .clamp(4096, MAX_RATE)
            .next_power_of_two();
        kernel.set_sample_bytes(new_rate)?;
        self.overhead = self
            .overhead
            .as_ref()
            .map(|e| Estimator::new(e.trap_cost()));
        sink.notice(
            pid,
            &format!(
                "{cost}: sampling heap allocations at 1 in {} (was {}); sites of blocks smaller \
                 than that become estimates (sampled: true)",
                human_size(new_rate),
                if rate == 0 {
                    "every allocation".to_string()
                } else {
                    format!("1 in {}", human_size(rate))
                }
            ),
        )?;
        Ok(())
    }

    /// Tells the user the probes' cost once it has a few seconds behind it.
    fn tell_overhead(&mut self, o: &Overhead, sink: &mut dyn Sink) -> std::io::Result<()> {
        if self.overhead_told || o.window_s < 3.0 {
            return Ok(());
        }
        self.overhead_told = true;
        sink.notice(self.pid, &describe_overhead(o))
    }

    /// Switches the sampled Go timer-creation probe on or off for the
    /// current window (see [`GoTarget::timer_sampling`]).
    fn sample_timer_creations(&mut self, kernel: &mut Kernel) {
        if !kernel.has_sampled_probes() {
            return;
        }
        let on = self
            .collector
            .go_mut()
            .is_none_or(|g| g.timer_sampling(Instant::now()));
        match kernel.set_sampled_probes(self.pid, on) {
            Ok(true) => log::debug!(
                "pid {}: timer creation stacks {}",
                self.pid,
                if on { "sampled" } else { "not sampled" }
            ),
            Ok(false) => {}
            // The target is exiting: its exit ends the trace.
            Err(_) if !std::path::Path::new(&format!("/proc/{}", self.pid)).exists() => {}
            // The next window tries again.
            Err(e) => log::warn!(
                "pid {}: cannot attach the timer creation probe: {}",
                self.pid,
                crate::error::chain(&e)
            ),
        }
    }

    /// Applies the Go sampling policy once the executable is mapped.
    fn settle_go(&mut self, opts: &Options, sink: &mut dyn Sink) -> std::io::Result<()> {
        let pid = self.pid;
        match self.collector.go_mut() {
            Some(go) => go.settle_sampling(opts.go_sampling, sink, pid),
            None => Ok(()),
        }
    }

    /// Re-reads the maps (new libraries, the executable after exec). A
    /// failed read means the target is exiting: keep the last maps. True
    /// when they changed.
    fn refresh_maps(&mut self) -> bool {
        // Unchanged (the common case): nothing to parse, resolve or rebuild.
        if let Ok(Some(maps)) = Maps::read_if_changed(self.pid, &mut self.maps_text)
            && !maps.mappings.is_empty()
        {
            if let Some(go) = self.collector.go_mut() {
                go.resolve(&maps);
            }
            self.collector.symbolizer_mut().update_maps(maps);
            return true;
        }
        false
    }

    /// Hooks the allocators of code files mapped since the plan (a library
    /// loaded with dlopen: jemalloc by a plugin, a Python extension's own
    /// malloc), with a notice; files without one are remembered as planned.
    fn hook_new_files(
        &mut self,
        kernel: &mut Kernel,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        let new: Vec<ObjectRef> = self
            .collector
            .symbolizer_mut()
            .maps()
            .executable_objects()
            .iter()
            .filter(|m| !self.planned_files.contains(&m.path))
            .map(|m| ObjectRef {
                path: m.path.clone(),
                open_path: m.open_path.clone(),
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.planned_files
            .extend(new.iter().map(|o| o.path.clone()));
        let planned = match probes::plan_libc(&new, &mut ElfObjects::new()) {
            Ok(p) => p,
            Err(e) => {
                log::info!(
                    "pid {}: new code files not planned: {}",
                    self.pid,
                    crate::error::chain(&e)
                );
                return Ok(());
            }
        };
        if planned.is_empty() {
            return Ok(());
        }
        let mut planned = planned;
        planned.sort_by_key(|p| !p.frees);
        match kernel.attach(&planned, self.pid) {
            Ok(live) => {
                let files: HashSet<&str> = live.iter().map(|p| p.path.as_str()).collect();
                let mut files: Vec<&str> = files.into_iter().collect();
                files.sort_unstable();
                sink.notice(
                    self.pid,
                    &format!(
                        "pid {} loaded an allocator since attach: {} more probes in {}",
                        self.pid,
                        live.len(),
                        files.join(", ")
                    ),
                )?;
            }
            // Unmapped again, or the process is exiting.
            Err(e) => log::info!(
                "pid {}: cannot hook a library loaded since attach: {}",
                self.pid,
                crate::error::chain(&e)
            ),
        }
        Ok(())
    }

    /// Whether the target exec'd since the last look (its executable is
    /// another file).
    fn exec_happened(&mut self) -> bool {
        match (self.exe_id, exe_id(self.pid)) {
            (Some(old), Some(new)) => old != new,
            (None, new) => {
                self.exe_id = new;
                false
            }
            // Gone: its exit ends the trace.
            (_, None) => false,
        }
    }

    /// Tells the user, once per module, which frames stay unnamed and why.
    fn tell_missing_symbols(&mut self, sink: &mut dyn Sink) -> std::io::Result<()> {
        let missing = self
            .collector
            .symbolizer_mut()
            .new_modules_without_symbols();
        if missing.is_empty() {
            return Ok(());
        }
        sink.notice(
            self.pid,
            &format!(
                "no symbols for some code of {}: those frames show as module+0xoffset; install \
                 the debug symbols (Debian: the package's -dbgsym or -dbg) or pass --debug-dir \
                 DIR holding .build-id/xx/....debug files",
                missing.join(", ")
            ),
        )
    }

    /// A snapshot outside the interval's (on demand, at the end), with the
    /// last memory status the watch saw.
    fn snapshot_now(&mut self, kernel: &mut Kernel) -> Result<Snapshot, TracerError> {
        kernel.read_sites()?;
        let mut snap = self.collector.collect(kernel)?;
        kernel.flush_logs();
        snap.memory = self.watch.as_ref().and_then(|w| w.last.clone());
        snap.overhead = self.last_overhead;
        Ok(snap)
    }

    /// The interval's snapshot, with the memory status and any alert due.
    fn interval(
        &mut self,
        kernel: &mut Kernel,
        unwinder: &mut Unwinder,
        opts: &Options,
        sink: &mut dyn Sink,
    ) -> Result<Step, TracerError> {
        if self.exec_happened() {
            return Ok(Step::Exec);
        }
        if self.refresh_maps() && !kernel.probes_detached() {
            self.hook_new_files(kernel, sink)?;
        }
        // Libraries loaded since (dlopen), the image after exec.
        if let Some(inst) =
            unwinder.install(kernel, self.pid, self.collector.symbolizer_mut().maps())?
        {
            unwind_notice(self.pid, &inst, sink)?;
        }
        self.settle_go(opts, sink)?;
        self.sample_timer_creations(kernel);
        let started = Instant::now();
        let mut snap = self.collector.collect(kernel)?;
        // The kernel's run-time statistics are per program, over every
        // process: the estimate is the root's (with its children's calls).
        if self.root && !kernel.probes_detached() {
            snap.overhead = self.measure_overhead(kernel);
        }
        if let Some(o) = snap.overhead {
            self.last_overhead = Some(o);
            self.tell_overhead(&o, sink)?;
            self.bound_overhead(kernel, &o, &snap, opts, sink)?;
        }
        log::info!(
            "pid {}: {} sites, {} B outstanding, read and symbolized in {:.1} ms",
            self.pid,
            snap.sites.len(),
            snap.total_outstanding_bytes,
            started.elapsed().as_secs_f64() * 1e3
        );
        kernel.flush_logs();
        self.tell_missing_symbols(sink)?;
        if let Some(message) = self.collector.go_mut().and_then(GoTarget::census_notice) {
            sink.notice(self.pid, &message)?;
        }
        if let Some(w) = self.watch.as_mut() {
            w.update(&mut snap, sink)?;
        }
        sink.snapshot(&snap)?;
        self.last_snap = Some(snap);
        Ok(Step::Snapshot)
    }

    /// The end of this process's trace: its OOM kill and exit when it exited,
    /// then the final report and the exports.
    async fn finish(
        &mut self,
        kernel: &mut Kernel,
        reason: EndReason,
        elapsed: Duration,
        opts: &Options,
        group_watch: Option<&MemoryWatch>,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        self.exited = true;
        if reason != EndReason::TargetExited {
            self.refresh_maps();
            let pid = self.pid;
            if let Some(go) = self.collector.go_mut() {
                go.restore(opts.go_sampling, sink, pid)?;
            }
        } else if let Some(maps) = self.own_child.as_ref().and_then(ExitWatcher::maps_at_exit) {
            self.collector.symbolizer_mut().update_maps(maps);
        }
        // The maps outlive the target: the final snapshot still holds everything.
        let mut snap = self.snapshot_now(kernel)?;
        snap.previous_images = self.previous_images.clone();
        self.tell_missing_symbols(sink)?;
        if reason == EndReason::TargetExited {
            let watch = self.watch.as_ref().or(group_watch);
            if let Some(kill) = watch.and_then(|w| w.oom_kill(self.pid, kernel, &snap)) {
                sink.oom_kill(&kill)?;
            }
            let (code, signal) = match &self.own_child {
                Some(w) => w.status(),
                None => kernel
                    .exit_status(self.pid)
                    .map_or((None, None), wait_status),
            };
            sink.target_exited(&Exit {
                pid: self.pid,
                code,
                signal,
            })?;
        }
        sink.finish(&snap, reason, elapsed.as_secs_f64())?;
        opts.exports.write(&snap)?;
        self.last_snap = Some(snap);
        if let Some(w) = self.watch.as_mut() {
            if reason == EndReason::TargetExited {
                // Gone: nothing left to alert about.
                w.notifier.resolve();
            }
            w.notifier.flush(Duration::from_secs(5)).await;
        }
        if self.own_child.is_some() && reason != EndReason::TargetExited {
            // Interrupted or timed out: the traced command keeps running, as
            // with `strace -o`; detaching is all the tracer does to it.
            log::info!("pid {} keeps running after the tracer detached", self.pid);
        }
        Ok(())
    }
}

/// (device, inode) of process `pid`'s executable.
fn exe_id(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// "~4.1 µs per call × 120k calls/s: about +49% CPU for the target".
fn describe_overhead(o: &Overhead) -> String {
    format!(
        "probes cost ~{:.1} µs per call × {} calls/s: about +{:.0}% CPU for the target \
         ({:.0}% of its CPU time, which a CPU-bound service loses in throughput); \
         --sample-bytes lowers it, --max-overhead bounds it",
        o.ns_per_call / 1e3,
        human_rate(o.calls_per_s),
        o.added_cpu_pct,
        o.share_pct
    )
}

/// 512 KiB, 4 MiB.
fn human_size(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

/// 120k, 1.2M, 850.
fn human_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.1}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.0}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// (exit code, signal) of a wait(2) status.
fn wait_status(status: u32) -> (Option<i32>, Option<i32>) {
    match status & 0x7f {
        0 => (Some(((status >> 8) & 0xff) as i32), None),
        sig => (None, Some(sig as i32)),
    }
}

/// What an interval did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Snapshot,
    /// The target exec'd: nothing was read, the session re-plans.
    Exec,
}

/// Target bits for a process of this session.
fn target_bits(follow_forks: bool) -> u32 {
    use tracer_common::target::{FOLLOW_FORKS, TRACED};
    if follow_forks {
        TRACED | FOLLOW_FORKS
    } else {
        TRACED
    }
}

/// Follows `t` into the image it exec'd: keeps the old image's sites (as
/// the exec found them) for the final report, then plans and attaches for
/// the new image as `attach` would, with a notice and a new `attached`
/// record.
async fn follow_exec(
    t: &mut Traced,
    kernel: &mut Kernel,
    unwinder: &mut Unwinder,
    opts: &Options,
    sink: &mut dyn Sink,
) -> Result<(), TracerError> {
    let pid = t.pid;
    // Its files are held open: stacks first seen now still resolve.
    let old = t.snapshot_now(kernel)?;
    let old_exe = std::mem::take(&mut t.exe);
    t.previous_images.push(PreviousImage {
        exe: old_exe.clone(),
        replaced_at: old.ts,
        total_outstanding_bytes: old.total_outstanding_bytes,
        sites: old.sites,
    });
    let replanned = match Target::resolve(pid) {
        Ok(target) => plan_running(target).await,
        Err(e) => Err(e),
    };
    let (target, plan) = match replanned {
        Ok(found) => found,
        Err(e) => {
            // Gone already (its exit ends the trace), or nothing to hook.
            t.exe_id = exe_id(pid);
            t.exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            kernel.clear_target_bits(pid, tracer_common::target::EXECED);
            // Exited already (a short-lived command): its exit ends its trace.
            if target::Target::is_alive(pid) {
                sink.notice(
                    pid,
                    &format!(
                        "pid {pid} exec'd {}: not traced ({}); the sites of {old_exe} are in \
                         the final report (previous_images)",
                        t.exe,
                        crate::error::chain(&e)
                    ),
                )?;
            }
            return Ok(());
        }
    };
    // The old image's links close first, and the new image's attach after:
    // two links on one function (libc, mapped by both images) would each
    // fire for one call, and one closing between a call's entry and its
    // return loses that call. The new image runs unprobed meanwhile (one
    // grace period, ~0.1 s of its start-up).
    kernel.detach_process_now(pid);
    let mut info = hook_process(
        kernel,
        unwinder,
        &target,
        &plan,
        target_bits(t.follow_forks),
        sink,
    )?;
    info.parent_pid = t.parent;
    t.rehook(target.maps.clone(), &plan, opts);
    t.settle_go(opts, sink)?;
    sink.notice(
        pid,
        &format!(
            "pid {pid} exec'd {}: re-attached to the new image ({} probes{}); the sites of \
             {old_exe} as the exec left them are in the final report (previous_images)",
            info.exe,
            info.probes.len(),
            info.go_version
                .as_ref()
                .map_or(String::new(), |v| format!(", Go {v}"))
        ),
    )?;
    sink.attached(&info)?;
    Ok(())
}

/// Traces the running process `pid` (and, with `--follow-forks`, the
/// children it starts) until it exits, `duration` elapses or the user
/// interrupts.
pub async fn attach(pid: u32, opts: &Options, sink: &mut dyn Sink) -> Result<(), TracerError> {
    let signals = Signals::take()?;
    let pid = process_of_thread(pid, sink)?;
    let target = Target::resolve(pid)?;
    target::check_environment()?;
    let (target, plan) = plan_running(target).await?;
    let exit_fd = PidFd::open(pid)?;
    let (mut kernel, mut unwinder) = load_kernel(
        target
            .maps
            .executable_objects()
            .iter()
            .map(|m| m.open_path.as_path()),
        opts,
    )?;
    watch_processes(&mut kernel, opts);
    let info = hook_process(
        &mut kernel,
        &mut unwinder,
        &target,
        &plan,
        target_bits(opts.follow_forks),
        sink,
    )?;
    let mut traced = Traced::new(pid, target.maps.clone(), Some(&plan), opts);
    traced.follow_forks = opts.follow_forks;
    traced.root = true;
    // Before `attached`, which tells scripts that everything is in place.
    traced.settle_go(opts, sink)?;
    sink.attached(&info)?;
    session_notice(&kernel, sink, pid)?;
    Session::new(kernel, unwinder)
        .trace(vec![(traced, exit_fd)], signals, opts, sink)
        .await
}

/// Traces every process of cgroup `cg` (and its descendant cgroups), those
/// that enter it or are born in it later included, until the duration
/// elapses or the user interrupts (or every process is gone).
pub async fn attach_cgroup(
    cg: Cgroup,
    opts: &Options,
    sink: &mut dyn Sink,
) -> Result<(), TracerError> {
    let signals = Signals::take()?;
    target::check_environment()?;
    let mut opts = opts.clone();
    // Children are born in their parent's cgroup.
    opts.follow_forks = true;
    let opts = &opts;
    let mut planned = Vec::new();
    let mut untraced = Vec::new();
    for pid in cg.processes() {
        let found = match Target::resolve(pid) {
            Ok(target) => plan_running(target).await,
            Err(e) => Err(e),
        };
        match found {
            Ok(p) => planned.push(p),
            Err(e) => {
                log::info!(
                    "pid {pid} of {}: not traced: {}",
                    cg.name(),
                    crate::error::chain(&e)
                );
                untraced.push((pid, e));
            }
        }
    }
    if planned.is_empty() {
        return Err(TracerError::EmptyCgroup(cg.name()));
    }
    let mut paths: Vec<&Path> = planned
        .iter()
        .flat_map(|(t, _)| t.maps.executable_objects())
        .map(|m| m.open_path.as_path())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let (mut kernel, mut unwinder) = load_kernel(paths, opts)?;
    watch_processes(&mut kernel, opts);
    let mut targets = Vec::new();
    for (i, (target, plan)) in planned.iter().enumerate() {
        let pid = target.pid;
        let fd = match PidFd::open(pid) {
            Ok(fd) => fd,
            Err(_) => continue, // exited meanwhile
        };
        let info = match hook_process(
            &mut kernel,
            &mut unwinder,
            target,
            plan,
            target_bits(true),
            sink,
        ) {
            Ok(info) => info,
            Err(_) if !target::Target::is_alive(pid) => continue,
            Err(e) => return Err(e),
        };
        let mut traced = Traced::new(pid, target.maps.clone(), Some(plan), opts);
        traced.follow_forks = true;
        traced.root = i == 0;
        traced.watch = None;
        traced.settle_go(opts, sink)?;
        sink.attached(&info)?;
        if targets.is_empty() {
            session_notice(&kernel, sink, pid)?;
        }
        targets.push((traced, fd));
    }
    let mut session = Session::new(kernel, unwinder);
    for (pid, e) in untraced {
        // Their children are followed still.
        if target::Target::is_alive(pid) {
            session.kernel.add_target(pid, target_bits(true), None)?;
            session.untraced.insert(pid);
            sink.notice(
                pid,
                &format!(
                    "pid {pid} of the cgroup: not traced ({})",
                    crate::error::chain(&e)
                ),
            )?;
        }
    }
    let first = targets.first().map_or(0, |(t, _)| t.pid);
    session.cgroup = Some(CgroupState {
        watch: opts
            .alerts
            .as_ref()
            .map(|a| MemoryWatch::of_cgroup(first, cg.memory_source(first), a)),
        cgroup: cg,
    });
    session.trace(targets, signals, opts, sink).await
}

/// The plan for running process `pid`. A process started an instant ago
/// may still be in the dynamic loader, its libraries (libc) not mapped
/// yet: wait for them a moment.
async fn plan_running(mut target: Target) -> Result<(Target, Plan), TracerError> {
    let pid = target.pid;
    let loading_since = Instant::now();
    let found = loop {
        let objects = probes::objects_of(&target);
        match make_plan(&objects, &target.exe, &mut ElfObjects::new())? {
            Some(plan) => break (target, plan),
            None if in_dynamic_loader(&target.maps)
                && loading_since.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
                target = Target::resolve(pid)?;
            }
            None => return Err(TracerError::NoAllocator(pid)),
        }
    };
    if loading_since.elapsed() > Duration::from_millis(5) {
        log::info!(
            "pid {pid}: waited {:.0} ms for the dynamic loader to map its libraries",
            loading_since.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(found)
}

/// Loads the kernel side, with the row array of the unwind tables sized
/// for the files `paths` (and libraries loaded later).
fn load_kernel<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    opts: &Options,
) -> Result<(Kernel, Unwinder), TracerError> {
    let mut sizes = opts.sizes;
    let mut unwinder = prepare_unwind(paths, opts, &mut sizes);
    let mut kernel = Kernel::load(sizes)?;
    unwinder.flush(&mut kernel, sizes.unwind_rows)?;
    Ok((kernel, unwinder))
}

/// Attaches the tracepoints that follow the targets' execs and, with
/// `--follow-forks`, their children; without them an exec is noticed at
/// the next interval and no child is followed.
fn watch_processes(kernel: &mut Kernel, opts: &Options) {
    if let Err(e) = kernel.watch_processes() {
        let what = if opts.follow_forks {
            "children are not followed and an exec is noticed at the next interval"
        } else {
            "an exec is noticed at the next interval"
        };
        log::warn!(
            "cannot watch the targets' forks and execs ({}): {what}",
            crate::error::chain(&e)
        );
    }
}

/// Makes the running process of `target` a target of `kernel` (`bits`:
/// [`tracer_common::target`]), lists its mappings for the unwinder and
/// attaches every probe of `plan` to it.
fn hook_process(
    kernel: &mut Kernel,
    unwinder: &mut Unwinder,
    target: &Target,
    plan: &Plan,
    bits: u32,
    sink: &mut dyn Sink,
) -> Result<Attached, TracerError> {
    let pid = target.pid;
    let started = Instant::now();
    let offsets = plan
        .go
        .as_ref()
        .map(|g| GoTarget::kernel_offsets(g, Some(&target.maps)));
    kernel.add_target(pid, bits, offsets)?;
    let mut unwind = None;
    if let Some(inst) = unwinder.install(kernel, pid, &target.maps)? {
        unwind_notice(pid, &inst, sink)?;
        unwind = inst.info();
    }
    let probes = kernel.attach(&plan.probes, pid)?;
    // Before `attached`: a target may exit right after it. Only `attach`
    // needs it; `run` waits for its own child.
    if let Err(e) = kernel.watch_exit() {
        log::info!(
            "the target's exit status is not recorded: {}",
            crate::error::chain(&e)
        );
    }
    log::info!(
        "pid {pid}: {} probes live in {:.2} s{}",
        probes.len(),
        started.elapsed().as_secs_f64(),
        plan.go
            .as_ref()
            .map_or(String::new(), |g| format!(" (Go {})", g.version.raw))
    );
    census_notice(plan.go.as_ref(), sink, pid)?;
    Ok(Attached {
        schema_version: SCHEMA_VERSION,
        pid,
        parent_pid: None,
        comm: target.comm.clone(),
        exe: target.exe.display().to_string(),
        go_version: plan.go.as_ref().map(|g| g.version.raw.clone()),
        probes,
        unwind,
        kernel: Some(kernel.info()),
        metrics: None,
    })
}

/// Watches the memory limit of `pid` and alerts, without hooking its
/// allocator (no uprobes: no overhead in the target). Alerts then carry no
/// call sites; the OOM kill is still recorded.
pub async fn watch(pid: u32, opts: &Options, sink: &mut dyn Sink) -> Result<(), TracerError> {
    let signals = Signals::take()?;
    let pid = process_of_thread(pid, sink)?;
    let target = Target::resolve(pid)?;
    target::check_environment()?;
    let exit_fd = PidFd::open(pid)?;
    let mut kernel = Kernel::load(opts.sizes.without_probes())?;
    kernel.add_target(pid, target_bits(false), None)?;
    let info = Attached {
        schema_version: SCHEMA_VERSION,
        pid,
        parent_pid: None,
        comm: target.comm.clone(),
        exe: target.exe.display().to_string(),
        go_version: None,
        probes: Vec::new(),
        unwind: None,
        kernel: Some(kernel.info()),
        metrics: None,
    };
    let mut traced = Traced::new(pid, target.maps.clone(), None, opts);
    traced.root = true;
    sink.attached(&info)?;
    // Nothing is walked: no tables.
    Session::new(kernel, Unwinder::disabled())
        .trace(vec![(traced, exit_fd)], signals, opts, sink)
        .await
}

/// Starts `argv` and traces it from its first instruction: the child is held
/// between fork and exec until every probe is attached. Its children are
/// followed unless `--no-follow-forks` (a shell wrapper is the common case).
pub async fn run(argv: &[String], opts: &Options, sink: &mut dyn Sink) -> Result<(), TracerError> {
    let signals = Signals::take()?;
    let command = argv.first().cloned().unwrap_or_default();
    let exe = process::find_executable(&command)?;
    target::check_environment()?;
    let mut elves = ElfObjects::new();
    let objects: Vec<ObjectRef> = probes::objects_of_command(&exe, &mut elves)?;
    let plan = make_plan(&objects, &exe, &mut elves)?.ok_or_else(|| TracerError::Spawn {
        command: command.clone(),
        reason: "neither it nor its libraries define malloc, and it is not a Go program \
                 (a stripped static binary?)"
            .into(),
    })?;
    let child = HeldChild::fork(&exe, argv)?;
    let pid = child.pid;
    let result = async {
        let exit_fd = PidFd::open(pid)?;
        let exit_hook = plan.go.as_ref().and_then(|g| GoTarget::exit_hook(pid, g));
        let (hook, exit_census) = match exit_hook {
            Some((h, c)) => (Some(h), Some(c)),
            None => (None, None),
        };
        let watcher = ExitWatcher::start(pid, hook);
        let offsets = plan.go.as_ref().map(|g| GoTarget::kernel_offsets(g, None));
        let (mut kernel, mut unwinder) =
            load_kernel(objects.iter().map(|o| o.open_path.as_path()), opts)?;
        watch_processes(&mut kernel, opts);
        kernel.add_target(pid, target_bits(opts.follow_forks), offsets)?;
        let probes = kernel.attach(&plan.probes, pid)?;
        census_notice(plan.go.as_ref(), sink, pid)?;
        let mut info = Attached {
            schema_version: SCHEMA_VERSION,
            pid,
            parent_pid: None,
            comm: exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            exe: exe.display().to_string(),
            go_version: plan.go.as_ref().map(|g| g.version.raw.clone()),
            probes,
            unwind: None,
            kernel: Some(kernel.info()),
            metrics: None,
        };
        child.release()?;
        // The unwinder needs the addresses the loader chose: the child stops
        // at its entry point with every library mapped, and runs on once
        // they are listed for the kernel. Without that stop (not seized),
        // the maps are polled until every library is there (the kernel
        // walks frame pointers until then). Before `attached`, which tells
        // scripts that everything is in place.
        // Blocking, briefly: the loader's work, a few milliseconds.
        let maps = match watcher.at_entry(Duration::from_secs(10)) {
            Some(maps) => Some(maps),
            None => wait_for_objects(pid, &objects).await,
        };
        let installed = match maps {
            Some(maps) => unwinder.install(&mut kernel, pid, &maps),
            None => Ok(None),
        };
        watcher.resume();
        if let Some(inst) = installed? {
            unwind_notice(pid, &inst, sink)?;
            info.unwind = inst.info();
        }
        sink.attached(&info)?;
        session_notice(&kernel, sink, pid)?;
        // The symbolizer reads the maps at the first interval. The Go runtime
        // resets MemProfileRate during start-up, so the sampling policy is
        // applied from the first interval on.
        let mut traced = Traced::new(pid, Maps::default(), Some(&plan), opts);
        traced.follow_forks = opts.follow_forks;
        traced.root = true;
        if let (Some(slot), Some(go)) = (exit_census, traced.collector.go_mut()) {
            go.set_exit_census(slot);
        }
        traced.own_child = Some(watcher);
        Session::new(kernel, unwinder)
            .trace(vec![(traced, exit_fd)], signals, opts, sink)
            .await
    }
    .await;
    if result.is_err() {
        // Never leave a held child behind.
        process::kill_now(pid);
        process::reap(pid);
    }
    result
}

/// Whether the process is still in the dynamic loader: the loader is
/// mapped and libc's code is not yet. The loader maps the libraries in
/// order, each first read-only as a whole file, then its segments: until
/// libc's code is mapped, the allocator may still be on its way.
fn in_dynamic_loader(maps: &Maps) -> bool {
    let name = |m: &crate::target::Mapping| {
        m.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let loader = maps
        .mappings
        .iter()
        .any(|m| name(m).starts_with("ld-linux"));
    let libc = maps
        .mappings
        .iter()
        .any(|m| m.executable && (name(m).starts_with("libc.so") || name(m).starts_with("libc-")));
    loader && !libc
}

/// The maps of a child just released, once every object of its plan is
/// mapped (the loader maps all libraries before running any of their code),
/// polled every millisecond for at most a second; None if it exited.
async fn wait_for_objects(pid: u32, objects: &[ObjectRef]) -> Option<Maps> {
    let want: Vec<&Path> = objects.iter().map(|o| o.path.as_path()).collect();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut last = None;
    while Instant::now() < deadline {
        let maps = Maps::read(pid).ok()?;
        let all = want.iter().all(|w| {
            maps.mappings
                .iter()
                .any(|m| m.executable && (m.path == *w || same_file(&m.path, w)))
        });
        if all {
            return Some(maps);
        }
        last = Some(maps);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    last
}

/// Whether two paths name one file (a library found through a symlink).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The process of `pid`, telling the user when `pid` is one of its threads.
fn process_of_thread(pid: u32, sink: &mut dyn Sink) -> Result<u32, TracerError> {
    let process = target::process_of(pid)?;
    if process != pid {
        sink.notice(
            process,
            &format!("{pid} is a thread of process {process}: tracing the process"),
        )?;
    }
    Ok(process)
}

/// Tells the user when a Go program's goroutines or timer stops cost a
/// probe hit each (the runtime's structures were not found).
fn census_notice(go: Option<&GoPlan>, sink: &mut dyn Sink, pid: u32) -> std::io::Result<()> {
    let Some(g) = go else {
        return Ok(());
    };
    let mut missing = Vec::new();
    if g.census.is_none() {
        missing.push("goroutines are traced with probes on their creation and exit (the goroutine list, runtime.allgs, was not found)");
    }
    if g.timer_heaps.is_none() {
        missing.push("timer stops and firings are traced with probes (the timer heaps, runtime.allp, were not found)");
    }
    if missing.is_empty() {
        return Ok(());
    }
    sink.notice(
        pid,
        &format!(
            "{} in {} (or TRACER_GO_CENSUS=0 / TRACER_GO_TIMER_HEAPS=0 turned them off): a trap each",
            missing.join("; "),
            g.object.path.display()
        ),
    )
}

/// Tells the user which kernel features are missing and what the tracer
/// does instead: probes attached one by one (batched uprobe_multi links
/// need Linux 6.6+), and sampling that cannot skip the return trap of
/// left-out calls (uprobe sessions need Linux 6.13+).
fn session_notice(kernel: &Kernel, sink: &mut dyn Sink, pid: u32) -> std::io::Result<()> {
    if let Some(why) = kernel.batching_unavailable() {
        sink.notice(
            pid,
            &format!(
                "probes attach one perf event each, and each takes ~0.1 s to detach at exit: \
                 batched uprobe_multi links are unavailable ({why})"
            ),
        )?;
    }
    match kernel.session_unavailable() {
        Some(why) => sink.notice(
            pid,
            &format!(
                "sampled-out calls still pay a return probe: uprobe sessions are unavailable ({why})"
            ),
        ),
        None => Ok(()),
    }
}

/// How often the kernel's list of targets is read for children born and
/// execs done when its ring buffer cannot wake the session: a new image
/// runs unprobed until it is read.
const PROCESS_POLL: Duration = Duration::from_millis(20);

/// The same as a safety net behind the ring buffer (a wakeup lost to a full
/// buffer): each look costs a few syscalls per target, which at 50 a
/// second were most of the tracer's own CPU.
const PROCESS_POLL_BEHIND_EVENTS: Duration = Duration::from_secs(1);

/// One set of kernel objects and the processes it traces.
struct Session {
    kernel: Kernel,
    unwinder: Unwinder,
    traced: Vec<Traced>,
    /// Each target's exit arrives as its pid.
    exit_tx: mpsc::UnboundedSender<u32>,
    exits: mpsc::UnboundedReceiver<u32>,
    /// Exited targets whose entries the maps still hold.
    gone: HashSet<u32>,
    /// Children that could not be traced (no allocator, gone at once):
    /// kept as targets only so that their own children are followed.
    untraced: HashSet<u32>,
    /// Children that exited before their probes could attach, and how
    /// many of them the user was told about.
    missed_children: (u64, u64),
    /// Under `--cgroup`: the cgroup, its memory watch.
    cgroup: Option<CgroupState>,
}

/// A cgroup traced whole (`--cgroup`).
struct CgroupState {
    cgroup: Cgroup,
    /// The cgroup's memory against its limit; alerts rank every process's
    /// sites together. None with `--no-alerts`.
    watch: Option<MemoryWatch>,
}

impl Session {
    fn new(kernel: Kernel, unwinder: Unwinder) -> Self {
        let (exit_tx, exits) = mpsc::unbounded_channel();
        Self {
            kernel,
            unwinder,
            traced: Vec::new(),
            exit_tx,
            exits,
            gone: HashSet::new(),
            untraced: HashSet::new(),
            missed_children: (0, 0),
            cgroup: None,
        }
    }

    /// Under `--cgroup`, each interval: processes that entered the cgroup
    /// are hooked, those that left stop being traced (their last numbers
    /// stay in their report); then the cgroup's totals and memory watch,
    /// every process's sites ranked together.
    async fn cgroup_tick(
        &mut self,
        started: Instant,
        opts: &Options,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        let Some(state) = &self.cgroup else {
            return Ok(());
        };
        let members: HashSet<u32> = state.cgroup.processes().into_iter().collect();
        let known: HashSet<u32> = self
            .traced
            .iter()
            .map(|t| t.pid)
            .chain(self.untraced.iter().copied())
            .collect();
        for &pid in members.difference(&known) {
            self.adopt(pid, false, opts, sink).await?;
        }
        let Self {
            kernel,
            traced,
            gone,
            cgroup,
            ..
        } = self;
        let group_watch = cgroup.as_ref().and_then(|c| c.watch.as_ref());
        for t in traced
            .iter_mut()
            .filter(|t| !t.exited && !members.contains(&t.pid))
        {
            if !target::Target::is_alive(t.pid) {
                continue; // its exit is on the way
            }
            sink.notice(
                t.pid,
                &format!("pid {} left the cgroup: no longer traced", t.pid),
            )?;
            t.finish(
                kernel,
                EndReason::LeftCgroup,
                started.elapsed(),
                opts,
                group_watch,
                sink,
            )
            .await?;
            kernel.remove_target(t.pid);
            gone.insert(t.pid);
        }
        self.cgroup_totals(sink)
    }

    /// The cgroup's totals from every process's last snapshot, and its
    /// memory watch on all their sites.
    fn cgroup_totals(&mut self, sink: &mut dyn Sink) -> Result<(), TracerError> {
        let Some(state) = self.cgroup.as_mut() else {
            return Ok(());
        };
        let mut processes = Vec::new();
        let mut sites = Vec::new();
        for t in &self.traced {
            let Some(snap) = &t.last_snap else {
                continue;
            };
            processes.push(crate::schema::ProcessTotal {
                pid: t.pid,
                comm: t.comm.clone(),
                total_outstanding_bytes: snap.total_outstanding_bytes,
                ended: t.exited,
            });
            if !t.exited {
                sites.extend(snap.sites.iter().cloned().map(|mut s| {
                    s.process = Some(crate::schema::ProcessRef {
                        pid: t.pid,
                        comm: t.comm.clone(),
                    });
                    s
                }));
            }
        }
        sites.sort_by(crate::schema::SiteReport::rank);
        let total = processes.iter().map(|p| p.total_outstanding_bytes).sum();
        let mut memory = None;
        if let Some(w) = state.watch.as_mut() {
            let mut combined = Snapshot {
                ts: std::time::SystemTime::now(),
                pid: self.traced.first().map_or(0, |t| t.pid),
                total_outstanding_bytes: total,
                sites,
                lost: Default::default(),
                activity: Default::default(),
                memory: None,
                mappings: Vec::new(),
                overhead: None,
                previous_images: Vec::new(),
            };
            w.update(&mut combined, sink)?;
            memory = combined.memory;
        }
        sink.cgroup(&crate::schema::CgroupTotals {
            cgroup: state.cgroup.name(),
            total_outstanding_bytes: total,
            processes,
            memory,
        })?;
        Ok(())
    }

    /// Adds a traced process; its exit arrives on `exits`.
    fn add(&mut self, t: Traced, fd: PidFd) {
        let tx = self.exit_tx.clone();
        let pid = t.pid;
        tokio::spawn(async move {
            fd.exited().await;
            let _ = tx.send(pid);
        });
        self.traced.push(t);
    }

    /// Hooks the children the kernel made targets and the targets that
    /// exec'd since the last look.
    async fn poll_processes(
        &mut self,
        opts: &Options,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        use tracer_common::target::{EXECED, NEW_CHILD};
        for (pid, bits) in self.kernel.targets() {
            if bits & NEW_CHILD != 0 {
                self.adopt(pid, true, opts, sink).await?;
            } else if bits & EXECED != 0 {
                match self.traced.iter_mut().find(|t| t.pid == pid && !t.exited) {
                    // Already on this image (`run`'s own exec of the
                    // command, an exec seen by the interval first).
                    Some(t) if t.exe_id.is_some() && t.exe_id == exe_id(pid) => {
                        self.kernel.clear_target_bits(pid, EXECED)
                    }
                    Some(t) => {
                        follow_exec(t, &mut self.kernel, &mut self.unwinder, opts, sink).await?
                    }
                    None => self.kernel.clear_target_bits(pid, EXECED),
                }
            } else if self.untraced.contains(&pid) && !target::Target::is_alive(pid) {
                self.untraced.remove(&pid);
                self.gone.insert(pid);
            }
        }
        Ok(())
    }

    /// Traces `pid`: a child the kernel made a target at its birth
    /// (`born`), or a process that entered the cgroup traced.
    async fn adopt(
        &mut self,
        pid: u32,
        born: bool,
        opts: &Options,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        let parent = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.stat())
            .ok()
            .map(|s| s.ppid as u32);
        // Held open first: the child may exit while it is being hooked.
        let fd = PidFd::open(pid);
        // A child execs right after its birth (a shell running a command):
        // the image found may be gone by the time it is hooked, and the
        // exec's mark cleared by the hooking.
        let exe_before = exe_id(pid);
        // A forked child runs its parent's image: its plan is the parent's
        // (planning parses every file: tens of milliseconds in which the
        // child runs unprobed).
        let inherited = parent
            .and_then(|pp| self.traced.iter().find(|t| t.pid == pp && !t.exited))
            .filter(|t| t.exe_id.is_some() && t.exe_id == exe_id(pid))
            .and_then(|t| t.plan.clone());
        let reused = inherited.is_some();
        let found = match (Target::resolve(pid), inherited) {
            (Ok(target), Some(plan)) => Ok((target, plan)),
            (Ok(target), None) => plan_running(target).await,
            (Err(e), _) => Err(e),
        };
        let (target, plan, fd) = match (found, fd) {
            (Ok((target, plan)), Ok(fd)) => (target, plan, fd),
            (Err(_), _) | (_, Err(_)) if !target::Target::is_alive(pid) => {
                self.kernel.remove_target(pid);
                self.gone.insert(pid);
                self.missed_children.0 += 1;
                return Ok(());
            }
            (Err(e), _) | (_, Err(e)) => {
                // Its own children are still followed.
                self.kernel
                    .add_target(pid, target_bits(true), None)
                    .unwrap_or_else(|e| log::debug!("pid {pid}: {e}"));
                self.untraced.insert(pid);
                if target::Target::is_alive(pid) {
                    sink.notice(
                        pid,
                        &format!(
                            "child {pid} of {}: not traced ({})",
                            parent.map_or("a traced process".into(), |p| p.to_string()),
                            crate::error::chain(&e)
                        ),
                    )?;
                }
                return Ok(());
            }
        };
        let mut info = match hook_process(
            &mut self.kernel,
            &mut self.unwinder,
            &target,
            &plan,
            target_bits(true),
            sink,
        ) {
            Ok(info) => info,
            // Exited while being hooked: nothing to trace.
            Err(_) if !target::Target::is_alive(pid) => {
                self.kernel.remove_target(pid);
                self.gone.insert(pid);
                self.missed_children.0 += 1;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        info.parent_pid = parent;
        let mut traced = Traced::new(pid, target.maps.clone(), Some(&plan), opts);
        traced.follow_forks = true;
        traced.parent = parent;
        if self.cgroup.is_some() {
            // The cgroup's watch alerts for all of its processes.
            traced.watch = None;
        }
        if reused {
            // Files the parent loaded after its plan are planned for the
            // child at its first interval.
            traced.planned_files = plan.probes.iter().map(|p| p.object.path.clone()).collect();
        }
        traced.settle_go(opts, sink)?;
        let how = if born {
            format!(
                "following child {pid} ({}) of {}",
                target.comm,
                parent.map_or("a traced process".into(), |p| p.to_string())
            )
        } else {
            format!("pid {pid} ({}) entered the cgroup: tracing it", target.comm)
        };
        sink.notice(pid, &format!("{how}: {} probes", info.probes.len()))?;
        sink.attached(&info)?;
        traced.exe_id = exe_before;
        let execed = traced.exec_happened();
        self.add(traced, fd);
        if execed && let Some(t) = self.traced.last_mut() {
            follow_exec(t, &mut self.kernel, &mut self.unwinder, opts, sink).await?;
        }
        Ok(())
    }

    /// The end of a cgroup's watch: its firing alert resolved (nobody
    /// watches any more), its deliveries given a moment to land.
    async fn flush_group_alerts(&mut self) {
        if let Some(w) = self.cgroup.as_mut().and_then(|c| c.watch.as_mut()) {
            w.notifier.resolve();
            w.notifier.flush(Duration::from_secs(5)).await;
        }
    }

    /// Gives the root the CPU time of every process traced (those exited
    /// at their last reading), when there are several.
    fn share_cpu_time(&mut self) {
        if self.traced.len() < 2 {
            return;
        }
        let mut total = 0.0;
        for t in &mut self.traced {
            if !t.exited
                && let Some(c) = crate::overhead::cpu_seconds(t.pid)
            {
                t.last_cpu = c;
            }
            total += t.last_cpu;
        }
        if let Some(root) = self.traced.iter_mut().find(|t| t.root) {
            root.session_cpu = Some(total);
        }
    }

    /// Tells the user how many children lived too briefly to be traced,
    /// when more did since the last time.
    fn tell_missed_children(&mut self, sink: &mut dyn Sink) -> std::io::Result<()> {
        let (missed, told) = self.missed_children;
        if missed == told {
            return Ok(());
        }
        self.missed_children.1 = missed;
        let pid = self.traced.first().map_or(0, |t| t.pid);
        sink.notice(
            pid,
            &format!(
                "{missed} child process(es) so far exited before their probes could attach \
                 (they lived less than ~{} ms): their allocations are not counted",
                PROCESS_POLL.as_millis() * 2
            ),
        )
    }

    /// Whether a child is waiting to be hooked (born since the last look).
    fn children_pending(&self) -> bool {
        self.kernel
            .targets()
            .iter()
            .any(|(_, bits)| bits & tracer_common::target::NEW_CHILD != 0)
    }

    /// Snapshots every interval until the duration elapses, the user
    /// interrupts or every target has exited; SIGUSR1 writes the exports on
    /// demand.
    async fn trace(
        mut self,
        targets: Vec<(Traced, PidFd)>,
        signals: Signals,
        opts: &Options,
        sink: &mut dyn Sink,
    ) -> Result<(), TracerError> {
        let started = Instant::now();
        if opts.alerts.is_some()
            && let Err(e) = self.kernel.watch_oom_kills()
        {
            log::warn!(
                "cannot watch the OOM killer ({}); kills are detected from the cgroup's counter",
                crate::error::chain(&e)
            );
        }
        for (t, fd) in targets {
            self.add(t, fd);
        }
        let mut ticker = tokio::time::interval(opts.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        // Forks and execs wake the session at once; without the ring buffer
        // the poll alone finds them.
        let mut events = self
            .kernel
            .take_process_events()
            // SAFETY: the ring buffer owns its map's descriptor, which
            // stays open and the same for as long as it lives.
            .and_then(|r| unsafe { tokio::io::unix::AsyncFd::register(r) }.ok());
        let mut poll = tokio::time::interval(if events.is_some() {
            PROCESS_POLL_BEHIND_EVENTS
        } else {
            PROCESS_POLL
        });
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Signals {
            mut sigint,
            mut sigterm,
            mut sigusr1,
        } = signals;
        let deadline = async {
            match opts.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let reason = loop {
            tokio::select! {
                _ = poll.tick() => self.poll_processes(opts, sink).await?,
                Some(()) = async {
                    match events.as_mut() {
                        Some(fd) => {
                            let mut ready = fd.readable_mut().await.ok()?;
                            while ready.get_inner_mut().next().is_some() {}
                            ready.clear_ready();
                            Some(())
                        }
                        None => std::future::pending().await,
                    }
                } => self.poll_processes(opts, sink).await?,
                _ = ticker.tick() => {
                    self.kernel.read_sites()?;
                    self.share_cpu_time();
                    let Self { kernel, unwinder, traced, .. } = &mut self;
                    for t in traced.iter_mut().filter(|t| !t.exited) {
                        if t.interval(kernel, unwinder, opts, sink)? == Step::Exec {
                            follow_exec(t, kernel, unwinder, opts, sink).await?;
                        }
                    }
                    if self.cgroup.is_some() {
                        self.cgroup_tick(started, opts, sink).await?;
                    }
                    self.kernel.forget_processes(&self.gone);
                    self.gone.clear();
                    self.tell_missed_children(sink)?;
                }
                _ = sigusr1.recv() => {
                    // The HTML report (--html) and the like, from the sinks.
                    if let Err(e) = sink.export_now() {
                        log::warn!("SIGUSR1: {e}");
                    }
                    let Self { kernel, traced, .. } = &mut self;
                    for t in traced.iter_mut().filter(|t| !t.exited) {
                        let message = if opts.exports.is_empty() {
                            "SIGUSR1: nothing to write (no --pprof, --folded or --flamegraph given)"
                                .to_string()
                        } else {
                            let snap = t.snapshot_now(kernel)?;
                            match opts.exports.write(&snap) {
                                Ok(files) => format!(
                                    "SIGUSR1: wrote {}",
                                    files
                                        .iter()
                                        .map(|f| f.display().to_string())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                                // The session goes on: a full disk must not end the trace.
                                Err(e) => format!("SIGUSR1: {}", crate::error::chain(&e)),
                            }
                        };
                        sink.notice(t.pid, &message)?;
                    }
                }
                _ = sigint.recv() => break EndReason::Interrupted,
                _ = sigterm.recv() => break EndReason::Interrupted,
                _ = &mut deadline => break EndReason::Duration,
                Some(pid) = self.exits.recv() => {
                    let Self { kernel, traced, gone, cgroup, .. } = &mut self;
                    let group_watch = cgroup.as_ref().and_then(|c| c.watch.as_ref());
                    if let Some(t) = traced.iter_mut().find(|t| t.pid == pid && !t.exited) {
                        t.finish(
                            kernel,
                            EndReason::TargetExited,
                            started.elapsed(),
                            opts,
                            group_watch,
                            sink,
                        )
                        .await?;
                        kernel.remove_target(pid);
                        gone.insert(pid);
                    }
                    if self.traced.iter().all(|t| t.exited) {
                        // A child born just before its parent's exit is
                        // still to be hooked.
                        self.poll_processes(opts, sink).await?;
                        if self.traced.iter().all(|t| t.exited) && !self.children_pending() {
                            if self.cgroup.is_some() {
                                self.cgroup_totals(sink)?;
                            }
                            self.flush_group_alerts().await;
                            return Ok(());
                        }
                    }
                }
            }
        };
        if reason == EndReason::Interrupted {
            // Detaching (the final report, restoring the Go sampling rate,
            // closing every probe link) takes a moment: a second Ctrl-C quits
            // at once. The kernel removes the probes when their descriptors
            // close with the process, so the target is left clean either way.
            quit_on_second_interrupt();
            log::warn!("detaching; press Ctrl-C again to quit at once (skips the final report)");
        }
        self.kernel.read_sites()?;
        let Self {
            kernel,
            traced,
            cgroup,
            ..
        } = &mut self;
        let group_watch = cgroup.as_ref().and_then(|c| c.watch.as_ref());
        for t in traced.iter_mut().filter(|t| !t.exited) {
            t.finish(kernel, reason, started.elapsed(), opts, group_watch, sink)
                .await?;
        }
        if self.cgroup.is_some() {
            self.cgroup_totals(sink)?;
        }
        self.flush_group_alerts().await;
        Ok(())
    }
}

/// The signals a session answers. They are taken before anything is
/// attached: the `attached` record tells a script it may interrupt, and a
/// Ctrl-C during a slow attach must detach cleanly rather than kill the tracer
/// with a ptrace-held child or half its probes in place.
struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sigusr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn take() -> Result<Self, TracerError> {
        let signal = |kind| tokio::signal::unix::signal(kind).map_err(TracerError::Signals);
        Ok(Self {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
            // SIGUSR1 would otherwise kill the tracer: always take it.
            sigusr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Gives SIGINT and SIGTERM back their default action (end the process):
/// tokio's handlers would otherwise swallow them while the session detaches.
fn quit_on_second_interrupt() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: resetting a signal to its default disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}
