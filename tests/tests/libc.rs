//! Privileged: the real tracer attached to real C processes whose allocations
//! are known, asserting call sites (function, file, line) and exact totals.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use tracer_tests::{allocs::EXPECTED, *};

const T: Duration = Duration::from_secs(60);

/// A site's (outstanding bytes, outstanding blocks, allocs, frees) are
/// exactly `want`; `what` names the case in the failure.
fn assert_figures(site: &Value, want: (u64, u64, u64, u64), what: &str) {
    let n = |k: &str| site[k].as_u64().unwrap();
    assert_eq!(
        (
            n("outstanding_bytes"),
            n("outstanding_count"),
            n("allocs"),
            n("frees")
        ),
        want,
        "{what} {site}"
    );
}

fn assert_exact_sites(report: &Value, full_stacks: bool) {
    let src = allocs::src();
    for &(kind, function, marker, bytes, count, allocs, frees) in EXPECTED {
        let line = marker_line(&src, marker);
        let site = site_at(report, kind, function, line);
        let what = format!("{kind} site {function}:{line} ({marker})");
        assert_eq!(site["outstanding_bytes"], bytes, "{what}");
        assert_eq!(site["outstanding_count"], count, "{what}");
        assert_eq!(site["allocs"], allocs, "{what}");
        assert_eq!(site["frees"], frees, "{what}");
        let file = site["frames"][0]["file"].as_str().unwrap_or_default();
        assert!(file.ends_with("allocs.c"), "{what}: file {file}");
        let functions: Vec<&str> = site["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        let has_root = functions
            .iter()
            .any(|f| ["main", "start_thread"].contains(f));
        assert_eq!(
            site["truncated"], !has_root,
            "{what}: truncated must be set exactly when the stack lacks its root: {functions:?}"
        );
        if full_stacks {
            assert!(
                !site["truncated"].as_bool().unwrap(),
                "{what}: {functions:?}"
            );
            if function == "thread_main" {
                assert_eq!(functions.last(), Some(&"start_thread"), "{what}");
            } else {
                let caller = if function == "inline_alloc" {
                    "leak_inlined"
                } else {
                    function
                };
                let expect_prefix = [caller, "run_all", "main"];
                let tail: Vec<&str> = functions
                    .iter()
                    .copied()
                    .skip_while(|f| *f != caller)
                    .take(3)
                    .collect();
                assert_eq!(tail, expect_prefix, "{what}: {functions:?}");
            }
        }
    }
    // The inlined helper is its own frame, at the call inside it, and its
    // caller is at the line where it was inlined.
    let inner = site_at(
        report,
        "heap",
        "inline_alloc",
        marker_line(&src, "inline_inner"),
    );
    assert_eq!(inner["frames"][0]["inlined"], true);
    assert_eq!(inner["frames"][1]["function"], "leak_inlined");
    assert_eq!(
        inner["frames"][1]["line"],
        marker_line(&src, "inline_outer")
    );
    // malloc's own mmap for the 1 MiB blocks is not counted a second time.
    assert!(
        report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !(s["kind"] == "mmap" && s["frames"][0]["function"] == "leak_big")),
        "large malloc blocks double-counted as mappings:\n{}",
        describe_sites(report)
    );
    // No phantom: every site whose innermost frame is the fixture's own
    // code is one of the expected, and together they hold exactly the
    // fixture's arithmetic (what libc allocates on its behalf, a thread's
    // stack, stdio's buffer, has libc frames innermost).
    let own: Vec<&Value> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["frames"][0]["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("allocs.c"))
        })
        .collect();
    for site in &own {
        let f = &site["frames"][0];
        assert!(
            EXPECTED.iter().any(|&(kind, function, marker, ..)| {
                site["kind"] == kind
                    && f["function"] == function
                    && f["line"] == marker_line(&src, marker)
            }),
            "a site the fixture does not have: {site}\n{}",
            describe_sites(report)
        );
    }
    assert_eq!(own.len(), EXPECTED.len(), "{}", describe_sites(report));
    let held: u64 = own
        .iter()
        .map(|s| s["outstanding_bytes"].as_u64().unwrap())
        .sum();
    let truth: u64 = EXPECTED.iter().map(|e| e.3).sum();
    assert_eq!(
        held, truth,
        "the fixture's sites hold {held} B, it leaves {truth} B"
    );
    // The failing calloc leaves no site, and is counted as failed.
    assert!(sites_at(report, "heap", "failures", marker_line(&src, "calloc_fail")).is_empty());
    assert!(report["activity"]["failed_allocs"].as_u64().unwrap() >= 1);
    // Nothing was lost on this small target.
    let lost = &report["lost"];
    for key in [
        "addr_map_full",
        "site_map_full",
        "stacks_lost",
        "pending_map_full",
        "unmatched_returns",
    ] {
        assert_eq!(lost[key], 0, "lost.{key}");
    }
}

/// The documented JSON Lines schema, on every object of a stream.
fn assert_schema(stream: &[Value], pid: u32) {
    assert_eq!(
        stream[0]["type"], "attached",
        "the stream starts with `attached`"
    );
    let probes: Vec<&str> = stream[0]["probes"]
        .as_array()
        .unwrap()
        .iter()
        // "free+0x3": placed past the entry on a cheaper instruction.
        .map(|p| p["function"].as_str().unwrap().split('+').next().unwrap())
        .collect();
    for f in ["malloc", "free", "calloc", "realloc", "mmap", "munmap"] {
        assert!(probes.contains(&f), "no probe on {f}: {probes:?}");
    }
    for v in stream {
        let kind = v["type"]
            .as_str()
            .expect("every object has a string `type`");
        let ts = v["ts"].as_str().expect("every object has a string `ts`");
        assert!(is_rfc3339(ts), "ts {ts} is not RFC 3339");
        assert_eq!(v["pid"], pid, "{kind} pid");
        if kind == "snapshot" || kind == "report" {
            let sites = v["sites"].as_array().expect("sites");
            let bytes: Vec<u64> = sites
                .iter()
                .map(|s| s["outstanding_bytes"].as_u64().unwrap())
                .collect();
            assert!(
                bytes.windows(2).all(|w| w[0] >= w[1]),
                "sites sorted by outstanding bytes"
            );
            for s in sites {
                assert!(["heap", "mmap"].contains(&s["kind"].as_str().unwrap()));
                for key in ["outstanding_bytes", "outstanding_count", "allocs", "frees"] {
                    assert!(s[key].is_u64(), "site.{key} is a count: {s}");
                }
                assert!(s["growth_bytes_per_s"].is_number());
                for f in s["frames"].as_array().expect("frames") {
                    assert!(f["function"].is_string());
                    assert!(f["file"].is_string() || f["file"].is_null());
                    assert!(f["line"].is_u64() || f["line"].is_null());
                }
            }
            assert!(v["lost"].is_object());
        }
    }
    let first_snapshot = stream.iter().position(|v| v["type"] == "snapshot");
    if let Some(i) = first_snapshot {
        assert!(i > 0, "`attached` comes before any snapshot");
    }
}

