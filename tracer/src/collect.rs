//! Stage 5a: collect — read the kernel's per-site statistics each interval,
//! symbolize new stacks once, and compute each site's growth.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use tracer_common::{Counter, Kind, MAX_STACK_DEPTH, STACK_ID_NONE};

pub use crate::schema::{
    Activity, Frames, Lost, ModuleMapping, SiteKind, SiteReport, Snapshot, site_id,
};
use crate::{
    error::TracerError,
    go::GoTarget,
    kernel::{Counters, Kernel},
    symbolize::{Frame, RawSite, Symbolizer, ends_at_root, trim_at_root},
};

struct SiteHistory {
    samples: VecDeque<(Instant, i64, i64)>,
}

/// Reads the kernel maps and keeps what is needed across intervals.
pub struct Collector {
    pid: u32,
    window: Duration,
    symbols: Symbolizer,
    stacks: HashMap<u32, (Frames, bool)>,
    history: HashMap<String, SiteHistory>,
    /// Each site's peak since attach, by site id.
    peaks: HashMap<String, crate::schema::Peak>,
    go: Option<GoTarget>,
}

impl Collector {
    pub fn new(pid: u32, symbols: Symbolizer, window: Duration) -> Self {
        Self {
            pid,
            window,
            symbols,
            stacks: HashMap::new(),
            history: HashMap::new(),
            peaks: HashMap::new(),
            go: None,
        }
    }

    /// Enables the Go sites (goroutines, sampled heap) for a Go target.
    pub fn with_go(mut self, go: GoTarget) -> Self {
        self.go = Some(go);
        self
    }

    pub fn go_mut(&mut self) -> Option<&mut GoTarget> {
        self.go.as_mut()
    }

    pub fn symbolizer_mut(&mut self) -> &mut Symbolizer {
        &mut self.symbols
    }

