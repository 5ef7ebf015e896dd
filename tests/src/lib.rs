//! Helpers for the privileged integration tests: locating the tracer and the
//! target programs, owning processes (killed on drop), reading the JSON stream.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod allocs;

/// The repository: where the fixtures' sources and the JSON Schema are.
/// `TRACER_WORKSPACE` moves it (the VMs of `cargo xtask vmtest` carry a
/// copy of those files, not the build tree).
fn workspace() -> PathBuf {
    std::env::var_os("TRACER_WORKSPACE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .to_path_buf()
        })
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

/// A TCP port free on loopback right now. Only a guess: another process may
/// take it before it is bound again, so [`with_free_port`] alone uses it.
fn candidate_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// Attempts [`with_free_port`] makes before giving up.
pub const PORT_ATTEMPTS: usize = 5;

/// How long [`with_free_port`] keeps trying, whatever the attempts left.
pub const PORT_DEADLINE: Duration = Duration::from_secs(120);

/// Starts an external server that binds a loopback port the test must know
/// and cannot report a port it picked itself (Prometheus, Alertmanager,
/// redis; the tracer binds port 0 and tells its own: see [`metrics_port`]).
/// `start` gets a port free a moment ago, never one of `avoid`, and returns
/// what it started or the failure's text (the server's output when it
/// exited). A failure saying "address already in use" (the port was taken
/// between the check and the bind) is retried with another port, up to
/// [`PORT_ATTEMPTS`] times and within [`PORT_DEADLINE`]; any other failure
/// panics at once. Returns what was started and its port.
pub fn with_free_port<T>(
    what: &str,
    avoid: &[u16],
    mut start: impl FnMut(u16) -> Result<T, String>,
) -> (T, u16) {
    let deadline = Instant::now() + PORT_DEADLINE;
    let mut failures = Vec::new();
    for _ in 0..PORT_ATTEMPTS {
        if Instant::now() >= deadline {
            break;
        }
        let port = wait_until(
            &format!("a free port for {what} other than {avoid:?}"),
            Duration::from_secs(10),
            || Some(candidate_port()).filter(|p| !avoid.contains(p)),
        );
        match start(port) {
            Ok(t) => return (t, port),
            Err(e) if is_port_taken(&e) => {
                failures.push(format!("port {port}: {e}"));
            }
            Err(e) => panic!("{what} failed on port {port}: {e}"),
        }
    }
    panic!(
        "{what}: every port tried was taken before it could be bound (within {PORT_DEADLINE:?}):\n{}",
        failures.join("\n")
    )
}

/// Whether a server's failure text says its port was taken.
pub fn is_port_taken(failure: &str) -> bool {
    failure
        .to_ascii_lowercase()
        .contains("address already in use")
}

/// The port of the tracer's metrics endpoint, from its `attached` record:
/// tests pass `--prometheus 127.0.0.1:0` and read the port the tracer
/// bound, instead of guessing one free.
pub fn metrics_port(attached: &Value) -> u16 {
    let url = attached["metrics"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics URL in the attached record: {attached}"));
    url.strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("not a metrics URL: {url}"))
        .port()
}

/// Polls `probe` every `every` until it returns a value or `timeout` has
/// passed (then None). `probe` runs at least once.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Waits until `probe` returns a value, polling every 20 ms; panics naming
/// `what` was awaited when that takes longer than `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, Duration::from_millis(20), probe)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Every supported Go release `leaky` is built with (`cargo xtask
/// fixtures`), plain and stripped.
pub const GO_RELEASES: &[&str] = &["1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27"];

/// A `#define NAME value` of a fixture source (`rel` under the fixtures):
/// the figures a test expects come from the program, not from the tracer.
pub fn constant_define(rel: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(source(rel)).unwrap();
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define") && w.next() == Some(name))
                .then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no #define {name} in {rel}"))
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
/// (CI is root); a kernel without uprobes is a reason to skip (see
/// [`skip`]).
pub fn privileged(test: &str) -> bool {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} loads eBPF programs and needs root: run `sudo cargo xtask test`"
    );
    if !Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        skip(test, "this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS)");
        return false;
    }
    true
}