/// Attach to a running target, let it allocate, let it exit: the tracer
/// reports the exit and a final report with every site exact, and exits 0.
fn attach_case(binary: &str, full_stacks: bool) {
    attach_cmd(Command::new(fixture(binary)).arg("wait"), full_stacks);
}

fn attach_cmd(cmd: &mut Command, full_stacks: bool) {
    let (stream, pid) = attach_until_exit(cmd, &[]);
    assert_schema(&stream, pid);
    assert_exact_sites(stream.last().unwrap(), full_stacks);
}

#[test]
fn attach_reports_exact_sites_with_full_stacks() {
    if !privileged("attach_reports_exact_sites_with_full_stacks") {
        return;
    }
    attach_case("allocs-fp", true);
}

#[test]
fn attach_without_frame_pointers_keeps_call_sites_and_flags_truncation() {
    if !privileged("attach_without_frame_pointers_keeps_call_sites_and_flags_truncation") {
        return;
    }
    attach_case("allocs-nofp", false);
}

#[test]
fn attach_finds_the_allocator_in_a_static_executable() {
    if !privileged("attach_finds_the_allocator_in_a_static_executable") {
        return;
    }
    attach_case("allocs-static", true);
}

/// A process with another root directory, as in a container: its libc is a
/// different file (inode) than the host's at the same path, so probes must go
/// through /proc/PID/root or they would never fire.
#[test]
fn attach_to_a_process_in_another_root() {
    if !privileged("attach_to_a_process_in_another_root") {
        return;
    }
    let root = std::env::temp_dir().join(format!("tracer-root-{}", std::process::id()));
    let _cleanup = RemoveDir(root.clone());
    let exe = fixture("allocs-fp");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&exe, root.join("allocs")).unwrap();
    let listing = Command::new("/lib64/ld-linux-x86-64.so.2")
        .arg("--list")
        .arg(&exe)
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let path = line.split("=>").last().unwrap().trim();
        let path = path.split(" (").next().unwrap();
        if !path.starts_with('/') {
            continue;
        }
        let dest = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(path, &dest).unwrap();
    }
    attach_cmd(
        Command::new("chroot").arg(&root).args(["/allocs", "wait"]),
        true,
    );
}

/// A process in its own mount namespace where libc's path is bind-mounted
/// over by a copy: the path in its maps names a different file on the host, so
/// the tracer must go through /proc/PID/root to reach the inode it uses.
#[test]
fn attach_to_a_process_in_another_mount_namespace() {
    if !privileged("attach_to_a_process_in_another_mount_namespace") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tracer-ns-{}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let copy = dir.join("libc.so.6");
    std::fs::copy(&libc, &copy).unwrap();
    let script = format!(
        "mount --bind {} {} && exec {} wait",
        copy.display(),
        libc.display(),
        fixture("allocs-fp").display()
    );
    attach_cmd(
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        true,
    );
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn run_traces_from_the_first_allocation() {
    if !privileged("run_traces_from_the_first_allocation") {
        return;
    }
    let out = std::env::temp_dir().join(format!("tracer-run-{}.jsonl", std::process::id()));
    // `now`: the target allocates as soon as main starts, so any window
    // between exec and attach would lose sites.
    // No interval before the target exits: what the report holds was read
    // at the exit (sites) or at the start (memory).
    let (mut tracer, _, _) = Tracing::run([fixture("allocs-fp").into_os_string(), "now".into()])
        .interval("30")
        .output(&out)
        .start();
    assert_eq!(tracer.wait(T), Some(0));
    let stream = parse_lines(&std::fs::read_to_string(&out).unwrap());
    let _ = std::fs::remove_file(&out);
    let pid = stream[0]["pid"].as_u64().unwrap() as u32;
    assert_schema(&stream, pid);
    let exited = stream
        .iter()
        .find(|v| v["type"] == "target_exited")
        .unwrap();
    assert_eq!(exited["code"], 0, "run reports the command's exit status");
    let report = stream.last().unwrap();
    assert_eq!(report["type"], "report");
    assert_exact_sites(report, true);
    assert!(
        !stream.iter().any(|v| v["type"] == "snapshot"),
        "the target exits before the first interval"
    );
    assert!(
        report["memory"]["usage_bytes"].as_u64().unwrap() > 0,
        "a report of a short run has the target's memory: {}",
        report["memory"]
    );
}

/// The table view, Ctrl-C, and the final report naming the leaking function.
#[test]
fn interrupt_prints_a_report_naming_the_leak() {
    if !privileged("interrupt_prints_a_report_naming_the_leak") {
        return;
    }
    let service = Proc::spawn(&mut Command::new(fixture("demo")));
    service.expect_line("demo service pid", T);
    let mut tracer = Proc::spawn(Command::new(tracer_bin()).args([
        "attach",
        &service.pid().to_string(),
        "--interval",
        "0.3",
    ]));
    tracer.expect_line("tracer: attached to pid", T);
    // Two table refreshes, then Ctrl-C.
    tracer.expect_line("tracer: pid", T);
    tracer.expect_line("tracer: pid", T);
    tracer.signal(libc::SIGINT);
    let lines = tracer.rest_of_output(Duration::from_secs(20), T);
    assert_eq!(tracer.wait(T), Some(0));
    let text = lines.join("\n");
    assert!(text.contains("ended: interrupted"), "{text}");
    let line = marker_line(&source("c/demo.c"), "session_cache_put");
    assert!(
        text.contains(&format!(
            "Largest holder: session_cache_put (demo.c:{line})"
        )),
        "the report must name the leak:\n{text}"
    );
    assert!(
        Path::new(&format!("/proc/{}", service.pid())).exists(),
        "the target survives"
    );
}

/// `--duration` stops by itself; the growth rate agrees with the snapshots.
#[test]
fn duration_stops_and_growth_matches_the_series() {
    if !privileged("duration_stops_and_growth_matches_the_series") {
        return;
    }
    let service = Proc::spawn(&mut Command::new(fixture("demo")));
    service.expect_line("demo service pid", T);
    let (mut tracer, mut stream, _) = Tracing::attach(service.pid())
        .interval("0.25")
        .args(["--duration", "3", "--trend-window", "30"])
        .start();
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    assert_eq!(report["reason"], "duration");
    let line = marker_line(&source("c/demo.c"), "session_cache_put");
    let leak = site_at(&report, "heap", "session_cache_put", line);
    assert_eq!(
        report["sites"][0]["site_id"], leak["site_id"],
        "the leak is on top"
    );
    // Every leaked block is one `struct session` (8 + 8 + 4000 bytes).
    let count = leak["outstanding_count"].as_u64().unwrap();
    assert!(count > 10, "the demo leaks ~25 sessions/s");
    assert_eq!(leak["outstanding_bytes"].as_u64().unwrap(), count * 4016);
    // Growth against the demo's own rate: one request every PERIOD_MS on an
    // absolute clock, a session every LEAK_EVERY requests.
    let define = |name: &str| constant_define("c/demo.c", name) as f64;
    let expected = 1000.0 / define("PERIOD_MS") / define("LEAK_EVERY") * 4016.0;
    let got = leak["growth_bytes_per_s"].as_f64().unwrap();
    assert!(
        (got - expected).abs() <= 0.1 * expected,
        "growth {got:.0} B/s; the demo leaks {expected:.0} B/s"
    );
    for churn in ["parse_request", "render_response"] {
        let s = report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["frames"][0]["function"] == churn)
            .unwrap_or_else(|| panic!("no {churn} site"));
        // Tracing stops at any instant: one request may be in flight.
        assert!(
            s["outstanding_count"].as_u64().unwrap() <= 1,
            "{churn} frees everything: {s}"
        );
        let growth = s["growth_bytes_per_s"].as_f64().unwrap();
        assert!(
            growth.abs() < 0.01 * got,
            "{churn} does not grow: {growth} B/s"
        );
    }
}

