//! Privileged: stacks of code built without frame pointers, walked in the
//! kernel from DWARF call-frame information. The truth is the fixture's own
//! arithmetic (tests/fixtures/c/deepchain.c's #defines) and its call chain.

use std::{process::Command, time::Duration};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(60);

/// A `#define NAME value` of deepchain.c.
fn define(name: &str) -> u64 {
    constant_define("c/deepchain.c", name)
}

fn functions(site: &Value) -> Vec<String> {
    site["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap().to_string())
        .collect()
}

/// Traces `deepchain wait` (built as `binary`) from start to exit and
/// returns the final report.
fn trace(binary: &str) -> Value {
    let mut target = Proc::spawn(Command::new(fixture(binary)).arg("wait"));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    end_normally(&mut target, &mut tracer, &mut stream)
}

/// The heap sites whose innermost frame is f10's malloc call.
fn chain_sites(report: &Value) -> Vec<&Value> {
    let line = marker_line(&source("c/deepchain.c"), "chain_malloc");
    sites_at(report, "heap", "f10", line)
}

/// -O2 -fomit-frame-pointer, 10 deep, an alloca frame (rbp-based CFA) and a
/// frame over 64 KiB: every path is whole, one site per path, exact bytes.
#[test]
fn stacks_without_frame_pointers_are_whole_and_exact() {
    if !privileged("stacks_without_frame_pointers_are_whole_and_exact") {
        return;
    }
    let report = trace("deepchain");
    let chain: Vec<String> = (1..=10).rev().map(|i| format!("f{i}")).collect();
    let sites = chain_sites(&report);
    assert_eq!(
        sites.len(),
        3,
        "one site per path (main, thread, signal handler):\n{}",
        describe_sites(&report)
    );
    for (caller, n, size) in [
        ("main", define("MAIN_N"), define("MAIN_SIZE")),
        ("thread_main", define("THREAD_N"), define("THREAD_SIZE")),
        ("on_signal", define("SIGNAL_N"), define("SIGNAL_SIZE")),
    ] {
        let site = sites
            .iter()
            .find(|s| functions(s).get(10).map(String::as_str) == Some(caller))
            .unwrap_or_else(|| {
                panic!(
                    "no site of f10..f1 called from {caller}:\n{}",
                    describe_sites(&report)
                )
            });
        let f = functions(site);
        assert_eq!(f[..10], chain[..], "{caller}: {f:?}");
        assert_eq!(site["outstanding_bytes"], n * size, "{caller}: {f:?}");
        assert_eq!(site["outstanding_count"], n, "{caller}");
        assert_eq!(site["allocs"], n, "{caller}");
        assert_eq!(site["truncated"], false, "{caller}: {f:?}");
        let module = site["frames"][5]["module"].as_str().unwrap();
        assert!(module.ends_with("/deepchain"), "{caller}: f5 in {module}");
        match caller {
            // The C start code past main is trimmed: main is the root.
            "main" => assert_eq!(f.len(), 11, "{f:?}"),
            // A thread ends at its start routine.
            "thread_main" => assert_eq!(f[11..], ["start_thread"], "{f:?}"),
            // Through the signal frame into the code raise() interrupted,
            // and on to main.
            _ => {
                assert_eq!(f.last().map(String::as_str), Some("main"), "{f:?}");
                assert!(
                    f.iter().any(|x| x.contains("raise")),
                    "the interrupted frames follow the handler: {f:?}"
                );
            }
        }
    }
    assert_eq!(report["lost"]["stacks_lost"], 0);
    let activity = &report["activity"];
    assert!(
        activity["unwind_walks"].as_u64().unwrap() >= 15,
        "every chain allocation was walked by the DWARF unwinder: {activity}"
    );
    assert!(
        activity["unwind_cache_hits"].as_u64().unwrap() > 0,
        "repeated call sites hit the per-pc cache: {activity}"
    );
    for reason in [
        "unwind_no_rule",
        "unwind_unsupported",
        "unwind_bad_return",
        "unwind_read_failed",
        "unwind_depth",
    ] {
        assert_eq!(activity[reason], 0, "{reason}: {activity}");
    }
}

/// Built with no call-frame information for its own code: the walk stops at
/// the first frame without a rule, says so (truncated, counted), and never
/// reports junk: all three paths are the same single frame.
#[test]
fn code_without_call_frame_information_truncates_cleanly() {
    if !privileged("code_without_call_frame_information_truncates_cleanly") {
        return;
    }
    let report = trace("deepchain-nocfi");
    // Built without line tables: f10 by name.
    let sites: Vec<&Value> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["frames"][0]["function"] == "f10")
        .collect();
    assert_eq!(sites.len(), 1, "{}", describe_sites(&report));
    let site = sites[0];
    assert_eq!(functions(site), ["f10"]);
    assert_eq!(site["truncated"], true);
    let n = define("MAIN_N") + define("THREAD_N") + define("SIGNAL_N");
    let bytes = define("MAIN_N") * define("MAIN_SIZE")
        + define("THREAD_N") * define("THREAD_SIZE")
        + define("SIGNAL_N") * define("SIGNAL_SIZE");
    assert_eq!(site["outstanding_bytes"], bytes);
    assert_eq!(site["outstanding_count"], n);
    assert!(
        report["activity"]["unwind_no_rule"].as_u64().unwrap() >= n,
        "each stopped walk is counted: {}",
        report["activity"]
    );
    assert!(report["lost"]["truncated_stacks"].as_u64().unwrap() >= 1);
}

