//! Privileged: the tracer attached to Go programs built by several Go
//! releases, reproducing real incidents with known counts.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(60);
/// `--go-sample-rate` for the incident tests: small beside the cache's
/// blocks, so that their estimate is exact.
const TEST_SAMPLE_RATE: u64 = 4096;
const VERSIONS: &[&str] = &["1.21", "1.24", "1.27"];

/// The value of an integer constant or assignment `name = N` or `name = N << M`
/// in the fixture's source: the truth the cache assertions start from.
fn go_constant(name: &str) -> u64 {
    let text = std::fs::read_to_string(src()).unwrap();
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(name)?.trim().strip_prefix('='))
        .unwrap_or_else(|| panic!("{name} = ... in {}", src().display()));
    let mut parts = value.split("<<").map(|p| p.trim().parse::<u64>().unwrap());
    let base = parts.next().unwrap();
    parts.next().map_or(base, |shift| base << shift)
}

/// Asserts a Go heap site's sampled estimate against what the fixture
/// allocated: `n` blocks of `size` bytes while the runtime sampled at `rate`.
///
/// The runtime samples each block on its own with p = 1 - exp(-size/rate)
/// (its sampling point is exponential, so memoryless), and the estimate is
/// k·size/p for the k blocks sampled. So the estimate must be a whole number
/// of sampled blocks, and k ~ Binomial(n, p) must lie within 4.5 standard
/// deviations of n·p (a false failure about once in 150,000 runs). Where p
/// is all but 1 that is exact.
///
/// Before Go 1.24 an mcache notices a new rate only at its next sample, and
/// P0's was drawn at the default 512 KiB before the runtime turned sampling
/// off at start: up to 512 KiB·ln(10⁴) bytes more (the 1-in-10⁴ tail of
/// that exponential draw) may pass unsampled first. Go 1.24 resamples at
/// once (`mcache.memProfRate`), so there the bound is the binomial alone.
fn assert_sampled_estimate(what: &str, version: &str, est: f64, n: u64, size: u64, rate: u64) {
    let (n, size) = (n as f64, size as f64);
    let p = 1.0 - (-size / rate as f64).exp();
    let k = est * p / size;
    assert!(
        (k - k.round()).abs() * size / p <= 2.0,
        "{what} go{version}: estimate {est} is not a whole number of sampled \
         {size}-byte blocks at rate {rate} (k = {k})"
    );
    let k = k.round();
    let spread = 4.5 * (n * p * (1.0 - p)).sqrt();
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    let stale_blocks = if minor < 24 {
        (512.0 * 1024.0 * 1e4_f64.ln() / size).ceil()
    } else {
        0.0
    };
    let (low, high) = (n * p - spread - stale_blocks * p, n * p + spread);
    assert!(
        k <= n && k >= low.floor() && k <= high.ceil(),
        "{what} go{version}: {k} of {n} blocks sampled at rate {rate} (p = {p:.4}), \
         expected {low:.1}..={high:.1}; estimate {est} B for {} B allocated",
        n * size
    );
}

fn src() -> std::path::PathBuf {
    source("go/leaky/main.go")
}

/// The goroutine site created at `marker`, with its start function.
fn goroutine_site<'v>(snap: &'v Value, marker: &str) -> &'v Value {
    let line = marker_line(&src(), marker);
    let found: Vec<&Value> = snap["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["kind"] == "goroutine"
                && s["frames"].as_array().unwrap().iter().any(|f| {
                    f["line"] == line && f["file"].as_str().unwrap_or("").ends_with("main.go")
                })
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "goroutine site at line {line}:\n{}",
        describe_sites(snap)
    );
    found[0]
}

/// The timer sites whose creation stack passes through `function` at `marker`.
fn timer_sites<'v>(
    snap: &'v Value,
    function: &str,
    marker: &str,
    src: &std::path::Path,
) -> Vec<&'v Value> {
    let line = marker_line(src, marker);
    snap["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["kind"] == "timer"
                && s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["function"] == function && f["line"] == line)
        })
        .collect()
}

/// The sampled heap sites allocated by `function` at `marker`: the frames
/// before that line are only the allocator's entry points. (Allocations the
/// runtime makes on its own inside that call, e.g. a GC assist's, pass
/// through it deeper and are sites of their own.)
fn heap_sites_through<'v>(snap: &'v Value, function: &str, marker: &str) -> Vec<&'v Value> {
    const ENTRY_POINTS: [&str; 4] = [
        "runtime.makeslice",
        "runtime.newobject",
        "runtime.growslice",
        "runtime.mallocgc",
    ];
    let line = marker_line(&src(), marker);
    snap["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["kind"] == "heap"
                && s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| {
                        let name = f["function"].as_str().unwrap_or("");
                        !ENTRY_POINTS.iter().any(|e| name.starts_with(e))
                    })
                    .is_some_and(|f| f["function"] == function && f["line"] == line)
        })
        .collect()
}

