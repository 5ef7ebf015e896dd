//! Privileged: alerts before the kernel's OOM kill, naming the culprit, and
//! the record of the kill — real programs in a memory cgroup with a small
//! limit, really killed.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(120);
const LIMIT: u64 = 64 << 20;

/// Starts `cmd` (which prints "ready" and waits for a line) in a fresh
/// cgroup, attaches the tracer with `extra` flags, releases the target, and
/// returns the whole stream once the tracer ends.
fn trace_in_cgroup(name: &str, cmd: &mut Command, extra: &[&str]) -> Option<Vec<Value>> {
    let cg = MemCgroup::create(name, LIMIT)?;
    let mut target = Proc::spawn(cmd);
    target.expect_line("ready", T);
    cg.add(target.pid());
    // Every caller's `extra` sets --interval.
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .default_interval()
        .args(extra)
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    // The scope is the hierarchy the group was made in (v1 here, v2 in
    // the VMs of `cargo xtask vmtest`), read from the group itself.
    for snap in stream.seen.iter().filter(|v| v["type"] == "snapshot") {
        assert_eq!(snap["memory"]["scope"], cg.scope, "{}", snap["memory"]);
        assert_eq!(
            snap["memory"]["cgroup"].as_str().map(Path::new),
            Some(cg.dir.as_path()),
            "{}",
            snap["memory"]
        );
    }
    Some(stream.seen)
}

fn first<'v>(stream: &'v [Value], kind: &str) -> Option<&'v Value> {
    stream.iter().find(|v| v["type"] == kind)
}

/// A one-request HTTP server on loopback that hands back the body it got.
fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // A whole request within 10 s, however it trickles in; else the
        // test's recv finds the channel closed and this message is printed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "the webhook request did not complete within 10 s: {}",
                String::from_utf8_lossy(&buf)
            );
            let n = conn.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
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
                    break;
                }
            }
        }
    });
    (url, rx)
}

#[test]
fn c_leak_is_alerted_well_before_the_oom_kill() {
    if !privileged("c_leak_is_alerted_well_before_the_oom_kill") {
        return;
    }
    let exec_out = std::env::temp_dir().join(format!("tracer-alert-exec-{}", std::process::id()));
    let (url, webhook) = webhook_receiver();
    let exec = format!("cat >> {}", exec_out.display());
    // 4 MiB/s into a 64 MiB limit: killed after ~15 s.
    let Some(stream) = trace_in_cgroup(
        "cleak",
        Command::new(fixture("oomleak")).args(["leak", "4096"]),
        &[
            "--interval",
            "0.5",
            // A leak that kills in seconds: a short trend window (an ETA
            // needs a quarter of it as history).
            "--oom-window",
            "20",
            "--alert-exec",
            &exec,
            "--alert-webhook",
            &url,
        ],
    ) else {
        return;
    };
    let alert = first(&stream, "alert").expect("an alert before the kill");
    let kill = first(&stream, "oom_kill").expect("the OOM kill is reported");
    let lead = ts_secs(kill["ts"].as_str().unwrap()) - ts_secs(alert["ts"].as_str().unwrap());
    assert!(
        lead >= 8.0,
        "alerted only {lead:.1} s before the kill: {alert}"
    );
    assert!(["warning", "critical"].contains(&alert["severity"].as_str().unwrap()));
    assert_eq!(alert["limit_bytes"], LIMIT);
    // The ETA against the real kill: every estimate made once the trend
    // has a quarter of its window (5 s of 20) is within 30% of the time
    // the kill really took from then (while more than 2 s were left).
    let kill_at = ts_secs(kill["ts"].as_str().unwrap());
    let attached_at = ts_secs(stream[0]["ts"].as_str().unwrap());
    let mut compared = 0;
    for v in stream
        .iter()
        .filter(|v| v["type"] == "alert" || v["type"] == "snapshot")
    {
        let at = ts_secs(v["ts"].as_str().unwrap());
        let eta = if v["type"] == "alert" {
            v["eta_s"].as_f64()
        } else {
            v["memory"]["eta_s"].as_f64()
        };
        let (Some(eta), left) = (eta, kill_at - at) else {
            continue;
        };
        if at - attached_at < 5.0 || left < 2.0 {
            continue;
        }
        assert!(
            (eta - left).abs() <= 0.3 * left,
            "ETA {eta:.1} s at {:.1} s after attach; the kill came {left:.1} s later: {v}",
            at - attached_at
        );
        compared += 1;
    }
    assert!(
        compared >= 5,
        "only {compared} estimates to compare with the kill"
    );
    // The culprit: the leaking function at its line.
    let line = marker_line(&source("c/oomleak.c"), "oom_leak");
    let top = &alert["top_sites"][0];
    assert_eq!(
        top["frames"][0]["function"], "grow_session_cache",
        "{alert}"
    );
    assert_eq!(top["frames"][0]["line"], line);
    // The kill's record names who held the memory.
    assert_eq!(kill["detected_by"], "oom:mark_victim tracepoint");
    assert_eq!(
        kill["top_sites"][0]["frames"][0]["function"],
        "grow_session_cache"
    );
    assert!(kill["top_sites"][0]["outstanding_bytes"].as_u64().unwrap() > 40 << 20);
    assert!(kill["anon_rss_bytes"].as_u64().unwrap() > 40 << 20);
    let report = stream.last().unwrap();
    assert_eq!(report["reason"], "target_exited");
    // The post-mortem: `tracer report` on the recording replays the alert
    // and the kill with who held the memory.
    let recording = std::env::temp_dir().join(format!("tracer-oom-{}.jsonl", std::process::id()));
    let lines: Vec<String> = stream.iter().map(Value::to_string).collect();
    std::fs::write(&recording, lines.join("\n") + "\n").unwrap();
    let out = Command::new(tracer_bin())
        .arg("report")
        .arg(&recording)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&recording);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("was killed by the kernel's OOM killer"),
        "{text}"
    );
    let killed = text
        .lines()
        .skip_while(|l| !l.contains("was killed by the kernel's OOM killer"))
        .nth(1)
        .unwrap_or_default();
    assert!(killed.contains("grow_session_cache"), "{text}");
    // --alert-exec got the alert's JSON on stdin.
    let exec_text = std::fs::read_to_string(&exec_out).unwrap_or_default();
    let _ = std::fs::remove_file(&exec_out);
    let first_exec: Value =
        serde_json::from_str(exec_text.lines().next().expect("--alert-exec ran")).unwrap();
    assert_eq!(first_exec["type"], "alert");
    assert_eq!(first_exec["severity"], alert["severity"]);
    // --alert-webhook got an Alertmanager payload.
    let body: Value = serde_json::from_str(
        &webhook
            .recv_timeout(Duration::from_secs(10))
            .expect("webhook POST"),
    )
    .unwrap();
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["alerts"][0]["labels"]["alertname"], "TracerOOMRisk");
    assert!(
        body["alerts"][0]["annotations"]["culprit"]
            .as_str()
            .unwrap()
            .starts_with("grow_session_cache")
    );
}