/// Tiny kernel maps: what does not fit is counted in `lost`, the eBPF side's
/// warning reaches the tracer's log, and the totals that are reported only
/// cover what was tracked (no phantom leaks).
#[test]
fn full_maps_are_counted_and_shown() {
    if !privileged("full_maps_are_counted_and_shown") {
        return;
    }
    let mut target = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .args(["--max-allocs", "8", "--max-stacks", "4"])
        .stderr(std::process::Stdio::piped())
        .on_attached(|_| target.send("go"))
        .start();
    let mut stderr = tracer.child.stderr.take().unwrap();
    target.expect_line("done", T);
    target.close_stdin();
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let lost = &report["lost"];
    assert!(lost["addr_map_full"].as_u64().unwrap() > 0, "{lost}");
    assert!(lost["stacks_lost"].as_u64().unwrap() > 0, "{lost}");
    let live: u64 = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outstanding_count"].as_u64().unwrap())
        .sum();
    assert!(live <= 8, "only tracked blocks are outstanding: {live}");
    assert!(
        report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["frames"][0]["function"] == "[unknown stack]"),
        "allocations without a stack are still accounted"
    );
    let mut log = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    assert!(
        log.contains("address map full: allocations are being lost"),
        "the eBPF side's warning reaches the log: {log}"
    );
}

/// `--sample-bytes`: blocks at least as large as the rate are always kept
/// (exact), smaller ones are unbiased estimates, churn stays at zero, and a
/// realloc still releases the block it replaces.
#[test]
fn sampling_keeps_large_blocks_exact_and_estimates_the_rest() {
    if !privileged("sampling_keeps_large_blocks_exact_and_estimates_the_rest") {
        return;
    }
    let (stream, _) = attach_until_exit(
        Command::new(fixture("allocs-fp")).arg("wait"),
        &["--sample-bytes", "4096"],
    );
    let report = stream.last().unwrap();
    let src = allocs::src();
    let at = |f: &str, m: &str| site_at(report, "heap", f, marker_line(&src, m));
    // At or above the rate: kept every time, weight 1.
    assert_eq!(at("leak_big", "big_malloc")["outstanding_bytes"], 2 << 20);
    assert_eq!(
        at("grow_realloc", "realloc_grow")["outstanding_bytes"],
        15_000
    );
    assert_eq!(at("leak_big", "big_malloc")["sampled"], true);
    // The 100-byte seeds realloc replaced are gone, whether kept or not.
    let seeds = sites_at(
        report,
        "heap",
        "grow_realloc",
        marker_line(&src, "realloc_seed"),
    );
    assert!(seeds.iter().all(|s| s["outstanding_bytes"] == 0));
    // Churn: 10000 × 64 B, p = 1/64: ~156 kept, weight 64 each.
    let churn = at("churn", "churn");
    assert_eq!(churn["outstanding_bytes"], 0);
    let est = churn["allocs"].as_f64().unwrap();
    assert!(
        (est - 10_000.0).abs() < 3_000.0,
        "churn allocs estimate {est}"
    );
    assert!(report["activity"]["unsampled"].as_u64().unwrap() > 9_000);
    // Mappings are never sampled.
    assert_eq!(
        site_at(report, "mmap", "leak_mmap", marker_line(&src, "mmap"))["outstanding_bytes"],
        131_072
    );
}

/// Sampling at a rate no block reaches leaves nearly every call out. With
/// uprobe sessions those calls skip their return probe; the allocator's own
/// mmap calls inside them (1 MiB blocks, a thread's new arena) must still be
/// recognised as nested, and the program's own mmap after them must not.
/// The classic path (sessions off) must give the same sites.
#[test]
fn sampled_out_calls_skip_their_return_and_stay_consistent() {
    if !privileged("sampled_out_calls_skip_their_return_and_stay_consistent") {
        return;
    }
    let src = allocs::src();
    for (env, program, foreign) in [
        (None, "alloc_session", false),
        // Another tool's uretprobe on malloc swaps return addresses for the
        // kernel's trampoline: left-out calls must still be told live.
        (None, "alloc_session", true),
        (Some("0"), "alloc_return", false),
    ] {
        let _foreign = foreign.then(ForeignUretprobe::on_malloc);
        let env: Vec<(&str, &str)> = env
            .map(|v| ("TRACER_UPROBE_SESSION", v))
            .into_iter()
            .collect();
        let (stream, _) = attach_until_exit_env(
            Command::new(fixture("allocs-fp")).arg("wait"),
            &["--sample-bytes", "4294967295"],
            &env,
        );
        let attached = stream.iter().find(|v| v["type"] == "attached").unwrap();
        let programs: Vec<&str> = attached["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["function"].as_str().unwrap().starts_with("malloc"))
            .map(|p| p["program"].as_str().unwrap())
            .collect();
        assert!(
            programs.contains(&program),
            "{env:?} {foreign}: {programs:?}"
        );
        let notices: Vec<&Value> = stream.iter().filter(|v| v["type"] == "notice").collect();
        assert_eq!(
            notices
                .iter()
                .any(|n| n["message"].as_str().unwrap().contains(
                    "uprobe sessions are unavailable (turned off by TRACER_UPROBE_SESSION=0)"
                )),
            program == "alloc_return",
            "{notices:?}"
        );
        let report = stream.last().unwrap();
        let mut mapped: Vec<String> = report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "mmap" && s["outstanding_bytes"].as_u64().unwrap() > 0)
            .map(|s| s["frames"][0]["function"].as_str().unwrap().to_string())
            .collect();
        mapped.sort();
        // No 1 MiB block nor arena of malloc's shows up as a mapping.
        assert_eq!(
            mapped,
            ["allocate_stack", "leak_mmap"],
            "{env:?} {foreign}: {}",
            describe_sites(report)
        );
        assert_eq!(
            site_at(report, "mmap", "leak_mmap", marker_line(&src, "mmap"))["outstanding_bytes"],
            131_072
        );
        assert!(report["activity"]["unsampled"].as_u64().unwrap() > 10_000);
        for (k, v) in report["lost"].as_object().unwrap() {
            if k != "truncated_stacks" {
                assert_eq!(v, 0, "{env:?} {foreign}: lost.{k}");
            }
        }
    }
}

