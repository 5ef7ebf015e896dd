//! Stage 6: sinks — where snapshots go (the terminal table, the JSON stream).

use std::{io, time::SystemTime};

use serde::{Deserialize, Serialize, Serializer};

use crate::{collect::Snapshot, kernel::AttachedProbe};

pub mod export;
pub mod flame;
pub mod json;
pub mod pprof;
pub mod prometheus;
pub mod table;

/// What the user is told once every probe is live.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attached {
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    /// The Go release that built the target, for Go programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_version: Option<String>,
    pub probes: Vec<AttachedProbe>,
}

/// Why tracing ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `--duration` elapsed.
    Duration,
    /// Ctrl-C / SIGTERM.
    Interrupted,
    /// The target process exited.
    TargetExited,
    /// `tracer report`: the recording stops without a final report (the
    /// tracer was killed or the stream cut).
    Recorded,
}

impl EndReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Duration => "duration elapsed",
            Self::Interrupted => "interrupted",
            Self::TargetExited => "target exited",
            Self::Recorded => "the recording ends without a final report",
        }
    }
}

/// How the traced process ended, when it did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exit {
    pub pid: u32,
    /// Exit code, when known (we are its parent in `tracer run`).
    pub code: Option<i32>,
    /// Terminating signal, when known.
    pub signal: Option<i32>,
}

/// A destination for the tracer's output.
pub trait Sink {
    fn attached(&mut self, info: &Attached) -> io::Result<()>;
    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()>;
    fn target_exited(&mut self, exit: &Exit) -> io::Result<()>;
    /// Something the user must know about what the tracer did or could not do.
    fn notice(&mut self, pid: u32, message: &str) -> io::Result<()>;
    /// An OOM-risk alert (or its end, severity `ok`).
    fn alert(&mut self, alert: &crate::alert::Alert) -> io::Result<()>;
    /// The kernel OOM-killed the target.
    fn oom_kill(&mut self, kill: &crate::alert::OomKill) -> io::Result<()>;
    /// The final report; `elapsed_s` is the time traced.
    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()>;
}

/// Sends everything to several sinks (the terminal or JSON, and metrics).
pub struct Tee(pub Vec<Box<dyn Sink>>);

impl Tee {
    fn each(&mut self, mut f: impl FnMut(&mut dyn Sink) -> io::Result<()>) -> io::Result<()> {
        // Every sink gets the event even when an earlier one failed.
        let mut first_err = None;
        for s in &mut self.0 {
            if let Err(e) = f(s.as_mut()) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Sink for Tee {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        self.each(|s| s.attached(info))
    }
    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.each(|s| s.snapshot(snap))
    }
    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        self.each(|s| s.target_exited(exit))
    }
    fn notice(&mut self, pid: u32, message: &str) -> io::Result<()> {
        self.each(|s| s.notice(pid, message))
    }
    fn alert(&mut self, alert: &crate::alert::Alert) -> io::Result<()> {
        self.each(|s| s.alert(alert))
    }
    fn oom_kill(&mut self, kill: &crate::alert::OomKill) -> io::Result<()> {
        self.each(|s| s.oom_kill(kill))
    }
    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()> {
        self.each(|s| s.finish(snap, reason, elapsed_s))
    }
}

/// RFC 3339 timestamps with millisecond precision, UTC.
pub fn ser_ts<S: Serializer>(ts: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*ts).to_string())
}

/// `1.5 MiB`, `512 B`.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let neg = n < 0.0;
    let mut v = n.abs();
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let sign = if neg { "-" } else { "" };
    if u == 0 {
        format!("{sign}{v:.0} {}", UNITS[u])
    } else {
        format!("{sign}{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(10.0 * 1024.0 * 1024.0), "10.0 MiB");
        assert_eq!(human_bytes(-2048.0), "-2.0 KiB");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let v = serde_json::to_value(Stamp(SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(v, serde_json::json!("1970-01-01T00:00:00.000Z"));
    }

    #[derive(Serialize)]
    struct Stamp(#[serde(serialize_with = "ser_ts")] SystemTime);
}
