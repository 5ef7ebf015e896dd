//! Privileged, for the kernels users run: these run inside the VMs of
//! `cargo xtask vmtest` (Debian's 6.1 and 6.12 cloud kernels under qemu,
//! cgroup v2 with the memory controller, PSI on), which passes `--ignored`.
//!
//! They are ignored on the host on purpose, not skipped: this machine's
//! memory cgroups are v1 and its kernel (6.18) has every optional feature,
//! so what they check (v2 nesting, memory.high, PSI, fallbacks) does not
//! exist here. The VM suite also runs libc.rs, go.rs and oom.rs tests,
//! whose memory cgroups are v2 there.

use std::{path::Path, process::Command, time::Duration};

use tracer_tests::*;

const T: Duration = Duration::from_secs(180);

/// The kernel's release, read where the tracer does not read it.
fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

fn version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// The cgroup v2 hierarchy with its memory controller on, or a failure: the
/// VM's init turns it on, and these tests exist for it.
fn require_v2(test: &str) {
    let on = std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
    if !on {
        skip(
            test,
            "no cgroup v2 memory controller (run by `cargo xtask vmtest`)",
        );
    }
}

/// Features the kernel lacks fall back, and the user is told: batched
/// uprobe_multi links need 6.6, uprobe sessions 6.13. The sites stay exact
/// either way.
#[test]
#[ignore = "runs inside the VMs of `cargo xtask vmtest`"]
fn missing_kernel_features_fall_back_with_a_notice() {
    if !privileged("missing_kernel_features_fall_back_with_a_notice") {
        return;
    }
    let release = release();
    let v = version(&release);
    // Sampling asks for uprobe sessions; 1 byte keeps every block (p = 1),
    // so the figures stay exact.
    let (stream, _) = attach_until_exit(
        Command::new(fixture("allocs-fp")).arg("wait"),
        &["--sample-bytes", "1"],
    );
    let attached = &stream[0];
    let report = stream.iter().rfind(|e| e["type"] == "report").unwrap();
    let kernel = &attached["kernel"];
    assert_eq!(kernel["release"], release.as_str(), "{attached}");
    assert_eq!(kernel["batched_uprobes"], v >= (6, 6), "{kernel}");
    assert_eq!(kernel["uprobe_sessions"], v >= (6, 13), "{kernel}");
    let notices: Vec<&str> = stream
        .iter()
        .filter(|e| e["type"] == "notice")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    let told = |needle: &str| notices.iter().any(|m| m.contains(needle));
    assert_eq!(
        told("batched uprobe_multi links are unavailable"),
        v < (6, 6),
        "Linux {release}: {notices:?}"
    );
    assert_eq!(
        told("uprobe sessions are unavailable"),
        v < (6, 13),
        "Linux {release}: {notices:?}"
    );
    // allocs.c's arithmetic, whichever way the probes went in.
    let &(kind, function, marker, bytes, count, ..) = allocs::expected("leak_malloc");
    let leak = site_at(report, kind, function, marker_line(&allocs::src(), marker));
    assert_eq!(
        (&leak["outstanding_bytes"], &leak["outstanding_count"]),
        (&bytes.into(), &count.into()),
        "{}",
        describe_sites(report)
    );
}

