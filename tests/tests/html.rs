//! Privileged: the HTML report (`--html`, and `tracer report --html`) of a
//! real OOM incident, rendered by headless Chromium (Debian's package) with
//! no network: the page renders, the memory chart is there with the alert
//! and the kill marked, the culprit is named, nothing is fetched.

use std::{path::Path, process::Command, time::Duration};

use tracer_tests::*;

const T: Duration = Duration::from_secs(120);

/// Chromium's DOM of `page`, rendered in a network namespace of its own
/// (no network at all), and a screenshot of it into `png`.
fn render_offline(page: &Path, png: &Path) -> String {
    let window = "1100,2400";
    let dom = String::from_utf8(headless_chromium(page, window, &["--dump-dom"]).stdout).unwrap();
    headless_chromium(page, window, &[&format!("--screenshot={}", png.display())]);
    dom
}

#[test]
fn the_html_report_of_an_oom_incident_renders_offline_with_the_alert_and_kill() {
    if !privileged("the_html_report_of_an_oom_incident_renders_offline_with_the_alert_and_kill") {
        return;
    }
    let Some(cg) = MemCgroup::create("html", 64 << 20) else {
        panic!("this machine has a cgroup v1 memory controller; CI must run this test");
    };
    let dir = std::env::temp_dir().join(format!("tracer-html-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (live, replayed, recording) = (
        dir.join("live.html"),
        dir.join("report.html"),
        dir.join("rec.jsonl"),
    );
    let mut target = Proc::spawn(Command::new(fixture("oomleak")).args(["leak", "8192"]));
    target.expect_line("ready", T);
    cg.add(target.pid());
    let (mut tracer, mut stream, _) = Tracing::attach(target.pid())
        .interval("0.5")
        .args(["--oom-window", "12", "--html"])
        .arg(&live)
        .output(&recording)
        .attach_within(T)
        .on_attached(|_| target.send("go"))
        .start();
    stream.next_of("alert", T);
    stream.next_of("oom_kill", T);
    stream.next_of("report", T);
    assert_eq!(tracer.wait(T), Some(0));
    let out = Command::new(tracer_bin())
        .arg("report")
        .arg(&recording)
        .args(["-f", "json", "-o", "/dev/null", "--html"])
        .arg(&replayed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    for (page, png) in [
        (&live, artifacts.join("html-report-live.png")),
        (&replayed, artifacts.join("html-report.png")),
    ] {
        let html = std::fs::read_to_string(page).unwrap();
        // Self-contained: nothing to fetch.
        for external in ["<script", "<link", "src=\"http", "href=\"http", "url(http"] {
            assert!(!html.contains(external), "{}: {external}", page.display());
        }
        let dom = render_offline(page, &png);
        for wanted in [
            "id=\"memory-chart\"",
            "class=\"alert-marker\"",
            "class=\"kill-marker\"",
            "id=\"sites-chart\"",
            "id=\"flamegraph\"",
            "grow_session_cache (oomleak.c:",
        ] {
            assert!(
                dom.contains(wanted),
                "{}: no {wanted} in the rendered page",
                page.display()
            );
        }
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 20_000,
            "{}: screenshot of {size} bytes",
            png.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