/// The seed incident: contexts with timers leaking until the kill. The
/// warning names the culprit tens of seconds ahead.
#[test]
fn go_timer_leak_is_alerted_tens_of_seconds_before_the_kill() {
    if !privileged("go_timer_leak_is_alerted_tens_of_seconds_before_the_kill") {
        return;
    }
    let Some(stream) = trace_in_cgroup(
        "gotimers",
        Command::new(fixture("leaky-go1.27")).args(["timerflood", "4000"]),
        &["--interval", "1"],
    ) else {
        return;
    };
    let alert = first(&stream, "alert").expect("an alert before the kill");
    let kill = first(&stream, "oom_kill").expect("the OOM kill is reported");
    let lead = ts_secs(kill["ts"].as_str().unwrap()) - ts_secs(alert["ts"].as_str().unwrap());
    assert!(lead >= 20.0, "alerted only {lead:.1} s before the kill");
    let line = marker_line(&source("go/leaky/main.go"), "flood_timer");
    let names_culprit = |sites: &Value| {
        sites.as_array().unwrap().iter().any(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == "main.timerFlood" && f["line"] == line)
        })
    };
    assert!(names_culprit(&alert["top_sites"]), "{}", alert["top_sites"]);
    assert!(
        alert["top_sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "timer"),
        "the growing timers are among the culprits"
    );
    assert!(names_culprit(&kill["top_sites"]));
}

/// A steady program near (but under) its limit: no alert over a long run.
#[test]
fn steady_state_near_the_limit_raises_no_alert() {
    if !privileged("steady_state_near_the_limit_raises_no_alert") {
        return;
    }
    // 44 MiB held plus 4 MiB of churn: ~70-75% of 64 MiB, flat.
    let Some(stream) = trace_in_cgroup(
        "steady",
        Command::new(fixture("oomleak")).args(["steady", "44"]),
        &["--interval", "0.5", "--duration", "25"],
    ) else {
        return;
    };
    assert!(
        first(&stream, "alert").is_none(),
        "no alert: {:?}",
        first(&stream, "alert")
    );
    let snaps: Vec<&Value> = stream.iter().filter(|v| v["type"] == "snapshot").collect();
    assert!(snaps.len() >= 40);
    let last = &snaps.last().unwrap()["memory"];
    assert_eq!(last["limit_bytes"], LIMIT);
    assert_eq!(last["level"], "ok");
    let usage = last["usage_bytes"].as_f64().unwrap() / LIMIT as f64;
    assert!((0.6..0.8).contains(&usage), "usage {usage}");
}

/// `tracer watch`: no probes at all, the same alert and kill record.
#[test]
fn watch_alerts_without_probes() {
    if !privileged("watch_alerts_without_probes") {
        return;
    }
    let Some(cg) = MemCgroup::create("watch", LIMIT) else {
        return;
    };
    let mut target = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "6144"]));
    target.expect_line("ready", T);
    cg.add(target.pid());
    // 6 MiB/s: killed in ~10 s; a trend window whose quarter is 3 s.
    let (mut tracer, mut stream, attached) = Tracing::watch(target.pid())
        .interval("0.5")
        .args(["--oom-window", "12"])
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    assert_eq!(attached["probes"].as_array().unwrap().len(), 0, "no probes");
    let alert = stream.next_of("alert", T);
    let kill = stream.next_of("oom_kill", T);
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let lead = ts_secs(kill["ts"].as_str().unwrap()) - ts_secs(alert["ts"].as_str().unwrap());
    assert!(lead >= 5.0, "alerted only {lead:.1} s before the kill");
    assert_eq!(kill["pid"], target.pid());
}