    /// The site's peak so far, this snapshot included: by bytes, or by
    /// count for sites that hold none (goroutines, timers).
    fn peak(&mut self, report: &SiteReport) -> crate::schema::Peak {
        let peak = self.peaks.entry(report.site_id.clone()).or_default();
        let higher = if report.outstanding_bytes > 0 || peak.bytes > 0 {
            report.outstanding_bytes > peak.bytes
        } else {
            report.outstanding_count > peak.count
        };
        if higher {
            peak.bytes = report.outstanding_bytes;
            peak.count = report.outstanding_count;
            peak.at = Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string());
        }
        peak.clone()
    }

    /// Takes a snapshot now.
    pub fn collect(&mut self, kernel: &mut Kernel) -> Result<Snapshot, TracerError> {
        let now = Instant::now();
        // Pending timers from the runtime's heaps (None: the kernel's
        // probes count them).
        let timers = self.go.as_mut().and_then(|g| g.timer_census(kernel));
        let sites = kernel.sites(self.pid);
        let kernel: &Kernel = kernel;
        let mut raw = Vec::new();
        for (key, stats) in sites {
            let Some(kind) = Kind::from_u32(key.kind) else {
                log::warn!(
                    "site of unknown kind {} in the kernel map: skipped",
                    key.kind
                );
                continue;
            };
            let (mut frames, truncated) = self.frames_for(kernel, key.stack_id);
            if kind == Kind::Timer {
                // The runtime's own timer frames say nothing about the site.
                let internal = frames
                    .iter()
                    .take_while(|f| {
                        f.function.starts_with("runtime.(*timer)")
                            || f.function == "time.newTimer"
                            || f.function == "time.startTimer"
                    })
                    .count();
                if internal < frames.len() {
                    frames = frames[internal..].into();
                }
            }
            let mut site = RawSite {
                kind: kind.into(),
                frames,
                truncated,
                start_function: None,
                sampled: kernel.sizes.sample_bytes > 0 && kind == Kind::Heap,
                bytes: stats.outstanding_bytes,
                count: stats.outstanding_count,
                allocs: stats.allocs,
                frees: stats.frees,
                alloc_bytes: stats.alloc_bytes,
                states: Default::default(),
            };
            if let (Kind::Timer, Some(t)) = (kind, &timers) {
                // `allocs`: the creations the sampled probe saw.
                let n = t.by_stack.get(&key.stack_id).copied().unwrap_or_default();
                site.count = (n.seen + n.estimated) as i64;
                site.frees = t.retired.get(&key.stack_id).copied().unwrap_or(0);
                site.sampled = n.estimated > 0;
            }
            raw.push(site);
        }
        if let Some(t) = &timers {
            // Timers no sampled creation names yet: no creation stack, only
            // the function they will run (as a goroutine's start function).
            for (&callback, &n) in &t.by_callback {
                raw.push(RawSite {
                    kind: Kind::Timer.into(),
                    frames: Frames::from([]),
                    truncated: false,
                    start_function: self.symbols.symbolize_stack(&[callback + 1]).pop(),
                    sampled: true,
                    bytes: 0,
                    count: n as i64,
                    allocs: 0,
                    frees: 0,
                    alloc_bytes: 0,
                    states: Default::default(),
                });
            }
        }
        if let Some(go) = self.go.as_mut() {
            raw.extend(go.sites(kernel, &mut self.symbols)?);
        }
        let mut counters = kernel.counters()?;
        if let Some(t) = &timers {
            counters.0[Counter::TimersRetired as usize] += t.retired.values().sum::<u64>();
        }
        Ok(self.build(kernel, raw, counters, now))
    }

    fn build(
        &mut self,
        kernel: &Kernel,
        sites: Vec<RawSite>,
        counters: Counters,
        now: Instant,
    ) -> Snapshot {
        // Several kernel stacks can symbolize to one call site (they differ
        // only in frames cut as junk): merge them, summing their statistics.
        let mut merged: HashMap<String, (SiteReport, i64, i64)> = HashMap::new();
        let mut live = 0u64;
        for site in sites {
            let id = site_id(
                site.kind,
                site.frames.iter().chain(site.start_function.as_ref()),
            );
            let entry = merged.entry(id.clone()).or_insert_with(|| {
                (
                    SiteReport {
                        site_id: id,
                        kind: site.kind,
                        outstanding_bytes: 0,
                        outstanding_count: 0,
                        allocs: 0,
                        frees: 0,
                        alloc_bytes: 0,
                        growth_bytes_per_s: 0.0,
                        growth_count_per_s: 0.0,
                        peak: Default::default(),
                        states: Default::default(),
                        start_function: site.start_function.clone(),
                        sampled: site.sampled,
                        truncated: site.truncated,
                        frames: site.frames.clone(),
                        process: None,
                    },
                    0,
                    0,
                )
            });
            entry.1 += site.bytes;
            entry.2 += site.count;
            entry.0.allocs += site.allocs;
            entry.0.frees += site.frees;
            entry.0.alloc_bytes += site.alloc_bytes;
            for (state, n) in site.states {
                *entry.0.states.entry(state).or_default() += n;
            }
        }
        let mut reports = Vec::with_capacity(merged.len());
        for (_, (mut report, bytes, count)) in merged {
            (report.growth_bytes_per_s, report.growth_count_per_s) =
                self.growth(&report.site_id, bytes, count, now);
            // A free may land an instant before its alloc's increment on
            // another CPU: clamp the transient negative.
            report.outstanding_bytes = bytes.max(0) as u64;
            report.outstanding_count = count.max(0) as u64;
            report.peak = self.peak(&report);
            live += report.outstanding_count;
            reports.push(report);
        }
        self.history.retain(|_, h| {
            h.samples
                .back()
                .is_some_and(|(t, _, _)| now.duration_since(*t) < Duration::from_secs(600))
        });
        reports.sort_by(SiteReport::rank);
        let mappings = self.mappings_of(&reports);
        let truncated = reports.iter().filter(|r| r.truncated).count() as u64;
        let lost = Lost::from_counters(&counters.0, truncated);
        let activity = Activity::from_counters(
            &counters.0,
            live as f64 / f64::from(kernel.sizes.allocs.max(1)),
            reports.len() as f64 / f64::from(kernel.sizes.sites.max(1)),
        );
        Snapshot {
            ts: SystemTime::now(),
            pid: self.pid,
            total_outstanding_bytes: reports.iter().map(|r| r.outstanding_bytes).sum(),
            sites: reports,
            lost,
            activity,
            memory: None,
            mappings,
            overhead: None,
            previous_images: Vec::new(),
        }
    }

    /// The executable mappings the reports' frames point into.
    fn mappings_of(&self, reports: &[SiteReport]) -> Vec<ModuleMapping> {
        let modules: std::collections::HashSet<&str> = reports
            .iter()
            .flat_map(|r| r.frames.iter().chain(&r.start_function))
            .filter_map(|f| f.module.as_deref())
            .collect();
        self.symbols
            .maps()
            .mappings
            .iter()
            .filter(|m| m.executable)
            .filter_map(|m| {
                let path = m.display_name();
                modules.contains(path.as_str()).then_some(ModuleMapping {
                    path,
                    start: m.start,
                    end: m.end,
                    offset: m.offset,
                })
            })
            .collect()
    }

    /// Symbolized frames of a stack, computed once per stack id: the kernel
    /// never reuses an id for another stack (no BPF_F_REUSE_STACKID).
    fn frames_for(&mut self, kernel: &Kernel, stack_id: u32) -> (Frames, bool) {
        if stack_id == STACK_ID_NONE {
            return (
                vec![
                    Frame::unknown(0, Some(crate::symbolize::UNMAPPED.into()))
                        .named("[unknown stack]"),
                ]
                .into(),
                true,
            );
        }
        if let Some(cached) = self.stacks.get(&stack_id) {
            return cached.clone();
        }
        let stack = kernel.stack(stack_id).unwrap_or_default();
        log::trace!("stack {stack_id:#x}: {:x?} end {:?}", stack.ips, stack.end);
        let mut ips = stack.ips;
        let recorded = ips.len();
        let left_the_stack = cut_at_non_code(&mut ips, self.symbols.maps());
        let mut frames = self.symbols.symbolize_stack(&ips);
        let truncated = match stack.end {
            // The DWARF walker knows whether it reached the thread's root.
            Some(end) => {
                if end == tracer_common::unwind::end::ROOT && !left_the_stack {
                    trim_at_root(&mut frames, recorded, MAX_STACK_DEPTH);
                    false
                } else {
                    true
                }
            }
            None => {
                let mut truncated = trim_at_root(&mut frames, recorded, MAX_STACK_DEPTH);
                if left_the_stack && !ends_at_root(&frames) {
                    truncated = true;
                }
                truncated
            }
        };
        let frames: Frames = frames.into();
        // An address outside every known mapping may be a library loaded since
        // the last maps snapshot: do not cache, retry next interval.
        if !frames.iter().any(|f| f.module.is_none()) {
            self.stacks.insert(stack_id, (frames.clone(), truncated));
        }
        (frames, truncated)
    }

    /// Least-squares slopes of outstanding bytes and count over the trend window.
    fn growth(&mut self, site: &str, bytes: i64, count: i64, now: Instant) -> (f64, f64) {
        let h = self
            .history
            .entry(site.to_string())
            .or_insert_with(|| SiteHistory {
                samples: VecDeque::new(),
            });
        h.samples.push_back((now, bytes, count));
        while h
            .samples
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > self.window)
        {
            h.samples.pop_front();
        }
        let Some(&(t0, _, _)) = h.samples.front() else {
            return (0.0, 0.0);
        };
        let series = |pick: fn(&(Instant, i64, i64)) -> i64| -> Vec<(f64, f64)> {
            h.samples
                .iter()
                .map(|s| (s.0.duration_since(t0).as_secs_f64(), pick(s) as f64))
                .collect()
        };
        (slope(&series(|s| s.1)), slope(&series(|s| s.2)))
    }
}

