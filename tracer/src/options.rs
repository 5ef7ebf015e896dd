//! What a tracing session is asked to do (from the command line).

use std::time::Duration;

use crate::{alert::watch::AlertOptions, kernel::MapSizes, sink::export::Exports};

/// Options common to `attach` and `run`.
#[derive(Clone, Debug)]
pub struct Options {
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub sizes: MapSizes,
    /// Window over which growth rates are computed.
    pub trend_window: Duration,
    /// Directories of separate debug files, searched before /usr/lib/debug.
    pub debug_dirs: Vec<std::path::PathBuf>,
    /// Walk every stack with frame pointers (the kernel's walker), never
    /// with DWARF unwind tables.
    pub frame_pointers_only: bool,
    /// How the Go heap sampling rate may be changed in the target.
    pub go_sampling: crate::go::SamplingPolicy,
    /// Time per snapshot for reading a Go program's goroutine list.
    pub go_census_budget: Duration,
    /// Bound on the probes' share of the target's CPU time (0 to 1).
    pub max_overhead: Option<f64>,
    /// OOM-risk alerting; None turns it off.
    pub alerts: Option<AlertOptions>,
    /// Files written at the end and on SIGUSR1 (pprof, folded, flame graph).
    pub exports: Exports,
    /// Trace the targets' children too (`--follow-forks`; `run` by default).
    pub follow_forks: bool,
    /// `--label` pairs (and `container` under `--container`): on every
    /// alert, metric and JSON line.
    pub labels: Vec<(String, String)>,
}

impl Options {
    /// Adds a label to every output, the alerts' included.
    pub fn add_label(&mut self, key: &str, value: &str) {
        self.labels.push((key.to_string(), value.to_string()));
        if let Some(a) = self.alerts.as_mut() {
            a.notify.labels.push((key.to_string(), value.to_string()));
        }
    }
}