/// Attaches to leaky-go<version>, lets it leak, waits for the churn to
/// settle, lets it exit, and returns the stream.
fn trace(version: &str, extra: &[&str]) -> Vec<Value> {
    trace_binary(&format!("leaky-go{version}"), version, extra)
}

fn trace_binary(binary: &str, version: &str, extra: &[&str]) -> Vec<Value> {
    let mut target = Proc::spawn(Command::new(fixture(binary)).arg("wait"));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, attached) = Tracing::attach(target.pid())
        .args(extra)
        .on_attached(|_| target.send("go"))
        .start();
    // Heap probes only where the runtime's profile cannot be read (no
    // symbol table or DWARF).
    let heap_probes = probe_programs(&attached)
        .iter()
        .any(|p| p == "go_profile_bucket");
    assert_eq!(heap_probes, binary.ends_with("-stripped"), "{binary}");
    assert!(
        attached["go_version"]
            .as_str()
            .unwrap()
            .starts_with(&format!("go{version}.")),
        "{attached}"
    );
    target.expect_line("done", T);
    // The churn goroutines have all signalled; wait until every one of them
    // has also exited (the runtime's list holds none of them alive) while
    // the 50 consumers are counted: a snapshot with no goroutine at all
    // would pass the first test vacuously.
    let churn_line = marker_line(&src(), "churn_goroutine");
    let consumer_line = marker_line(&src(), "goroutine");
    stream.next_of_where(
        "snapshot",
        "50 consumers, no churn goroutine alive",
        T,
        |snap| {
            let goroutines = || {
                snap["sites"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| s["kind"] == "goroutine")
            };
            goroutines().any(|s| {
                s["outstanding_count"] == 50
                    && s["frames"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|f| f["line"] == consumer_line)
            }) && !goroutines()
                .any(|s| s["frames"][0]["line"] == churn_line && s["outstanding_count"] != 0)
        },
    );
    target.close_stdin();
    assert_eq!(
        target.wait(T),
        Some(0),
        "the target runs normally while traced"
    );
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    stream.seen
}