/// Cuts a recorded stack at its first address outside executable memory;
/// true when it did. A frame-pointer walk through code built without frame
/// pointers reads stack contents, data or text as return addresses: the
/// walk has left the stack there. (ip-1: a return address may end its
/// mapping.)
fn cut_at_non_code(ips: &mut Vec<u64>, maps: &crate::target::Maps) -> bool {
    match ips
        .iter()
        .position(|&ip| !maps.is_code(ip.saturating_sub(1)))
    {
        Some(i) => {
            ips.truncate(i);
            true
        }
        None => false,
    }
}

/// Least-squares slope of `y` over `x`; 0 with fewer than two distinct x.
pub fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx < 1e-12 {
        return 0.0;
    }
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    sxy / sxx
}

impl Frame {
    fn named(mut self, name: &str) -> Self {
        self.function = name.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_end_where_they_leave_executable_memory() {
        let maps = crate::target::Maps::parse(
            b"55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234 /usr/bin/demo\n\
              7f1e2a026000-7f1e2a17b000 r-xp 00026000 fe:01 42 /usr/lib/libc.so.6\n",
        )
        .unwrap();
        let mut ips = vec![
            0x55d0c0a01100,
            0x7f1e2a030000,
            0x646d65747379732f,
            0x55d0c0a01200,
        ];
        assert!(cut_at_non_code(&mut ips, &maps));
        assert_eq!(ips, [0x55d0c0a01100, 0x7f1e2a030000]);
        let mut whole = vec![0x55d0c0a01100, 0x55d0c0a02000];
        assert!(
            !cut_at_non_code(&mut whole, &maps),
            "a return address may end its mapping"
        );
        assert_eq!(whole.len(), 2);
    }

    #[test]
    fn slope_of_lines() {
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, 100.0 + 5.0 * i as f64))
            .collect();
        assert!((slope(&pts) - 5.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 3.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 3.0), (1.0, 9.0)]), 0.0);
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 7.0)).collect();
        assert_eq!(slope(&flat), 0.0);
    }
}