/// A test that cannot run here. Under CI (`CI` set) that is a failure with
/// its reason: a skipped test must not pass as coverage. Elsewhere the SKIP
/// line goes to the real stderr (libtest captures `eprintln!`) and to the
/// file `TRACER_SKIP_LOG` names, which `cargo xtask test` counts at the end.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false") {
        panic!("{test} cannot run here, and CI must run it: {reason}");
    }
    let line = format!("SKIP {test}: {reason}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    if let Some(log) = std::env::var_os("TRACER_SKIP_LOG") {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }
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
        Self::try_spawn(cmd).unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
    }

    /// Starts a program written an instant ago. Another test's fork, between
    /// its fork and its exec, may still hold the writer's descriptor: exec
    /// then fails with "text file busy" for that moment, so it is retried.
    pub fn spawn_new_file(cmd: &mut Command) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::try_spawn(cmd) {
                Ok(p) => return p,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot start {cmd:?}: {e}"),
            }
        }
    }

    fn try_spawn(cmd: &mut Command) -> std::io::Result<Self> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
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
        Ok(Self {
            child,
            stdout: Some(rx),
        })
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
            let l = self
                .stdout
                .as_ref()
                .unwrap()
                .recv_timeout(left)
                .unwrap_or_else(|e| {
                    panic!(
                        "no line starting with {prefix:?} from process {} within {timeout:?} ({e})",
                        self.pid()
                    )
                });
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    /// Every stdout line left, until the process closes its stdout (exits);
    /// panics if that takes longer than `timeout` or the output pauses for
    /// longer than `quiet`.
    pub fn rest_of_output(&self, quiet: Duration, timeout: Duration) -> Vec<String> {
        let rx = self.stdout.as_ref().unwrap();
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(quiet.min(left)) {
                Ok(l) => lines.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => return lines,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "process {} did not close its output within {timeout:?} (or was silent for \
                     {quiet:?}); it wrote:\n{}",
                    self.pid(),
                    lines.join("\n")
                ),
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
        let pid = self.pid();
        wait_until(&format!("process {pid} to exit"), timeout, || {
            self.child.try_wait().unwrap()
        })
        .code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON stream of a tracer, written to its stdout or to a file.
pub struct Stream {
    rx: mpsc::Receiver<String>,
    pub seen: Vec<Value>,
    rebuild: Rebuild,
    /// For a file: while held, a thread follows the file.
    _tail: Option<Arc<()>>,
}

impl Stream {
    /// Takes over the stdout lines of `proc`.
    pub fn new(proc: &mut Proc) -> Self {
        Self {
            rx: proc.stdout.take().expect("stdout not taken yet"),
            seen: Vec::new(),
            rebuild: Rebuild::default(),
            _tail: None,
        }
    }

    /// Follows the file at `path` (`-o FILE`) as it is written, from its
    /// start; it may not exist yet. Only complete lines are read.
    pub fn tail(path: &Path) -> Self {
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(());
        let watch = Arc::downgrade(&alive);
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let (mut pos, mut partial) = (0u64, Vec::new());
            while watch.strong_count() > 0 {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    if f.metadata().map_or(0, |m| m.len()) < pos {
                        // Truncated: written again from the start.
                        (pos, partial) = (0, Vec::new());
                    }
                    let mut buf = Vec::new();
                    if f.seek(SeekFrom::Start(pos)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                        pos += buf.len() as u64;
                        partial.extend_from_slice(&buf);
                    }
                    while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=i).collect();
                        let line = String::from_utf8_lossy(&line[..i]).into_owned();
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            rx,
            seen: Vec::new(),
            rebuild: Rebuild::default(),
            _tail: Some(alive),
        }
    }

    /// The next object of `kind` for which `pred` holds, within `timeout`
    /// (`what` says what `pred` awaits, for the failure); every line read
    /// is kept.
    pub fn next_of_where(
        &mut self,
        kind: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no `{kind}` with {what} within {timeout:?}; the last one was:\n{}",
                self.seen
                    .iter()
                    .rev()
                    .find(|v| v["type"] == kind)
                    .map_or_else(|| "(none)".to_string(), Value::to_string)
            );
            let v = self.next_of(kind, left);
            if pred(&v) {
                return v;
            }
        }
    }

    /// The next object of `type`, within `timeout`; every line read is kept.
    /// Every line is checked against the shipped JSON Schema; snapshots come
    /// back whole (see [`Rebuild`]).
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
            let v = self.rebuild.line(&line);
            self.seen.push(v.clone());
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// Turns the tracer's stream back into whole events, independently of the
/// tracer's own code: a `snapshot` names only the sites that changed since
/// the previous one, and each site's frames come once in a `site` event. A
/// rebuilt snapshot lists every site known, whole, most outstanding bytes
/// first, as version 1 of the stream did.
#[derive(Default)]
pub struct Rebuild {
    /// Per process (a session traces several: deltas are per pid), by site id.
    sites: std::collections::HashMap<(u64, String), Value>,
    numbers: std::collections::HashMap<u64, std::collections::HashMap<String, Value>>,
}

