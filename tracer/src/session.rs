//! The flow, end to end: resolve target → choose probes → load/attach →
//! read maps each interval → symbolize → sinks, until the target exits, the
//! duration elapses or the user interrupts.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use std::time::SystemTime;

use crate::{
    alert::{Alert, Alerter, MemoryStatus, OomKill, Thresholds, Trend},
    collect::{Collector, GoState, Snapshot},
    error::TracerError,
    golang::RuntimeMem,
    kernel::{Kernel, MapSizes},
    memlimit,
    notify::Notifier,
    probes::{self, ObjectRef},
    sink::{Attached, EndReason, Exit, Sink, export::Exports},
    symbolize::Symbolizer,
    target::{self, Maps, Target},
};

/// Options common to `attach` and `run`.
#[derive(Clone, Debug)]
pub struct Options {
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub sizes: MapSizes,
    /// Window over which growth rates are computed.
    pub trend_window: Duration,
    /// Go heap sampling rate to set in the target (bytes); None: only turn
    /// sampling on (at 512 KiB) when the binary has it off.
    pub go_sample_rate: Option<u64>,
    /// Never write to the target's memory.
    pub no_write: bool,
    /// OOM-risk alerting; None turns it off.
    pub alerts: Option<AlertOptions>,
    /// Files written at the end and on SIGUSR1 (pprof, folded, flame graph).
    pub exports: Exports,
}

/// How the tracer watches the target's memory limit and alerts.
#[derive(Clone, Debug)]
pub struct AlertOptions {
    pub thresholds: Thresholds,
    /// History the usage trend is computed over.
    pub window: Duration,
    pub exec: Option<String>,
    pub webhook: Option<String>,
}

/// The target's memory against its limit: trend, alerts, notifications.
struct MemoryWatch {
    pid: u32,
    trend: Trend,
    alerter: Alerter,
    notifier: Notifier,
    last: Option<MemoryStatus>,
    oom_kills_at_start: Option<u64>,
}

impl MemoryWatch {
    fn new(pid: u32, opts: &AlertOptions) -> Self {
        let oom_kills_at_start = memlimit::Source::of_pid(pid)
            .read()
            .ok()
            .and_then(|s| s.oom_kills);
        Self {
            pid,
            trend: Trend::new(opts.window),
            alerter: Alerter::new(opts.thresholds),
            notifier: Notifier::new(opts.exec.clone(), opts.webhook.clone()),
            last: None,
            oom_kills_at_start,
        }
    }

    /// Reads the memory state, attaches it to `snap`, and alerts when due.
    fn update(&mut self, snap: &mut Snapshot, sink: &mut dyn Sink) -> anyhow::Result<()> {
        // The target may have been moved to another cgroup: resolve each time.
        let Ok(state) = memlimit::Source::of_pid(self.pid).read() else {
            return Ok(());
        };
        let now = Instant::now();
        self.trend.push(now, state.usage_bytes);
        let eta = state.limit_bytes.and_then(|l| self.trend.eta(l));
        let fraction = state
            .limit_bytes
            .filter(|&l| l > 0)
            .map(|l| state.usage_bytes as f64 / l as f64);
        let due = self.alerter.evaluate(now, fraction, eta);
        let status = MemoryStatus {
            state: state.clone(),
            eta_s: eta,
            growth_bytes_per_s: self.trend.slope(),
            level: self.alerter.level(),
        };
        snap.memory = Some(status.clone());
        self.last = Some(status);
        if let Some((severity, reason)) = due {
            let alert = Alert {
                pid: self.pid,
                severity,
                reason,
                eta_s: eta,
                usage_bytes: state.usage_bytes,
                limit_bytes: state.limit_bytes,
                memory: state,
                top_sites: crate::alert::culprits(&snap.sites, 5),
                ts: SystemTime::now(),
            };
            sink.alert(&alert)?;
            self.notifier
                .send(&alert, crate::sink::json::alert_line(&alert));
        }
        Ok(())
    }