/// A `NAME = value` constant of a fixture script or source.
fn constant(rel: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(source(rel)).unwrap();
    text.lines()
        .find_map(|l| {
            let l = l.trim_start().trim_start_matches("const ");
            let (lhs, rhs) = l.split_once('=')?;
            let lhs = lhs.split(':').next()?.trim();
            (lhs == name).then(|| {
                rhs.trim()
                    .trim_end_matches(';')
                    .replace('_', "")
                    .parse()
                    .unwrap()
            })
        })
        .unwrap_or_else(|| panic!("no {name} in {rel}"))
}

/// Attaches to `cmd` (which prints "ready", grows on a line, prints
/// "done") and returns a snapshot taken while it holds what it grew, and the
/// last one before detaching.
fn snapshot_while_held(cmd: &mut Command, held_bytes: u64) -> (Value, Value) {
    let mut target = Proc::spawn(cmd);
    target.expect_line("ready", T);
    let (mut tracer, mut stream, attached) = Tracing::attach(target.pid())
        .interval("0.25")
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    let snap = stream.next_of_where("snapshot", "the grown bytes held", T, |s| {
        s["total_outstanding_bytes"].as_u64().unwrap_or(0) >= held_bytes
    });
    tracer.signal(libc::SIGINT);
    let _ = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    target.close_stdin();
    assert_eq!(target.wait(T), Some(0), "the target runs normally");
    (snap, attached)
}

/// Debian's python3 (no frame pointers, no debug symbols installed): the
/// cache's bytes under one site whose native stack reaches the interpreter's
/// entry.
#[test]
fn python_native_stacks_reach_the_interpreter_entry() {
    if !privileged("python_native_stacks_reach_the_interpreter_entry") {
        return;
    }
    let n = constant("python/pyleak.py", "N");
    let size = constant("python/pyleak.py", "SIZE");
    // bytearray(SIZE) is one malloc(SIZE + 1).
    let want = n * (size + 1);
    let (snap, attached) = snapshot_while_held(
        Command::new("/usr/bin/python3").arg(source("python/pyleak.py")),
        want,
    );
    // The tables' memory is reported: python3 with libc is about 110k rows.
    let unwind = &attached["unwind"];
    let bytes = unwind["bytes"].as_u64().unwrap();
    assert!(
        bytes > 0 && bytes <= 4 << 20,
        "python3's unwind tables within 4 MiB: {unwind}"
    );
    assert_eq!(bytes, unwind["rows"].as_u64().unwrap() * 16);
    let sites = snap["sites"].as_array().unwrap();
    let site = sites
        .iter()
        .find(|s| s["outstanding_count"] == n && s["outstanding_bytes"] == want)
        .unwrap_or_else(|| {
            panic!(
                "no site holding {n} x {} B:\n{}",
                size + 1,
                describe_sites(&snap)
            )
        });
    let f = functions(site);
    assert_eq!(site["truncated"], false, "{f:?}");
    assert!(
        f.iter().any(|x| x == "Py_BytesMain"),
        "the stack reaches the interpreter's entry: {f:?}"
    );
    assert!(
        f.iter().any(|x| x == "_PyEval_EvalFrameDefault"),
        "through the bytecode loop: {f:?}"
    );
    assert_eq!(snap["lost"]["stacks_lost"], 0);
}