impl Rebuild {
    /// One line of the stream, checked against the schema; a snapshot is
    /// returned whole.
    pub fn line(&mut self, line: &str) -> Value {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert_schema(&v);
        match v["type"].as_str() {
            Some("site") => {
                let mut site = v.clone();
                let o = site.as_object_mut().unwrap();
                for k in ["type", "ts", "pid"] {
                    o.remove(k);
                }
                let pid = v["pid"].as_u64().unwrap();
                self.sites
                    .insert((pid, v["site_id"].as_str().unwrap().to_string()), site);
                v
            }
            Some("snapshot") => {
                let pid = v["pid"].as_u64().unwrap();
                let numbers = self.numbers.entry(pid).or_default();
                for id in v["removed"].as_array().into_iter().flatten() {
                    numbers.remove(id.as_str().unwrap());
                }
                for n in v["sites"].as_array().unwrap() {
                    let id = n["site_id"].as_str().unwrap();
                    assert!(
                        self.sites.contains_key(&(pid, id.to_string())),
                        "snapshot names site {id} before any `site` event of pid {pid} describes it"
                    );
                    numbers.insert(id.to_string(), n.clone());
                }
                let mut whole: Vec<Value> = numbers
                    .iter()
                    .map(|(id, n)| {
                        let mut s = self.sites[&(pid, id.clone())].clone();
                        for (k, x) in n.as_object().unwrap() {
                            s[k] = x.clone();
                        }
                        s
                    })
                    .collect();
                whole.sort_by(|a, b| {
                    let key = |s: &Value| {
                        (
                            std::cmp::Reverse(s["outstanding_bytes"].as_u64().unwrap()),
                            std::cmp::Reverse(s["allocs"].as_u64().unwrap()),
                            s["site_id"].as_str().unwrap().to_string(),
                        )
                    };
                    key(a).cmp(&key(b))
                });
                assert_eq!(
                    whole.len() as u64,
                    v["site_count"].as_u64().unwrap(),
                    "site_count disagrees with the sites the stream described"
                );
                let mut snap = v;
                snap["sites"] = Value::Array(whole);
                snap
            }
            _ => v,
        }
    }
}

/// Checks an event against `schema/events.schema.json`.
pub fn assert_schema(event: &Value) {
    static VALIDATOR: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let v = VALIDATOR.get_or_init(|| {
        let path = workspace().join("schema/events.schema.json");
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        jsonschema::draft202012::new(&schema).expect("the shipped schema is valid")
    });
    let errors: Vec<String> = v
        .iter_errors(event)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "event breaks schema/events.schema.json: {errors:#?}\n{event}"
    );
}

