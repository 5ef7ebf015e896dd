//! Privileged: alerts delivered to a real Alertmanager (Debian's
//! prometheus-alertmanager, started here on loopback) through its API, and
//! routed by it to a webhook receiver run by the test: the seed incident
//! (Go contexts with timers leaking until the OOM kill), with Alertmanager
//! down when the alert fires and started again mid-incident.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(180);

/// An HTTP receiver on loopback: every request's body, as it arrives.
fn receiver() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = conn.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                        let _ = tx.send(body.to_string());
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

/// Debian's Alertmanager on `port`, routing everything to `hook` at once.
struct Alertmanager {
    proc: Option<Proc>,
    dir: PathBuf,
    port: u16,
}

impl Alertmanager {
    /// Started on a free port: it cannot report one it picked itself, so
    /// a port taken between the check and its bind is retried with another.
    fn start(dir: &Path, hook: &str) -> Self {
        with_free_port("Alertmanager", &[], |port| {
            let mut am = Self::configure(dir, port, hook);
            am.try_restart().map(|()| am)
        })
        .0
    }

    fn configure(dir: &Path, port: u16, hook: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("alertmanager.yml"),
            format!(
                "route:\n  receiver: test\n  group_by: [alertname, pid, severity]\n  \
                 group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: test\n    webhook_configs:\n      - url: {hook}\n        \
                 send_resolved: true\n"
            ),
        )
        .unwrap();
        Self {
            proc: None,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Started again on its port, which the tracer was given: a port taken
    /// meanwhile (by another test's server) is waited for, up to a deadline.
    fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_restart() {
                Ok(()) => return,
                Err(e) if is_port_taken(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("Alertmanager did not start again on {}: {e}", self.port),
            }
        }
    }

    /// Starts it and waits until it is ready; its log when it exits first
    /// (a port taken says "address already in use").
    fn try_restart(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("alertmanager.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new("/usr/bin/prometheus-alertmanager");
        cmd.arg(format!(
            "--config.file={}",
            self.dir.join("alertmanager.yml").display()
        ))
        .arg(format!(
            "--storage.path={}",
            self.dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        let mut proc = Proc::spawn(&mut cmd);
        // Ready (its own page, not another program's on that port) or exited.
        let ready = wait_until(
            "Alertmanager to answer or exit",
            Duration::from_secs(30),
            || {
                if let Some(st) = proc.child.try_wait().unwrap() {
                    return Some(Err(format!(
                        "Alertmanager exited ({st}); its log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    )));
                }
                self.get("/-/ready").map(|_| Ok(()))
            },
        );
        self.proc = Some(proc);
        ready
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(libc::SIGTERM);
            p.wait(Duration::from_secs(20));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> Option<String> {
        http_get(self.port, path)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A chunked or plain HTTP body's JSON.
fn json_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| {
        // Chunked: the JSON sits between the chunk-size lines.
        let start = body.find(['[', '{']).expect("a JSON body");
        let end = body.rfind([']', '}']).expect("a JSON body") + 1;
        serde_json::from_str(&body[start..end]).expect("a JSON body")
    })
}

#[test]
fn alerts_reach_alertmanager_through_a_restart_and_resolve_after_the_kill() {
    if !privileged("alerts_reach_alertmanager_through_a_restart_and_resolve_after_the_kill") {
        return;
    }
    let (hook, routed) = receiver();
    let dir = std::env::temp_dir().join(format!("tracer-am-{}", std::process::id()));
    let mut am = Alertmanager::start(&dir, &hook);
    let Some(cg) = MemCgroup::create("am", 64 << 20) else {
        panic!("this machine has a cgroup v1 memory controller; CI must run this test");
    };
    let mut target =
        Proc::spawn(Command::new(fixture("leaky-go1.27")).args(["timerflood", "4000"]));
    target.expect_line("ready", T);
    cg.add(target.pid());
    let (mut tracer, mut stream, attached) = Tracing::attach(target.pid())
        .interval("1")
        .args([
            "--alertmanager",
            &am.url(),
            "--label",
            "cluster=eu-test",
            // The tracer binds a free port and tells it in `attached`.
            "--prometheus",
            "127.0.0.1:0",
        ])
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    let metrics_port = metrics_port(&attached);
    // Down when the alert fires: the tracer keeps it and retries.
    am.stop();
    let alert = stream.next_of_where("alert", "a warning", T, |v| v["severity"] != "ok");
    assert_eq!(
        alert["labels"]["cluster"], "eu-test",
        "--label on JSON lines: {alert}"
    );
    let failures = wait_until("a failed delivery counted", Duration::from_secs(30), || {
        let text = http_get(metrics_port, "/metrics")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("tracer_alert_delivery_failures_total"))?
            .to_string();
        assert!(
            line.contains("cluster=\"eu-test\""),
            "--label on metrics: {line}"
        );
        let n: f64 = line.rsplit(' ').next()?.parse().ok()?;
        (n >= 1.0).then_some(n)
    });
    assert!(failures >= 1.0);
    std::thread::sleep(Duration::from_secs(2));
    am.restart();
    // Alertmanager lists it, as the tracer labelled it.
    let listed = wait_until(
        "Alertmanager lists the alert",
        Duration::from_secs(60),
        || {
            let alerts = json_body(&am.get("/api/v2/alerts")?);
            alerts
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "TracerOOMRisk")
                .cloned()
        },
    );
    let labels = &listed["labels"];
    assert_eq!(labels["pid"], target.pid().to_string(), "{listed}");
    assert_eq!(labels["cluster"], "eu-test", "{listed}");
    assert_eq!(
        labels["instance"],
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim(),
        "{listed}"
    );
    assert_eq!(labels["comm"], "leaky-go1.27", "{listed}");
    assert!(
        labels["cgroup"]
            .as_str()
            .unwrap_or_default()
            .ends_with(cg.dir.file_name().unwrap().to_str().unwrap()),
        "{listed}"
    );
    assert!(
        labels["culprit"]
            .as_str()
            .unwrap_or_default()
            .starts_with("main.timerFlood"),
        "the culprit label names the leaking function: {listed}"
    );
    assert!(
        ["warning", "critical"].contains(&labels["severity"].as_str().unwrap()),
        "{listed}"
    );
    assert!(
        listed["annotations"]["top_sites"]
            .as_str()
            .unwrap_or_default()
            .contains("main.timerFlood"),
        "{listed}"
    );
    assert_eq!(listed["status"]["state"], "active", "{listed}");
    // Routed on to the receiver, firing; then resolved after the kill.
    let deadline = Instant::now() + T;
    let mut fired = false;
    let mut resolved = false;
    while !(fired && resolved) {
        let left = deadline.saturating_duration_since(Instant::now());
        let body = routed
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("fired {fired}, resolved {resolved} within {T:?}"));
        let v = json_body(&body);
        for a in v["alerts"].as_array().unwrap() {
            if a["labels"]["pid"].as_str() != Some(target.pid().to_string().as_str()) {
                continue;
            }
            match a["status"].as_str() {
                Some("firing") => fired = true,
                Some("resolved") if fired => resolved = true,
                _ => {}
            }
        }
    }
    let kill = stream.next_of("oom_kill", T);
    assert_eq!(kill["pid"], target.pid());
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
}

/// GET `path` on loopback `port`; the body of a 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}