fn assert_incidents(version: &str, stream: &[Value]) {
    let report = stream.last().unwrap();
    // Consumers blocked forever on a channel nobody closes.
    let consumers = goroutine_site(report, "goroutine");
    assert_eq!(consumers["outstanding_count"], 50, "go{version} consumers");
    // Read from the runtime's list: why they wait, by the runtime's own
    // wait reason names.
    assert_eq!(
        consumers["states"],
        serde_json::json!({"chan receive": 50}),
        "go{version} consumers"
    );
    assert_eq!(consumers["frames"][0]["function"], "main.startConsumers");
    // Go 1.21 starts `go consumer(ch)` through a closure it names like any
    // other (main.startConsumers.func1); from 1.22 the wrapper is a gowrap,
    // which the tracer sees through.
    let expected_start = if version == "1.21" {
        "main.startConsumers.func1"
    } else {
        "main.consumer"
    };
    assert_eq!(
        consumers["start_function"]["function"], expected_start,
        "go{version}"
    );
    // Healthy churn: all gone (no live goroutine of that site).
    let churn_line = marker_line(&src(), "churn_goroutine");
    assert!(
        report["sites"].as_array().unwrap().iter().all(|s| {
            s["kind"] != "goroutine"
                || s["frames"][0]["line"] != churn_line
                || s["outstanding_count"] == 0
        }),
        "go{version}: churn goroutines alive at the end:\n{}",
        describe_sites(report)
    );
    // The goroutine stuck in leakTimers.
    let timer_g = goroutine_site(report, "timer_goroutine");
    assert_eq!(timer_g["outstanding_count"], 1);
    assert_eq!(
        timer_g["states"],
        serde_json::json!({"select (no cases)": 1})
    );
    let expected_start = if version == "1.21" {
        "main.main.func1"
    } else {
        "main.leakTimers"
    };
    assert_eq!(
        timer_g["start_function"]["function"], expected_start,
        "go{version}"
    );
    // The seed incident: WithTimeout in a loop, cancel deferred forever.
    let seed = timer_sites(report, "main.leakTimers", "timer", &src());
    assert_eq!(
        seed.len(),
        1,
        "go{version} timer site:\n{}",
        describe_sites(report)
    );
    assert_eq!(
        seed[0]["outstanding_count"], 100,
        "go{version} pending timers"
    );
    assert_eq!(seed[0]["allocs"], 100);
    let functions: Vec<&str> = seed[0]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    let chain: Vec<&str> = functions
        .iter()
        .copied()
        .skip_while(|f| *f != "time.AfterFunc")
        .filter(|f| *f != "context.WithDeadline") // inlined in some releases
        .take(4)
        .collect();
    assert_eq!(
        chain,
        [
            "time.AfterFunc",
            "context.WithDeadlineCause",
            "context.WithTimeout",
            "main.leakTimers"
        ],
        "go{version}: {functions:?}"
    );
    // Stopped and fired timers are not pending.
    for (marker, n) in [("stopped_timer", 100), ("fired_timer", 50)] {
        let sites = timer_sites(report, "main.otherTimers", marker, &src());
        assert_eq!(
            sites.len(),
            1,
            "go{version} {marker}:\n{}",
            describe_sites(report)
        );
        assert_eq!(sites[0]["outstanding_count"], 0, "go{version} {marker}");
        assert_eq!(sites[0]["allocs"], n, "go{version} {marker}");
        assert_eq!(sites[0]["frees"], n, "go{version} {marker}");
    }
    // Channel timers: held by the runtime until they fire under Go <= 1.22
    // and asynctimerchan=1 (which this go.mod selects where the release still
    // has the setting, as the binary's embedded DefaultGODEBUG says); else
    // collectable garbage, not counted.
    let binary = std::fs::read(fixture(&format!("leaky-go{version}"))).unwrap();
    let async_chan = version == "1.21" || binary.windows(16).any(|w| w == b"asynctimerchan=1");
    let chans = timer_sites(report, "main.otherTimers", "chan_timer", &src());
    let pending: u64 = chans
        .iter()
        .map(|s| s["outstanding_count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        pending,
        if async_chan { 10 } else { 0 },
        "go{version} channel timers"
    );
    // The cache that only grows, sampled at the rate the tests ask for.
    let cache = heap_sites_through(report, "main.fillCache", "cache");
    assert_eq!(
        cache.len(),
        1,
        "go{version} cache site:\n{}",
        describe_sites(report)
    );
    assert_sampled_estimate(
        "cache",
        version,
        cache[0]["outstanding_bytes"].as_f64().unwrap(),
        go_constant("cacheEntries"),
        go_constant("cacheEntrySize"),
        TEST_SAMPLE_RATE,
    );
    assert_eq!(cache[0]["sampled"], true);
}

/// The stream's first notice says `text`.
fn assert_notice(stream: &[Value], text: &str) {
    let notice = stream
        .iter()
        .find(|v| v["type"] == "notice")
        .expect("a notice");
    assert!(
        notice["message"].as_str().unwrap().contains(text),
        "{notice}"
    );
}

#[test]
fn go_incidents_per_release() {
    if !privileged("go_incidents_per_release") {
        return;
    }
    for version in VERSIONS {
        let stream = trace(
            version,
            &["--go-sample-rate", &TEST_SAMPLE_RATE.to_string()],
        );
        assert_notice(&stream, &format!("to {TEST_SAMPLE_RATE} bytes (it was 0)"));
        assert_incidents(version, &stream);
    }
}

/// Built with -ldflags=-s -w: no .symtab, no DWARF. Probes are placed and
/// frames symbolized (names, lines, inlined calls) from .gopclntab, and
/// MemProfileRate is found from the allocator's code: every assertion of the
/// unstripped case holds.
#[test]
fn stripped_go_binaries() {
    if !privileged("stripped_go_binaries") {
        return;
    }
    for version in VERSIONS {
        let stream = trace_binary(
            &format!("leaky-go{version}-stripped"),
            version,
            &["--go-sample-rate", &TEST_SAMPLE_RATE.to_string()],
        );
        assert_notice(&stream, &format!("to {TEST_SAMPLE_RATE} bytes (it was 0)"));
        assert_incidents(version, &stream);
    }
}

/// The binary never imported pprof, so its sampling is off: the tracer turns
/// it on at the runtime's default and says so; with --no-write it does not
/// touch the target and says that instead.
#[test]
fn go_heap_sampling_is_turned_on_only_when_allowed() {
    if !privileged("go_heap_sampling_is_turned_on_only_when_allowed") {
        return;
    }
    let stream = trace("1.27", &[]);
    let notice = stream
        .iter()
        .find(|v| v["type"] == "notice")
        .expect("a notice");
    assert!(
        notice["message"]
            .as_str()
            .unwrap()
            .contains("to 524288 bytes (it was 0)"),
        "{notice}"
    );
    assert_eq!(
        heap_sites_through(stream.last().unwrap(), "main.fillCache", "cache").len(),
        1
    );

    let stream = trace("1.27", &["--no-write"]);
    let notice = stream
        .iter()
        .find(|v| v["type"] == "notice")
        .expect("a notice");
    assert!(
        notice["message"]
            .as_str()
            .unwrap()
            .contains("--no-write forbids"),
        "{notice}"
    );
    let report = stream.last().unwrap();
    assert!(heap_sites_through(report, "main.fillCache", "cache").is_empty());
    // Goroutines need no write: still exact.
    assert_eq!(goroutine_site(report, "goroutine")["outstanding_count"], 50);
}

/// Under Go >= 1.23 semantics an unreferenced channel timer is collectable
/// garbage: not a leak, not counted. Func timers are.
#[test]
fn collectable_channel_timers_are_not_counted() {
    if !privileged("collectable_channel_timers_are_not_counted") {
        return;
    }
    let src = source("go/chantimers/main.go");
    for version in ["1.24", "1.27"] {
        let mut target = Proc::spawn(&mut Command::new(fixture(&format!(
            "chantimers-go{version}"
        ))));
        target.expect_line("ready", T);
        let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
            .on_attached(|_| target.send("go"))
            .start();
        target.expect_line("done", T);
        let report = end_normally(&mut target, &mut tracer, &mut stream);
        let func = timer_sites(&report, "main.timers", "func_timer", &src);
        assert_eq!(func.len(), 1, "go{version}:\n{}", describe_sites(&report));
        assert_eq!(func[0]["outstanding_count"], 10, "go{version} func timers");
        let chans = timer_sites(&report, "main.timers", "collectable_chan_timer", &src);
        assert!(
            chans.iter().all(|s| s["outstanding_count"] == 0),
            "go{version}: collectable channel timers counted:\n{}",
            describe_sites(&report)
        );
    }
}

/// A cgo program started by `tracer run`: the C allocation site (libc
/// probes) and the goroutine site (Go probes) come out of one process, the C
/// stack continuing into the Go code that called it.
#[test]
fn cgo_program_under_run_has_libc_and_go_sites() {
    if !privileged("cgo_program_under_run_has_libc_and_go_sites") {
        return;
    }
    let src = source("go/cgoleak/main.go");
    for version in ["1.21", "1.27"] {
        let out =
            std::env::temp_dir().join(format!("tracer-cgo-{}-{version}.jsonl", std::process::id()));
        // The command shares the tracer's stdin and stdout; the stream goes to a file.
        let (mut tracer, _, _) = Tracing::run([fixture(&format!("cgoleak-go{version}"))])
            .output(&out)
            .start();
        tracer.expect_line("ready", T);
        tracer.send("go");
        tracer.expect_line("done", T);
        tracer.close_stdin();
        assert_eq!(tracer.wait(T), Some(0));
        let stream = parse_lines(&std::fs::read_to_string(&out).unwrap());
        let _ = std::fs::remove_file(&out);
        let report = stream.last().unwrap();
        assert_eq!(report["type"], "report");
        let c = site_at(report, "heap", "c_leak", marker_line(&src, "c_leak"));
        assert_eq!(c["outstanding_bytes"], 20_000, "go{version}");
        assert_eq!(c["outstanding_count"], 20);
        assert!(
            c["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == "main.leakC"),
            "go{version}: the C stack continues into Go: {}",
            c["frames"]
        );
        let line = marker_line(&src, "waiter");
        let g = report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == "goroutine" && s["frames"][0]["line"] == line)
            .unwrap_or_else(|| panic!("go{version}: no waiter site:\n{}", describe_sites(report)));
        assert_eq!(g["outstanding_count"], 10, "go{version}");
    }
}

/// A healthy Go program churning goroutines and timers for seconds: its
/// sites keep being created and retired, and their counts stay flat.
#[test]
fn steady_state_counts_stay_flat() {
    if !privileged("steady_state_counts_stay_flat") {
        return;
    }
    for version in VERSIONS {
        let target =
            Proc::spawn(Command::new(fixture(&format!("leaky-go{version}"))).arg("steady"));
        target.expect_line("ready", T);
        let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
            .interval("0.25")
            .args(["--duration", "4"])
            .start();
        let report = stream.next_of("report", T);
        assert_eq!(tracer.wait(T), Some(0));
        let src = src();
        for (kind, marker) in [
            ("goroutine", "steady_goroutine"),
            ("timer", "steady_fired"),
            ("timer", "steady_stopped"),
        ] {
            let line = marker_line(&src, marker);
            let of = |snap: &Value| -> Option<(u64, u64)> {
                snap["sites"].as_array()?.iter().find_map(|s| {
                    let here = s["kind"] == kind
                        && s["frames"]
                            .as_array()?
                            .iter()
                            .any(|f| f["function"] == "main.steady" && f["line"] == line);
                    here.then(|| {
                        (
                            s["outstanding_count"].as_u64().unwrap(),
                            s["allocs"].as_u64().unwrap(),
                        )
                    })
                })
            };
            // Goroutines are read from the runtime's list: live ones only,
            // so the site is absent whenever none is alive.
            let (alive, created) = if kind == "goroutine" {
                of(&report).unwrap_or((0, 0))
            } else {
                of(&report)
                    .unwrap_or_else(|| panic!("go{version} {marker}:\n{}", describe_sites(&report)))
            };
            if kind != "goroutine" {
                assert!(
                    created > 500,
                    "go{version} {marker}: only {created} created in 4 s"
                );
            }
            // In flight: one round of 20, two where a round's goroutines are
            // between wg.Done and their exit as the next starts. Never a trend.
            let counts: Vec<u64> = stream
                .seen
                .iter()
                .filter_map(|v| of(v).map(|c| c.0))
                .collect();
            assert!(
                counts.iter().all(|&c| c <= 40),
                "go{version} {marker}: {counts:?}"
            );

            assert!(
                alive <= 40,
                "go{version} {marker}: {alive} alive at the end"
            );
            // A trend needs samples: goroutines read from the runtime's list
            // show only when a snapshot catches some alive.
            if counts.len() >= 4 {
                let half = counts.len() / 2;
                let mean = |c: &[u64]| c.iter().sum::<u64>() as f64 / c.len().max(1) as f64;
                assert!(
                    mean(&counts[half..]) <= mean(&counts[..half]) + 10.0,
                    "go{version} {marker}: counts trend upward: {counts:?}"
                );
            }
        }
        // Still running normally after being traced and detached.
        let status = std::fs::read_to_string(format!("/proc/{}/status", target.pid()))
            .expect("the target is still running");
        assert!(
            !status.contains("State:\tZ"),
            "go{version}: the target died"
        );
        assert!(Path::new(&format!("/proc/{}/exe", target.pid())).exists());
    }
}

/// A binary with symbols and DWARF has its heap profile read from the
/// runtime's own records, like `runtime.MemProfile`: no probe on the sampling
/// path, and a leak sampled before the tracer attached is there at once.
#[test]
fn heap_sampled_before_attach_is_read_from_the_runtime() {
    if !privileged("heap_sampled_before_attach_is_read_from_the_runtime") {
        return;
    }
    for version in VERSIONS {
        let mut target =
            Proc::spawn(Command::new(fixture(&format!("leaky-go{version}"))).arg("early"));
        target.expect_line("ready", T);
        let (mut tracer, mut stream, attached) = Tracing::attach(target.pid()).start();
        let programs = probe_programs(&attached);
        assert!(
            !programs.iter().any(|p| p.starts_with("go_profile")),
            "go{version}: no heap probes: {programs:?}"
        );
        let snap = stream.next_of("snapshot", T);
        let cache = heap_sites_through(&snap, "main.fillCache", "cache");
        assert_eq!(cache.len(), 1, "go{version}:\n{}", describe_sites(&snap));
        // Sampled at the rate the program set itself.
        assert_sampled_estimate(
            "early cache",
            version,
            cache[0]["outstanding_bytes"].as_f64().unwrap(),
            go_constant("cacheEntries"),
            go_constant("cacheEntrySize"),
            go_constant("runtime.MemProfileRate"),
        );
        end_normally(&mut target, &mut tracer, &mut stream);
    }
}

/// The rate the tracer wrote into a target that had sampling off is written
/// back when the tracer detaches from the still running target (the target
/// is left as it was found), unless --keep-writes.
#[test]
fn go_heap_sampling_rate_is_restored_on_detach() {
    if !privileged("go_heap_sampling_rate_is_restored_on_detach") {
        return;
    }
    let binary = fixture("leaky-go1.27");
    // runtime.MemProfileRate's address, from the binary's own symbol table
    // (a Go executable is not position-independent: no load bias).
    let data = std::fs::read(&binary).unwrap();
    let addr = {
        use object::{Object, ObjectSymbol};
        object::File::parse(&*data)
            .unwrap()
            .symbols()
            .find(|s| s.name() == Ok("runtime.MemProfileRate"))
            .expect("runtime.MemProfileRate in .symtab")
            .address()
    };
    let rate_of = |pid: u32| {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        std::fs::File::open(format!("/proc/{pid}/mem"))
            .unwrap()
            .read_exact_at(&mut b, addr)
            .unwrap();
        u64::from_le_bytes(b)
    };
    for (extra, after) in [(&[][..], 0), (&["--keep-writes"][..], 524288)] {
        let target = Proc::spawn(Command::new(&binary).arg("wait"));
        target.expect_line("ready", T);
        assert_eq!(rate_of(target.pid()), 0, "the fixture has sampling off");
        let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
            .args(["--duration", "2"])
            .args(extra)
            .start();
        stream.next_of("snapshot", T);
        assert_eq!(rate_of(target.pid()), 524288, "turned on while traced");
        stream.next_of("report", T);
        assert_eq!(tracer.wait(T), Some(0));
        assert_eq!(
            rate_of(target.pid()),
            after,
            "after detaching with {extra:?}"
        );
        let said = if after == 0 {
            "restored the target's runtime.MemProfileRate to 0"
        } else {
            "left the target's runtime.MemProfileRate at 524288"
        };
        assert!(
            stream
                .seen
                .iter()
                .any(|v| v["type"] == "notice" && v["message"].as_str().unwrap().contains(said)),
            "a notice says `{said}`: {:?}",
            stream.seen
        );
    }
}

/// A timer site with no creation stack: named only by the function it runs.
fn callback_only_timers(snap: &Value) -> Vec<&Value> {
    snap["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["kind"] == "timer"
                && s["frames"].as_array().unwrap().is_empty()
                && s["outstanding_count"].as_u64().unwrap() > 0
        })
        .collect()
}