    /// Whether the kernel OOM-killed the target, and the record of it.
    fn oom_kill(&self, kernel: &Kernel, snap: &Snapshot) -> Option<OomKill> {
        let top_sites: Vec<_> = snap.sites.iter().take(10).cloned().collect();
        if let Some(v) = kernel.oom_victim().filter(|v| v.pid == self.pid) {
            return Some(OomKill {
                pid: self.pid,
                detected_by: "oom:mark_victim tracepoint".into(),
                anon_rss_bytes: Some(v.anon_rss_kb * 1024),
                file_rss_bytes: Some(v.file_rss_kb * 1024),
                shmem_rss_bytes: Some(v.shmem_rss_kb * 1024),
                total_vm_bytes: Some(v.total_vm_kb * 1024),
                memory: self.last.clone(),
                top_sites,
            });
        }
        // Without the tracepoint: the cgroup counted a kill while we watched.
        let before = self.oom_kills_at_start?;
        let cgroup = self.last.as_ref()?.state.cgroup.clone()?;
        let now = memlimit::Source::V1 {
            dir: cgroup.clone(),
        }
        .read()
        .ok()
        .and_then(|s| s.oom_kills)
        .or_else(|| {
            memlimit::Source::V2 {
                mount: cgroup.clone(),
                dir: cgroup,
            }
            .read()
            .ok()
            .and_then(|s| s.oom_kills)
        })?;
        (now > before).then(|| OomKill {
            pid: self.pid,
            detected_by: "cgroup oom_kill counter".into(),
            anon_rss_bytes: None,
            file_rss_bytes: None,
            shmem_rss_bytes: None,
            total_vm_bytes: None,
            memory: self.last.clone(),
            top_sites,
        })
    }
}

/// Default Go heap sampling rate, the runtime's own default.
pub const DEFAULT_GO_SAMPLE_RATE: u64 = 512 * 1024;

/// Everything to hook in one target.
struct Plan {
    probes: Vec<probes::PlannedProbe>,
    go: Option<probes::GoPlan>,
}

