//! The JSON stream scales with what changes, not with what exists: a program
//! holding 819,200 blocks from 8,192 distinct stacks (tests/fixtures/c/
//! manysites.c) is traced to a file; every line is checked against the
//! shipped schema, snapshots once the allocations stop are small, and the
//! final report and a replay of the recording hold every site exactly.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::*;

const T: Duration = Duration::from_secs(120);
const BITS: u32 = 13;
const BLOCKS: u64 = 100;
/// malloc(SIZE) in manysites.c.
const SIZE: u64 = 48;

#[test]
fn many_sites_stream_small_snapshots_and_exact_reports() {
    if !privileged("many_sites_stream_small_snapshots_and_exact_reports") {
        return;
    }
    let sites = 1u64 << BITS;
    let truth_bytes = sites * BLOCKS * SIZE;
    let hold_line = marker_line(&source("c/manysites.c"), "manysites_hold");
    let dir = std::env::temp_dir().join(format!("tracer-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let recording = dir.join("rec.jsonl");

    let mut target = Proc::spawn(
        Command::new(fixture("manysites"))
            .arg(BITS.to_string())
            .arg(BLOCKS.to_string()),
    );
    target.expect_line("ready", T);
    let mut tracer = Proc::spawn(
        Command::new(tracer_bin())
            .args(["attach", &target.pid().to_string(), "-f", "json"])
            // A short trend window: growth settles to 0 two seconds after
            // the allocations stop, and the numbers stop changing.
            .args(["--interval", "0.5", "--trend-window", "2", "-o"])
            .arg(&recording),
    );
    let read = || std::fs::read_to_string(&recording).unwrap_or_default();
    let deadline = Instant::now() + T;
    while !read().contains("\"type\":\"attached\"") {
        assert!(Instant::now() < deadline, "no `attached` in the recording");
        std::thread::sleep(Duration::from_millis(50));
    }
    target.send("go");
    let done = target.expect_line("done", T);
    assert_eq!(
        done,
        format!("done {sites} {} {truth_bytes}", sites * BLOCKS),
        "the fixture's own count"
    );
    // Wait until several snapshots in a row hold everything (the trend
    // window has passed), then end the target.
    let deadline = Instant::now() + T;
    loop {
        let text = read();
        let held: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"type\":\"snapshot\"") && l.ends_with('}'))
            .filter(|l| l.contains(&format!("\"total_outstanding_bytes\":{truth_bytes},")))
            .collect();
        if held.len() >= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the snapshots never held the fixture's {truth_bytes} B eight times"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    target.close_stdin();
    assert_eq!(target.wait(T), Some(0), "the target runs normally");
    assert_eq!(
        tracer.wait(T),
        Some(0),
        "the tracer exits 0 with the target"
    );

    let text = read();
    let raw: Vec<&str> = text.lines().collect();
    // Every line against the schema, snapshots rebuilt by the tests' own code.
    let events = parse_lines(&text);
    let snapshots: Vec<(usize, &Value)> = events
        .iter()
        .enumerate()
        .filter(|(_, v)| v["type"] == "snapshot")
        .collect();
    let site_events = events.iter().filter(|v| v["type"] == "site").count();
    // Each site is described once (its frames never change here).
    assert_eq!(site_events as u64, sites, "one `site` event per site");

    // Once everything is held and growth has settled, a snapshot carries
    // totals only.
    let (last_i, last) = *snapshots.last().expect("snapshots");
    assert_eq!(last["total_outstanding_bytes"], truth_bytes);
    assert_eq!(last["site_count"], sites);
    let last_len = raw[last_i].len();
    assert!(
        last_len <= 1 << 20,
        "a snapshot after the allocations stop is {last_len} B (at most 1 MiB)"
    );
    assert_eq!(
        serde_json::from_str::<Value>(raw[last_i]).unwrap()["sites"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "no site changed in the last snapshot"
    );
    assert_exact(last, sites, hold_line);

    // The final report is self-contained: every site whole.
    let report = events.last().unwrap();
    assert_eq!(report["type"], "report");
    assert_exact(report, sites, hold_line);

    // `tracer report` rebuilds the last snapshot of a recording that lost
    // its report (the tracer killed), as the tests' own rebuild does.
    let cut = dir.join("cut.jsonl");
    std::fs::write(&cut, raw[..=last_i].join("\n")).unwrap();
    let replayed = replay_json::<&str>(&cut, &[]);
    let replayed = replayed.last().unwrap();
    assert_eq!(replayed["type"], "report");
    assert_eq!(replayed["sites"], last["sites"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every site at manysites.c's malloc line holds exactly its 100 blocks, the
/// sites are all distinct stacks, and nothing was lost.
fn assert_exact(snap: &Value, sites: u64, hold_line: u32) {
    let all = snap["sites"].as_array().unwrap();
    assert_eq!(all.len() as u64, sites, "{}", describe_sites(snap));
    let mut ids = std::collections::HashSet::new();
    for s in all {
        assert_eq!(s["kind"], "heap");
        assert_eq!(s["frames"][0]["function"], "hold", "{s}");
        assert_eq!(s["frames"][0]["line"], hold_line);
        assert_eq!(s["outstanding_bytes"], BLOCKS * SIZE, "{s}");
        assert_eq!(s["outstanding_count"], BLOCKS);
        assert_eq!(s["truncated"], false);
        assert!(ids.insert(s["site_id"].as_str().unwrap().to_string()));
    }
    for (reason, n) in snap["lost"].as_object().unwrap() {
        assert_eq!(n, 0, "lost.{reason}");
    }
}