/// Timers are read from the runtime's heaps, so those leaked before attach
/// are counted at once, exactly, by the function they run (context's cancel
/// closure). The creation probe is attached only in short windows: once it
/// has seen the leaking line create a few, every pending timer with that
/// callback gets its stack, and timers created while it is off cost no trap
/// and are still counted.
#[test]
fn timers_leaked_before_attach_are_counted_then_named() {
    if !privileged("timers_leaked_before_attach_are_counted_then_named") {
        return;
    }
    for binary in ["leaky-go1.21", "leaky-go1.24-stripped", "leaky-go1.27"] {
        let mut target = Proc::spawn(Command::new(fixture(binary)).args(["timerlate", "3000"]));
        target.expect_line("ready", T);
        let (mut tracer, mut stream, _) = Tracing::attach(target.pid()).start();
        // Before any creation is seen: one site per callback, exact.
        let first = stream.next_of("snapshot", T);
        // The creation probe's first window opens at the first interval
        // and stays 3 s (timed from here, not from the attach: that takes
        // seconds under emulation).
        let window_opened = std::time::Instant::now();
        let unnamed = callback_only_timers(&first);
        assert_eq!(unnamed.len(), 1, "{binary}:\n{}", describe_sites(&first));
        assert_eq!(unnamed[0]["outstanding_count"], 3000, "{binary}");
        let runs = unnamed[0]["start_function"]["function"].as_str().unwrap();
        assert!(
            runs.starts_with("context."),
            "{binary}: the callback {runs}"
        );
        // Inside the first sampling window: seen, so the line is named.
        target.send("leak 500");
        target.expect_line("leaked 3500", T);
        let named = |n: u64| {
            move |snap: &Value| {
                let sites = timer_sites(snap, "main.leakLate", "late_timer", &src());
                sites.len() == 1
                    && sites[0]["outstanding_count"] == n
                    && callback_only_timers(snap).is_empty()
            }
        };
        let snap = stream.next_of_where("snapshot", "3500 timers named", T, named(3500));
        assert!(
            timer_sites(&snap, "main.cancelled", "cancelled_timer", &src())
                .iter()
                .all(|s| s["outstanding_count"] == 0),
            "{binary}: cancelled timers are not pending:\n{}",
            describe_sites(&snap)
        );
        // Past the first window (3 s after the first interval), before the
        // next (20 s later): creations are not trapped, yet counted.
        std::thread::sleep(Duration::from_secs(6).saturating_sub(window_opened.elapsed()));
        let before = stream.next_of("snapshot", T)["activity"]["timers_created"]
            .as_u64()
            .unwrap();
        target.send("leak 2000");
        target.expect_line("leaked 5500", T);
        let snap = stream.next_of_where("snapshot", "5500 timers named", T, named(5500));
        assert_eq!(
            snap["activity"]["timers_created"].as_u64().unwrap(),
            before,
            "{binary}: the creation probe is off outside its windows"
        );
        let site = timer_sites(&snap, "main.leakLate", "late_timer", &src())[0];
        assert_eq!(
            site["sampled"], true,
            "{binary}: part of the split is estimated"
        );
        tracer.signal(libc::SIGINT);
        assert_eq!(tracer.wait(T), Some(0));
    }
}