/// A return probe on libc's malloc from outside the tracer (a tracefs
/// uprobe event, as `perf probe` makes), removed on drop.
struct ForeignUretprobe {
    name: String,
}

impl ForeignUretprobe {
    const TRACEFS: &str = "/sys/kernel/tracing";

    fn on_malloc() -> Self {
        use object::{Object, ObjectSymbol};
        let tracefs = Path::new(Self::TRACEFS);
        if !tracefs.join("uprobe_events").exists() {
            let ok = Command::new("mount")
                .args(["-t", "tracefs", "nodev", Self::TRACEFS])
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot mount tracefs");
        }
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        let data = std::fs::read(libc).unwrap();
        let file = object::File::parse(&*data).unwrap();
        // libc's text is mapped at its file offset: the address is the offset.
        let malloc = file
            .dynamic_symbols()
            .find(|s| s.name().is_ok_and(|n| n == "malloc"))
            .expect("malloc in libc")
            .address();
        let name = format!("tracer_test_{}", std::process::id());
        Self::append(&format!("r:{name}/malloc {libc}:{malloc:#x}"));
        std::fs::write(tracefs.join(format!("events/{name}/malloc/enable")), "1").unwrap();
        Self { name }
    }

    fn append(line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(Path::new(Self::TRACEFS).join("uprobe_events"))
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

impl Drop for ForeignUretprobe {
    fn drop(&mut self) {
        let enable = Path::new(Self::TRACEFS).join(format!("events/{}/malloc/enable", self.name));
        let _ = std::fs::write(enable, "0");
        Self::append(&format!("-:{}/malloc", self.name));
    }
}

/// The kernel's stack table refuses a second stack hashed to an occupied
/// bucket. With 16 buckets for allocs.c's ~15 stacks several collide (with
/// all 15 in distinct buckets about once in a million runs); they must land
/// in the tracer's own table, with their whole stacks, and none be lost.
#[test]
fn colliding_stacks_fall_back_to_the_tracers_own_table() {
    if !privileged("colliding_stacks_fall_back_to_the_tracers_own_table") {
        return;
    }
    let (stream, _) = attach_until_exit(
        Command::new(fixture("allocs-fp")).arg("wait"),
        // The kernel's frame-pointer walker and its stack table (DWARF
        // walks go to the tracer's own table directly).
        &["--max-stacks", "16", "--frame-pointers-only"],
    );
    let report = stream.last().unwrap();
    assert_eq!(report["lost"]["stacks_lost"], 0, "{}", report["lost"]);
    assert!(
        report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["frames"][0]["function"] != "[unknown stack]"),
        "{}",
        describe_sites(report)
    );
    let src = allocs::src();
    for (function, marker) in [
        ("leak_malloc", "leak_malloc"),
        ("leak_calloc", "leak_calloc"),
        ("leak_posix_memalign", "posix_memalign"),
        ("leak_memalign", "memalign"),
    ] {
        let site = site_at(report, "heap", function, marker_line(&src, marker));
        assert_eq!(
            site["outstanding_bytes"],
            allocs::bytes_at(marker),
            "{function}"
        );
        let frames: Vec<&str> = site["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        assert_eq!(frames, [function, "run_all", "main"], "whole stacks");
    }
}

/// A binary stripped of its symbols, its debug file kept apart as Debian's
/// -dbgsym packages do: without it, the leak's frame is named
/// `module+0xoffset` (an offset `addr2line` maps to `leak_malloc`) and a
/// notice names the module; with `--debug-dir`, the frame has its name and
/// line again.
#[test]
fn stripped_binaries_name_offsets_and_take_debug_dirs() {
    if !privileged("stripped_binaries_name_offsets_and_take_debug_dirs") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tracer-debugdir-{}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let original = fixture("allocs-fp");
    let stripped = dir.join("allocs-stripped");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&stripped)
        .arg(&original));
    let data = std::fs::read(&original).unwrap();
    let build_id = {
        use object::Object;
        object::File::parse(&*data)
            .unwrap()
            .build_id()
            .unwrap()
            .expect("a build id")
    };
    let hex: String = build_id.iter().map(|b| format!("{b:02x}")).collect();
    let debug_dir = dir.join("debug");
    let debug_file = debug_dir.join(format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..]));
    std::fs::create_dir_all(debug_file.parent().unwrap()).unwrap();
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&original)
        .arg(&debug_file));
    let line = marker_line(&source("c/allocs.c"), "leak_malloc");

    let trace = |extra: &[&str]| -> (Vec<Value>, Value) {
        let mut target = Proc::spawn(Command::new(&stripped).arg("wait"));
        target.expect_line("ready", T);
        let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
            .args(extra)
            .on_attached(|_| target.send("go"))
            .start();
        target.expect_line("done", T);
        let report = end_normally(&mut target, &mut tracer, &mut stream);
        (stream.seen, report)
    };

    // Without the debug file: offsets, and a notice naming the module.
    let (seen, report) = trace(&[]);
    let module = stripped.display().to_string();
    assert!(
        seen.iter().any(|v| v["type"] == "notice"
            && v["message"].as_str().unwrap().contains("no symbols")
            && v["message"].as_str().unwrap().contains(&module)),
        "a notice names {module}: {seen:?}"
    );
    // The site allocating exactly leak_malloc's 10 x 1000 B, found by the
    // fixture's arithmetic since it has no name.
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "heap" && s["outstanding_bytes"] == 10000 && s["allocs"] == 10)
        .unwrap_or_else(|| panic!("no 10 x 1000 B site:\n{}", describe_sites(&report)));
    let f = &site["frames"][0];
    let name = f["function"].as_str().unwrap();
    let prefix = "allocs-stripped+0x";
    assert!(name.starts_with(prefix), "{f}");
    let offset = u64::from_str_radix(&name[prefix.len()..], 16).unwrap();
    // The return address is after the call: the call is at offset - 1.
    let resolved = run(Command::new("addr2line")
        .args(["-f", "-e"])
        .arg(&original)
        .arg(format!("{:#x}", offset - 1)));
    let resolved = String::from_utf8_lossy(&resolved);
    assert_eq!(
        resolved.lines().next(),
        Some("leak_malloc"),
        "addr2line reads {name} as {resolved}"
    );
    assert!(resolved.contains(&format!("allocs.c:{line}")), "{resolved}");

    // With the debug directory: the name and line again, no notice.
    let (seen, report) = trace(&["--debug-dir", debug_dir.to_str().unwrap()]);
    let site = site_at(&report, "heap", "leak_malloc", line);
    assert_eq!(site["outstanding_bytes"], 10000);
    assert!(
        !seen
            .iter()
            .any(|v| v["type"] == "notice" && v["message"].as_str().unwrap().contains(&module)),
        "no notice about {module} once its debug file is found"
    );
}

