//! Helpers for the privileged integration tests: locating the tracer and the
//! target programs, owning processes (killed on drop), reading the JSON stream.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tracer binary under test (set by `cargo xtask test`).
pub fn tracer_bin() -> PathBuf {
    let p = std::env::var_os("TRACER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/tracer"));
    assert!(
        p.exists(),
        "{} does not exist: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// A built target program (see `cargo xtask fixtures`).
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("TRACER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("tests/fixtures/build"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} does not exist: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// The `go` command that reads pprof files back (set by `cargo xtask test`).
pub fn go_tool() -> PathBuf {
    let p = std::env::var_os("TRACER_GO")
        .map(PathBuf::from)
        .expect("TRACER_GO is not set: run the tests with `cargo xtask test`");
    assert!(p.exists(), "{} does not exist", p.display());
    p
}

/// Debian's Prometheus server (installed by `cargo xtask test`).
pub fn prometheus_bin() -> PathBuf {
    let p = PathBuf::from("/usr/bin/prometheus");
    assert!(
        p.exists(),
        "{} does not exist: run the tests with `cargo xtask test`, which installs Debian's prometheus",
        p.display()
    );
    p
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// A fixture's source file.
pub fn source(rel: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(rel)
}

/// The line carrying `SITE:<name>` in a fixture source: where the tracer must
/// report that allocation site.
pub fn marker_line(src: &Path, name: &str) -> u32 {
    let text = std::fs::read_to_string(src).unwrap();
    let tag = format!("SITE:{name}");
    let hits: Vec<u32> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            l.split("SITE:")
                .nth(1)
                .is_some_and(|rest| rest.split_whitespace().next() == Some(name))
        })
        .map(|(i, _)| i as u32 + 1)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "marker {tag} must appear once in {}",
        src.display()
    );
    hits[0]
}

/// Whether privileged tests can run here. Not being root is a setup error
/// (CI is root); a kernel without uprobes is a real reason to skip, printed.
pub fn privileged(test: &str) -> bool {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} loads eBPF programs and needs root: run `sudo cargo xtask test`"
    );
    if !Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        eprintln!("SKIP {test}: this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS)");
        return false;
    }
    true
}

/// A process owned by a test: killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Option<mpsc::Receiver<String>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `cmd` with piped stdin/stdout; stdout lines arrive on a channel.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdout: Some(rx),
        }
    }

    /// The next stdout line, within `timeout`.
    pub fn line(&self, timeout: Duration) -> String {
        self.stdout
            .as_ref()
            .unwrap()
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no output line within {timeout:?}: {e}"))
    }

    /// Waits for a stdout line equal to or starting with `prefix`.
    pub fn expect_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.line(left);
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.child.stdin.as_mut().unwrap()
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin(), "{line}").unwrap();
        self.stdin().flush().unwrap();
    }

    /// Closes stdin (the allocs target exits on EOF).
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit within `timeout`; returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit within {timeout:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON stream of a tracer writing to stdout.
pub struct Stream {
    rx: mpsc::Receiver<String>,
    pub seen: Vec<Value>,
}

impl Stream {
    /// Takes over the stdout lines of `proc`.
    pub fn new(proc: &mut Proc) -> Self {
        Self {
            rx: proc.stdout.take().expect("stdout not taken yet"),
            seen: Vec::new(),
        }
    }

    /// The next object of `type`, within `timeout`; every line read is kept.
    pub fn next_of(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no `{kind}` object within {timeout:?}; saw types {:?}",
                    self.seen
                        .iter()
                        .map(|v| v["type"].clone())
                        .collect::<Vec<_>>()
                )
            });
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            self.seen.push(v.clone());
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// Starts `tracer attach PID` with JSON on its stdout, snapshots every 0.2 s,
/// `extra` arguments and `env`; returns the tracer, its stream and the
/// `attached` event, once every probe is live.
pub fn attach_json(pid: u32, extra: &[&str], env: &[(&str, &str)]) -> (Proc, Stream, Value) {
    let mut tracer = Proc::spawn(
        Command::new(tracer_bin())
            .envs(env.iter().copied())
            .args([
                "attach",
                &pid.to_string(),
                "--format",
                "json",
                "--interval",
                "0.2",
            ])
            .args(extra),
    );
    let mut stream = Stream::new(&mut tracer);
    let attached = stream.next_of("attached", Duration::from_secs(60));
    (tracer, stream, attached)
}

