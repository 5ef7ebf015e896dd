//! The memory watch: each interval, the target's memory against its limit,
//! the trend, alerts when due (to the sinks and the notifier), and, at the
//! end, whether the kernel OOM-killed the target.

use std::time::{Duration, Instant, SystemTime};

use super::{Alert, Alerter, MemoryStatus, OomKill, Thresholds, Trend, memlimit, notify::Notifier};
use crate::{kernel::Kernel, schema::Snapshot, sink::Sink};

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
pub struct MemoryWatch {
    pid: u32,
    trend: Trend,
    alerter: Alerter,
    pub notifier: Notifier,
    /// The last memory status read.
    pub last: Option<MemoryStatus>,
    oom_kills_at_start: Option<u64>,
}

impl MemoryWatch {
    pub fn new(pid: u32, opts: &AlertOptions) -> Self {
        let start = memlimit::Source::of_pid(pid).read().ok();
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
            trend: Trend::new(opts.window),
            alerter: Alerter::new(opts.thresholds),
            notifier: Notifier::new(opts.exec.clone(), opts.webhook.clone()),
            oom_kills_at_start: start.and_then(|s| s.oom_kills),
            last,
        }
    }

    /// Reads the memory state, attaches it to `snap`, and alerts when due.
    pub fn update(&mut self, snap: &mut Snapshot, sink: &mut dyn Sink) -> std::io::Result<()> {
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
                top_sites: super::culprits(&snap.sites, 5),
                ts: SystemTime::now(),
            };
            sink.alert(&alert)?;
            self.notifier
                .send(&alert, crate::sink::json::alert_line(&alert));
        }
        Ok(())
    }

    /// Whether the kernel OOM-killed the target, and the record of it.
    pub fn oom_kill(&self, kernel: &Kernel, snap: &Snapshot) -> Option<OomKill> {
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
