//! `tracer report`: a recorded JSON Lines stream (`-f json -o FILE`) replayed
//! into the same sinks afterwards — the table, pprof, flame graphs — e.g. for
//! a post-mortem after the OOM killer took the target.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    time::SystemTime,
};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    error::TracerError,
    schema::{EndReason, Envelope, Event, Rebuilder, SCHEMA_VERSION, Snapshot},
    sink::Sink,
};

/// The `type`s this tracer writes (and so can replay).
const KNOWN_EVENTS: &[&str] = &[
    "attached",
    "notice",
    "site",
    "snapshot",
    "alert",
    "oom_kill",
    "target_exited",
    "report",
];

/// What a replay found.
pub struct Replayed {
    /// The final report's snapshot, else the last snapshot recorded.
    pub snapshot: Snapshot,
    /// Why the recording ended; None when it has no final report (the
    /// tracer was killed, or the stream was cut).
    pub reason: Option<EndReason>,
    pub elapsed_s: f64,
}

/// Replays the events of `path` into `sink` in order (attached, notices,
/// alerts, the OOM kill, the exit) and ends with the final report. Interval
/// snapshots are not replayed; the last one stands in for a missing report.
///
/// A bad recording is a [`TracerError::Recording`]; errors writing to the
/// sink stay I/O errors (a closed pipe is no bad recording).
pub fn replay(path: &Path, sink: &mut dyn Sink) -> Result<Replayed, TracerError> {
    let bad = |reason: String| TracerError::Recording {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| {
        bad(format!(
            "cannot open the recording: {e}; give a file written by `tracer ... -f json -o FILE`"
        ))
    })?;
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(format!("cannot read line {}: {e}", i + 1)))?;
        if !line.trim().is_empty() {
            lines.push((i + 1, line));
        }
    }
    let last = lines.last().map(|(n, _)| *n);
    let mut pid = 0;
    let mut version = SCHEMA_VERSION;
    let mut start: Option<SystemTime> = None;
    let mut sites = Rebuilder::new();
    let mut latest: Option<(Snapshot, f64)> = None;
    let mut report: Option<(Snapshot, EndReason, f64)> = None;
    for (n, line) in &lines {
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A tracer killed mid-write leaves its last line cut short.
            Err(e) if e.is_eof() && Some(*n) == last => {
                log::warn!(
                    "{}: line {n} is cut short (the tracer was stopped while writing it); ignored",
                    path.display()
                );
                continue;
            }
            Err(e) => {
                return Err(bad(format!(
                    "line {n} is not JSON ({e}); is this a recording written with `-f json`?"
                )));
            }
        };
        match value.get("type").and_then(Value::as_str) {
            None | Some("") => {
                return Err(bad(format!(
                    "line {n} has no `type`; is this a recording written with `-f json`?"
                )));
            }
            // Lines of a newer tracer: skip, the rest still replays.
            Some(other) if !KNOWN_EVENTS.contains(&other) => {
                log::warn!(
                    "{}: line {n}: unknown event `{other}` skipped",
                    path.display()
                );
                continue;
            }
            // Version 1 streams carried whole snapshots.
            Some("snapshot") if version < 2 => {
                let mut s: Snapshot = field(&value, *n).map_err(bad)?;
                s.ts = ts_of(&value).unwrap_or(s.ts);
                pid = s.pid;
                latest = Some((s, since(start, ts_of(&value))));
                continue;
            }
            Some(_) => {}
        }
        let Envelope { ts, event, .. } = field(&value, *n).map_err(bad)?;
        match event {
            Event::Attached(a) => {
                pid = a.pid;
                version = a.schema_version;
                start = start.or(Some(ts));
                sink.attached(&a)?;
            }
            Event::Notice(notice) => sink.notice(notice.pid, &notice.message)?,
            Event::Alert(mut a) => {
                a.ts = ts;
                sink.alert(&a)?;
            }
            Event::OomKill(k) => sink.oom_kill(&k)?,
            Event::TargetExited(e) => sink.target_exited(&e)?,
            Event::Site(info) => sites.site(info),
            Event::Snapshot(delta) => {
                let s = sites
                    .snapshot(delta, ts)
                    .map_err(|e| bad(format!("line {n}: {e}; is the recording complete?")))?;
                sink.replayed_snapshot(&s)?;
                pid = s.pid;
                latest = Some((s, since(start, Some(ts))));
            }
            Event::Cgroup(totals) => sink.cgroup(&totals)?,
            Event::Report(mut r) => {
                r.snapshot.ts = ts;
                pid = r.snapshot.pid;
                report = Some((r.snapshot, r.reason, r.elapsed_s));
            }
        }
    }
    let (snapshot, reason, elapsed_s) = match (report, latest) {
        (Some((s, r, e)), _) => (s, Some(r), e),
        (None, Some((s, e))) => {
            sink.notice(
                pid,
                "the recording has no final report (the tracer was stopped early); \
                 showing its last snapshot",
            )?;
            (s, None, e)
        }
        (None, None) => {
            return Err(bad(
                "holds no snapshot; record with `tracer attach PID -f json -o FILE` and let \
                 it run at least one interval"
                    .into(),
            ));
        }
    };
    sink.finish(&snapshot, reason.unwrap_or(EndReason::Recorded), elapsed_s)?;
    Ok(Replayed {
        snapshot,
        reason,
        elapsed_s,
    })
}

/// The event of one line, minus its envelope.
fn field<T: DeserializeOwned>(value: &Value, n: usize) -> Result<T, String> {
    T::deserialize(value).map_err(|e| {
        format!(
            "line {n} is not a tracer `{}` event ({e}); was it written by another version?",
            value.get("type").and_then(Value::as_str).unwrap_or("?")
        )
    })
}

fn ts_of(value: &Value) -> Option<SystemTime> {
    value
        .get("ts")
        .and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339(t).ok())
}

/// Seconds from the start of the recording to `ts`.
fn since(start: Option<SystemTime>, ts: Option<SystemTime>) -> f64 {
    match (start, ts) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default().as_secs_f64(),
        _ => 0.0,
    }
}
