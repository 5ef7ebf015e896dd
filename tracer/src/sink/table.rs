//! The live terminal view and the final report.

use std::io::{self, Write};

use super::{Attached, EndReason, Exit, Sink, human_bytes};
use crate::schema::{Lost, SiteKind, SiteReport, Snapshot, TRUNCATED_STACKS};

pub struct TableSink<W: Write> {
    out: W,
    /// Redraw in place (an interactive terminal) instead of appending.
    redraw: bool,
    top: usize,
    /// Each traced process's command name, from its `attached`.
    comms: std::collections::HashMap<u32, String>,
}

impl<W: Write> TableSink<W> {
    pub fn new(out: W, redraw: bool, top: usize) -> Self {
        Self {
            out,
            redraw,
            top,
            comms: Default::default(),
        }
    }

    /// What was written so far (the terminal UI prints its buffered report).
    pub fn get_ref(&self) -> &W {
        &self.out
    }
}

/// A goroutine site's states, ` [50 chan receive, 2 running]`; empty for
/// sites without.
fn states(site: &SiteReport) -> String {
    if site.states.is_empty() {
        return String::new();
    }
    let mut v: Vec<(&String, &u64)> = site.states.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    format!(
        " [{}]",
        v.iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The site's frames as `f (file:line) ← g (file:line) ← …`, at most `n`.
fn chain(site: &SiteReport, n: usize) -> String {
    let prefix = match (&site.start_function, site.kind) {
        // Pending timers no creation stack was sampled for yet.
        (Some(f), SiteKind::Timer) => {
            format!("[timers running {}; creation not sampled yet]", f.function)
        }
        (Some(f), _) => format!("go {}{} created at ", f.function, states(site)),
        (None, _) => String::new(),
    };
    // The allocator and its wrappers (`_PyObject_Malloc`, `zmalloc`…) say
    // nothing about who allocated: start past them.
    let frames = site.past_allocator();
    let mut s = prefix
        + &frames
            .iter()
            .take(n)
            .map(|f| f.short())
            .collect::<Vec<_>>()
            .join(" ← ");
    if frames.len() > n {
        // Library frames can fill the first places (time.AfterFunc ←
        // context.WithTimeout ← …): name the user's frame as well.
        let shown_user = frames.iter().take(n).any(|f| is_user_frame(&f.function));
        match frames.iter().skip(n).find(|f| is_user_frame(&f.function)) {
            Some(user) if !shown_user => {
                s.push_str(" ← … ← ");
                s.push_str(&user.short());
            }
            _ => s.push_str(" ← …"),
        }
    }
    if site.truncated {
        s.push_str(" [truncated]");
    }
    s
}

/// Bytes per second, or count per second for sites that hold no bytes
/// (goroutines).
fn growth_of(site: &SiteReport) -> String {
    if site.outstanding_bytes == 0 && site.growth_bytes_per_s.abs() < 0.5 {
        let g = site.growth_count_per_s;
        if g.abs() < 0.05 {
            return "0".into();
        }
        return format!("{g:+.1}/s");
    }
    growth(site.growth_bytes_per_s)
}

fn growth(g: f64) -> String {
    if g.abs() < 0.5 {
        "0".into()
    } else if g > 0.0 {
        format!("+{}/s", human_bytes(g))
    } else {
        format!("{}/s", human_bytes(g))
    }
}

pub use crate::symbolize::is_user_frame;

/// One line naming every non-zero loss, or saying there is none, then the
/// truncated stacks (not a loss: their bytes are all counted).
pub fn lost_line(lost: &Lost) -> String {
    let parts: Vec<String> = lost
        .described()
        .filter(|(name, n, _)| *n > 0 && *name != TRUNCATED_STACKS)
        .map(|(_, n, what)| format!("{n} {what}"))
        .collect();
    let mut line = if parts.is_empty() {
        "lost: nothing".to_string()
    } else {
        format!("lost: {}", parts.join("; "))
    };
    let truncated = lost.get(TRUNCATED_STACKS);
    if truncated > 0 {
        line.push_str(&format!("; {truncated} sites with truncated stacks"));
    }
    line
}

/// The files probed, each once, in the order first probed.
fn probed_files(info: &Attached) -> Vec<&str> {
    let mut seen = std::collections::HashSet::new();
    info.probes
        .iter()
        .map(|p| p.path.as_str())
        .filter(|p| seen.insert(*p))
        .collect()
}

impl<W: Write> TableSink<W> {
    fn comm_of(&self, pid: u32) -> &str {
        self.comms.get(&pid).map_or("?", String::as_str)
    }
}

impl<W: Write> TableSink<W> {
    fn write_table(&mut self, snap: &Snapshot) -> io::Result<()> {
        let ts = humantime::format_rfc3339_seconds(snap.ts);
        let comm = self.comm_of(snap.pid).to_owned();
        writeln!(
            self.out,
            "tracer: pid {} ({}) at {ts}: {} outstanding in {} sites; {}",
            snap.pid,
            comm,
            human_bytes(snap.total_outstanding_bytes as f64),
            snap.sites.len(),
            lost_line(&snap.lost)
        )?;
        if let Some(o) = &snap.overhead {
            writeln!(
                self.out,
                "overhead: ~{:.1} µs/call × {:.0} calls/s = +{:.0}% CPU for the target \
                 ({:.0}% of its CPU time)",
                o.ns_per_call / 1e3,
                o.calls_per_s,
                o.added_cpu_pct,
                o.share_pct
            )?;
        }
        writeln!(
            self.out,
            "{:>12} {:>9} {:>13} {:>10} {:>10}  {:<5} SITE",
            "OUTSTANDING", "COUNT", "GROWTH", "ALLOCS", "FREES", "KIND"
        )?;
        for site in snap.sites.iter().take(self.top) {
            writeln!(
                self.out,
                "{:>12} {:>9} {:>13} {:>10} {:>10}  {:<5} {}",
                human_bytes(site.outstanding_bytes as f64),
                site.outstanding_count,
                growth_of(site),
                site.allocs,
                site.frees,
                site.kind,
                chain(site, 3)
            )?;
        }
        if snap.sites.len() > self.top {
            writeln!(self.out, "  … {} more sites", snap.sites.len() - self.top)?;
        }
        Ok(())
    }
}

impl<W: Write> Sink for TableSink<W> {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        self.comms.insert(info.pid, info.comm.clone());
        let objects = probed_files(info);
        writeln!(
            self.out,
            "tracer: attached to pid {} ({}): {} probes in {}",
            info.pid,
            info.comm,
            info.probes.len(),
            objects.join(", ")
        )?;
        if let Some(u) = &info.unwind {
            writeln!(
                self.out,
                "tracer: stacks walked with the DWARF unwind tables of {} files ({} rows, {} of \
                 kernel memory){}",
                u.files,
                u.rows,
                human_bytes(u.bytes as f64),
                if u.frame_pointer_files.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; with frame pointers: {}",
                        u.frame_pointer_files.join(", ")
                    )
                }
            )?;
        }
        self.out.flush()
    }

    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        if self.redraw {
            // Home + clear: redraw in place like top(1).
            write!(self.out, "\x1b[H\x1b[2J")?;
        }
        self.write_table(snap)?;
        if !self.redraw {
            writeln!(self.out)?;
        }
        self.out.flush()
    }

    fn notice(&mut self, _pid: u32, message: &str) -> io::Result<()> {
        writeln!(self.out, "tracer: {message}")?;
        self.out.flush()
    }

    fn alert(&mut self, alert: &crate::alert::Alert) -> io::Result<()> {
        use crate::alert::Level;
        let tag = match alert.severity {
            Level::Ok => "RESOLVED",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
        };
        let limit = alert
            .limit_bytes
            .map_or("no limit".into(), |l| human_bytes(l as f64));
        let pct = alert
            .limit_bytes
            .filter(|&l| l > 0)
            .map_or(String::new(), |l| {
                format!(" ({:.0}%)", alert.usage_bytes as f64 * 100.0 / l as f64)
            });
        let eta = alert
            .eta_s
            .map_or(String::new(), |e| format!(", OOM in ~{e:.0} s"));
        writeln!(
            self.out,
            "!!! tracer {tag}: pid {}: {} — {} of {limit}{pct}{eta}",
            alert.pid,
            alert.reason,
            human_bytes(alert.usage_bytes as f64)
        )?;
        for site in alert.top_sites.iter().take(5) {
            writeln!(self.out, "!!!   {} {}", growth_of(site), chain(site, 3))?;
        }
        self.out.flush()
    }

    fn oom_kill(&mut self, kill: &crate::alert::OomKill) -> io::Result<()> {
        let rss = kill.anon_rss_bytes.map_or(String::new(), |b| {
            format!(" with {} anonymous RSS", human_bytes(b as f64))
        });
        writeln!(
            self.out,
            "!!! tracer: pid {} was killed by the kernel's OOM killer{rss} ({}); holding memory then:",
            kill.pid, kill.detected_by
        )?;
        for site in kill.top_sites.iter().take(5) {
            writeln!(
                self.out,
                "!!!   {} {} {}",
                human_bytes(site.outstanding_bytes as f64),
                site.kind,
                chain(site, 3)
            )?;
        }
        self.out.flush()
    }

    fn cgroup(&mut self, totals: &crate::schema::CgroupTotals) -> io::Result<()> {
        let mut procs: Vec<&crate::schema::ProcessTotal> = totals.processes.iter().collect();
        procs.sort_by_key(|p| std::cmp::Reverse(p.total_outstanding_bytes));
        writeln!(
            self.out,
            "tracer: cgroup {}: {} outstanding in {} processes: {}",
            totals.cgroup,
            human_bytes(totals.total_outstanding_bytes as f64),
            procs.len(),
            procs
                .iter()
                .take(5)
                .map(|p| format!(
                    "{} ({}) {}{}",
                    p.comm,
                    p.pid,
                    human_bytes(p.total_outstanding_bytes as f64),
                    if p.ended { ", ended" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join("; ")
        )?;
        self.out.flush()
    }

    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        let how = match (exit.code, exit.signal) {
            (Some(c), _) => format!(" with status {c}"),
            (_, Some(s)) => format!(" killed by signal {s}"),
            _ => String::new(),
        };
        writeln!(self.out, "tracer: pid {} exited{how}", exit.pid)?;
        self.out.flush()
    }

    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()> {
        let comm = self.comm_of(snap.pid).to_owned();
        writeln!(
            self.out,
            "\n== tracer report: pid {} ({}), traced {elapsed_s:.1} s, ended: {}",
            snap.pid,
            comm,
            reason.describe()
        )?;
        writeln!(
            self.out,
            "{} outstanding in {} sites; {}",
            human_bytes(snap.total_outstanding_bytes as f64),
            snap.sites.len(),
            lost_line(&snap.lost)
        )?;
        let holders: Vec<&SiteReport> = snap
            .sites
            .iter()
            .filter(|s| s.outstanding_bytes > 0 || s.outstanding_count > 0)
            .take(self.top)
            .collect();
        if holders.is_empty() {
            writeln!(
                self.out,
                "No call site holds memory allocated since attach."
            )?;
        }
        for (i, site) in holders.iter().enumerate() {
            let what = match &site.start_function {
                Some(start) if site.kind == SiteKind::Timer => format!(
                    "{} timers pending running {} (no creation stack sampled yet)",
                    site.outstanding_count,
                    start.short(),
                ),
                // Read from the runtime's list: live ones, by state.
                Some(start) if !site.states.is_empty() => format!(
                    "{} goroutines alive running {}{}, growth {}",
                    site.outstanding_count,
                    start.short(),
                    states(site),
                    growth_of(site),
                ),
                Some(start) => format!(
                    "{} goroutines alive running {}, growth {}, {} created / {} exited",
                    site.outstanding_count,
                    start.short(),
                    growth_of(site),
                    site.allocs,
                    site.frees
                ),
                None if site.kind == SiteKind::Timer => format!(
                    "{} timers pending, growth {}, {} created / {} stopped or fired",
                    site.outstanding_count,
                    growth_of(site),
                    site.allocs,
                    site.frees
                ),
                None => format!(
                    "{}{} in {} blocks ({}), growth {}, {} allocs / {} frees",
                    if site.sampled { "~" } else { "" },
                    human_bytes(site.outstanding_bytes as f64),
                    site.outstanding_count,
                    site.kind,
                    growth_of(site),
                    site.allocs,
                    site.frees
                ),
            };
            let peak = if site.peak.bytes > site.outstanding_bytes {
                format!(
                    " (peak {} at {})",
                    human_bytes(site.peak.bytes as f64),
                    site.peak.at.as_deref().unwrap_or("?")
                )
            } else {
                String::new()
            };
            writeln!(
                self.out,
                "\n#{} {what}{peak}{}",
                i + 1,
                if site.truncated {
                    " [stack truncated: build with -fno-omit-frame-pointer for full stacks]"
                } else {
                    ""
                }
            )?;
            for f in site.frames.iter() {
                let inl = if f.inlined { " (inlined)" } else { "" };
                writeln!(self.out, "      {}{inl}", f.short())?;
            }
        }
        // What the program's own teardown freed (an interpreter frees its
        // heap at exit): the sites that held most at their peak.
        let mut freed: Vec<&SiteReport> = snap
            .sites
            .iter()
            .filter(|s| s.peak.bytes > 0 && s.outstanding_bytes < s.peak.bytes / 2)
            .collect();
        freed.sort_by_key(|s| std::cmp::Reverse(s.peak.bytes));
        if !freed.is_empty() {
            writeln!(
                self.out,
                "\nHeld more earlier (peak since attach, now mostly freed):"
            )?;
            for site in freed.iter().take(self.top.min(5)) {
                writeln!(
                    self.out,
                    "  {} at {} (now {}): {}",
                    human_bytes(site.peak.bytes as f64),
                    site.peak.at.as_deref().unwrap_or("?"),
                    human_bytes(site.outstanding_bytes as f64),
                    chain(site, 4)
                )?;
            }
        }
        for image in &snap.previous_images {
            writeln!(
                self.out,
                "\nBefore it exec'd, {} held {} (at {}):",
                image.exe,
                human_bytes(image.total_outstanding_bytes as f64),
                humantime::format_rfc3339_seconds(image.replaced_at)
            )?;
            for site in image
                .sites
                .iter()
                .filter(|s| s.outstanding_bytes > 0 || s.outstanding_count > 0)
                .take(self.top.min(5))
            {
                let held = if site.outstanding_bytes > 0 {
                    human_bytes(site.outstanding_bytes as f64)
                } else {
                    format!("{} {}s", site.outstanding_count, site.kind)
                };
                writeln!(self.out, "  {held}: {}", chain(site, 4))?;
            }
        }
        for (kind, what) in [
            (SiteKind::Goroutine, "goroutines alive"),
            (SiteKind::Timer, "timers pending"),
        ] {
            if let Some(top) = snap
                .sites
                .iter()
                .filter(|s| s.kind == kind && s.outstanding_count > 0)
                .max_by_key(|s| s.outstanding_count)
            {
                let user = top.culprit().map_or("[unknown]".into(), |f| f.short());
                writeln!(
                    self.out,
                    "\nMost {what}: {user}, {} ({})",
                    top.outstanding_count,
                    match &top.start_function {
                        Some(f) if top.kind == SiteKind::Timer => {
                            format!("timers running {}", f.function)
                        }
                        Some(f) => format!("running {}", f.function),
                        None => format!("growth {}", growth_of(top)),
                    }
                )?;
            }
        }
        if let Some(top) = holders.iter().find(|s| s.outstanding_bytes > 0) {
            let culprit = top.culprit().map_or("[unknown]".into(), |f| f.short());
            writeln!(
                self.out,
                "\nLargest holder: {culprit}, {} outstanding ({} blocks never freed)",
                human_bytes(top.outstanding_bytes as f64),
                top.outstanding_count
            )?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::AttachedProbe;

    #[test]
    fn each_probed_file_is_named_once() {
        let probe = |path: &str| AttachedProbe {
            function: "f".into(),
            path: path.into(),
            offset: 0,
            program: "p".into(),
        };
        let info = Attached {
            schema_version: 2,
            pid: 1,
            parent_pid: None,
            comm: "a".into(),
            exe: "/bin/a".into(),
            go_version: None,
            probes: vec![
                probe("/lib/libc.so.6"),
                probe("/bin/a"),
                probe("/lib/libc.so.6"),
            ],
            unwind: None,
            kernel: None,
            metrics: None,
        };
        assert_eq!(probed_files(&info), ["/lib/libc.so.6", "/bin/a"]);
    }

    #[test]
    fn truncation_is_not_listed_as_a_loss() {
        let mut values = [0u64; tracer_common::COUNTER_COUNT as usize];
        assert_eq!(lost_line(&Lost::from_counters(&values, 0)), "lost: nothing");
        assert_eq!(
            lost_line(&Lost::from_counters(&values, 13)),
            "lost: nothing; 13 sites with truncated stacks"
        );
        values[tracer_common::Counter::StackLost as usize] = 2;
        assert_eq!(
            lost_line(&Lost::from_counters(&values, 0)),
            "lost: 2 stacks unrecorded (stack table full, raise --max-stacks)"
        );
    }

    #[test]
    fn user_frames() {
        for f in [
            "main.leakTimers",
            "github.com/acme/svc/cache.(*LRU).Put",
            "leak_malloc",
        ] {
            assert!(is_user_frame(f), "{f}");
        }
        for f in [
            "time.AfterFunc",
            "context.WithTimeout",
            "runtime.newobject",
            "net/http.(*conn).serve",
            "[unknown]",
        ] {
            assert!(!is_user_frame(f), "{f}");
        }
    }
}