/// A Rust release build without frame pointers: the blocks under one site,
/// at the fixture's line, whole to main.
#[test]
fn rust_release_stacks_are_whole() {
    if !privileged("rust_release_stacks_are_whole") {
        return;
    }
    let count = constant("rust/rustleak.rs", "COUNT");
    let size = constant("rust/rustleak.rs", "SIZE");
    let line = marker_line(&source("rust/rustleak.rs"), "rust_fill");
    let report = trace_run("rustleak");
    let sites: Vec<&Value> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == "rustleak::fill_cache" && f["line"] == line)
        })
        .collect();
    assert_eq!(
        sites.len(),
        1,
        "one site per call site:\n{}",
        describe_sites(&report)
    );
    let site = sites[0];
    let f = functions(site);
    assert_eq!(site["outstanding_bytes"], count * size, "{f:?}");
    assert_eq!(site["outstanding_count"], count, "{f:?}");
    assert_eq!(site["truncated"], false, "{f:?}");
    let from_fill: Vec<&str> = f
        .iter()
        .map(String::as_str)
        .skip_while(|x| *x != "rustleak::fill_cache")
        .take(2)
        .collect();
    assert_eq!(
        from_fill,
        ["rustleak::fill_cache", "rustleak::main"],
        "{f:?}"
    );
    assert_eq!(f.last().map(String::as_str), Some("main"), "{f:?}");
    assert_eq!(report["lost"]["stacks_lost"], 0);
}

/// `tracer run` of `binary wait`, fed "go" once attached; the final report.
fn trace_run(binary: &str) -> Value {
    let out = out_file(binary);
    let (mut tracer, mut stream, _) = Tracing::run([fixture(binary).into_os_string()])
        .output(&out)
        .start();
    // The tracer's stdin is the target's.
    tracer.send("go");
    tracer.close_stdin();
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let _ = std::fs::remove_file(&out);
    report
}

/// Where a `tracer run` writes its stream (its stdout is the target's).
fn out_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tracer-unwind-{name}-{}.jsonl", std::process::id()))
}