/// A container's group has no limit of its own; its parent (the pod) has.
/// The limit that kills is the parent's, and the alert and the kill are
/// told against it.
#[test]
#[ignore = "runs inside the VMs of `cargo xtask vmtest`"]
fn a_nested_group_is_limited_by_its_parent() {
    const TEST: &str = "a_nested_group_is_limited_by_its_parent";
    if !privileged(TEST) {
        return;
    }
    require_v2(TEST);
    let limit: u64 = 64 << 20;
    let Some(pod) = MemCgroup::create("pod", limit) else {
        return;
    };
    let container = pod.child("container");
    assert_eq!(
        std::fs::read_to_string(container.dir.join("memory.max"))
            .unwrap()
            .trim(),
        "max"
    );
    let mut target = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "4096"]));
    target.expect_line("ready", T);
    container.add(target.pid());
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .default_interval()
        .args(["--interval", "0.5", "--oom-window", "20"])
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let seen = &stream.seen;
    let snap = seen
        .iter()
        .find(|v| v["type"] == "snapshot")
        .expect("a snapshot");
    assert_eq!(snap["memory"]["scope"], "cgroup_v2");
    assert_eq!(
        snap["memory"]["cgroup"].as_str().map(Path::new),
        Some(container.dir.as_path())
    );
    assert_eq!(snap["memory"]["limit_bytes"], limit, "{}", snap["memory"]);
    let alert = seen
        .iter()
        .find(|v| v["type"] == "alert")
        .expect("an alert before the kill");
    let kill = seen
        .iter()
        .find(|v| v["type"] == "oom_kill")
        .expect("the kill is recorded");
    assert_eq!(alert["limit_bytes"], limit);
    assert!(ts_secs(alert["ts"].as_str().unwrap()) < ts_secs(kill["ts"].as_str().unwrap()));
    let line = marker_line(&source("c/oomleak.c"), "oom_leak");
    assert_eq!(
        alert["top_sites"][0]["frames"][0]["function"],
        "grow_session_cache"
    );
    assert_eq!(alert["top_sites"][0]["frames"][0]["line"], line);
    assert_eq!(kill["pid"], target.pid());
    // The kernel counted the kill in the group that held the process.
    let events = std::fs::read_to_string(container.dir.join("memory.events")).unwrap();
    assert!(events.contains("oom_kill 1"), "{events}");
}

/// Over memory.high the kernel throttles instead of killing: the tracer
/// says so, reports the high mark and the throttle count, and PSI (live on
/// these kernels) shows the stall.
#[test]
#[ignore = "runs inside the VMs of `cargo xtask vmtest`"]
fn memory_high_throttling_is_reported_with_pressure() {
    const TEST: &str = "memory_high_throttling_is_reported_with_pressure";
    if !privileged(TEST) {
        return;
    }
    require_v2(TEST);
    let high: u64 = 24 << 20;
    let Some(cg) = MemCgroup::create("high", 256 << 20) else {
        return;
    };
    std::fs::write(cg.dir.join("memory.high"), high.to_string()).unwrap();
    // 40 MiB held: 16 over the high mark, and anonymous with no swap, so
    // reclaim cannot bring it back under: every allocation is throttled.
    let mut target = Proc::spawn(Command::new(fixture("oomleak")).args(["steady", "40"]));
    target.expect_line("ready", T);
    cg.add(target.pid());
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .default_interval()
        .args(["--interval", "0.5", "--duration", "25"])
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let events = std::fs::read_to_string(cg.dir.join("memory.events")).unwrap();
    let high_events: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("high "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        high_events > 0,
        "the fixture never went over memory.high: {events}"
    );
    let notice = stream
        .seen
        .iter()
        .find(|v| v["type"] == "notice" && v["message"].as_str().unwrap().contains("memory.high"))
        .unwrap_or_else(|| panic!("no memory.high notice: {:?}", stream.seen));
    assert_eq!(notice["pid"], target.pid());
    assert!(
        notice["message"].as_str().unwrap().contains("24.0 MiB"),
        "{notice}"
    );
    let last = stream
        .seen
        .iter()
        .rev()
        .find(|v| v["type"] == "snapshot")
        .unwrap();
    let memory = &last["memory"];
    assert_eq!(memory["scope"], "cgroup_v2");
    assert_eq!(memory["high_bytes"], high);
    let seen_events = memory["high_events"].as_u64().expect("high_events");
    assert!(
        seen_events > 0 && seen_events <= high_events,
        "{memory} vs {events}"
    );
    // PSI is live on these kernels, and a throttled group stalls.
    let psi = memory["pressure_some_avg10"]
        .as_f64()
        .unwrap_or_else(|| panic!("no PSI: {memory}"));
    let own = std::fs::read_to_string(cg.dir.join("memory.pressure")).unwrap();
    assert!(own.starts_with("some avg10="), "{own}");
    assert!(
        psi > 0.0,
        "throttled, yet no memory pressure: {memory}; {own}"
    );
    // The baseline the fixture holds, in 256 KiB blocks: past the high
    // mark, and short of its 40 MiB only by what throttling held back.
    let baseline = site_at(
        &report,
        "heap",
        "hold_baseline",
        marker_line(&source("c/oomleak.c"), "baseline"),
    );
    let held = baseline["outstanding_bytes"].as_u64().unwrap();
    let blocks = baseline["outstanding_count"].as_u64().unwrap();
    assert_eq!(held, blocks * (256 << 10), "{baseline}");
    assert!(held > high && held <= 40 << 20, "{baseline}");
}
