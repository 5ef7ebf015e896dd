//! Bad input: each case gets one clear sentence, the documented exit code,
//! and never a panic.

use std::{
    process::{Command, Output},
    time::Duration,
};

use tracer_tests::*;

fn tracer(args: &[&str]) -> Output {
    Command::new(tracer_bin()).args(args).output().unwrap()
}

/// Asserts exit code and message, and that nothing panicked.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn no_such_pid() {
    assert_fails(
        &tracer(&["attach", "4194300"]),
        3,
        "no process with pid 4194300",
    );
}

#[test]
fn kernel_thread() {
    // pid 2 is kthreadd on every Linux system.
    assert_fails(&tracer(&["attach", "2"]), 3, "is a kernel thread");
}

#[test]
fn zombie() {
    // The child exits at once; its parent never waits for it, so it stays
    // a zombie (a shell may reap its background job before it execs a
    // sleep: seen under load).
    let parent = Proc::spawn(Command::new("python3").args([
        "-c",
        "import os, sys, time\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nprint(pid, flush=True)\ntime.sleep(30)",
    ]));
    let pid: u32 = parent.line(Duration::from_secs(10)).trim().parse().unwrap();
    wait_until(
        &format!("pid {pid} to become a zombie"),
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap()
                .contains(") Z ")
                .then_some(())
        },
    );
    assert_fails(&tracer(&["attach", &pid.to_string()]), 3, "is a zombie");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["attach", "abc"][..],
        &["attach", "1", "--interval", "0"],
        &["attach", "1", "--format", "xml"],
        &["attach", "1", "--max-allocs", "0"],
        &["attach", "1", "--prometheus", "localhost"],
        &["attach", "1", "--prometheus", "127.0.0.1:99999"],
        &["attach", "1", "--pprof", "/nonexistent/dir/heap.pb.gz"],
        &[
            "report",
            "x.jsonl",
            "--flamegraph",
            "/nonexistent/dir/f.svg",
        ],
        &["report"],
        &["run"],
        &["frobnicate"],
    ] {
        let out = tracer(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

#[test]
fn run_unknown_command() {
    assert_fails(
        &tracer(&["run", "--", "no-such-command-xyz"]),
        3,
        "cannot start `no-such-command-xyz`: not found in PATH",
    );
}

#[test]
fn unwritable_output() {
    let target = Proc::spawn(Command::new("sleep").arg("30"));
    assert_fails(
        &tracer(&[
            "attach",
            &target.pid().to_string(),
            "-o",
            "/nonexistent/dir/out",
        ]),
        1,
        "cannot create the output file /nonexistent/dir/out",
    );
}

#[test]
fn metrics_address_in_use() {
    let target = Proc::spawn(Command::new("sleep").arg("30"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_fails(
        &tracer(&["attach", &target.pid().to_string(), "--prometheus", &addr]),
        1,
        &format!("cannot serve metrics on {addr}: Address already in use"),
    );
}

#[test]
fn report_of_a_bad_recording() {
    assert_fails(
        &tracer(&["report", "/nonexistent/rec.jsonl"]),
        3,
        "/nonexistent/rec.jsonl: cannot open the recording",
    );
    let dir = std::env::temp_dir();
    let cases = [
        ("not json\n", "line 1 is not JSON"),
        (
            "{\"type\":\"attached\"}\n",
            "line 1 is not a tracer `attached` event",
        ),
        ("{\"a\":1}\n", "line 1 has no `type`"),
        ("", "holds no snapshot"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("tracer-bad-{}-{i}.jsonl", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let out = tracer(&["report", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        assert_fails(&out, 3, needle);
    }
}

/// Runs the tracer as user nobody without capabilities.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tracer_bin())
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs")
}

#[test]
fn not_root_is_told_to_use_sudo() {
    if !privileged("not_root_is_told_to_use_sudo") {
        return;
    }
    // A process of nobody's own, so only the missing capabilities stop it.
    let target = Proc::spawn(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sleep",
        "30",
    ]));
    std::thread::sleep(Duration::from_millis(200));
    assert_fails(
        &as_nobody(&["attach", &target.pid().to_string()]),
        4,
        "lacks the privileges to load eBPF programs (missing CAP_BPF, CAP_PERFMON); run it as root (`sudo tracer",
    );
}

#[test]
fn pid_of_another_user_is_not_permitted() {
    if !privileged("pid_of_another_user_is_not_permitted") {
        return;
    }
    assert_fails(
        &as_nobody(&["attach", "1"]),
        4,
        "not permitted to trace pid 1",
    );
}

#[test]
fn kernel_without_btf_or_uprobes() {
    if !privileged("kernel_without_btf_or_uprobes") {
        return;
    }
    let target = Proc::spawn(Command::new("sleep").arg("30"));
    let pid = target.pid().to_string();
    let out = Command::new(tracer_bin())
        .args(["attach", &pid])
        .env("TRACER_BTF_PATH", "/nonexistent/vmlinux")
        .output()
        .unwrap();
    assert_fails(&out, 4, "does not expose BTF");
    let out = Command::new(tracer_bin())
        .args(["attach", &pid])
        .env("TRACER_UPROBE_PMU_PATH", "/nonexistent/uprobe")
        .output()
        .unwrap();
    assert_fails(&out, 4, "does not support uprobes");
}

/// A thread id (from `ps -L`, `top -H`) is traced as its process, with a
/// notice; it used to fail as "not permitted".
#[test]
fn a_thread_id_traces_its_process() {
    if !privileged("a_thread_id_traces_its_process") {
        return;
    }
    let t = Duration::from_secs(60);
    let target = Proc::spawn(Command::new("/usr/bin/python3").args([
        "-c",
        "import threading, time\n\
         t = threading.Thread(target=time.sleep, args=(60,), daemon=True)\n\
         t.start()\n\
         print(t.native_id, flush=True)\n\
         time.sleep(60)",
    ]));
    let tid: u32 = target.line(t).trim().parse().unwrap();
    assert_ne!(tid, target.pid(), "the thread has its own id");
    let (mut tracer, mut stream, attached) = Tracing::attach(tid).args(["--duration", "1"]).start();
    assert_eq!(
        attached["pid"],
        target.pid(),
        "the thread's process is traced"
    );
    stream.next_of("report", t);
    assert_eq!(tracer.wait(t), Some(0));
    let notice = format!("{tid} is a thread of process {}", target.pid());
    assert!(
        stream
            .seen
            .iter()
            .any(|v| v["type"] == "notice" && v["message"].as_str().unwrap().contains(&notice)),
        "a notice says `{notice}`: {:?}",
        stream.seen
    );
}

/// A kernel older than the minimum is refused before anything loads:
/// `setarch --uname-2.6` makes uname(2) report a 2.6 release to the tracer.
#[test]
fn a_kernel_older_than_the_minimum_is_refused() {
    let me = std::process::id().to_string();
    let out = Command::new("setarch")
        .args(["x86_64", "--uname-2.6"])
        .arg(tracer_bin())
        .args(["attach", &me])
        .output()
        .unwrap();
    assert_fails(
        &out,
        4,
        "is older than 6.1, the oldest kernel tracer supports",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Linux 2.6."), "{stderr}");
}
