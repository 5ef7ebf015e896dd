//! `--html FILE` and `tracer report FILE --html OUT`: one self-contained page
//! (no script, no network: charts are inline SVG drawn here, the flame graph
//! an inline image) with, per traced process, memory used against its limit
//! over time with the alerts and the OOM kill marked, the top sites'
//! outstanding bytes over time, goroutine and timer counts over time, the
//! flame graph, and the final table with whole stacks. Written at each
//! process's end and on SIGUSR1.

use std::{collections::BTreeMap, fmt::Write as _, io, path::PathBuf, time::SystemTime};

use base64::Engine as _;

use super::{Attached, EndReason, Exit, Sink, human_bytes};
use crate::schema::{Alert, Level, OomKill, SiteKind, Snapshot};

/// A chart's line: its name, colour and (seconds, value) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);
/// The same with an owned name.
type OwnedSeries = (String, &'static str, Vec<(f64, f64)>);

/// Points kept per process; beyond, every other one is dropped (the chart
/// keeps its shape over any length of run).
const MAX_POINTS: usize = 2000;
/// Sites charted over time, and listed in the table.
const CHART_SITES: usize = 6;
const TABLE_SITES: usize = 50;

/// One snapshot, reduced to what the charts draw.
struct Point {
    t: SystemTime,
    usage: Option<u64>,
    limit: Option<u64>,
    sites: BTreeMap<String, u64>,
    goroutines: u64,
    timers: u64,
}

#[derive(Default)]
struct Process {
    attached: Option<Attached>,
    points: Vec<Point>,
    alerts: Vec<(SystemTime, Level, String)>,
    kill: Option<(SystemTime, OomKill)>,
    exit: Option<Exit>,
    last: Option<Snapshot>,
    ended: Option<(EndReason, f64)>,
}

/// Collects every process's history and writes the page.
pub struct HtmlSink {
    path: PathBuf,
    procs: BTreeMap<u32, Process>,
}

impl HtmlSink {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            procs: BTreeMap::new(),
        }
    }

    fn record(&mut self, snap: &Snapshot) {
        let p = self.procs.entry(snap.pid).or_default();
        let count = |k: SiteKind| {
            snap.sites
                .iter()
                .filter(|s| s.kind == k)
                .map(|s| s.outstanding_count)
                .sum()
        };
        p.points.push(Point {
            t: snap.ts,
            usage: snap.memory.as_ref().map(|m| m.state.usage_bytes),
            limit: snap.memory.as_ref().and_then(|m| m.state.limit_bytes),
            sites: snap
                .sites
                .iter()
                .filter(|s| s.outstanding_bytes > 0)
                .take(40)
                .map(|s| (s.site_id.clone(), s.outstanding_bytes))
                .collect(),
            goroutines: count(SiteKind::Goroutine),
            timers: count(SiteKind::Timer),
        });
        if p.points.len() > MAX_POINTS {
            let last = p.points.pop();
            let mut i = 0;
            p.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            p.points.extend(last);
        }
        p.last = Some(snap.clone());
    }

    /// Writes the page now.
    pub fn write(&self) -> io::Result<()> {
        let tmp = self.path.with_extension("html.tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, &self.path)
    }

    fn render(&self) -> String {
        let mut h = String::new();
        h.push_str(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>tracer report</title><style>\
             body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
             h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}\
             .ok{color:#2a7}.warning{color:#c80}.critical{color:#c22}\
             table{border-collapse:collapse;font-size:.9em}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}\
             td.n{text-align:right;font-variant-numeric:tabular-nums}\
             details summary{cursor:pointer}ol{margin:.2em 0;font-family:monospace;font-size:.9em}\
             svg{background:#fafafa;border:1px solid #ddd}.legend span{margin-right:1.2em}\
             </style></head><body><h1>tracer report</h1>",
        );
        if self.procs.is_empty() {
            h.push_str("<p>Nothing was traced.</p>");
        }
        for (pid, p) in &self.procs {
            self.render_process(&mut h, *pid, p);
        }
        h.push_str("</body></html>\n");
        h
    }

    fn render_process(&self, h: &mut String, pid: u32, p: &Process) {
        let comm = p.attached.as_ref().map_or("", |a| a.comm.as_str());
        let exe = p.attached.as_ref().map_or("", |a| a.exe.as_str());
        let _ = write!(
            h,
            "<section id=\"pid-{pid}\"><h2>pid {pid} ({}) — {}</h2>",
            esc(comm),
            esc(exe)
        );
        let t0 = p
            .points
            .first()
            .map(|q| q.t)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let secs = |t: SystemTime| t.duration_since(t0).unwrap_or_default().as_secs_f64();
        if let Some((reason, elapsed)) = p.ended {
            let _ = write!(
                h,
                "<p>Traced {elapsed:.1} s; ended: {}.",
                esc(reason.describe())
            );
            if let Some(e) = &p.exit {
                match (e.code, e.signal) {
                    (Some(c), _) => {
                        let _ = write!(h, " Exited with status {c}.");
                    }
                    (_, Some(s)) => {
                        let _ = write!(h, " Killed by signal {s}.");
                    }
                    _ => {}
                }
            }
            h.push_str("</p>");
        }
        if let Some(m) = p.last.as_ref().and_then(|s| s.memory.as_ref()) {
            let _ = write!(
                h,
                "<p>Memory: {} of {} ({:?}); level <b class=\"{}\">{:?}</b>{}</p>",
                human_bytes(m.state.usage_bytes as f64),
                m.state
                    .limit_bytes
                    .map_or("no limit".into(), |l| human_bytes(l as f64)),
                m.state.scope,
                level_class(m.level),
                m.level,
                m.eta_s
                    .map_or(String::new(), |e| format!(", limit in ~{e:.0} s")),
            );
        }
        // Memory against its limit, the alerts and the kill marked.
        let usage: Vec<(f64, f64)> = p
            .points
            .iter()
            .filter_map(|q| Some((secs(q.t), q.usage? as f64)))
            .collect();
        let limit: Vec<(f64, f64)> = p
            .points
            .iter()
            .filter_map(|q| Some((secs(q.t), q.limit? as f64)))
            .collect();
        let mut markers: Vec<(f64, &str, String)> = p
            .alerts
            .iter()
            .map(|(t, level, reason)| (secs(*t), "alert-marker", format!("{level:?}: {reason}")))
            .collect();
        if let Some((t, k)) = &p.kill {
            markers.push((
                secs(*t),
                "kill-marker",
                format!("OOM kill ({})", k.detected_by),
            ));
        }
        h.push_str("<h3>Memory used and its limit</h3>");
        h.push_str(&chart(
            "memory-chart",
            &[("used", "#36c", usage), ("limit", "#c22", limit)],
            &markers,
            true,
        ));
        for (_, class, text) in &markers {
            let _ = write!(h, "<div class=\"{class}-text\">{}</div>", esc(text));
        }
        // The top sites' outstanding bytes over time.
        if let Some(last) = &p.last {
            let top: Vec<&crate::schema::SiteReport> = last
                .sites
                .iter()
                .filter(|s| s.outstanding_bytes > 0)
                .take(CHART_SITES)
                .collect();
            if !top.is_empty() {
                const COLORS: [&str; CHART_SITES] =
                    ["#36c", "#c22", "#2a7", "#c80", "#84c", "#555"];
                let series: Vec<OwnedSeries> = top
                    .iter()
                    .zip(COLORS)
                    .map(|(s, c)| {
                        let name = s
                            .culprit()
                            .or(s.frames.first())
                            .map_or_else(|| s.site_id.clone(), |f| f.short());
                        let pts = p
                            .points
                            .iter()
                            .map(|q| {
                                (
                                    secs(q.t),
                                    q.sites.get(&s.site_id).copied().unwrap_or(0) as f64,
                                )
                            })
                            .collect();
                        (name, c, pts)
                    })
                    .collect();
                h.push_str("<h3>Top sites, outstanding bytes</h3>");
                let borrowed: Vec<Series> = series
                    .iter()
                    .map(|(n, c, v)| (n.as_str(), *c, v.clone()))
                    .collect();
                h.push_str(&chart("sites-chart", &borrowed, &markers, true));
            }
        }
        let goroutines: Vec<(f64, f64)> = p
            .points
            .iter()
            .map(|q| (secs(q.t), q.goroutines as f64))
            .collect();
        let timers: Vec<(f64, f64)> = p
            .points
            .iter()
            .map(|q| (secs(q.t), q.timers as f64))
            .collect();
        if p.points.iter().any(|q| q.goroutines > 0 || q.timers > 0) {
            h.push_str("<h3>Goroutines and timers</h3>");
            h.push_str(&chart(
                "goroutines-chart",
                &[
                    ("goroutines", "#2a7", goroutines),
                    ("timers", "#c80", timers),
                ],
                &markers,
                false,
            ));
        }
        if let Some(last) = &p.last {
            if let Some(svg) = super::flame::flamegraph_svg(last) {
                let _ = write!(
                    h,
                    "<h3>In-use memory flame graph</h3><img id=\"flamegraph\" alt=\"flame graph\" style=\"max-width:100%\" src=\"data:image/svg+xml;base64,{}\">",
                    base64::engine::general_purpose::STANDARD.encode(svg)
                );
            }
            h.push_str("<h3>Sites at the end</h3><table id=\"sites\"><tr><th>kind</th><th>outstanding</th><th>count</th><th>growth/s</th><th>peak</th><th>site</th></tr>");
            for s in last.sites.iter().take(TABLE_SITES) {
                let name = s
                    .culprit()
                    .or(s.frames.first())
                    .map_or_else(|| s.site_id.clone(), |f| f.short());
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td><details><summary>{}</summary><ol>",
                    s.kind,
                    human_bytes(s.outstanding_bytes as f64),
                    s.outstanding_count,
                    human_bytes(s.growth_bytes_per_s),
                    human_bytes(s.peak.bytes as f64),
                    esc(&name)
                );
                for f in s.frames.iter().chain(&s.start_function) {
                    let _ = write!(h, "<li>{}</li>", esc(&f.short()));
                }
                h.push_str("</ol></details></td></tr>");
            }
            h.push_str("</table>");
        }
        h.push_str("</section>");
    }
}