/// How long a tracer may take to attach (every probe live).
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// One way to start the tracer with a JSON stream: `tracer attach PID`,
/// `tracer run -- ARGV` or `tracer watch PID`, with `--format json` and
/// snapshots every 0.2 s unless told otherwise, the stream on its stdout or
/// in a file (`-o`). [`Tracing::start`] returns the tracer, its stream and
/// the `attached` event once every probe is live, after running the
/// [`Tracing::on_attached`] hook (e.g. to tell the target to start).
///
/// ```no_run
/// # use tracer_tests::*;
/// # let mut target = Proc::spawn(&mut std::process::Command::new("x"));
/// let pid = target.pid();
/// let (tracer, stream, attached) = Tracing::attach(pid)
///     .args(["--max-stacks", "16"])
///     .on_attached(|_| target.send("go"))
///     .start();
/// ```
#[must_use = "nothing starts before `start`"]
pub struct Tracing<'h> {
    subcommand: &'static str,
    pid: Option<u32>,
    argv: Vec<OsString>,
    interval: Option<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    output: Option<PathBuf>,
    stderr: Option<Stdio>,
    attach_timeout: Duration,
    hook: Option<Hook<'h>>,
    /// `cgroup.procs` of the group the tracer starts in.
    cgroup: Option<std::ffi::CString>,
}

/// What [`Tracing::on_attached`] runs.
type Hook<'h> = Box<dyn FnOnce(&Value) + 'h>;

/// Why [`Tracing::try_start`] did not get to `attached`.
#[derive(Debug)]
pub struct StartFailure {
    pub code: Option<i32>,
    pub stderr: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tracer exited ({:?}) before attaching: {}",
            self.code, self.stderr
        )
    }
}

impl<'h> Tracing<'h> {
    fn new(subcommand: &'static str, pid: Option<u32>) -> Self {
        Self {
            subcommand,
            pid,
            argv: Vec::new(),
            interval: Some("0.2".into()),
            args: Vec::new(),
            env: Vec::new(),
            output: None,
            stderr: None,
            attach_timeout: ATTACH_TIMEOUT,
            cgroup: None,
            hook: None,
        }
    }

    /// `tracer attach PID`.
    pub fn attach(pid: u32) -> Self {
        Self::new("attach", Some(pid))
    }

    /// `tracer attach --cgroup DIR`.
    pub fn attach_cgroup(dir: &Path) -> Self {
        Self::new("attach", None).args(["--cgroup".as_ref(), dir.as_os_str()])
    }

    /// `tracer watch PID` (no probes).
    pub fn watch(pid: u32) -> Self {
        Self::new("watch", Some(pid))
    }

    /// `tracer run -- ARGV`. The command shares the tracer's stdin and
    /// stdout, so its stream usually goes to a file ([`Self::output`]).
    pub fn run<I: IntoIterator<Item = S>, S: Into<OsString>>(argv: I) -> Self {
        let mut t = Self::new("run", None);
        t.argv = argv.into_iter().map(Into::into).collect();
        t
    }

    /// `--interval SECS` instead of 0.2.
    pub fn interval(mut self, secs: &str) -> Self {
        self.interval = Some(secs.into());
        self
    }

    /// No `--interval`: the tracer's own default (or one among the args).
    pub fn default_interval(mut self) -> Self {
        self.interval = None;
        self
    }

    /// More arguments, after `--format json`, `--interval` and `-o`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Wait up to `timeout` for `attached` ([`ATTACH_TIMEOUT`] otherwise).
    pub fn attach_within(mut self, timeout: Duration) -> Self {
        self.attach_timeout = timeout;
        self
    }

    /// Starts the tracer inside `group` (it moves itself there before it
    /// execs, so that everything it allocates is charged to the group).
    pub fn in_cgroup(mut self, group: &MemCgroup) -> Self {
        let procs = group.dir.join("cgroup.procs");
        self.cgroup =
            Some(std::ffi::CString::new(procs.into_os_string().into_encoded_bytes()).unwrap());
        self
    }