/// Ends a traced run the normal way: closes the target's stdin, expects it
/// to exit 0, then the tracer to write its report and exit 0. Returns the
/// report.
pub fn end_normally(target: &mut Proc, tracer: &mut Proc, stream: &mut Stream) -> Value {
    let t = Duration::from_secs(60);
    target.close_stdin();
    assert_eq!(
        target.wait(t),
        Some(0),
        "the target runs normally while traced"
    );
    let report = stream.next_of("report", t);
    assert_eq!(
        tracer.wait(t),
        Some(0),
        "the tracer exits 0 when the target exits"
    );
    report
}

/// The eBPF program of every probe an `attached` event lists.
pub fn probe_programs(attached: &Value) -> Vec<String> {
    attached["probes"]
        .as_array()
        .expect("probes is an array")
        .iter()
        .map(|p| p["program"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Parses JSON Lines text.
pub fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect()
}

/// Sites of a snapshot whose innermost frame is `function` at `line`.
pub fn sites_at<'v>(snap: &'v Value, kind: &str, function: &str, line: u32) -> Vec<&'v Value> {
    snap["sites"]
        .as_array()
        .expect("sites is an array")
        .iter()
        .filter(|s| {
            s["kind"] == kind
                && s["frames"][0]["function"] == function
                && s["frames"][0]["line"] == line
        })
        .collect()
}

/// The one site at `function:line`, with a readable failure listing all sites.
pub fn site_at<'v>(snap: &'v Value, kind: &str, function: &str, line: u32) -> &'v Value {
    let found = sites_at(snap, kind, function, line);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} site at {function}:{line}, sites are:\n{}",
        describe_sites(snap)
    );
    found[0]
}

pub fn describe_sites(snap: &Value) -> String {
    snap["sites"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let frames: Vec<String> = s["frames"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| format!("{}:{}", f["function"], f["line"]))
                        .collect();
                    format!(
                        "  {} {} B {} blocks: {}",
                        s["kind"],
                        s["outstanding_bytes"],
                        s["outstanding_count"],
                        frames.join(" <- ")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// True when `s` is an RFC 3339 UTC timestamp as the tracer writes them.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z')
        && s[..4].chars().all(|c| c.is_ascii_digit())
}

/// A memory cgroup with a hard limit, owned by a test: on drop its processes
/// are killed and it is removed.
pub struct MemCgroup {
    pub dir: PathBuf,
}

impl MemCgroup {
    /// A v1 memory cgroup (the machine's hybrid layout); None, with the
    /// reason printed, where there is no v1 memory controller.
    pub fn create(name: &str, limit: u64) -> Option<Self> {
        let base = Path::new("/sys/fs/cgroup/memory");
        if !base.join("memory.limit_in_bytes").exists() {
            eprintln!("SKIP: no cgroup v1 memory controller at {}", base.display());
            return None;
        }
        let dir = base.join(format!("tracer-test-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        // No swap: the limit must end in the OOM killer, not in swapping.
        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        let _ = std::fs::write(dir.join("memory.swappiness"), "0");
        Some(Self { dir })
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Seconds of an RFC 3339 UTC timestamp since 1970 (for differences).
pub fn ts_secs(ts: &str) -> f64 {
    let (date, time) = ts.split_once('T').unwrap();
    let mut d = date.split('-').map(|p| p.parse::<i64>().unwrap());
    let (y, m, day) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let t = time.trim_end_matches('Z');
    let mut hms = t.split(':');
    let h: f64 = hms.next().unwrap().parse().unwrap();
    let mi: f64 = hms.next().unwrap().parse().unwrap();
    let s: f64 = hms.next().unwrap().parse().unwrap();
    days as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + s
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::ts_secs("1970-01-01T00:00:01.500Z"), 1.5);
        assert_eq!(
            super::ts_secs("2026-11-23T00:00:00.000Z") - super::ts_secs("2026-11-22T23:59:59.000Z"),
            1.0
        );
        // Across a month, a year and a leap day.
        assert_eq!(
            super::ts_secs("2026-12-01T00:00:00.250Z") - super::ts_secs("2026-11-30T23:59:59.750Z"),
            0.5
        );
        assert_eq!(
            super::ts_secs("2027-01-01T00:00:01Z") - super::ts_secs("2026-12-31T23:59:59Z"),
            2.0
        );
        assert_eq!(
            super::ts_secs("2028-03-01T00:00:00Z") - super::ts_secs("2028-02-28T00:00:00Z"),
            2.0 * 86400.0
        );
        assert_eq!(super::ts_secs("2026-11-29T18:00:00Z"), 1_795_975_200.0);
    }
}
