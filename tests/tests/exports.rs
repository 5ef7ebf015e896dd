//! The ecosystem's formats, read back by the ecosystem's own tools: a real
//! Prometheus server scrapes `--prometheus`, `go tool pprof` reads
//! `--pprof`, `tracer report` replays a recording, the flame graph is SVG.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(60);

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tracer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One sample of `go tool pprof -raw`: its values, the functions of its
/// stack (innermost first, inlined lines included) and its labels.
#[derive(Debug)]
struct RawSample {
    values: Vec<i64>,
    functions: Vec<String>,
    labels: String,
}

/// A profile as `go tool pprof -raw` prints it.
struct RawProfile {
    text: String,
    samples: Vec<RawSample>,
}

impl RawProfile {
    fn read(path: &Path) -> Self {
        let out = Command::new(go_tool())
            .args(["tool", "pprof", "-raw"])
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "go tool pprof -raw {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let section = |name: &str| -> Vec<&str> {
            text.lines()
                .skip_while(|l| *l != name)
                .skip(1)
                .take_while(|l| l.starts_with(' '))
                .collect()
        };
        // "     1: 0x55.. M=1 leak_malloc /src/allocs.c:33:0 s=0", then one
        // indented line per frame inlined into it.
        let mut locations: std::collections::HashMap<u64, Vec<String>> = Default::default();
        let mut current = 0;
        for l in section("Locations") {
            let t = l.trim();
            let func = |rest: &str| rest.split_whitespace().next().unwrap_or("").to_string();
            match t.split_once(": 0x") {
                Some((id, rest)) if id.chars().all(|c| c.is_ascii_digit()) => {
                    current = id.parse().unwrap();
                    let after_mapping = rest.split_once(' ').map_or("", |x| x.1);
                    let after_mapping = after_mapping
                        .strip_prefix("M=")
                        .and_then(|r| r.split_once(' '))
                        .map_or(after_mapping, |x| x.1);
                    locations
                        .entry(current)
                        .or_default()
                        .push(func(after_mapping));
                }
                _ => locations.entry(current).or_default().push(func(t)),
            }
        }
        // Sample lines "  10 10000 10 10000: 1 2 3 " each followed by a
        // line of labels.
        let mut samples = Vec::new();
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Samples:")
            .skip(2)
            .take_while(|l| *l != "Locations")
            .collect();
        let mut i = 0;
        while i < lines.len() {
            let Some((vals, ids)) = lines[i].split_once(':') else {
                i += 1;
                continue;
            };
            let values: Vec<i64> = vals
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            let functions = ids
                .split_whitespace()
                .flat_map(|id| locations[&id.parse::<u64>().unwrap()].clone())
                .collect();
            let labels = lines
                .get(i + 1)
                .filter(|l| !l.contains(": ") || l.contains(":["))
                .map_or(String::new(), |l| l.trim().to_string());
            i += if labels.is_empty() { 1 } else { 2 };
            samples.push(RawSample {
                values,
                functions,
                labels,
            });
        }
        Self { text, samples }
    }

    /// The sample whose innermost frame is `function`.
    fn at(&self, function: &str) -> &RawSample {
        let found: Vec<&RawSample> = self
            .samples
            .iter()
            .filter(|s| s.functions.first().is_some_and(|f| f == function))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one sample at {function} in:\n{}",
            self.text
        );
        found[0]
    }
}