/// Detaching takes a moment (the final report, closing every probe link); a
/// second Ctrl-C quits at once. The target keeps running, unharmed.
#[test]
fn a_second_interrupt_quits_at_once() {
    if !privileged("a_second_interrupt_quits_at_once") {
        return;
    }
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let service = Proc::spawn(&mut Command::new(fixture("demo")));
    service.expect_line("demo service pid", T);
    let (mut tracer, _stream, _) = Tracing::attach(service.pid())
        .stderr(std::process::Stdio::piped())
        .start();
    let stderr = tracer.child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    tracer.signal(libc::SIGINT);
    let hint = wait_until("the detach hint", T, || {
        lines.try_recv().ok().filter(|l| l.contains("Ctrl-C again"))
    });
    assert!(hint.contains("quit at once"), "{hint}");
    tracer.signal(libc::SIGINT);
    let status = wait_until("the tracer to end", T, || tracer.child.try_wait().unwrap());
    assert_eq!(
        status.signal(),
        Some(libc::SIGINT),
        "the second Ctrl-C ends the tracer: {status:?}"
    );
    // The target is untouched: still running.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", service.pid())).unwrap();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(matches!(state, "S" | "R"), "target state {state}");
}

/// An entrypoint script that execs the real program after attach (`sh -c
/// '...; exec app'`): the tracer follows into the new image, with a notice
/// and a new `attached` record, and traces it exactly; the shell's sites
/// stay in the final report under `previous_images`.
#[test]
fn exec_after_attach_is_followed() {
    if !privileged("exec_after_attach_is_followed") {
        return;
    }
    let allocs = fixture("allocs-fp");
    let mut shell = Proc::spawn(Command::new("/bin/sh").args([
        "-c",
        &format!("echo ready; read line; exec {} wait", allocs.display()),
    ]));
    shell.expect_line("ready", T);
    let (mut tracer, mut stream, first) = Tracing::attach(shell.pid())
        .on_attached(|_| shell.send("go"))
        .start();
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    assert_eq!(first["exe"], sh.display().to_string());
    // allocs.c's own "ready": it runs, not yet allocating.
    shell.expect_line("ready", T);
    let real = std::fs::canonicalize(&allocs).unwrap();
    let second = stream.next_of("attached", T);
    assert_eq!(second["exe"], real.display().to_string());
    assert_eq!(second["pid"], shell.pid());
    let notice = stream
        .seen
        .iter()
        .find(|v| v["type"] == "notice" && v["message"].as_str().unwrap().contains("exec'd"))
        .expect("a notice names the exec");
    assert!(
        notice["message"]
            .as_str()
            .unwrap()
            .contains(&real.display().to_string()),
        "{notice}"
    );
    shell.send("go");
    shell.expect_line("done", T);
    shell.close_stdin();
    assert_eq!(shell.wait(T), Some(0));
    stream.next_of("target_exited", T);
    let report = stream.next_of("report", T);
    assert_exact_sites(&report, true);
    let previous = report["previous_images"]
        .as_array()
        .expect("previous_images");
    assert_eq!(previous.len(), 1, "{previous:?}");
    assert_eq!(previous[0]["exe"], sh.display().to_string());
    assert_eq!(tracer.wait(T), Some(0));
    assert_schema(&stream.seen, shell.pid());
}