fn level_class(l: Level) -> &'static str {
    match l {
        Level::Ok => "ok",
        Level::Warning => "warning",
        Level::Critical => "critical",
    }
}

/// An SVG line chart: `series` (name, colour, (seconds, value)) and
/// vertical `markers` (seconds, class, title).
fn chart(id: &str, series: &[Series], markers: &[(f64, &str, String)], bytes: bool) -> String {
    const W: f64 = 900.0;
    const H: f64 = 260.0;
    const L: f64 = 70.0;
    const B: f64 = 30.0;
    let xs = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .chain(markers.iter().map(|m| m.0));
    let tmax = xs.fold(1.0f64, f64::max);
    let vmax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let x = |t: f64| L + t / tmax * (W - L - 10.0);
    let y = |v: f64| H - B - v / vmax * (H - B - 10.0);
    let label = |v: f64| {
        if bytes {
            human_bytes(v)
        } else {
            format!("{v:.0}")
        }
    };
    let mut s = format!(
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">"
    );
    let _ = write!(
        s,
        "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/><line x1=\"{L}\" y1=\"10\" x2=\"{L}\" y2=\"{}\" stroke=\"#999\"/>",
        H - B,
        W - 10.0,
        H - B,
        H - B
    );
    for i in 0..=4 {
        let v = vmax * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            L - 4.0,
            y(v) + 4.0,
            esc(&label(v))
        );
        let t = tmax * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{t:.0} s</text>",
            x(t),
            H - B + 16.0
        );
    }
    for (t, class, title) in markers {
        let colour = if *class == "kill-marker" {
            "#000"
        } else {
            "#c80"
        };
        let _ = write!(
            s,
            "<line class=\"{class}\" x1=\"{0:.1}\" y1=\"10\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"{colour}\" stroke-dasharray=\"4 3\"><title>{2}</title></line>",
            x(*t),
            H - B,
            esc(title)
        );
    }
    for (name, colour, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            s,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            path.join(" "),
            esc(name)
        );
    }
    s.push_str("</svg><div class=\"legend\">");
    for (name, colour, _) in series {
        let _ = write!(s, "<span style=\"color:{colour}\">━ {}</span>", esc(name));
    }
    s.push_str("</div>");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

