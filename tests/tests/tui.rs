//! Privileged: the live terminal UI in a real terminal (tmux, 150x24) against
//! the Go seed's WithTimeout leak in a 256 MiB memory cgroup: the header
//! shows usage, the limit and an ETA; the alert panel appears and stays; the
//! timers view lists the leaking site; `q` detaches within a second and
//! leaves the terminal sane. A screenshot of the screen (through headless
//! Chromium) is kept for the README.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use tracer_tests::*;

const T: Duration = Duration::from_secs(120);
const LIMIT: u64 = 256 << 20;
const TEST: &str = "the_tui_shows_the_limit_the_alert_and_the_leaking_timers_and_quits_cleanly";

/// A tmux server of the test's own (its own socket), with one 150x24
/// session running `command`; killed on drop, with what it runs, and its
/// socket removed.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(command: &str) -> Self {
        let tmux = Self {
            socket: std::env::temp_dir().join(format!("tracer-test-tmux-{}", std::process::id())),
        };
        let out = tmux
            .cmd()
            .args(["new-session", "-d", "-s", "t", "-x", "150", "-y", "24"])
            .arg(command)
            .output()
            .expect("tmux");
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The pane keeps its 150x24 whatever clients attach (none do).
        let _ = tmux
            .cmd()
            .args(["set-option", "-t", "t", "window-size", "manual"])
            .output();
        tmux
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).env("TERM", "xterm-256color");
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen as text, one line per row.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// The screen with its colours, as ANSI escapes.
    fn screen_ansi(&self) -> String {
        self.run(&["capture-pane", "-e", "-p", "-t", "t"])
    }

    /// The screen and the scrollback above it.
    fn history(&self) -> String {
        self.run(&["capture-pane", "-p", "-S", "-", "-t", "t"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn format(&self, f: &str) -> String {
        self.run(&["display-message", "-p", "-t", "t", f])
            .trim()
            .to_string()
    }

    /// Waits until the screen satisfies `probe`; panics with the screen
    /// after `timeout`.
    fn wait_for<R>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&str) -> Option<R>,
    ) -> R {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if let Some(r) = probe(&screen) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not on screen within {timeout:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The function holding a fixture source's `SITE:` marker, as Go names it
/// (`main.timerFlood`): read from the source, not from the tracer.
fn go_function_of(src: &Path, line: u32) -> String {
    let text = std::fs::read_to_string(src).unwrap();
    let func = text
        .lines()
        .take(line as usize)
        .filter_map(|l| l.strip_prefix("func "))
        .last()
        .expect("the marker is inside a function");
    let name = func.split('(').next().unwrap().trim();
    format!("main.{name}")
}

/// The screen's sites table (the rows under the kind tabs).
fn table_of(screen: &str) -> Vec<&str> {
    let lines: Vec<&str> = screen.lines().collect();
    let tabs = lines
        .iter()
        .position(|l| l.contains(" timers ") && l.contains("sorted by"))
        .unwrap_or_else(|| panic!("no kind tabs on screen:\n{screen}"));
    lines[tabs + 1..].to_vec()
}

#[test]
fn the_tui_shows_the_limit_the_alert_and_the_leaking_timers_and_quits_cleanly() {
    if !privileged(TEST) {
        return;
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        skip(
            TEST,
            "tmux is not installed (`cargo xtask test` installs it)",
        );
        return;
    }
    let Some(cg) = MemCgroup::create("tui", LIMIT) else {
        return;
    };
    let src = source("go/leaky/main.go");
    let line = marker_line(&src, "flood_timer");
    let culprit = format!("{} (main.go:{line})", go_function_of(&src, line));
    let mut target =
        Proc::spawn(Command::new(fixture("leaky-go1.27")).args(["timerflood", "4000"]));
    target.expect_line("ready", T);
    cg.add(target.pid());
    // The shell reports how the tracer ended and the terminal's modes after.
    let tmux = Tmux::start(&format!(
        "{} attach {}; echo tracer-exit=$?; stty -a; sleep 600",
        tracer_bin().display(),
        target.pid()
    ));
    let pid = target.pid();
    tmux.wait_for("the attached target", T, |s| {
        s.contains(&format!("pid {pid} (leaky-go1.27)"))
            .then_some(())
    });
    assert_eq!(
        tmux.format("#{alternate_on}"),
        "1",
        "the UI takes the alternate screen"
    );
    target.send("go");

    // The header: usage against the limit the test set, its scope, an ETA.
    let header = tmux.wait_for("an ETA", T, |s| {
        let first = s.lines().next()?;
        first.contains("ETA in ~").then(|| first.to_string())
    });
    assert!(
        header.contains("/ 256.0 MiB"),
        "the cgroup's limit: {header}"
    );
    assert!(header.contains("cgroup v1"), "{header}");
    let used: f64 = header
        .split("used ")
        .nth(1)
        .and_then(|u| u.split(" MiB").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no usage in MiB: {header}"));
    assert!(used > 1.0 && used < 256.0, "{header}");

    // The alert panel, with the culprit, and still there 5 s later.
    let alerted = |s: &str| s.contains("WARNING alert: pid") || s.contains("CRITICAL alert: pid");
    tmux.wait_for("the alert panel", T, |s| alerted(s).then_some(()));
    std::thread::sleep(Duration::from_secs(5));
    let later = tmux.screen();
    assert!(alerted(&later), "the alert panel went away:\n{later}");
    assert!(
        later.contains(&culprit),
        "the alert names {culprit}:\n{later}"
    );

    // Tab to the timers (heap, mmap, goroutines, timers): the leaking site
    // is listed, with the timers it holds.
    tmux.keys(&["Tab", "Tab", "Tab"]);
    let row = tmux.wait_for("the leaking timers", Duration::from_secs(10), |s| {
        table_of(s)
            .into_iter()
            .find(|l| l.contains(&culprit))
            .map(str::to_string)
    });
    // GROWTH HELD COUNT, then the sparkline: the count is the token just
    // before the first block character (growth and held take one token or
    // two, "+759.5 KiB/s", as their units come).
    let tokens: Vec<&str> = row.split_whitespace().collect();
    let spark = tokens
        .iter()
        .position(|t| t.starts_with(['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█']))
        .unwrap_or_else(|| panic!("no sparkline in {row:?}"));
    let count: u64 = spark
        .checked_sub(1)
        .and_then(|i| tokens[i].parse().ok())
        .unwrap_or_else(|| panic!("no count in {row:?}"));
    assert!(count > 1000, "pending timers at the site: {row}");
    screenshot(&tmux.screen_ansi());

    // q: detached within a second, the terminal back to normal.
    let asked = Instant::now();
    tmux.keys(&["q"]);
    tmux.wait_for("the tracer's end", Duration::from_secs(10), |s| {
        s.contains("tracer-exit=").then_some(())
    });
    let took = asked.elapsed();
    let history = tmux.history();
    assert!(
        took < Duration::from_secs(1),
        "q took {took:?} to detach:\n{history}"
    );
    assert!(history.contains("tracer-exit=0"), "{history}");
    assert_eq!(
        tmux.format("#{alternate_on}"),
        "0",
        "back on the normal screen"
    );
    assert_eq!(tmux.format("#{cursor_flag}"), "1", "the cursor shows");
    let stty: Vec<&str> = history.split_whitespace().collect();
    for mode in ["icanon", "echo", "isig", "opost"] {
        assert!(
            stty.contains(&mode),
            "{mode} is off after the tracer: {history}"
        );
    }
    // The final report stays on the normal screen.
    assert!(history.contains("== tracer report: pid"), "{history}");
    assert!(history.contains("ended: interrupted"), "{history}");
    // The target goes on, detached.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
}

/// The screen, coloured, as an HTML page and through headless Chromium as
/// target/tui.png (and docs/tui.png with TRACER_README_SCREENSHOT=1).
fn screenshot(ansi: &str) {
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let page = artifacts.join("tui-screen.html");
    std::fs::write(&page, ansi_to_html(ansi)).unwrap();
    let png = artifacts.join("tui.png");
    headless_chromium(
        &page,
        "1300,430",
        &[&format!("--screenshot={}", png.display())],
    );
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "{}: screenshot of {size} bytes",
        png.display()
    );
    if std::env::var_os("TRACER_README_SCREENSHOT").is_some() {
        let docs: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/tui.png");
        std::fs::copy(&png, docs).unwrap();
    }
}

/// xterm's palette for the 16 basic colours.
const PALETTE: [&str; 16] = [
    "#000000", "#cd0000", "#00cd00", "#cdcd00", "#0000ee", "#cd00cd", "#00cdcd", "#e5e5e5",
    "#7f7f7f", "#ff0000", "#00ff00", "#ffff00", "#5c5cff", "#ff00ff", "#00ffff", "#ffffff",
];
const FG: &str = "#d0d0d0";
const BG: &str = "#1c1c1c";

fn colour_256(n: u32) -> String {
    match n {
        0..=15 => PALETTE[n as usize].to_string(),
        16..=231 => {
            let n = n - 16;
            let c = |v: u32| if v == 0 { 0 } else { 55 + v * 40 };
            format!("#{:02x}{:02x}{:02x}", c(n / 36), c(n / 6 % 6), c(n % 6))
        }
        _ => {
            let v = 8 + (n.min(255) - 232) * 10;
            format!("#{v:02x}{v:02x}{v:02x}")
        }
    }
}

/// The SGR state of a run of text.
#[derive(Clone, Default, PartialEq)]
struct Pen {
    fg: Option<String>,
    bg: Option<String>,
    bold: bool,
    reverse: bool,
}

impl Pen {
    fn apply(&mut self, params: &str) {
        let p: Vec<u32> = params.split(';').map(|v| v.parse().unwrap_or(0)).collect();
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                0 => *self = Pen::default(),
                1 => self.bold = true,
                22 => self.bold = false,
                7 => self.reverse = true,
                27 => self.reverse = false,
                n @ 30..=37 => self.fg = Some(PALETTE[(n - 30) as usize].into()),
                n @ 90..=97 => self.fg = Some(PALETTE[(n - 90 + 8) as usize].into()),
                n @ 40..=47 => self.bg = Some(PALETTE[(n - 40) as usize].into()),
                n @ 100..=107 => self.bg = Some(PALETTE[(n - 100 + 8) as usize].into()),
                39 => self.fg = None,
                49 => self.bg = None,
                n @ (38 | 48) => {
                    let colour = match p.get(i + 1) {
                        Some(5) => {
                            i += 2;
                            p.get(i).map(|&c| colour_256(c))
                        }
                        Some(2) => {
                            i += 4;
                            (i < p.len())
                                .then(|| format!("#{:02x}{:02x}{:02x}", p[i - 2], p[i - 1], p[i]))
                        }
                        _ => None,
                    };
                    if n == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    fn style(&self) -> String {
        let (mut fg, mut bg) = (
            self.fg.clone().unwrap_or(FG.into()),
            self.bg.clone().unwrap_or(BG.into()),
        );
        if self.reverse {
            std::mem::swap(&mut fg, &mut bg);
        }
        format!(
            "color:{fg};background:{bg}{}",
            if self.bold { ";font-weight:bold" } else { "" }
        )
    }
}

/// tmux's `capture-pane -e` output as a page of coloured spans.
fn ansi_to_html(ansi: &str) -> String {
    let mut html = format!(
        "<!doctype html><meta charset=utf-8><style>body{{margin:0;background:{BG}}}\
         pre{{margin:8px;font:14px/17px 'DejaVu Sans Mono',monospace}}</style><pre>"
    );
    let mut pen = Pen::default();
    for line in ansi.lines() {
        let mut rest = line;
        html.push_str(&format!("<span style=\"{}\">", pen.style()));
        while let Some(esc) = rest.find("\x1b[") {
            push_text(&mut html, &rest[..esc]);
            let after = &rest[esc + 2..];
            let end = after
                .find(|c: char| c.is_ascii_alphabetic())
                .unwrap_or(after.len());
            if after[end..].starts_with('m') {
                pen.apply(&after[..end]);
                html.push_str(&format!("</span><span style=\"{}\">", pen.style()));
            }
            rest = &after[(end + 1).min(after.len())..];
        }
        push_text(&mut html, rest);
        html.push_str("</span>\n");
    }
    html.push_str("</pre>");
    html
}

fn push_text(html: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '<' => html.push_str("&lt;"),
            '>' => html.push_str("&gt;"),
            '&' => html.push_str("&amp;"),
            c => html.push(c),
        }
    }
}