/// Debian's ripgrep under `tracer run`: no stack lost, and every frame of
/// every site lies in code the process mapped.
#[test]
fn ripgrep_stacks_stay_in_code() {
    if !privileged("ripgrep_stacks_stay_in_code") {
        return;
    }
    let out = out_file("rg");
    let (mut tracer, mut stream, _) = Tracing::run([
        "/usr/bin/rg",
        "--no-config",
        "-c",
        "fn ",
        source("").to_str().unwrap(),
    ])
    .output(&out)
    .start();
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let _ = std::fs::remove_file(&out);
    assert_eq!(report["lost"]["stacks_lost"], 0, "{}", report["lost"]);
    let code: Vec<(u64, u64)> = report["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["start"].as_u64().unwrap(), m["end"].as_u64().unwrap()))
        .collect();
    let sites = report["sites"].as_array().unwrap();
    assert!(!sites.is_empty());
    for site in sites {
        for frame in site["frames"].as_array().unwrap() {
            let addr = frame["addr"].as_u64().unwrap();
            assert!(
                code.iter().any(|&(s, e)| s <= addr && addr < e),
                "frame {frame} outside every executable mapping"
            );
        }
    }
    let whole = sites.iter().filter(|s| s["truncated"] == false).count();
    assert!(
        whole * 10 >= sites.len() * 9,
        "{whole} of {} sites whole",
        sites.len()
    );
}

/// A library without frame pointers loaded with dlopen after attach: its
/// table is loaded when the maps change, and its stacks are whole.
#[test]
fn libraries_loaded_after_attach_are_unwound() {
    if !privileged("libraries_loaded_after_attach_are_unwound") {
        return;
    }
    let mut target = Proc::spawn(Command::new(fixture("dlchain")).arg(fixture("libchain.so")));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .interval("0.25")
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("loaded", T);
    // The maps are re-read at each interval, before its snapshot: two
    // snapshots after the library was mapped, and its table is in place.
    stream.next_of("snapshot", T);
    stream.next_of("snapshot", T);
    target.send("go");
    target.expect_line("done", T);
    let report = end_normally(&mut target, &mut tracer, &mut stream);
    let n = constant_define("c/dlchain.c", "N");
    let size = constant_define("c/dlchain.c", "SIZE");
    let line = marker_line(&source("c/libchain.c"), "lib_malloc");
    let site = site_at(&report, "heap", "lib_f3", line);
    let f = functions(site);
    assert_eq!(f, ["lib_f3", "lib_f2", "lib_f1", "main"], "{f:?}");
    assert_eq!(site["truncated"], false);
    assert_eq!(site["outstanding_bytes"], n * size);
    assert_eq!(site["outstanding_count"], n);
}

/// `tracer run` stops the command at its entry point until its mappings are
/// listed for the kernel: even the allocations of its first instructions
/// (stdio's buffers, before it reads its input) have whole stacks, with the
/// input given before the tracer is even attached.
#[test]
fn run_mode_stacks_are_whole_from_the_first_instruction() {
    if !privileged("run_mode_stacks_are_whole_from_the_first_instruction") {
        return;
    }
    let out = out_file("run-first");
    let mut tracer = Proc::spawn(
        Command::new(tracer_bin())
            .args(["run", "-f", "json", "-o"])
            .arg(&out)
            .arg("--")
            .arg(fixture("deepchain"))
            .arg("wait"),
    );
    // Before anything is attached: the command may run at once.
    tracer.send("go");
    tracer.expect_line("ready", T);
    tracer.expect_line("done", T);
    tracer.close_stdin();
    assert_eq!(tracer.wait(T), Some(0));
    let stream = parse_lines(&std::fs::read_to_string(&out).unwrap());
    let _ = std::fs::remove_file(&out);
    let report = stream.last().unwrap();
    assert_eq!(report["type"], "report");
    let sites = report["sites"].as_array().unwrap();
    // puts("ready") allocates stdout's buffer: the program's first
    // allocation, a few instructions into main.
    let stdout_buffer = sites
        .iter()
        .find(|s| functions(s).iter().any(|f| f.contains("puts")))
        .unwrap_or_else(|| panic!("no site under puts:\n{}", describe_sites(report)));
    let f = functions(stdout_buffer);
    assert_eq!(stdout_buffer["truncated"], false, "{f:?}");
    assert_eq!(f.last().map(String::as_str), Some("main"), "{f:?}");
    let chain = chain_sites(report);
    assert_eq!(chain.len(), 3, "{}", describe_sites(report));
    assert!(chain.iter().all(|s| s["truncated"] == false));
    let total: u64 = chain
        .iter()
        .map(|s| s["outstanding_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total,
        define("MAIN_N") * define("MAIN_SIZE")
            + define("THREAD_N") * define("THREAD_SIZE")
            + define("SIGNAL_N") * define("SIGNAL_SIZE")
    );
}

/// Python frees its heap at exit: the report after the exit keeps each
/// site's peak (the cache's n blocks of SIZE + 1 bytes), and when.
#[test]
fn python_exit_report_keeps_the_peak() {
    if !privileged("python_exit_report_keeps_the_peak") {
        return;
    }
    let n = constant("python/pyleak.py", "N");
    let size = constant("python/pyleak.py", "SIZE");
    let want = n * (size + 1);
    let mut target = Proc::spawn(Command::new("/usr/bin/python3").arg(source("python/pyleak.py")));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .interval("0.25")
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    stream.next_of_where("snapshot", "the grown bytes held", T, |s| {
        s["total_outstanding_bytes"].as_u64().unwrap_or(0) >= want
    });
    target.close_stdin();
    assert_eq!(target.wait(T), Some(0));
    let report = stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    assert_eq!(report["reason"], "target_exited");
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["peak"]["bytes"] == want && s["peak"]["count"] == n)
        .unwrap_or_else(|| panic!("no site peaking at {want} B:\n{}", describe_sites(&report)));
    assert!(site["peak"]["at"].is_string(), "{site}");
    // What the teardown left: the evidence is in the peak, not here.
    assert!(
        site["outstanding_bytes"].as_u64().unwrap() < want,
        "python freed the cache at exit: {site}"
    );
}
