//! The memory watch: each interval, the target's memory against its limit,
//! the trend, alerts when due (to the sinks and the notifier), and, at the
//! end, whether the kernel OOM-killed the target.

use std::time::{Duration, Instant, SystemTime};

use std::collections::HashMap;

use super::{Alert, Alerter, MemoryStatus, OomKill, Thresholds, Trend, memlimit, notify::Notifier};
use crate::{
    kernel::Kernel,
    schema::{GrowingProcess, Scope, Snapshot},
    sink::Sink,
};

/// How the tracer watches the target's memory limit and alerts.
#[derive(Clone, Debug)]
pub struct AlertOptions {
    pub thresholds: Thresholds,
    /// History the usage trend is computed over.
    pub window: Duration,
    /// Where alerts go besides the output, and their labels.
    pub notify: super::notify::NotifyConfig,
}

/// The target's memory against its limit: trend, alerts, notifications.
pub struct MemoryWatch {
    pid: u32,
    /// Where the limit is read; None: the memory cgroup of `pid`, resolved
    /// at each read (the target may be moved).
    source: Option<memlimit::Source>,
    trend: Trend,
    alerter: Alerter,
    pub notifier: Notifier,
    /// The last memory status read.
    pub last: Option<MemoryStatus>,
    oom_kills_at_start: Option<u64>,
    /// memory.events `high` as last read, and when it last rose while the
    /// user had been told (None: not throttled now).
    high_events: Option<u64>,
    throttled_since: Option<Instant>,
    /// At system scope: every process's resident memory over the window,
    /// to tell whether the target is the one growing.
    processes: ProcessGrowth,
}

/// Resident memory of every process, sampled each interval over the trend
/// window (system scope only: a cgroup's own usage is its processes').
struct ProcessGrowth {
    window: Duration,
    /// Per pid: the oldest sample kept and the latest.
    samples: HashMap<u32, (RssSample, RssSample)>,
}

/// When, and resident bytes.
type RssSample = (Instant, u64);

impl ProcessGrowth {
    fn sample(&mut self, now: Instant) {
        let page = page_size();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut seen = std::collections::HashSet::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(rss) = std::fs::read_to_string(format!("/proc/{pid}/statm"))
                .ok()
                .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
            else {
                continue;
            };
            seen.insert(pid);
            let e = self
                .samples
                .entry(pid)
                .or_insert(((now, rss * page), (now, rss * page)));
            e.1 = (now, rss * page);
            // Keep the oldest sample within the window.
            if now.duration_since(e.0.0) > self.window {
                e.0 = e.1;
            }
        }
        self.samples.retain(|pid, _| seen.contains(pid));
    }

    fn growth(&self, pid: u32) -> Option<f64> {
        let ((t0, a), (t1, b)) = self.samples.get(&pid)?;
        let dt = t1.duration_since(*t0).as_secs_f64();
        (dt > 0.0).then(|| (*b as f64 - *a as f64) / dt)
    }

    /// The `n` processes growing fastest.
    fn fastest(&self, n: usize) -> Vec<GrowingProcess> {
        let mut all: Vec<GrowingProcess> = self
            .samples
            .iter()
            .filter_map(|(&pid, (_, (_, rss)))| {
                let growth = self.growth(pid)?;
                (growth > 0.0).then(|| GrowingProcess {
                    pid,
                    comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim().to_string())
                        .unwrap_or_default(),
                    rss_bytes: *rss,
                    growth_bytes_per_s: growth,
                })
            })
            .collect();
        all.sort_by(|a, b| b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s));
        all.truncate(n);
        all
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

impl MemoryWatch {
    pub fn new(pid: u32, opts: &AlertOptions) -> Self {
        Self::with_source(pid, None, opts)
    }

    /// The watch of a whole cgroup (`--cgroup`): its limit from `source`;
    /// alerts name the process holding the fastest-growing site.
    pub fn of_cgroup(first: u32, source: memlimit::Source, opts: &AlertOptions) -> Self {
        Self::with_source(first, Some(source), opts)
    }

    fn with_source(pid: u32, source: Option<memlimit::Source>, opts: &AlertOptions) -> Self {
        let start = source
            .clone()
            .unwrap_or_else(|| memlimit::Source::of_pid(pid))
            .read()
            .ok();
        // A target that exits before the first interval still has its
        // memory in the final report: the state read at start.
        let last = start.clone().map(|state| MemoryStatus {
            state,
            eta_s: None,
            growth_bytes_per_s: None,
            level: crate::schema::Level::Ok,
        });
        Self {
            pid,
            source,
            trend: Trend::new(opts.window),
            alerter: Alerter::new(opts.thresholds),
            notifier: Notifier::new(opts.notify.clone()),
            high_events: start.as_ref().and_then(|s| s.high_events),
            throttled_since: None,
            oom_kills_at_start: start.and_then(|s| s.oom_kills),
            last,
            processes: ProcessGrowth {
                window: opts.window,
                samples: HashMap::new(),
            },
        }
    }