    /// An environment variable for the tracer.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Environment variables for the tracer.
    pub fn envs<'a>(mut self, vars: impl IntoIterator<Item = &'a (&'a str, &'a str)>) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// The stream goes to `path` (`-o`), read from there as it is written;
    /// a file left at `path` is removed first.
    pub fn output(mut self, path: impl Into<PathBuf>) -> Self {
        self.output = Some(path.into());
        self
    }

    /// The tracer's stderr (inherited otherwise).
    pub fn stderr(mut self, stderr: Stdio) -> Self {
        self.stderr = Some(stderr);
        self
    }

    /// Runs once `attached` has arrived, before [`Self::start`] returns.
    pub fn on_attached(mut self, hook: impl FnOnce(&Value) + 'h) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    fn command(&mut self) -> Command {
        let mut cmd = Command::new(tracer_bin());
        cmd.arg(self.subcommand);
        if let Some(pid) = self.pid {
            cmd.arg(pid.to_string());
        }
        cmd.args(["--format", "json"]);
        if let Some(secs) = &self.interval {
            cmd.args(["--interval", secs]);
        }
        if let Some(path) = &self.output {
            let _ = std::fs::remove_file(path);
            cmd.arg("-o").arg(path);
        }
        cmd.args(&self.args);
        if !self.argv.is_empty() {
            cmd.arg("--").args(&self.argv);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(stderr) = self.stderr.take() {
            cmd.stderr(stderr);
        }
        if let Some(procs) = self.cgroup.clone() {
            use std::os::unix::process::CommandExt;
            // Between fork and exec: no allocation, only system calls. "0"
            // is the writing process, in either cgroup version.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written == 1 { Ok(()) } else { Err(err) }
                });
            }
        }
        cmd
    }

    fn stream(&self, tracer: &mut Proc) -> Stream {
        match &self.output {
            Some(path) => Stream::tail(path),
            None => Stream::new(tracer),
        }
    }

    /// Starts the tracer and waits for its `attached` event (panics after
    /// [`ATTACH_TIMEOUT`] or [`Self::attach_within`]), then runs the hook.
    pub fn start(mut self) -> (Proc, Stream, Value) {
        let mut tracer = Proc::spawn(&mut self.command());
        let mut stream = self.stream(&mut tracer);
        let attached = stream.next_of("attached", self.attach_timeout);
        if let Some(hook) = self.hook.take() {
            hook(&attached);
        }
        (tracer, stream, attached)
    }

    /// [`Self::start`], but a tracer that exits before `attached` is a
    /// failure returned with its stderr (e.g. to retry a port that was
    /// taken), not a panic. Its stderr is passed on to the test's.
    pub fn try_start(mut self) -> Result<(Proc, Stream, Value), StartFailure> {
        assert!(self.stderr.is_none(), "try_start reads stderr itself");
        self.stderr = Some(Stdio::piped());
        let mut tracer = Proc::spawn(&mut self.command());
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = tracer.child.stderr.take().unwrap();
        let copy = stderr.clone();
        let copier = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = std::io::stderr().write_all(&buf[..n]);
                copy.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        // Whether the tracer wrote its stream: lines on its stdout pass
        // through here.
        let wrote = Arc::new(AtomicBool::new(false));
        if self.output.is_none() {
            let (tx, rx) = mpsc::channel();
            let lines = tracer.stdout.replace(rx).unwrap();
            let flag = wrote.clone();
            std::thread::spawn(move || {
                for line in lines {
                    flag.store(true, Ordering::SeqCst);
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let out = self.output.clone();
        let written = || match &out {
            Some(path) => std::fs::metadata(path).is_ok_and(|m| m.len() > 0),
            None => wrote.load(Ordering::SeqCst),
        };
        let mut stream = self.stream(&mut tracer);
        // Attached (something was written) or exited, whichever is first.
        let exited = wait_until("the tracer to attach or exit", self.attach_timeout, || {
            if written() {
                return Some(None);
            }
            tracer.child.try_wait().unwrap().map(Some)
        });
        if let Some(status) = exited {
            // What it wrote just before exiting may still be on its way.
            let late = poll_until(Duration::from_secs(2), Duration::from_millis(20), || {
                written().then_some(())
            });
            if late.is_none() {
                let _ = copier.join();
                let stderr = stderr.lock().unwrap().clone();
                return Err(StartFailure {
                    code: status.code(),
                    stderr,
                });
            }
        }
        let attached = stream.next_of("attached", self.attach_timeout);
        if let Some(hook) = self.hook.take() {
            hook(&attached);
        }
        Ok((tracer, stream, attached))
    }
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

/// `tracer report -f json RECORDING EXTRA…`, which must succeed; its events,
/// parsed as [`parse_lines`] does.
pub fn replay_json<S: AsRef<std::ffi::OsStr>>(recording: &Path, extra: &[S]) -> Vec<Value> {
    let out = Command::new(tracer_bin())
        .args(["report", "-f", "json"])
        .arg(recording)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tracer report {}: {}",
        recording.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_lines(&String::from_utf8_lossy(&out.stdout))
}

/// Parses a recorded JSON Lines stream, each line checked against the
/// schema, snapshots rebuilt whole.
pub fn parse_lines(text: &str) -> Vec<Value> {
    let mut rebuild = Rebuild::default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| rebuild.line(l))
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

/// Debian's Chromium, headless, offline (a network namespace of its own,
/// so a page that reached out would fail), on `page` in a window of
/// `window` ("W,H") with `extra` flags (`--dump-dom`, `--screenshot=…`);
/// fails the test unless it succeeds.
pub fn headless_chromium(page: &Path, window: &str, extra: &[&str]) -> std::process::Output {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium: `cargo xtask test` installs Debian's package");
    let out = Command::new("unshare")
        .args([
            "-n",
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .arg("--hide-scrollbars")
        .arg(format!("--window-size={window}"))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("unshare and chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A memory cgroup with a hard limit, owned by a test: on drop its processes
/// are killed and it is removed.
pub struct MemCgroup {
    pub dir: PathBuf,
    /// The hierarchy it was made in: `cgroup_v1` or `cgroup_v2` (the scope
    /// the tracer must report for it).
    pub scope: &'static str,
}

/// Where a test's memory cgroups go: the v1 memory controller where there
/// is one (this machine's hybrid layout), else the unified hierarchy when
/// its memory controller is on (the VMs of `cargo xtask vmtest`).
fn memory_hierarchy() -> Option<(&'static Path, &'static str)> {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        return Some((v1, "cgroup_v1"));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.subtree_control")).ok()?;
    controllers
        .split_whitespace()
        .any(|c| c == "memory")
        .then_some((v2, "cgroup_v2"))
}

impl MemCgroup {
    /// A memory cgroup limited to `limit` bytes, swap off; None, with the
    /// reason given through [`skip`], where no memory controller is
    /// reachable.
    pub fn create(name: &str, limit: u64) -> Option<Self> {
        let Some((base, scope)) = memory_hierarchy() else {
            skip(
                &format!("memory cgroup {name}"),
                "no memory controller: neither a v1 hierarchy at /sys/fs/cgroup/memory \
                 nor `memory` in /sys/fs/cgroup/cgroup.subtree_control",
            );
            return None;
        };
        let cg = Self::under(
            base,
            scope,
            &format!("tracer-test-{}-{name}", std::process::id()),
        );
        cg.limit(limit);
        Some(cg)
    }

    /// A child group of this one, without a limit of its own (a container
    /// under a pod's limit).
    pub fn child(&self, name: &str) -> Self {
        if self.scope == "cgroup_v2" {
            std::fs::write(self.dir.join("cgroup.subtree_control"), "+memory").unwrap();
        }
        Self::under(&self.dir, self.scope, name)
    }

    fn under(base: &Path, scope: &'static str, name: &str) -> Self {
        let dir = base.join(name);
        let _ = std::fs::create_dir(&dir);
        Self { dir, scope }
    }

    /// Sets the hard limit; swap is off, so it ends in the OOM killer.
    pub fn limit(&self, limit: u64) {
        if self.scope == "cgroup_v2" {
            std::fs::write(self.dir.join("memory.max"), limit.to_string()).unwrap();
            let _ = std::fs::write(self.dir.join("memory.swap.max"), "0");
        } else {
            std::fs::write(self.dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
            let _ = std::fs::write(
                self.dir.join("memory.memsw.limit_in_bytes"),
                limit.to_string(),
            );
            let _ = std::fs::write(self.dir.join("memory.swappiness"), "0");
        }
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

/// How long the helpers below wait for a target's line or exit.
const WAIT: Duration = Duration::from_secs(60);

/// Attaches (with `extra` flags) to a target following allocs.c's protocol,
/// lets it allocate and exit, and returns the whole stream and its pid. The
/// target must exit 0, the tracer report its exit and then exit 0 itself.
pub fn attach_until_exit(cmd: &mut Command, extra: &[&str]) -> (Vec<Value>, u32) {
    attach_until_exit_env(cmd, extra, &[])
}

/// [`attach_until_exit`] with environment variables for the tracer.
pub fn attach_until_exit_env(
    cmd: &mut Command,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vec<Value>, u32) {
    let mut target = Proc::spawn(cmd);
    target.expect_line("ready", WAIT);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .args(extra)
        .envs(env)
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", WAIT);
    // The target's code, read while it still runs: every frame reported
    // must lie in it (a walk that left the stack is cut, not reported).
    let code = code_ranges(target.pid());
    target.close_stdin();
    assert_eq!(
        target.wait(WAIT),
        Some(0),
        "the target must run normally while traced"
    );
    let exited = stream.next_of("target_exited", WAIT);
    assert_eq!(exited["pid"], target.pid());
    let report = stream.next_of("report", WAIT);
    assert_eq!(report["reason"], "target_exited");
    for site in report["sites"].as_array().unwrap() {
        for f in site["frames"].as_array().unwrap() {
            if f["function"] == "[unknown stack]" {
                continue;
            }
            let pc = f["addr"].as_u64().unwrap().saturating_sub(1);
            assert!(
                code.iter().any(|&(lo, hi)| lo <= pc && pc < hi),
                "frame {f} is outside the target's executable mappings {code:x?}"
            );
        }
    }
    assert_eq!(
        tracer.wait(WAIT),
        Some(0),
        "the tracer exits 0 when the target exits"
    );
    (stream.seen, target.pid())
}

/// The executable mappings of a running process, from /proc/PID/maps.
pub fn code_ranges(pid: u32) -> Vec<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')))
        .map(|l| {
            let (lo, hi) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            (
                u64::from_str_radix(lo, 16).unwrap(),
                u64::from_str_radix(hi, 16).unwrap(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_taken_port_is_retried_with_another() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let avoid = taken.local_addr().unwrap().port();
        let mut tried = Vec::new();
        let (bound, port) = super::with_free_port("a listener", &[avoid], |port| {
            tried.push(port);
            if tried.len() == 1 {
                return Err("bind: address already in use".to_string());
            }
            std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())
        });
        assert_eq!(tried.len(), 2);
        assert_eq!(bound.local_addr().unwrap().port(), port);
        assert!(!tried.contains(&avoid));
    }

    #[test]
    #[should_panic(expected = "every port tried was taken")]
    fn retries_are_bounded() {
        super::with_free_port("a listener", &[], |_| {
            Err::<(), _>("Address already in use".to_string())
        });
    }

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
