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
    alert::{Alert, OomKill},
    collect::Snapshot,
    error::TracerError,
    sink::{Attached, EndReason, Exit, Sink},
};

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
pub fn replay(path: &Path, sink: &mut dyn Sink) -> anyhow::Result<Replayed> {
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
    let mut start: Option<SystemTime> = None;
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
                ))
                .into());
            }
        };
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ts = value
            .get("ts")
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339(t).ok());
        match kind {
            "attached" => {
                let a: Attached = field(&value, *n).map_err(bad)?;
                pid = a.pid;
                start = start.or(ts);
                sink.attached(&a)?;
            }
            "notice" => {
                let p = value.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32;
                let m = value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                sink.notice(p, m)?;
            }
            "alert" => {
                let mut a: Alert = field(&value, *n).map_err(bad)?;
                a.ts = ts.unwrap_or(SystemTime::UNIX_EPOCH);
                sink.alert(&a)?;
            }
            "oom_kill" => {
                let k: OomKill = field(&value, *n).map_err(bad)?;
                sink.oom_kill(&k)?;
            }
            "target_exited" => {
                let e: Exit = field(&value, *n).map_err(bad)?;
                sink.target_exited(&e)?;
            }
            "snapshot" | "report" => {
                let mut s: Snapshot = field(&value, *n).map_err(bad)?;
                if let Some(ts) = ts {
                    s.ts = ts;
                }
                pid = s.pid;
                let elapsed = match (start, ts) {
                    (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default().as_secs_f64(),
                    _ => 0.0,
                };
                if kind == "report" {
                    let reason: EndReason = value
                        .get("reason")
                        .cloned()
                        .map(serde_json::from_value)
                        .transpose()
                        .map_err(|e| bad(format!("line {n}: bad `reason`: {e}")))?
                        .unwrap_or(EndReason::Interrupted);
                    let elapsed = value
                        .get("elapsed_s")
                        .and_then(Value::as_f64)
                        .unwrap_or(elapsed);
                    report = Some((s, reason, elapsed));
                } else {
                    latest = Some((s, elapsed));
                }
            }
            "" => {
                return Err(bad(format!(
                    "line {n} has no `type`; is this a recording written with `-f json`?"
                ))
                .into());
            }
            // Lines of a newer tracer: skip, the rest still replays.
            other => log::warn!(
                "{}: line {n}: unknown event `{other}` skipped",
                path.display()
            ),
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
            )
            .into());
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