    /// Reads the memory state, attaches it to `snap`, and alerts when due.
    pub fn update(&mut self, snap: &mut Snapshot, sink: &mut dyn Sink) -> std::io::Result<()> {
        // A process on its way out (an OOM kill's victim) has been moved to
        // the root cgroup: reading "its" cgroup now would report the whole
        // machine. Its memory is the last read.
        if self.source.is_none() && crate::target::Target::is_exiting(self.pid) {
            snap.memory = self.last.clone();
            return Ok(());
        }
        // The target may have been moved to another cgroup: resolve each time.
        let source = self
            .source
            .clone()
            .unwrap_or_else(|| memlimit::Source::of_pid(self.pid));
        let Ok(state) = source.read() else {
            return Ok(());
        };
        let now = Instant::now();
        self.notifier.tick();
        self.tell_throttling(now, &state, sink)?;
        self.trend.push(now, state.usage_bytes);
        let system = state.scope == Scope::System;
        if system {
            self.processes.sample(now);
        }
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
        if let Some((severity, mut reason)) = due {
            let mut top_sites = super::culprits(&snap.sites, 5);
            let mut target_growth = None;
            let mut growing_processes = Vec::new();
            // At system scope the trend is every process's: the target is
            // blamed only when its own growth explains most of it.
            if system && severity != crate::schema::Level::Ok {
                let own = self.processes.growth(self.pid).unwrap_or(0.0);
                target_growth = Some(own);
                let total = self.trend.slope().unwrap_or(0.0);
                if total > 0.0 && own < total / 2.0 {
                    growing_processes = self.processes.fastest(5);
                    top_sites.clear();
                    reason = format!(
                        "system memory is running out ({reason}), but pid {} grows {}/s of the \
                         system's {}/s: it is not the cause; growing fastest: {}",
                        self.pid,
                        crate::sink::human_bytes(own),
                        crate::sink::human_bytes(total),
                        growing_processes
                            .iter()
                            .map(|p| format!(
                                "{} ({}) {}/s",
                                p.comm,
                                p.pid,
                                crate::sink::human_bytes(p.growth_bytes_per_s)
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            // Sites of several processes (a cgroup's): the alert names the
            // process holding the fastest-growing one.
            let mut pid = self.pid;
            if let Some(p) = top_sites.first().and_then(|s| s.process.clone()) {
                pid = p.pid;
                reason = format!("{reason}; growing fastest: pid {} ({})", p.pid, p.comm);
            }
            let alert = Alert {
                pid,
                severity,
                reason,
                eta_s: eta,
                usage_bytes: state.usage_bytes,
                limit_bytes: state.limit_bytes,
                memory: state,
                top_sites,
                target_growth_bytes_per_s: target_growth,
                growing_processes,
                ts: SystemTime::now(),
            };
            sink.alert(&alert)?;
            self.notifier
                .send(&alert, crate::sink::json::alert_line(&alert));
        }
        Ok(())
    }

    /// Over memory.high the kernel makes the cgroup's allocations reclaim
    /// and sleep: latency suffers long before any OOM kill, and usage
    /// stalls just under the limit the trend would otherwise have crossed.
    /// Told once when it starts, and again after a quiet window.
    fn tell_throttling(
        &mut self,
        now: Instant,
        state: &crate::schema::MemoryState,
        sink: &mut dyn Sink,
    ) -> std::io::Result<()> {
        let (Some(events), Some(high)) = (state.high_events, state.high_bytes) else {
            return Ok(());
        };
        let rose = self.high_events.is_some_and(|before| events > before);
        self.high_events = Some(events);
        if !rose {
            if self
                .throttled_since
                .is_some_and(|t| now.duration_since(t) > self.trend.window())
            {
                self.throttled_since = None;
            }
            return Ok(());
        }
        let told = self.throttled_since.is_some();
        self.throttled_since = Some(now);
        if told {
            return Ok(());
        }
        sink.notice(
            self.pid,
            &format!(
                "the cgroup {} is over its memory.high ({}, usage {}): the kernel is \
                 throttling its allocations into direct reclaim (memory.events high={events})",
                state
                    .cgroup
                    .as_deref()
                    .map(|c| c.display().to_string())
                    .unwrap_or_default(),
                crate::sink::human_bytes(high as f64),
                crate::sink::human_bytes(state.usage_bytes as f64),
            ),
        )
    }

    /// Whether the kernel OOM-killed process `pid` (the target, or one of
    /// the cgroup's), and the record of it.
    pub fn oom_kill(&self, pid: u32, kernel: &Kernel, snap: &Snapshot) -> Option<OomKill> {
        let top_sites: Vec<_> = snap.sites.iter().take(10).cloned().collect();
        if let Some(v) = kernel.oom_victim(pid) {
            return Some(OomKill {
                pid,
                detected_by: "oom:mark_victim tracepoint".into(),
                anon_rss_bytes: Some(v.anon_rss_kb * 1024),
                file_rss_bytes: Some(v.file_rss_kb * 1024),
                shmem_rss_bytes: Some(v.shmem_rss_kb * 1024),
                total_vm_bytes: Some(v.total_vm_kb * 1024),
                memory: self.last.clone(),
                top_sites,
            });
        }
        // Without the tracepoint: the cgroup counted a kill while we watched
        // (a cgroup's watch cannot tell which of its processes it was).
        if self.source.is_some() {
            return None;
        }
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
            pid,
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
