//! JSON Lines: one object per line, each with `type` and `ts` (schema in the README).

use std::{
    io::{self, Write},
    time::SystemTime,
};

use serde::Serialize;

use super::{Attached, EndReason, Exit, Sink, ser_ts};
use crate::collect::Snapshot;

pub struct JsonSink<W: Write> {
    out: W,
}

/// The JSON line of an alert, as `--alert-exec` receives it.
pub fn alert_line(alert: &crate::alert::Alert) -> String {
    let mut v = serde_json::to_value(alert).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), "alert".into());
        o.insert(
            "ts".into(),
            humantime::format_rfc3339_millis(alert.ts)
                .to_string()
                .into(),
        );
    }
    v.to_string()
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    fn emit<T: Serialize>(&mut self, kind: &str, ts: SystemTime, body: &T) -> io::Result<()> {
        #[derive(Serialize)]
        struct Envelope<'a, T> {
            #[serde(rename = "type")]
            kind: &'a str,
            #[serde(serialize_with = "ser_ts")]
            ts: SystemTime,
            #[serde(flatten)]
            body: &'a T,
        }
        let line = serde_json::to_string(&Envelope { kind, ts, body })?;
        writeln!(self.out, "{line}")?;
        // Consumers react to lines as they come (e.g. start a workload on
        // "attached"): never leave one in a buffer.
        self.out.flush()
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        self.emit("attached", SystemTime::now(), info)
    }

    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        // Stamped with when the maps were read, not when the line is written.
        self.emit("snapshot", snap.ts, snap)
    }

    fn notice(&mut self, pid: u32, message: &str) -> io::Result<()> {
        #[derive(Serialize)]
        struct Notice<'a> {
            pid: u32,
            message: &'a str,
        }
        self.emit("notice", SystemTime::now(), &Notice { pid, message })
    }

    fn alert(&mut self, alert: &crate::alert::Alert) -> io::Result<()> {
        self.emit("alert", alert.ts, alert)
    }

    fn oom_kill(&mut self, kill: &crate::alert::OomKill) -> io::Result<()> {
        self.emit("oom_kill", SystemTime::now(), kill)
    }

    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        self.emit("target_exited", SystemTime::now(), exit)
    }

    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()> {
        #[derive(Serialize)]
        struct Report<'a> {
            reason: EndReason,
            elapsed_s: f64,
            #[serde(flatten)]
            snapshot: &'a Snapshot,
        }
        self.emit(
            "report",
            snap.ts,
            &Report {
                reason,
                elapsed_s,
                snapshot: snap,
            },
        )
    }
}
