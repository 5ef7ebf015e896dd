//! JSON Lines: one event per line, each with `type` and `ts` (see
//! [`crate::schema`] and `schema/events.schema.json`).

use std::{
    io::{self, Write},
    time::SystemTime,
};

use super::{Attached, EndReason, Exit, Sink};
use crate::schema::{Alert, Encoder, Envelope, Event, Notice, OomKill, Report, Snapshot};

pub struct JsonSink<W: Write> {
    out: W,
    encoder: Encoder,
    /// `--label` pairs, on every line.
    labels: std::collections::BTreeMap<String, String>,
    /// The metrics endpoint's URL, told in every `attached` record.
    metrics: Option<String>,
}

/// The JSON line of an event at `ts`.
pub fn line(event: Event, ts: SystemTime) -> io::Result<String> {
    labelled(event, ts, &Default::default())
}

fn labelled(
    event: Event,
    ts: SystemTime,
    labels: &std::collections::BTreeMap<String, String>,
) -> io::Result<String> {
    Ok(serde_json::to_string(&Envelope {
        ts,
        event,
        labels: labels.clone(),
    })?)
}

/// The JSON line of an alert, as `--alert-exec` receives it.
pub fn alert_line(alert: &Alert) -> String {
    line(Event::Alert(alert.clone()), alert.ts).unwrap_or_default()
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            encoder: Encoder::new(),
            labels: Default::default(),
            metrics: None,
        }
    }

    /// Tells the metrics endpoint's URL (as bound) in `attached` records.
    pub fn with_metrics(mut self, url: Option<String>) -> Self {
        self.metrics = url;
        self
    }

    /// Adds `--label` pairs to every line.
    pub fn with_labels(mut self, labels: &[(String, String)]) -> Self {
        self.labels = labels.iter().cloned().collect();
        self
    }

    fn emit(&mut self, event: Event, ts: SystemTime) -> io::Result<()> {
        writeln!(self.out, "{}", labelled(event, ts, &self.labels)?)?;
        // Consumers react to lines as they come (e.g. start a workload on
        // "attached"): never leave one in a buffer.
        self.out.flush()
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        let mut info = info.clone();
        if info.metrics.is_none() {
            info.metrics.clone_from(&self.metrics);
        }
        self.emit(Event::Attached(info), SystemTime::now())
    }

    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        // One write for the snapshot's `site` events and itself, stamped with
        // when the maps were read, not when the lines are written.
        let mut text = String::new();
        for event in self.encoder.encode(snap) {
            text.push_str(&labelled(event, snap.ts, &self.labels)?);
            text.push('\n');
        }
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    fn notice(&mut self, pid: u32, message: &str) -> io::Result<()> {
        let notice = Notice {
            pid,
            message: message.into(),
        };
        self.emit(Event::Notice(notice), SystemTime::now())
    }

    fn alert(&mut self, alert: &Alert) -> io::Result<()> {
        self.emit(Event::Alert(alert.clone()), alert.ts)
    }

    fn oom_kill(&mut self, kill: &OomKill) -> io::Result<()> {
        self.emit(Event::OomKill(kill.clone()), SystemTime::now())
    }

    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        self.emit(Event::TargetExited(exit.clone()), SystemTime::now())
    }

    fn cgroup(&mut self, totals: &crate::schema::CgroupTotals) -> io::Result<()> {
        self.emit(Event::Cgroup(totals.clone()), SystemTime::now())
    }

    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()> {
        let report = Report {
            reason,
            elapsed_s,
            snapshot: snap.clone(),
        };
        self.emit(Event::Report(report), snap.ts)
    }
}