#[test]
fn pprof_profile_and_report_replay() {
    if !privileged("pprof_profile_and_report_replay") {
        return;
    }
    let dir = TempDir::new("pprof");
    let (profile, recording) = (dir.join("heap.pb.gz"), dir.join("rec.jsonl"));
    let (mut tracer, _, _) = Tracing::run([fixture("allocs-fp").into_os_string(), "now".into()])
        .default_interval()
        .output(&recording)
        // The replay is compared event by event: no system-wide alert
        // from a busy CI machine in between.
        .arg("--no-alerts")
        .arg("--pprof")
        .arg(&profile)
        .start();
    assert_eq!(tracer.wait(T), Some(0));

    let raw = RawProfile::read(&profile);
    assert!(
        raw.text.contains(
            "alloc_objects/count alloc_space/bytes inuse_objects/count inuse_space/bytes[dflt]"
        ),
        "{}",
        raw.text
    );
    // Exact figures, as the JSON reports them (libc.rs checks those).
    // leak_malloc frees nothing: what it allocated is what it holds.
    let &(.., bytes, count, allocs, _) = allocs::expected("leak_malloc");
    let leak = raw.at("leak_malloc");
    assert_eq!(
        leak.values,
        [allocs, bytes, count, bytes].map(|v| v as i64),
        "{}",
        raw.text
    );
    assert_eq!(leak.functions[1..3], ["run_all", "main"]);
    assert!(leak.labels.contains("kind:[heap]"), "{leak:?}");
    let mapped = raw.at("leak_mmap");
    let &(.., bytes, count, _, _) = allocs::expected("mmap");
    assert_eq!(
        mapped.values[2..],
        [count, bytes].map(|v| v as i64),
        "{}",
        raw.text
    );
    assert!(mapped.labels.contains("kind:[mmap]"), "{mapped:?}");
    // inline_alloc was inlined into leak_inlined: both are lines of one
    // location, innermost first.
    let inlined = raw.at("inline_alloc");
    assert_eq!(inlined.values[3], 2100);
    assert_eq!(inlined.functions[..2], ["inline_alloc", "leak_inlined"]);
    assert!(
        raw.text
            .lines()
            .any(|l| l.trim_start().starts_with("leak_inlined ")),
        "leak_inlined is a continuation line of inline_alloc's location:\n{}",
        raw.text
    );
    let allocs_fp = fixture("allocs-fp");
    let mappings: Vec<&str> = raw.text.lines().skip_while(|l| *l != "Mappings").collect();
    assert!(
        mappings
            .iter()
            .any(|l| l.ends_with(&format!("{}  [FN][FL][LN][IN]", allocs_fp.display()))),
        "a mapping for the executable: {mappings:?}"
    );
    let top = Command::new(go_tool())
        .args([
            "tool",
            "pprof",
            "-top",
            "-nodefraction=0",
            "-sample_index=inuse_space",
        ])
        .arg(&profile)
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(top.starts_with("File: allocs-fp\n"), "{top}");
    assert!(top.contains("leak_malloc"), "{top}");

    // The recording replayed afterwards gives the same report and profile.
    let recorded = parse_lines(&std::fs::read_to_string(&recording).unwrap());
    let original = recorded.iter().find(|v| v["type"] == "report").unwrap();
    let replay_profile = dir.join("replay.pb.gz");
    let replayed = replay_json(&recording, &[Path::new("--pprof"), &replay_profile]);
    let kinds: Vec<&Value> = replayed.iter().map(|v| &v["type"]).collect();
    assert_eq!(kinds, ["attached", "target_exited", "report"]);
    let report = &replayed[2];
    assert_eq!(report["sites"], original["sites"]);
    assert_eq!(report["reason"], "target_exited");
    assert_eq!(report["ts"], original["ts"]);
    assert_eq!(
        std::fs::read(&replay_profile).unwrap(),
        std::fs::read(&profile).unwrap(),
        "the replayed profile is the live one"
    );
    let table = Command::new(tracer_bin())
        .arg("report")
        .arg(&recording)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("ended: target exited"), "{table}");
    assert!(table.contains("leak_big"), "{table}");
}

#[test]
fn report_of_a_cut_recording_uses_its_last_snapshot() {
    if !privileged("report_of_a_cut_recording_uses_its_last_snapshot") {
        return;
    }
    let dir = TempDir::new("cut");
    let recording = dir.join("rec.jsonl");
    let mut target = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    target.expect_line("ready", T);
    // The recording goes to a file: the stream is read from there.
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .output(&recording)
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    let line = marker_line(&source("c/allocs.c"), "leak_malloc");
    let leak_bytes = allocs::bytes_at("leak_malloc");
    stream.next_of_where("snapshot", "leak_malloc holding its blocks", T, |v| {
        sites_at(v, "heap", "leak_malloc", line)
            .first()
            .is_some_and(|s| s["outstanding_bytes"] == leak_bytes)
    });
    // As the OOM killer or `kill -9` would: no final report.
    tracer.signal(libc::SIGKILL);
    tracer.wait(T);
    let replayed = replay_json::<&str>(&recording, &[]);
    let notice = replayed.iter().find(|v| v["type"] == "notice").unwrap();
    assert!(
        notice["message"]
            .as_str()
            .unwrap()
            .contains("no final report"),
        "{notice}"
    );
    let report = replayed.last().unwrap();
    assert_eq!(report["type"], "report");
    assert_eq!(report["reason"], "recorded");
    assert_eq!(
        site_at(report, "heap", "leak_malloc", line)["outstanding_bytes"],
        leak_bytes
    );
}