/// Allocator probes in every object, Go runtime probes for a Go executable.
fn make_plan(objects: &[ObjectRef], exe: &Path) -> Result<Option<Plan>, TracerError> {
    let libc = probes::plan_libc(objects)?;
    let go = match objects.iter().find(|o| o.path == exe) {
        Some(obj) => probes::plan_go(obj)?,
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
    let mut all: Vec<probes::PlannedProbe> = go.iter().flat_map(|g| g.probes.clone()).collect();
    all.extend(libc);
    // Frees and exits go live first (stable sort keeps the rest in order).
    all.sort_by_key(|p| !p.frees);
    Ok(Some(Plan { probes: all, go }))
}

/// The Go runtime offsets with the runtime address of `time.newTimer`, which
/// needs the load bias of a position-independent executable (known from
/// `maps` once it is mapped).
fn go_offsets(go: &probes::GoPlan, maps: Option<&Maps>) -> tracer_common::GoOffsets {
    let mut off = go.offsets;
    if let Some((lo, hi)) = go.newtimer {
        let bias = if go.pie {
            maps.and_then(|m| runtime_address(go, m, lo))
                .map(|a| a - lo)
        } else {
            Some(0)
        };
        match bias {
            Some(b) => {
                (off.newtimer_lo, off.newtimer_hi) = (lo + b, hi + b);
                off.sendtime_pc = go.sendtime.map_or(0, |a| a + b);
            }
            None => log::warn!(
                "timers of a position-independent Go executable cannot be traced with \
                 `tracer run`; attach to the running process instead"
            ),
        }
    }
    off
}

/// Address of `vaddr` of the executable `go.object` in the running target.
fn runtime_address(go: &probes::GoPlan, maps: &Maps, vaddr: u64) -> Option<u64> {
    let (seg_va, seg_off) = go.first_segment;
    let m = maps
        .mappings
        .iter()
        .find(|m| m.path == go.object.path && m.offset == seg_off)?;
    Some(vaddr - seg_va + m.start)
}

/// Turns Go heap sampling on when the binary has it off, or sets the rate the
/// user asked for, telling the user either way. Returns whether the target's
/// rate is settled (nothing more to do).
fn go_sampling_policy(
    collector: &mut Collector,
    opts: &Options,
    sink: &mut dyn Sink,
    pid: u32,
) -> anyhow::Result<bool> {
    let Some(go) = collector.go_mut() else {
        return Ok(true);
    };
    if go.plan.mem_profile_rate.is_some() && go.mem.rate_addr().is_none() {
        // `run`: the executable is not mapped yet.
        return Ok(false);
    }
    let Some(current) = go.mem.rate() else {
        sink.notice(
            pid,
            "cannot read runtime.MemProfileRate (stripped binary?): Go heap sites use the \
             runtime's default rate for scaling",
        )?;
        return Ok(true);
    };
    let wanted = match opts.go_sample_rate {
        Some(r) if r != current => r,
        None if current == 0 => DEFAULT_GO_SAMPLE_RATE,
        _ => {
            go.rate = current;
            return Ok(true);
        }
    };
    if opts.no_write {
        if current == 0 {
            sink.notice(
                pid,
                "Go heap sampling is off in this binary (runtime.MemProfileRate = 0) and \
                 --no-write forbids turning it on: no Go heap sites will be shown",
            )?;
        }
        return Ok(true);
    }
    match go.mem.set_rate(wanted) {
        Ok(()) => {
            go.rate = wanted;
            sink.notice(
                pid,
                &format!(
                    "set the target's Go heap sampling rate (runtime.MemProfileRate) to {wanted} \
                     bytes (it was {current}); --no-write forbids this"
                ),
            )?;
            Ok(true)
        }
        Err(e) => {
            sink.notice(pid, &format!("cannot set runtime.MemProfileRate: {e}"))?;
            Ok(true)
        }
    }
}

/// Traces the running process `pid` until it exits, `duration` elapses or the
/// user interrupts.
pub async fn attach(pid: u32, opts: &Options, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let target = Target::resolve(pid)?;
    target::check_environment()?;
    let objects = probes::objects_of(&target);
    let plan = make_plan(&objects, &target.exe)?.ok_or(TracerError::NoAllocator(pid))?;
    let exit_fd = PidFd::open(pid)?;
    let offsets = plan
        .go
        .as_ref()
        .map(|g| go_offsets(g, Some(&target.maps)))
        .unwrap_or_default();
    let mut kernel = Kernel::load(pid, opts.sizes, offsets)?;
    let probes = kernel.attach(&plan.probes, pid)?;
    session_notice(&kernel, sink, pid)?;
    let info = Attached {
        pid,
        comm: target.comm.clone(),
        exe: target.exe.display().to_string(),
        go_version: plan.go.as_ref().map(|g| g.version.raw.clone()),
        probes,
    };
    let symbols = Symbolizer::new(target.maps.clone());
    let mut collector = go_collector(pid, &plan, &target.maps, symbols, opts);
    // Before `attached`, which tells scripts that everything is in place.
    let settled = go_sampling_policy(&mut collector, opts, sink, pid)?;
    sink.attached(&info)?;
    let go_pending = plan.go.is_some() && !settled;
    trace_loop(
        Traced {
            pid,
            kernel: &mut kernel,
            collector: &mut collector,
            exit_fd,
            own_child: None,
            go_pending,
        },
        opts,
        sink,
    )
    .await
}

/// Watches the memory limit of `pid` and alerts, without hooking its
/// allocator (no uprobes: no overhead in the target). Alerts then carry no
/// call sites; the OOM kill is still recorded.
pub async fn watch(pid: u32, opts: &Options, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let target = Target::resolve(pid)?;
    target::check_environment()?;
    let exit_fd = PidFd::open(pid)?;
    let mut kernel = Kernel::load(pid, opts.sizes, Default::default())?;
    let info = Attached {
        pid,
        comm: target.comm.clone(),
        exe: target.exe.display().to_string(),
        go_version: None,
        probes: Vec::new(),
    };
    let symbols = Symbolizer::new(target.maps.clone());
    let mut collector = Collector::new(pid, symbols, opts.trend_window);
    sink.attached(&info)?;
    trace_loop(
        Traced {
            pid,
            kernel: &mut kernel,
            collector: &mut collector,
            exit_fd,
            own_child: None,
            go_pending: false,
        },
        opts,
        sink,
    )
    .await
}

/// Starts `argv` and traces it from its first instruction: the child is held
/// between fork and exec until every probe is attached.
pub async fn run(argv: &[String], opts: &Options, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let command = argv.first().cloned().unwrap_or_default();
    let exe = find_executable(&command)?;
    target::check_environment()?;
    let objects: Vec<ObjectRef> = probes::objects_of_command(&exe)?;
    let plan = make_plan(&objects, &exe)?.ok_or_else(|| TracerError::Spawn {
        command: command.clone(),
        reason: "neither it nor its libraries define malloc, and it is not a Go program \
                 (a stripped static binary?)"
            .into(),
    })?;
    let child = HeldChild::fork(&exe, argv)?;
    let pid = child.pid;
    let result = async {
        let exit_fd = PidFd::open(pid)?;
        let watcher = ExitWatcher::start(pid);
        let offsets = plan
            .go
            .as_ref()
            .map(|g| go_offsets(g, None))
            .unwrap_or_default();
        let mut kernel = Kernel::load(pid, opts.sizes, offsets)?;
        let probes = kernel.attach(&plan.probes, pid)?;
        session_notice(&kernel, sink, pid)?;
        let info = Attached {
            pid,
            comm: exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            exe: exe.display().to_string(),
            go_version: plan.go.as_ref().map(|g| g.version.raw.clone()),
            probes,
        };
        sink.attached(&info)?;
        child.release()?;
        // The maps are the child's after exec; read them once it has mapped
        // its libraries (the symbolizer also refreshes every interval). The
        // Go runtime resets MemProfileRate during start-up, so the sampling
        // policy is applied from the first interval on.
        let symbols = Symbolizer::new(Maps::default());
        let mut collector = go_collector(pid, &plan, &Maps::default(), symbols, opts);
        let go_pending = plan.go.is_some();
        trace_loop(
            Traced {
                pid,
                kernel: &mut kernel,
                collector: &mut collector,
                exit_fd,
                own_child: Some(watcher),
                go_pending,
            },
            opts,
            sink,
        )
        .await
    }
    .await;
    if result.is_err() {
        // Never leave a held child behind.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        reap(pid);
    }
    result
}

/// Tells the user when sampling cannot skip the return trap of left-out
/// calls (uprobe sessions need Linux 6.13+).
fn session_notice(kernel: &Kernel, sink: &mut dyn Sink, pid: u32) -> std::io::Result<()> {
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

/// The collector, with the Go runtime's memory when the target is Go.
fn go_collector(
    pid: u32,
    plan: &Plan,
    maps: &Maps,
    symbols: Symbolizer,
    opts: &Options,
) -> Collector {
    let collector = Collector::new(pid, symbols, opts.trend_window);
    let Some(go) = &plan.go else {
        return collector;
    };
    let mut state = GoState {
        mem: RuntimeMem::open(pid, None),
        rate: DEFAULT_GO_SAMPLE_RATE,
        plan: go.clone(),
    };
    resolve_rate_addr(&mut state, maps);
    collector.with_go(state)
}

/// Finds `runtime.MemProfileRate` and the memory profile in the target once
/// its executable is mapped.
fn resolve_rate_addr(go: &mut GoState, maps: &Maps) {
    if go.mem.rate_addr().is_none()
        && let Some(va) = go.plan.mem_profile_rate
        && let Some(addr) = runtime_address(&go.plan, maps, va)
    {
        go.mem.set_rate_addr(addr);
    }
    if !go.mem.has_profile()
        && let Some(layout) = go.plan.mem_profile
        && let Some(addr) = runtime_address(&go.plan, maps, layout.mbuckets)
    {
        go.mem.set_profile(addr, layout);
    }
}

/// What one session traces: the target and the stages set up for it.
struct Traced<'a> {
    pid: u32,
    kernel: &'a mut Kernel,
    collector: &'a mut Collector,
    /// Readable when the target exits.
    exit_fd: PidFd,
    /// In `run` mode, the watcher of our own child.
    own_child: Option<ExitWatcher>,
    /// The Go sampling policy still waits for the executable to be mapped.
    go_pending: bool,
}

async fn trace_loop(t: Traced<'_>, opts: &Options, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let Traced {
        pid,
        kernel,
        collector,
        exit_fd,
        own_child,
        mut go_pending,
    } = t;
    let started = Instant::now();
    let mut watch = opts.alerts.as_ref().map(|a| MemoryWatch::new(pid, a));
    if watch.is_some()
        && let Err(e) = kernel.watch_oom_kills()
    {
        log::warn!(
            "cannot watch the OOM killer ({e}); kills are detected from the cgroup's counter"
        );
    }
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    // SIGUSR1 would otherwise kill the tracer: always take it.
    let mut sigusr1 = tokio::signal::unix::signal(SignalKind::user_defined1())?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let exited = exit_fd.exited();
    tokio::pin!(exited);
    let reason = loop {
        tokio::select! {
            _ = ticker.tick() => {
                refresh_maps(pid, collector);
                if go_pending {
                    go_pending = !go_sampling_policy(collector, opts, sink, pid)?;
                }
                let mut snap = collector.collect(kernel)?;
                kernel.flush_logs();
                if let Some(w) = watch.as_mut() {
                    w.update(&mut snap, sink)?;
                }
                sink.snapshot(&snap)?;
            }
            _ = sigusr1.recv() => {
                let message = if opts.exports.is_empty() {
                    "SIGUSR1: nothing to write (no --pprof, --folded or --flamegraph given)".to_string()
                } else {
                    let snap = snapshot_now(collector, kernel, watch.as_ref())?;
                    match opts.exports.write(&snap) {
                        Ok(files) => format!(
                            "SIGUSR1: wrote {}",
                            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                        ),
                        // The session goes on: a full disk must not end the trace.
                        Err(e) => format!("SIGUSR1: {e:#}"),
                    }
                };
                sink.notice(pid, &message)?;
            }
            _ = sigint.recv() => break EndReason::Interrupted,
            _ = sigterm.recv() => break EndReason::Interrupted,
            _ = &mut deadline => break EndReason::Duration,
            _ = &mut exited => break EndReason::TargetExited,
        }
    };
    if reason != EndReason::TargetExited {
        refresh_maps(pid, collector);
    } else if let Some(maps) = own_child.as_ref().and_then(ExitWatcher::maps_at_exit) {
        collector.symbolizer_mut().update_maps(maps);
    }
    // The maps outlive the target: the final snapshot still holds everything.
    let snap = snapshot_now(collector, kernel, watch.as_ref())?;
    if reason == EndReason::TargetExited {
        if let Some(kill) = watch.as_ref().and_then(|w| w.oom_kill(kernel, &snap)) {
            sink.oom_kill(&kill)?;
        }
        let (code, signal) = match &own_child {
            Some(w) => w.status(),
            None => (None, None),
        };
        sink.target_exited(&Exit { pid, code, signal })?;
    }
    sink.finish(&snap, reason, started.elapsed().as_secs_f64())?;
    opts.exports.write(&snap)?;
    if let Some(w) = watch.as_mut() {
        w.notifier.flush(Duration::from_secs(5)).await;
    }
    if own_child.is_some() && reason != EndReason::TargetExited {
        // Interrupted or timed out: the traced command keeps running, as with
        // `strace -o`; detaching is all the tracer does to it.
        log::info!("pid {pid} keeps running after the tracer detached");
    }
    Ok(())
}