/// Without the oom:mark_victim tracepoint (turned off here, as where
/// tracefs cannot be mounted), the kill is still recorded, from the
/// cgroup's own kill counter, with the memory at the last interval.
#[test]
fn the_kill_is_recorded_from_the_cgroup_counter_without_the_tracepoint() {
    if !privileged("the_kill_is_recorded_from_the_cgroup_counter_without_the_tracepoint") {
        return;
    }
    let Some(cg) = MemCgroup::create("counter", LIMIT) else {
        return;
    };
    let mut target = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "8192"]));
    target.expect_line("ready", T);
    cg.add(target.pid());
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .interval("0.5")
        .env("TRACER_OOM_TRACEPOINT", "0")
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    let kill = stream.next_of("oom_kill", T);
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    // The kernel's own count, read from the group the test made.
    let counted = if cg.scope == "cgroup_v2" {
        std::fs::read_to_string(cg.dir.join("memory.events")).unwrap()
    } else {
        std::fs::read_to_string(cg.dir.join("memory.oom_control")).unwrap()
    };
    assert!(counted.contains("oom_kill 1"), "{counted}");
    assert_eq!(kill["pid"], target.pid());
    assert_eq!(kill["detected_by"], "cgroup oom_kill counter", "{kill}");
    assert_eq!(kill["memory"]["limit_bytes"], LIMIT);
    assert!(
        kill["anon_rss_bytes"].is_null(),
        "the counter knows no RSS: {kill}"
    );
    let line = marker_line(&source("c/oomleak.c"), "oom_leak");
    assert_eq!(
        kill["top_sites"][0]["frames"][0]["function"],
        "grow_session_cache"
    );
    assert_eq!(kill["top_sites"][0]["frames"][0]["line"], line);
}

/// At system scope the trend is every process's: the process that grows is
/// blamed, not the target. One test, the two cases in turn: a second hog
/// running meanwhile would halve each one's share.
#[test]
fn system_scope_alerts_blame_the_process_that_grows() {
    if !privileged("system_scope_alerts_blame_the_process_that_grows") {
        return;
    }
    idle_target_is_not_blamed();
    growing_target_is_blamed();
}

/// An idle target while another process grows by 200 MiB/s is not blamed:
/// the alert says memory is running out, names the growing process, and
/// lists no site of the target.
fn idle_target_is_not_blamed() {
    // Outside any memory cgroup with a limit: the system is the scope.
    let mut idle = Proc::spawn(Command::new(fixture("oomleak")).args(["steady", "4"]));
    idle.expect_line("ready", T);
    let mut hog = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "204800"]));
    hog.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(idle.pid())
        .interval("0.5")
        .args(["--oom-window", "16"])
        .on_attached(|_| {
            idle.send("go");
            hog.send("go");
        })
        .start();
    let alert = stream.next_of_where("alert", "an alert", Duration::from_secs(30), |a| {
        a["severity"] != "ok"
    });
    drop(hog);
    tracer.signal(libc::SIGINT);
    assert_eq!(tracer.wait(T), Some(0));
    assert_eq!(alert["memory"]["scope"], "system", "{alert}");
    let reason = alert["reason"].as_str().unwrap();
    assert!(reason.contains("not the cause"), "{reason}");
    assert!(
        alert["top_sites"].as_array().unwrap().is_empty(),
        "no site of the idle target is blamed: {alert}"
    );
    let growing = alert["growing_processes"].as_array().unwrap();
    assert!(
        growing
            .iter()
            .any(|p| p["comm"] == "oomleak" && p["pid"] != idle.pid()),
        "the hog is named: {growing:?}"
    );
}

/// The counterpart: the target that grows is blamed, with its own sites.
fn growing_target_is_blamed() {
    let mut hog = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "204800"]));
    hog.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(hog.pid())
        .interval("0.5")
        .args(["--oom-window", "16"])
        .on_attached(|_| hog.send("go"))
        .start();
    let alert = stream.next_of_where("alert", "an alert", Duration::from_secs(30), |a| {
        a["severity"] != "ok"
    });
    drop(hog);
    tracer.signal(libc::SIGINT);
    let _ = tracer.wait(T);
    assert_eq!(alert["memory"]["scope"], "system", "{alert}");
    assert!(
        !alert["reason"].as_str().unwrap().contains("not the cause"),
        "{alert}"
    );
    assert!(alert["growing_processes"].is_null(), "{alert}");
    let line = marker_line(&source("c/oomleak.c"), "oom_leak");
    assert!(
        alert["top_sites"].as_array().unwrap().iter().any(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == "grow_session_cache" && f["line"] == line)
        }),
        "the leaking site is named: {alert}"
    );
}