#[test]
fn prometheus_scrapes_bounded_site_series() {
    if !privileged("prometheus_scrapes_bounded_site_series") {
        return;
    }
    let dir = TempDir::new("prometheus");
    let mut target = Proc::spawn(Command::new(fixture("allocs-fp")).arg("wait"));
    target.expect_line("ready", T);
    // The tracer binds port 0 and tells the port it got. Prometheus cannot:
    // it gets a port free a moment ago, and another when that one is taken
    // before it binds it.
    // Keep the series of the sites down to leak_malloc's rank by size (the
    // glibc DTV site allocs::heap_sites counts is smaller than any).
    let leak_bytes = allocs::bytes_at("leak_malloc");
    let shown = 1 + allocs::EXPECTED
        .iter()
        .filter(|e| e.0 == "heap" && e.3 > leak_bytes)
        .count();
    let (mut tracer, mut stream, attached) = Tracing::attach(target.pid())
        .args(["--prometheus", "127.0.0.1:0"])
        .args(["--prometheus-sites", &shown.to_string()])
        .on_attached(|_| target.send("go"))
        .start();
    let metrics_port = metrics_port(&attached);
    target.expect_line("done", T);

    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let log_path = dir.join("prometheus.log");
    let (_prometheus, prom_port) = with_free_port("Prometheus", &[metrics_port], |port| {
        let log = std::fs::File::create(&log_path).unwrap();
        let mut prometheus = Proc::spawn(
            Command::new(prometheus_bin())
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stderr(Stdio::from(log)),
        );
        // Serving (its own health page, not another program's on that
        // port) or exited.
        let healthy = format!("http://127.0.0.1:{port}/-/healthy");
        wait_until("Prometheus to serve or exit", T, || {
            if let Some(st) = prometheus.child.try_wait().unwrap() {
                return Some(Err(format!(
                    "Prometheus exited ({st}); its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )));
            }
            let body = ureq::get(&healthy).call().ok()?.body_mut().read_to_string();
            body.ok()
                .filter(|b| b.contains("Prometheus"))
                .map(|_| Ok(()))
        })
        .map(|()| prometheus)
    });
    let query = |q: &str| -> Vec<Value> {
        let url = format!("http://127.0.0.1:{prom_port}/api/v1/query");
        let Ok(mut resp) = ureq::get(&url).query("query", q).call() else {
            return Vec::new();
        };
        let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let value = |r: &Value| r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
    // Prometheus starts, scrapes every second; wait for the leak's series.
    let leak_q =
        "tracer_site_outstanding_bytes{job=\"tracer\",kind=\"heap\",function=\"leak_malloc\"}";
    let mut last = Vec::new();
    let leak = poll_until(T, Duration::from_millis(250), || {
        let r = query(leak_q);
        let held = r
            .first()
            .is_some_and(|first| value(first) == leak_bytes as f64);
        last.clone_from(&r);
        held.then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never saw leak_malloc at {leak_bytes} B within {T:?} (last: {last:?}); its log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    assert_eq!(leak.len(), 1, "{leak:?}");
    let labels = &leak[0]["metric"];
    assert_eq!(labels["pid"], target.pid().to_string());
    assert_eq!(labels["site"].as_str().unwrap().len(), 12, "{labels}");
    let objects = query("tracer_site_outstanding_objects{function=\"leak_malloc\"}");
    assert_eq!(value(&objects[0]), allocs::expected("leak_malloc").4 as f64);
    let up = query("up{job=\"tracer\"}");
    assert_eq!(value(&up[0]), 1.0, "the scrape succeeds: {up:?}");
    // Bounded: the sites asked for and one aggregate, which loses nothing.
    let heap = query("tracer_site_outstanding_bytes{kind=\"heap\"}");
    assert_eq!(heap.len(), shown + 1, "{heap:?}");
    let other: Vec<&Value> = heap
        .iter()
        .filter(|r| r["metric"]["site"] == "other")
        .collect();
    assert_eq!(other.len(), 1, "{heap:?}");
    assert_eq!(
        other[0]["metric"]["function"],
        format!("[{} other sites]", allocs::heap_sites() - shown)
    );
    let sum: f64 = heap.iter().map(value).sum();
    let total = query("tracer_outstanding_bytes{kind=\"heap\"}");
    assert_eq!(sum, value(&total[0]));
    assert_eq!(
        value(&query("tracer_sites{kind=\"heap\"}")[0]),
        allocs::heap_sites() as f64
    );
    // The tracer's health is there too.
    let lost = query("tracer_lost_total");
    assert!(lost.len() >= 7, "{lost:?}");
    assert!(lost.iter().all(|r| value(r) == 0.0), "{lost:?}");
    let hits = query("tracer_probe_events_total{event=\"alloc_calls\"}");
    assert!(value(&hits[0]) >= 10000.0, "{hits:?}");
    assert_eq!(value(&query("tracer_target_up")[0]), 1.0);

    end_normally(&mut target, &mut tracer, &mut stream);
}

#[test]
fn sigusr1_writes_go_profiles_while_tracing() {
    if !privileged("sigusr1_writes_go_profiles_while_tracing") {
        return;
    }
    let dir = TempDir::new("sigusr1");
    let profile = dir.join("go.pb.gz");
    let mut target = Proc::spawn(Command::new(fixture("leaky-go1.27")).arg("wait"));
    target.expect_line("ready", T);
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .args(["--pprof", profile.to_str().unwrap()])
        .on_attached(|_| target.send("go"))
        .start();
    target.expect_line("done", T);
    stream.next_of_where(
        "snapshot",
        "the 50 main.consumer goroutines blocked",
        T,
        |snap| {
            snap["sites"].as_array().unwrap().iter().any(|s| {
                s["kind"] == "goroutine"
                    && s["start_function"]["function"] == "main.consumer"
                    && s["outstanding_count"] == 50
            })
        },
    );
    tracer.signal(libc::SIGUSR1);
    let notice = stream.next_of("notice", T);
    let message = notice["message"].as_str().unwrap();
    assert!(message.starts_with("SIGUSR1: wrote "), "{message}");
    let goroutines = dir.join("go.goroutines.pb.gz");
    let timers = dir.join("go.timers.pb.gz");
    for f in [&profile, &goroutines, &timers] {
        assert!(message.contains(&f.display().to_string()), "{message}");
    }

    // Read while the tracer still runs.
    let g = RawProfile::read(&goroutines);
    assert!(g.text.contains("goroutine/count[dflt]"), "{}", g.text);
    let consumers = g.at("main.startConsumers");
    assert_eq!(consumers.values, [50]);
    assert!(
        consumers.labels.contains("start_function:[main.consumer]"),
        "{consumers:?}"
    );
    let t = RawProfile::read(&timers);
    let seed: Vec<&RawSample> = t
        .samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| f == "main.leakTimers"))
        .collect();
    assert_eq!(
        seed.iter().map(|s| s.values[0]).sum::<i64>(),
        100,
        "the WithTimeout leak's 100 timers: {}",
        t.text
    );
    let m = RawProfile::read(&profile);
    assert!(
        m.samples.iter().any(|s| s.labels.contains("kind:[heap]")
            && s.functions.iter().any(|f| f == "main.fillCache")
            && s.values[3] > 0),
        "the cache's sampled heap: {}",
        m.text
    );
    assert!(tracer.child.try_wait().unwrap().is_none(), "still tracing");

    end_normally(&mut target, &mut tracer, &mut stream);
}

#[test]
fn folded_stacks_and_flame_graph() {
    if !privileged("folded_stacks_and_flame_graph") {
        return;
    }
    let dir = TempDir::new("flame");
    let folded = dir.join("stacks.folded");
    let svg = dir.join("flame.svg");
    let mut tracer = Proc::spawn(
        Command::new(tracer_bin())
            .args(["run", "--format", "json", "-o", "/dev/null", "--folded"])
            .arg(&folded)
            .arg("--flamegraph")
            .arg(&svg)
            .arg("--")
            .arg(fixture("allocs-fp"))
            .arg("now"),
    );
    assert_eq!(tracer.wait(T), Some(0));
    let text = std::fs::read_to_string(&folded).unwrap();
    let image = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.lines().any(|l| l
            == format!(
                "heap;main;run_all;leak_malloc {}",
                allocs::bytes_at("leak_malloc")
            )),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == format!("mmap;main;run_all;leak_mmap {}", allocs::bytes_at("mmap"))),
        "{text}"
    );
    assert!(
        !text.contains(";churn "),
        "a site holding nothing is no stack"
    );
    // inferno writes the standard SVG DOCTYPE.
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&image, opts).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    for f in ["leak_malloc", "grow_realloc", "leak_big"] {
        assert!(image.contains(f), "the flame graph names {f}");
    }
}