/// A snapshot outside the interval's (on demand, at the end), with the last
/// memory status the watch saw.
fn snapshot_now(
    collector: &mut Collector,
    kernel: &mut Kernel,
    watch: Option<&MemoryWatch>,
) -> Result<Snapshot, TracerError> {
    let mut snap = collector.collect(kernel)?;
    kernel.flush_logs();
    snap.memory = watch.and_then(|w| w.last.clone());
    Ok(snap)
}

fn refresh_maps(pid: u32, collector: &mut Collector) {
    // A failed read means the target is exiting; keep the last snapshot.
    if let Ok(maps) = Maps::read(pid)
        && !maps.mappings.is_empty()
    {
        if let Some(go) = collector.go_mut() {
            resolve_rate_addr(go, &maps);
        }
        collector.symbolizer_mut().update_maps(maps);
    }
}

/// Waits for our child `pid` and returns (exit code, signal).
fn reap(pid: u32) -> (Option<i32>, Option<i32>) {
    let mut status = 0;
    let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    if r != pid as i32 {
        return (None, None);
    }
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

/// Watches a child we started with ptrace(PTRACE_SEIZE, PTRACE_O_TRACEEXIT).
///
/// At the exit stop the child's address space still exists, so its maps can
/// be read: a short-lived command's stacks are then symbolized in the final
/// report although it exited before the first interval. Signals are passed
/// through unchanged; nothing else is traced. ptrace requests must come from
/// the thread that seized, hence the dedicated thread.
struct ExitWatcher {
    maps: std::sync::mpsc::Receiver<Maps>,
    status: std::sync::mpsc::Receiver<(Option<i32>, Option<i32>)>,
    pid: u32,
    seized: bool,
}

impl ExitWatcher {
    fn start(pid: u32) -> Self {
        let (maps_tx, maps) = std::sync::mpsc::channel();
        let (status_tx, status) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let p = pid as libc::pid_t;
            let opts = libc::PTRACE_O_TRACEEXIT as usize;
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, p, 0usize, opts) };
            let _ = ready_tx.send(r == 0);
            if r != 0 {
                log::warn!(
                    "cannot watch pid {pid} for its exit ({}); stacks first seen after the last \
                     interval may stay unsymbolized",
                    std::io::Error::last_os_error()
                );
                return;
            }
            loop {
                let mut st = 0;
                let w = unsafe { libc::waitpid(p, &mut st, libc::__WALL) };
                if w < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    break;
                }
                if libc::WIFEXITED(st) {
                    let _ = status_tx.send((Some(libc::WEXITSTATUS(st)), None));
                    break;
                }
                if libc::WIFSIGNALED(st) {
                    let _ = status_tx.send((None, Some(libc::WTERMSIG(st))));
                    break;
                }
                if !libc::WIFSTOPPED(st) {
                    continue;
                }
                let sig = libc::WSTOPSIG(st);
                let event = (st >> 16) & 0xff;
                let (req, deliver) = if event == libc::PTRACE_EVENT_EXIT {
                    if let Ok(m) = Maps::read(pid) {
                        let _ = maps_tx.send(m);
                    }
                    (libc::PTRACE_CONT, 0)
                } else if event == libc::PTRACE_EVENT_STOP {
                    // Group-stop (SIGSTOP, SIGTSTP…): stay stopped like an
                    // untraced process would, without blocking SIGCONT.
                    if matches!(
                        sig,
                        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                    ) {
                        (libc::PTRACE_LISTEN, 0)
                    } else {
                        (libc::PTRACE_CONT, 0)
                    }
                } else {
                    // Signal-delivery stop: deliver the signal unchanged.
                    (libc::PTRACE_CONT, sig as usize)
                };
                unsafe { libc::ptrace(req, p, 0usize, deliver) };
            }
        });
        let seized = ready.recv().unwrap_or(false);
        Self {
            maps,
            status,
            pid,
            seized,
        }
    }

    /// The child's maps read at its exit stop, if any.
    fn maps_at_exit(&self) -> Option<Maps> {
        self.maps.try_iter().last()
    }

    /// Exit code or signal of the child (reaped by the watcher).
    fn status(&self) -> (Option<i32>, Option<i32>) {
        if !self.seized {
            return reap(self.pid);
        }
        self.status
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or((None, None))
    }
}

