//! Stage 6: sinks — where snapshots go (the terminal UI or table, the JSON
//! stream).

use std::io;

use crate::schema::Snapshot;
pub use crate::schema::{Attached, EndReason, Exit, ser_ts};

pub mod export;
pub mod flame;
pub mod html;
pub mod json;
pub mod pprof;
pub mod prometheus;
pub mod table;
pub mod tui;

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
    /// A cgroup's totals (`--cgroup`), each interval and at the end.
    fn cgroup(&mut self, _totals: &crate::schema::CgroupTotals) -> io::Result<()> {
        Ok(())
    }
    /// A snapshot `tracer report` rebuilt from a recording (the history
    /// sinks chart; the others show only the final report).
    fn replayed_snapshot(&mut self, _snap: &Snapshot) -> io::Result<()> {
        Ok(())
    }
    /// SIGUSR1: write what the sink writes at the end, now.
    fn export_now(&mut self) -> io::Result<()> {
        Ok(())
    }
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
    fn cgroup(&mut self, totals: &crate::schema::CgroupTotals) -> io::Result<()> {
        self.each(|s| s.cgroup(totals))
    }
    fn replayed_snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.each(|s| s.replayed_snapshot(snap))
    }
    fn export_now(&mut self) -> io::Result<()> {
        self.each(|s| s.export_now())
    }
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
    use serde::Serialize;
    use std::time::SystemTime;

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