/// 100k goroutines blocked three ways, each from its own line: the census
/// counts each creation site exactly, by wait reason, whatever the number
/// of snapshots it takes to read the whole list within its time budget.
#[test]
fn blocked_goroutines_are_counted_per_site_and_wait_reason() {
    if !privileged("blocked_goroutines_are_counted_per_site_and_wait_reason") {
        return;
    }
    let (recv, send, sel) = (50_000u64, 30_000u64, 20_000u64);
    for binary in ["leaky-go1.21", "leaky-go1.24-stripped", "leaky-go1.27"] {
        let target = Proc::spawn(Command::new(fixture(binary)).args([
            "parkmix",
            &recv.to_string(),
            &send.to_string(),
            &sel.to_string(),
        ]));
        target.expect_line("ready", T);
        // Short intervals: more snapshots, each with its own reading budget.
        let (mut tracer, mut stream, _) = Tracing::attach(target.pid()).interval("0.25").start();
        let expected = [
            ("mix_recv", recv, "chan receive"),
            ("mix_send", send, "chan send"),
            ("mix_select", sel, "select"),
        ];
        let exact = |snap: &Value| {
            expected.iter().all(|(marker, n, state)| {
                let line = marker_line(&src(), marker);
                snap["sites"].as_array().unwrap().iter().any(|s| {
                    s["kind"] == "goroutine"
                        && s["frames"][0]["line"] == line
                        && s["outstanding_count"] == *n
                        && s["states"][*state] == *n
                })
            })
        };
        let snap = stream.next_of_where("snapshot", "100k goroutines counted exactly", T, exact);
        // Nothing else of the program's own is alive (main is).
        let others: u64 = snap["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "goroutine")
            .map(|s| s["outstanding_count"].as_u64().unwrap())
            .sum();
        assert!(
            others <= recv + send + sel + 1,
            "{binary}: {others} goroutines:\n{}",
            describe_sites(&snap)
        );
        tracer.signal(libc::SIGINT);
        assert_eq!(tracer.wait(T), Some(0));
    }
}

/// The goroutines of the census's sites, all kinds of state.
fn census_total(snap: &Value) -> u64 {
    snap["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "goroutine")
        .map(|s| s["outstanding_count"].as_u64().unwrap())
        .sum()
}

/// A Go HTTP service (a goroutine, a WithTimeout timer and 2 KiB per
/// request) under load, traced with every kind on: its goroutine count
/// agrees with the program's own `runtime.NumGoroutine()`, the per-request
/// timers (all cancelled) are not pending, and its allocations are sampled.
#[test]
fn service_under_load_agrees_with_its_own_goroutine_count() {
    if !privileged("service_under_load_agrees_with_its_own_goroutine_count") {
        return;
    }
    let bin = fixture("gohttp-go1.27");
    let mut server = Proc::spawn(Command::new(&bin).arg("serve"));
    let ready = server.expect_line("ready", T);
    let port = ready.split_whitespace().nth(1).unwrap().to_string();
    let (mut tracer, mut stream, _) = Tracing::attach(server.pid()).start();
    let load = Command::new(&bin)
        .args(["load", &port, "4"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&load.stdout);
    let rps: f64 = said
        .trim()
        .strip_prefix("rps ")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("load said {said:?}"));
    assert!(rps > 100.0, "the service serves while traced: {rps} req/s");
    // The client is gone: once its connection's goroutines have exited the
    // count is steady. Each round asks the program, then takes a snapshot
    // read after the answer.
    let mut rounds = Vec::new();
    let agreed = (0..20).any(|_| {
        server.send("count");
        let n: u64 = server.expect_line("goroutines", T)[11..]
            .trim()
            .parse()
            .unwrap();
        stream.next_of("snapshot", T);
        let census = census_total(&stream.next_of("snapshot", T));
        rounds.push((n, census));
        n == census
    });
    assert!(agreed, "NumGoroutine vs census, per round: {rounds:?}");
    let snap = stream.next_of("snapshot", T);
    let handle_timers: u64 = snap["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["kind"] == "timer"
                && s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["function"] == "main.handle")
        })
        .map(|s| s["outstanding_count"].as_u64().unwrap())
        .sum();
    assert_eq!(handle_timers, 0, "{}", describe_sites(&snap));
    assert!(
        snap["activity"]["timers_created"].as_u64().unwrap() > 0,
        "the sampled creation probe saw requests' timers"
    );
    assert!(
        snap["sites"].as_array().unwrap().iter().any(|s| {
            s["kind"] == "heap"
                && s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["function"] == "main.handle")
        }),
        "the requests' buffers are sampled:\n{}",
        describe_sites(&snap)
    );
    tracer.signal(libc::SIGINT);
    assert_eq!(tracer.wait(T), Some(0));
}