/// `prog & tracer attach $!`: a process still in the dynamic loader (held
/// here at its exec stop, before the loader has mapped libc) is waited
/// for, then traced, instead of "found no allocator".
#[test]
fn attach_waits_for_the_dynamic_loader() {
    if !privileged("attach_waits_for_the_dynamic_loader") {
        return;
    }
    use std::os::unix::process::CommandExt;
    // The ptrace requests must come from the thread that spawned the child.
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let mut cmd = Command::new(fixture("demo"));
        // SAFETY: only async-signal-safe ptrace(2) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                Ok(())
            });
        }
        let service = Proc::spawn(&mut cmd);
        let pid = service.pid() as i32;
        let mut status = 0;
        // SAFETY: waiting for our own child's exec stop.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        tx.send((pid as u32, maps)).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        // SAFETY: releasing our own tracee.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
        service
    });
    let (pid, maps) = rx.recv().unwrap();
    assert!(
        !maps.contains("libc.so"),
        "held before the loader maps libc:\n{maps}"
    );
    let (mut tracer, mut stream, attached) = Tracing::attach(pid).start();
    let holder_done = holder.join().unwrap();
    assert!(
        probe_programs(&attached)
            .iter()
            .any(|p| p.contains("alloc") || p.contains("size")),
        "libc's allocator is hooked: {attached}"
    );
    holder_done.expect_line("demo service pid", T);
    let snap = stream.next_of_where("snapshot", "the demo's allocations", T, |s| {
        s["total_outstanding_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert!(snap["site_count"].as_u64().unwrap() > 0);
    tracer.signal(libc::SIGINT);
    assert_eq!(tracer.wait(T), Some(0));
}

/// A binary removed or replaced after it started (a deploy swapped it): its
/// frames still resolve, exactly, and their module says "(deleted)".
#[test]
fn a_deleted_binary_is_traced_and_named_so() {
    if !privileged("a_deleted_binary_is_traced_and_named_so") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tracer-deleted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("allocs");
    std::fs::copy(fixture("allocs-fp"), &copy).unwrap();
    let mut target = Proc::spawn_new_file(Command::new(&copy).arg("wait"));
    target.expect_line("ready", T);
    std::fs::remove_dir_all(&dir).unwrap();
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    target.close_stdin();
    assert_eq!(target.wait(T), Some(0));
    let report = stream.next_of("report", T);
    assert_exact_sites(&report, true);
    let (_, function, marker, ..) = EXPECTED[0];
    let site = site_at(
        &report,
        "heap",
        function,
        marker_line(&allocs::src(), marker),
    );
    assert_eq!(
        site["frames"][0]["module"],
        format!("{} (deleted)", copy.display()),
        "{site}"
    );
    assert_eq!(tracer.wait(T), Some(0));
}

/// `attach` is not the target's parent, yet `target_exited` says how it
/// ended: its exit code, or the signal that killed it (from the kernel's
/// sched_process_exit, read in the exiting task).
#[test]
fn attach_reports_how_the_target_ended() {
    if !privileged("attach_reports_how_the_target_ended") {
        return;
    }
    let mut shell = Proc::spawn(Command::new("/bin/sh").args(["-c", "echo ready; read x; exit 7"]));
    shell.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(shell.pid())
        .on_attached(|_| shell.send("go"))
        .start();
    let exited = stream.next_of("target_exited", T);
    assert_eq!(shell.wait(T), Some(7));
    assert_eq!(exited["code"], 7, "{exited}");
    assert!(exited["signal"].is_null(), "{exited}");
    assert_eq!(tracer.wait(T), Some(0));

    let target = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid()).start();
    target.signal(libc::SIGTERM);
    let exited = stream.next_of("target_exited", T);
    assert_eq!(exited["signal"], libc::SIGTERM, "{exited}");
    assert!(exited["code"].is_null(), "{exited}");
    assert_eq!(tracer.wait(T), Some(0));
}

/// `attach --follow-forks`: a child forked after attach (no exec) is traced
/// as a target of its own, from its birth: its sites are exactly the
/// fixture's, under its pid, and none of them shows in the parent, whose
/// own site holds exactly what it allocated after the fork.
#[test]
fn forked_children_are_traced_as_their_own_targets() {
    if !privileged("forked_children_are_traced_as_their_own_targets") {
        return;
    }
    let mut parent = Proc::spawn(Command::new(fixture("allocs-fp")).arg("fork"));
    parent.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(parent.pid())
        .arg("--follow-forks")
        .on_attached(|_| parent.send("fork"))
        .start();
    let child: u32 = parent
        .expect_line("child", T)
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("child PID");
    let attached = stream.next_of_where("attached", "the child's pid", T, |v| v["pid"] == child);
    assert_eq!(attached["parent_pid"], parent.pid(), "{attached}");
    assert!(
        attached["probes"].as_array().unwrap().len() >= 6,
        "{attached}"
    );
    // The child waits for a line before allocating.
    parent.expect_line("ready", T);
    parent.send("go");
    parent.expect_line("done", T);
    parent.close_stdin();
    assert_eq!(parent.wait(T), Some(0), "both processes end normally");
    let mut reports = Vec::new();
    while reports.len() < 2 {
        reports.push(stream.next_of("report", T));
    }
    assert_eq!(
        tracer.wait(T),
        Some(0),
        "the tracer ends with its last target"
    );
    let of = |pid: u32| {
        reports
            .iter()
            .find(|r| r["pid"] == pid)
            .unwrap_or_else(|| panic!("no report for pid {pid}: {reports:?}"))
    };
    assert_exact_sites(of(child), true);
    let parent_report = of(parent.pid());
    let src = allocs::src();
    let own = site_at(
        parent_report,
        "heap",
        "parent_only",
        marker_line(&src, "parent_only"),
    );
    assert_eq!(own["outstanding_bytes"], 7 * 900, "{own}");
    assert_eq!(own["outstanding_count"], 7, "{own}");
    assert!(
        sites_at(
            parent_report,
            "heap",
            "leak_malloc",
            marker_line(&src, "leak_malloc")
        )
        .is_empty(),
        "the child's sites stay out of the parent's report: {}",
        describe_sites(parent_report)
    );
    let exits: Vec<&Value> = stream
        .seen
        .iter()
        .filter(|v| v["type"] == "target_exited")
        .collect();
    assert!(
        exits.iter().any(|e| e["pid"] == child && e["code"] == 0),
        "the child's exit is reported: {exits:?}"
    );
}

/// `tracer run` follows what a shell wrapper starts (`sh -c 'app; ...'`
/// forks and execs the app): the app is traced under its own pid with the
/// fixture's exact sites.
#[test]
fn run_follows_a_shell_wrapper_into_its_program() {
    if !privileged("run_follows_a_shell_wrapper_into_its_program") {
        return;
    }
    let out = std::env::temp_dir().join(format!("tracer-wrapper-{}.json", std::process::id()));
    let script = format!("{} wait; echo wrapper-done", fixture("allocs-fp").display());
    let (mut tracer, mut stream, first) = Tracing::run(["/bin/sh", "-c", script.as_str()])
        .output(&out)
        .start();
    assert!(first["parent_pid"].is_null(), "{first}");
    // allocs' "ready PID": it runs, not yet allocating.
    let app: u32 = tracer
        .expect_line("ready", T)
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ready PID");
    let real = std::fs::canonicalize(fixture("allocs-fp")).unwrap();
    stream.next_of_where("attached", "the app's image", T, |v| {
        v["pid"] == app && v["exe"] == real.display().to_string()
    });
    tracer.send("go");
    tracer.expect_line("done", T);
    tracer.close_stdin();
    tracer.expect_line("wrapper-done", T);
    assert_eq!(tracer.wait(T), Some(0));
    let report = stream.next_of_where("report", "the app's pid", T, |v| v["pid"] == app);
    let _ = std::fs::remove_file(&out);
    assert_exact_sites(&report, true);
}

/// A library with an allocator of its own, loaded with dlopen after attach
/// (a plugin bringing its own jemalloc): its malloc family is hooked when
/// it is mapped, with a notice, and its blocks are counted exactly.
#[test]
fn an_allocator_loaded_after_attach_is_hooked() {
    if !privileged("an_allocator_loaded_after_attach_is_hooked") {
        return;
    }
    let lib = fixture("libownalloc.so");
    let mut target = Proc::spawn(Command::new(fixture("dlchain")).arg(&lib));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, first) = Tracing::attach(target.pid())
        .interval("0.25")
        .on_attached(|_| target.send("go"))
        .start();
    let lib_path = std::fs::canonicalize(&lib).unwrap().display().to_string();
    assert!(
        !first["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["path"] == lib_path.as_str()),
        "not mapped yet at attach"
    );
    target.expect_line("loaded", T);
    let notice = stream.next_of_where("notice", "the new allocator", T, |v| {
        v["message"].as_str().unwrap().contains(&lib_path)
    });
    assert!(
        notice["message"].as_str().unwrap().contains("allocator"),
        "{notice}"
    );
    target.send("go");
    target.expect_line("done", T);
    let report = end_normally(&mut target, &mut tracer, &mut stream);
    let define = |name: &str| constant_define("c/dlchain.c", name);
    let (n, size) = (define("N"), define("SIZE"));
    let line = marker_line(&source("c/ownalloc.c"), "own_malloc");
    let site = site_at(&report, "heap", "lib_f1", line);
    assert_eq!(site["outstanding_bytes"], n * size, "{site}");
    assert_eq!(site["outstanding_count"], n, "{site}");
}

/// `attach --cgroup`: two copies of the fixture in a memory cgroup and a
/// leaking third moved in after attach. Every process is traced with its
/// own pid and exact sites; the cgroup's alert names the leaking process
/// and its site; its OOM kill is recorded for it.
#[test]
fn a_cgroup_is_traced_whole_and_its_alert_names_the_culprit() {
    if !privileged("a_cgroup_is_traced_whole_and_its_alert_names_the_culprit") {
        return;
    }
    let Some(cg) = MemCgroup::create("whole", 96 << 20) else {
        panic!("this machine has a cgroup v1 memory controller; CI must run this test");
    };
    let mut a = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    let mut b = Proc::spawn(Command::new(fixture("allocs-nofp")).arg("wait"));
    a.expect_line("ready", T);
    b.expect_line("ready", T);
    cg.add(a.pid());
    cg.add(b.pid());
    let (mut tracer, mut stream, _) = Tracing::attach_cgroup(&cg.dir)
        .interval("0.5")
        .args(["--oom-window", "12"])
        .start();
    for pid in [a.pid(), b.pid()] {
        if !stream
            .seen
            .iter()
            .any(|v| v["type"] == "attached" && v["pid"] == pid)
        {
            stream.next_of_where("attached", "each process of the cgroup", T, |v| {
                v["pid"] == pid
            });
        }
    }
    // 8 MiB/s from a process that enters the cgroup after attach.
    let mut leak = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "8192"]));
    leak.expect_line("ready", T);
    cg.add(leak.pid());
    stream.next_of_where("attached", "the leaking process", T, |v| {
        v["pid"] == leak.pid()
    });
    for p in [&mut a, &mut b] {
        p.send("go");
        p.expect_line("done", T);
    }
    leak.send("go");
    let alert = stream.next_of_where("alert", "a warning or worse", T, |v| v["severity"] != "ok");
    assert_eq!(
        alert["pid"],
        leak.pid(),
        "the alert names the leaking process: {alert}"
    );
    let top = &alert["top_sites"][0];
    assert_eq!(top["process"]["pid"], leak.pid(), "{alert}");
    assert_eq!(
        top["frames"][0]["function"], "grow_session_cache",
        "{alert}"
    );
    assert_eq!(
        top["frames"][0]["line"],
        marker_line(&source("c/oomleak.c"), "oom_leak"),
        "{alert}"
    );
    let kill = stream.next_of("oom_kill", T);
    assert_eq!(kill["pid"], leak.pid(), "{kill}");
    assert_eq!(kill["detected_by"], "oom:mark_victim tracepoint");
    let totals = stream.next_of_where("cgroup", "the leak ended", T, |v| {
        v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == leak.pid() && p["ended"] == true)
    });
    assert_eq!(totals["processes"].as_array().unwrap().len(), 3, "{totals}");
    for p in [&mut a, &mut b] {
        p.close_stdin();
        assert_eq!(p.wait(T), Some(0));
    }
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let r = stream.next_of("report", T);
        if r["pid"] != leak.pid() {
            reports.push(r);
        }
    }
    assert_eq!(
        tracer.wait(T),
        Some(0),
        "the tracer ends with the cgroup's last process"
    );
    for r in &reports {
        assert!(r["pid"] == a.pid() || r["pid"] == b.pid(), "{}", r["pid"]);
        assert_exact_sites(r, r["pid"] == a.pid());
    }
}