/// A pidfd: becomes readable when the process exits (also when it is not our
/// child, and before it is reaped).
struct PidFd(OwnedFd);

impl PidFd {
    fn open(pid: u32) -> Result<Self, TracerError> {
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => TracerError::NoSuchProcess(pid),
                _ => TracerError::NotPermitted {
                    pid,
                    reason: format!("pidfd_open: {e}"),
                },
            });
        }
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    async fn exited(self) {
        // SAFETY: the OwnedFd is a valid pidfd, moved into the AsyncFd, which
        // closes it on drop; nothing else closes or replaces it.
        match unsafe { AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE) } {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(e) => {
                log::warn!("cannot watch the target for exit: {e}");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Looks a command up like execvp does.
fn find_executable(command: &str) -> Result<PathBuf, TracerError> {
    let spawn_err = |reason: &str| TracerError::Spawn {
        command: command.into(),
        reason: reason.into(),
    };
    if command.is_empty() {
        return Err(spawn_err("no command given after `--`"));
    }
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.contains('/') {
        let p = PathBuf::from(command);
        return if is_exec(&p) {
            Ok(std::fs::canonicalize(&p).unwrap_or(p))
        } else {
            Err(spawn_err("no such executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(command))
        .find(|p| is_exec(p))
        .ok_or_else(|| spawn_err("not found in PATH"))
}

/// A forked child that waits, before exec, until the tracer releases it.
struct HeldChild {
    pid: u32,
    go: Option<OwnedFd>,
    exec_err: OwnedFd,
    command: String,
}

impl HeldChild {
    fn fork(exe: &Path, argv: &[String]) -> Result<Self, TracerError> {
        let command = argv.first().cloned().unwrap_or_default();
        let spawn_err = |reason: String| TracerError::Spawn {
            command: command.clone(),
            reason,
        };
        // Everything the child needs is prepared before fork: after it, the
        // child may only make async-signal-safe calls.
        let path = CString::new(exe.as_os_str().as_encoded_bytes())
            .map_err(|_| spawn_err("path contains a NUL byte".into()))?;
        let args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| spawn_err("an argument contains a NUL byte".into()))?;
        let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        arg_ptrs.push(std::ptr::null());
        let (go_r, go_w) = pipe().map_err(|e| spawn_err(e.to_string()))?;
        let (err_r, err_w) = pipe().map_err(|e| spawn_err(e.to_string()))?;
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(spawn_err(std::io::Error::last_os_error().to_string()));
        }
        if pid == 0 {
            // Child.
            unsafe {
                let mut b = 0u8;
                let n = libc::read(go_r.as_raw_fd(), (&raw mut b).cast(), 1);
                if n != 1 {
                    libc::_exit(127);
                }
                libc::execv(path.as_ptr(), arg_ptrs.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(err_w.as_raw_fd(), (&raw const errno).cast(), 4);
                libc::_exit(127);
            }
        }
        drop(go_r);
        drop(err_w);
        Ok(Self {
            pid: pid as u32,
            go: Some(go_w),
            exec_err: err_r,
            command,
        })
    }

    /// Lets the child exec, and reports an exec failure.
    fn release(mut self) -> Result<(), TracerError> {
        let go = self.go.take().expect("released once");
        let b = 1u8;
        unsafe { libc::write(go.as_raw_fd(), (&raw const b).cast(), 1) };
        drop(go);
        // The error pipe is close-on-exec: EOF means exec succeeded.
        let mut errno = 0i32;
        let n = unsafe { libc::read(self.exec_err.as_raw_fd(), (&raw mut errno).cast(), 4) };
        if n == 4 {
            reap(self.pid);
            return Err(TracerError::Spawn {
                command: self.command.clone(),
                reason: std::io::Error::from_raw_os_error(errno).to_string(),
            });
        }
        Ok(())
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_commands_like_execvp() {
        assert!(find_executable("sh").unwrap().is_absolute());
        assert!(matches!(
            find_executable("no-such-command-xyz"),
            Err(TracerError::Spawn { .. })
        ));
        assert!(matches!(
            find_executable("/etc/passwd"),
            Err(TracerError::Spawn { .. })
        ));
        assert!(matches!(
            find_executable(""),
            Err(TracerError::Spawn { .. })
        ));
    }
}