/// An entrypoint script that execs a Go service after attach: the tracer
/// re-plans for the Go image. The timers it leaked before the tracer saw
/// the exec are counted from the runtime's heaps; those leaked after are
/// named by the creation probe attached to the new image.
#[test]
fn exec_from_a_shell_into_a_go_program_is_followed() {
    if !privileged("exec_from_a_shell_into_a_go_program_is_followed") {
        return;
    }
    let bin = fixture("leaky-go1.27");
    let mut shell = Proc::spawn(Command::new("/bin/sh").args([
        "-c",
        &format!(
            "echo ready; read line; exec {} timerlate 400",
            bin.display()
        ),
    ]));
    shell.expect_line("ready", T);
    let (mut tracer, mut stream, first) = Tracing::attach(shell.pid())
        .on_attached(|_| shell.send("go"))
        .start();
    assert!(first["go_version"].is_null(), "{first}");
    // The Go program's own "ready": 400 contexts leaked.
    shell.expect_line("ready", T);
    let second = stream.next_of("attached", T);
    assert!(
        second["go_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("go1.27.")),
        "{second}"
    );
    stream.next_of_where("snapshot", "the 400 timers counted", T, |snap| {
        let unnamed = callback_only_timers(snap);
        unnamed.len() == 1 && unnamed[0]["outstanding_count"] == 400
    });
    shell.send("leak 100");
    shell.expect_line("leaked 500", T);
    stream.next_of_where("snapshot", "500 timers named", T, |snap| {
        let sites = timer_sites(snap, "main.leakLate", "late_timer", &src());
        sites.len() == 1
            && sites[0]["outstanding_count"] == 500
            && callback_only_timers(snap).is_empty()
    });
    tracer.signal(libc::SIGINT);
    assert_eq!(tracer.wait(T), Some(0));
    let report = stream.next_of("report", T);
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    assert_eq!(
        report["previous_images"][0]["exe"],
        sh.display().to_string(),
        "{}",
        report["previous_images"]
    );
}

/// The releases the incident tests above do not run: the goroutine list and
/// the timer heaps are found and read, plain and stripped, with exact counts
/// (the offset table is checked against each one's DWARF in gopclntab.rs).
#[test]
fn every_release_reads_goroutines_and_timers() {
    if !privileged("every_release_reads_goroutines_and_timers") {
        return;
    }
    for version in GO_RELEASES.iter().filter(|v| !VERSIONS.contains(v)) {
        for suffix in ["", "-stripped"] {
            let binary = format!("leaky-go{version}{suffix}");
            let target =
                Proc::spawn(Command::new(fixture(&binary)).args(["parkmix", "300", "200", "100"]));
            target.expect_line("ready", T);
            let (mut tracer, mut stream, _) = Tracing::attach(target.pid()).start();
            let expected = [
                ("mix_recv", 300, "chan receive"),
                ("mix_send", 200, "chan send"),
                ("mix_select", 100, "select"),
            ];
            let snap = stream.next_of("snapshot", T);
            for (marker, n, state) in expected {
                let site = goroutine_site(&snap, marker);
                assert_eq!(site["outstanding_count"], n, "{binary} {marker}");
                assert_eq!(site["states"][state], n, "{binary} {marker}");
            }
            tracer.signal(libc::SIGINT);
            assert_eq!(tracer.wait(T), Some(0));
            drop(target);

            let mut target = Proc::spawn(Command::new(fixture(&binary)).args(["timerlate", "400"]));
            target.expect_line("ready", T);
            let (mut tracer, mut stream, _) = Tracing::attach(target.pid()).start();
            let first = stream.next_of("snapshot", T);
            let unnamed = callback_only_timers(&first);
            assert_eq!(unnamed.len(), 1, "{binary}:\n{}", describe_sites(&first));
            assert_eq!(unnamed[0]["outstanding_count"], 400, "{binary}");
            target.send("leak 100");
            target.expect_line("leaked 500", T);
            stream.next_of_where("snapshot", "500 timers named", T, |snap| {
                let sites = timer_sites(snap, "main.leakLate", "late_timer", &src());
                sites.len() == 1
                    && sites[0]["outstanding_count"] == 500
                    && callback_only_timers(snap).is_empty()
            });
            let notices: Vec<&Value> = stream
                .seen
                .iter()
                .filter(|v| v["type"] == "notice")
                .collect();
            assert!(
                !notices
                    .iter()
                    .any(|n| n["message"].as_str().unwrap().contains("not found")),
                "{binary}: {notices:?}"
            );
            tracer.signal(libc::SIGINT);
            assert_eq!(tracer.wait(T), Some(0));
        }
    }
}
