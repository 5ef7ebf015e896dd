//! The overhead estimate against what a real service loses: Debian's
//! redis-server (jemalloc) under redis-benchmark, measured untraced, traced
//! and untraced again in one test.

use std::{process::Command, time::Duration};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(60);

/// Requests per second redis-benchmark reaches against `port`: the mean of
/// its SET and GET runs.
fn benchmark(port: u16) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "-n", "100000"])
        .args(["-q", "--csv"])
        .output()
        .expect("redis-benchmark (Debian: redis-tools) must be installed");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // "SET","117647.06",... after a header line.
    let rates: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("\"SET\"") || l.starts_with("\"GET\""))
        .map(|l| {
            l.split(',')
                .nth(1)
                .unwrap()
                .trim_matches('"')
                .parse()
                .unwrap_or_else(|e| panic!("redis-benchmark said {l:?}: {e}"))
        })
        .collect();
    assert_eq!(rates.len(), 2, "redis-benchmark said:\n{text}");
    rates.iter().sum::<f64>() / 2.0
}

/// Starts redis-server on a free port; returns it once it accepts
/// connections.
fn redis() -> (Proc, u16) {
    with_free_port("redis-server", &[], |port| {
        let server = Proc::spawn(Command::new("/usr/bin/redis-server").args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]));
        loop {
            let line = server.line(T);
            if line.contains("Ready to accept connections") {
                return Ok(server);
            }
            if line.contains("Address already in use") {
                return Err(line);
            }
        }
    })
}

/// The estimate shown while tracing agrees within 2× with the share of
/// throughput redis loses to the probes (redis's main thread is CPU-bound
/// under redis-benchmark, so the share of its CPU time spent in probes is
/// the share of throughput it loses).
#[test]
fn redis_overhead_estimate_matches_the_measured_loss() {
    if !privileged("redis_overhead_estimate_matches_the_measured_loss") {
        return;
    }
    let (server, port) = redis();
    let before = benchmark(port);
    let (mut tracer, mut stream, attached) = Tracing::attach(server.pid()).start();
    assert!(
        attached["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["path"].as_str().unwrap().contains("jemalloc")),
        "redis's jemalloc is probed: {attached}"
    );
    let traced = benchmark(port);
    // An estimate spanning most of the run (about 4 s here): the readings
    // start at the first interval after attach.
    let snap = stream.next_of_where("snapshot", "an estimate over 3 s", T, |s| {
        s["overhead"]["window_s"].as_f64().is_some_and(|w| w >= 3.0)
    });
    // Told once three seconds are behind the estimate.
    let told =
        |v: &Value| v["type"] == "notice" && v["message"].as_str().unwrap().contains("per call");
    if !stream.seen.iter().any(told) {
        stream.next_of_where("notice", "the estimate told", T, |n| told(n));
    }
    tracer.signal(libc::SIGINT);
    assert_eq!(tracer.wait(T), Some(0));
    let after = benchmark(port);
    let untraced = (before + after) / 2.0;
    let measured = 1.0 - traced / untraced;
    let overhead: &Value = &snap["overhead"];
    let estimated = overhead["share_pct"].as_f64().unwrap() / 100.0;
    let ratio = estimated / measured;
    eprintln!(
        "redis: untraced {before:.0} and {after:.0} req/s, traced {traced:.0}: lost {:.0}%, \
         estimated {:.0}% ({overhead})",
        measured * 100.0,
        estimated * 100.0
    );
    assert!(
        measured > 0.05,
        "tracing every allocation must cost redis something measurable: {measured}"
    );
    assert!(
        (0.5..=2.0).contains(&ratio),
        "estimated {:.0}% vs measured {:.0}% lost throughput",
        estimated * 100.0,
        measured * 100.0
    );
    drop(server);
}

/// `--max-overhead 20`: once the estimate is over the bound the tracer
/// samples or takes its probes off, with a notice, and redis then loses
/// less than 20% of its throughput to the tracer, measured.
#[test]
fn max_overhead_bounds_what_redis_loses() {
    if !privileged("max_overhead_bounds_what_redis_loses") {
        return;
    }
    let (server, port) = redis();
    let before = benchmark(port);
    let (mut tracer, mut stream, _) = Tracing::attach(server.pid())
        .args(["--max-overhead", "20"])
        .start();
    let acted = |v: &Value| {
        v["type"] == "notice"
            && v["message"]
                .as_str()
                .unwrap()
                .contains("--max-overhead 20%")
    };
    // Load until the tracer has settled: its probes off, or an estimate
    // under the bound after its last step.
    let mut settled = false;
    for _ in 0..6 {
        benchmark(port);
        // Everything the tracer wrote up to now.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        stream.next_of_where("snapshot", "a snapshot after the run", T, |s| {
            ts_secs(s["ts"].as_str().unwrap()) >= now
        });
        let notices: Vec<&Value> = stream.seen.iter().filter(|v| acted(v)).collect();
        let Some(last) = notices.last() else {
            continue;
        };
        if last["message"]
            .as_str()
            .unwrap()
            .contains("took every probe off")
        {
            settled = true;
            break;
        }
        let after_last = stream
            .seen
            .iter()
            .rev()
            .take_while(|v| !acted(v))
            .filter(|v| v["type"] == "snapshot")
            .filter_map(|v| v["overhead"]["share_pct"].as_f64())
            .next();
        if after_last.is_some_and(|share| share <= 20.0) {
            settled = true;
            break;
        }
    }
    assert!(
        settled,
        "the tracer never acted on the bound: {:?}",
        stream
            .seen
            .iter()
            .filter(|v| v["type"] == "notice")
            .collect::<Vec<_>>()
    );
    let traced = benchmark(port);
    tracer.signal(libc::SIGINT);
    assert_eq!(tracer.wait(T), Some(0));
    let after = benchmark(port);
    let lost = 1.0 - traced / ((before + after) / 2.0);
    eprintln!(
        "redis under --max-overhead 20: untraced {before:.0} and {after:.0} req/s, traced {traced:.0}: lost {:.0}%",
        lost * 100.0
    );
    assert!(
        lost < 0.20,
        "redis lost {:.0}% under --max-overhead 20",
        lost * 100.0
    );
    drop(server);
}