impl Sink for HtmlSink {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        self.procs.entry(info.pid).or_default().attached = Some(info.clone());
        Ok(())
    }
    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.record(snap);
        Ok(())
    }
    fn replayed_snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.record(snap);
        Ok(())
    }
    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        self.procs.entry(exit.pid).or_default().exit = Some(exit.clone());
        Ok(())
    }
    fn notice(&mut self, _pid: u32, _message: &str) -> io::Result<()> {
        Ok(())
    }
    fn alert(&mut self, alert: &Alert) -> io::Result<()> {
        self.procs.entry(alert.pid).or_default().alerts.push((
            alert.ts,
            alert.severity,
            alert.reason.clone(),
        ));
        Ok(())
    }
    fn oom_kill(&mut self, kill: &OomKill) -> io::Result<()> {
        // Marked at the last snapshot before it (the record carries no
        // time of its own, and a replay happens later).
        let p = self.procs.entry(kill.pid).or_default();
        let at = p.points.last().map_or_else(SystemTime::now, |q| q.t);
        p.kill = Some((at, kill.clone()));
        Ok(())
    }
    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()> {
        self.record(snap);
        self.procs.entry(snap.pid).or_default().ended = Some((reason, elapsed_s));
        self.write()
    }
    fn export_now(&mut self) -> io::Result<()> {
        self.write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_and_mark() {
        let svg = chart(
            "c",
            &[("a<b", "#000", vec![(0.0, 1.0), (2.0, 4.0)])],
            &[(1.0, "alert-marker", "warning: \"x\" & y".into())],
            true,
        );
        assert!(svg.starts_with("<svg id=\"c\""));
        assert!(svg.contains("class=\"alert-marker\""));
        assert!(svg.contains("a&lt;b") && svg.contains("&quot;x&quot; &amp; y"));
        assert!(!svg.contains("a<b"));
    }
}