/// `attach --cgroup` on a cgroup v2 directory (this machine's unified
/// hierarchy has no memory controller: the memory watch then reads the
/// processes' v1 memory cgroup): its processes, and a child one of them
/// starts, are traced with their exact sites.
#[test]
fn a_cgroup_v2_directory_is_traced_whole() {
    if !privileged("a_cgroup_v2_directory_is_traced_whole") {
        return;
    }
    let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("a cgroup v2 hierarchy (this machine mounts one at /sys/fs/cgroup/unified)");
    let dir = unified.join(format!("tracer-test-{}-v2", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let mut a = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    let mut forker = Proc::spawn(Command::new(fixture("allocs-fp")).arg("fork"));
    a.expect_line("ready", T);
    forker.expect_line("ready", T);
    for pid in [a.pid(), forker.pid()] {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
    let (mut tracer, mut stream, _) = Tracing::attach_cgroup(&dir).interval("0.5").start();
    for pid in [a.pid(), forker.pid()] {
        if !stream
            .seen
            .iter()
            .any(|v| v["type"] == "attached" && v["pid"] == pid)
        {
            stream.next_of_where("attached", "each process of the cgroup", T, |v| {
                v["pid"] == pid
            });
        }
    }
    // The forker's child is born in the cgroup: traced from its birth.
    forker.send("fork");
    let child: u32 = forker
        .expect_line("child", T)
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap();
    stream.next_of_where("attached", "the child", T, |v| v["pid"] == child);
    forker.expect_line("ready", T);
    forker.send("go");
    forker.expect_line("done", T);
    a.send("go");
    a.expect_line("done", T);
    a.close_stdin();
    forker.close_stdin();
    assert_eq!(a.wait(T), Some(0));
    assert_eq!(forker.wait(T), Some(0));
    let mut reports = std::collections::HashMap::new();
    while reports.len() < 3 {
        let r = stream.next_of("report", T);
        reports.insert(r["pid"].as_u64().unwrap() as u32, r);
    }
    assert_eq!(tracer.wait(T), Some(0));
    assert_exact_sites(&reports[&a.pid()], true);
    assert_exact_sites(&reports[&child], true);
    // The last line: the cgroup's final totals, every process ended.
    let totals = stream.next_of("cgroup", T);
    assert_eq!(totals["cgroup"], dir.display().to_string());
    let procs = totals["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "{totals}");
    assert!(procs.iter().all(|p| p["ended"] == true), "{totals}");
}

/// Eight threads allocating at once, each freeing the blocks another
/// allocated; realloc shrinking and realloc(p, 0); mremap moving a mapping;
/// a free of a block from before attach. Every figure is the fixture's
/// arithmetic (tests/fixtures/c/threads.c).
#[test]
fn threads_freeing_each_others_blocks_and_realloc_corners_are_exact() {
    if !privileged("threads_freeing_each_others_blocks_and_realloc_corners_are_exact") {
        return;
    }
    let mut target = Proc::spawn(&mut Command::new(fixture("threads")));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    let report = end_normally(&mut target, &mut tracer, &mut stream);
    let src = source("c/threads.c");
    let define = |name: &str| constant_define("c/threads.c", name);
    let (threads, per) = (define("THREADS"), define("PER_THREAD"));
    let kept_bytes: u64 = (0..threads).map(|t| per / 2 * (t + 1) * 16).sum();
    let site = |kind: &str, function: &str, marker: &str| {
        site_at(&report, kind, function, marker_line(&src, marker)).clone()
    };
    let t = site("heap", "thread_alloc", "thread_alloc");
    assert_eq!(t["allocs"], threads * per, "{t}");
    assert_eq!(t["frees"], threads * per / 2, "cross-thread frees: {t}");
    assert_eq!(t["outstanding_count"], threads * per / 2, "{t}");
    assert_eq!(t["outstanding_bytes"], kept_bytes, "{t}");
    let check = |s: Value, bytes: u64, count: u64, allocs: u64, frees: u64| {
        assert_figures(&s, (bytes, count, allocs, frees), "")
    };
    // A shrinking realloc moves the block to its own site, at its new size.
    check(site("heap", "shrink", "shrink_seed"), 0, 0, 1, 1);
    check(site("heap", "shrink", "shrink"), 1000, 1, 1, 0);
    // realloc(p, 0) frees p and allocates nothing.
    check(site("heap", "realloc_to_zero", "zero_seed"), 0, 0, 1, 1);
    assert!(
        sites_at(
            &report,
            "heap",
            "realloc_to_zero",
            marker_line(&src, "zero")
        )
        .is_empty(),
        "realloc(p, 0) is no allocation: {}",
        describe_sites(&report)
    );
    // mremap moves the mapping to its own site, at its new length.
    check(site("mmap", "remap", "remap_seed"), 0, 0, 1, 1);
    check(site("mmap", "remap", "remap"), 196_608, 1, 1, 0);
    assert!(
        report["activity"]["untracked_frees"].as_u64().unwrap() >= 1,
        "the block from before attach is an untracked free: {}",
        report["activity"]
    );
    for key in [
        "addr_map_full",
        "pending_map_full",
        "unmatched_returns",
        "stacks_lost",
    ] {
        assert_eq!(report["lost"][key], 0, "lost.{key}");
    }
}

/// Allocator libraries that bring their own C++ `new`/`delete` (and
/// jemalloc its `mallocx` family), preloaded into a C++ program: those
/// entry points are probed in them, and every figure is the program's
/// arithmetic (tests/fixtures/c/cxxalloc.cc).
#[test]
fn allocator_libraries_own_entry_points_are_exact() {
    if !privileged("allocator_libraries_own_entry_points_are_exact") {
        return;
    }
    let src = source("c/cxxalloc.cc");
    let libs = [
        "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
    ];
    for lib in libs {
        assert!(
            Path::new(lib).exists(),
            "{lib} is missing: `cargo xtask test` installs it (libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0)"
        );
        let mut target = Proc::spawn(Command::new(fixture("cxxalloc")).env("LD_PRELOAD", lib));
        target.expect_line("ready", T);
        let (mut tracer, mut stream, attached) = Tracing::attach(target.pid())
            .on_attached(|_| target.send("go"))
            .start();
        let probed: Vec<String> = attached["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                p["path"].as_str().unwrap().contains(
                    Path::new(lib)
                        .file_name()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .split(".so")
                        .next()
                        .unwrap(),
                )
            })
            .map(|p| {
                p["function"]
                    .as_str()
                    .unwrap()
                    .split('+')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        // Aliases at one address are probed once, under one of their names.
        for (what, names) in [
            ("malloc", &["malloc"][..]),
            ("operator new", &["_Znwm", "_Znam"][..]),
            ("operator delete", &["_ZdlPv", "_ZdaPv"][..]),
        ] {
            assert!(
                probed.iter().any(|p| names.contains(&p.as_str())),
                "{lib}: no probe on {what}: {probed:?}"
            );
        }
        target.expect_line("done", T);
        let jemalloc_api = target.expect_line("jemalloc_api", T).ends_with('1');
        let report = end_normally(&mut target, &mut tracer, &mut stream);
        let site = |function: &str, marker: &str| {
            site_at(&report, "heap", function, marker_line(&src, marker)).clone()
        };
        let check = |s: Value, bytes: u64, count: u64, allocs: u64, frees: u64| {
            assert_figures(&s, (bytes, count, allocs, frees), lib)
        };
        check(site("leak_new()", "cxx_new"), 20 * 240, 20, 20, 0);
        check(
            site("leak_new_array()", "cxx_new_array"),
            10 * 1000,
            10,
            10,
            0,
        );
        check(site("churn_new()", "cxx_churn"), 0, 0, 1000, 1000);
        assert_eq!(
            jemalloc_api,
            lib.contains("jemalloc"),
            "{lib}: mallocx found?"
        );
        if jemalloc_api {
            check(site("jemalloc_api()", "mallocx"), 5 * 2048, 5, 5, 0);
            check(site("jemalloc_api()", "rallocx_seed"), 0, 0, 3, 3);
            check(site("jemalloc_api()", "rallocx"), 3 * 3000, 3, 3, 0);
            check(site("jemalloc_api()", "sdallocx_churn"), 0, 0, 4, 4);
            check(site("jemalloc_api()", "dallocx_churn"), 0, 0, 4, 4);
        }
    }
}

/// Run inside a container's memory cgroup (`kubectl exec` into the pod), the
/// tracer's eBPF maps are charged to that group. Maps that would not fit are
/// refused before anything is loaded, with what to do, and the target is
/// left alone; `tracer watch` fits; smaller maps, as the message says, then
/// trace it exactly.
#[test]
fn maps_too_large_for_the_tracers_own_cgroup_are_refused_then_shrunk() {
    const TEST: &str = "maps_too_large_for_the_tracers_own_cgroup_are_refused_then_shrunk";
    if !privileged(TEST) {
        return;
    }
    // The default maps take 121 MiB of kernel memory as Linux 6.18 counts
    // them (the `memlock` of each map in /proc/PID/fdinfo), the smaller
    // ones below about 15 MiB.
    let Some(group) = MemCgroup::create("own", 96 << 20) else {
        return;
    };
    let mut target = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    target.expect_line("ready", T);
    let Err(refused) = Tracing::attach(target.pid()).in_cgroup(&group).try_start() else {
        panic!("the default maps were loaded in a 96 MiB group");
    };
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    let dir = group.dir.to_str().unwrap();
    for needle in [dir, "kubectl exec", "--max-allocs", "--max-stacks"] {
        assert!(
            refused.stderr.contains(needle),
            "{needle}: {}",
            refused.stderr
        );
    }
    assert!(!refused.stderr.contains("panicked"), "{}", refused.stderr);
    // `tracer watch` hangs no probe: it needs no map for blocks, sites or
    // stacks, and fits at the default sizes.
    let (mut watcher, mut stream, attached) =
        Tracing::watch(target.pid()).in_cgroup(&group).start();
    assert_eq!(attached["probes"].as_array().unwrap().len(), 0);
    watcher.signal(libc::SIGINT);
    stream.next_of("report", T);
    assert_eq!(watcher.wait(T), Some(0));

    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .in_cgroup(&group)
        .args(["--max-allocs", "65536", "--max-sites", "4096"])
        .args(["--max-stacks", "4096", "--max-goroutines", "4096"])
        .on_attached(|_| target.send("go"))
        .start();
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", tracer.pid())).unwrap();
    let name = group.dir.file_name().unwrap().to_str().unwrap();
    assert!(own.contains(name), "the tracer runs in {name}: {own}");
    target.expect_line("done", T);
    target.close_stdin();
    assert_eq!(target.wait(T), Some(0), "the target runs normally");
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    assert_exact_sites(&report, true);
}
