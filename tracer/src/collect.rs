//! Stage 5a: collect — read the kernel's per-site statistics each interval,
//! symbolize new stacks once, and compute each site's growth.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tracer_common::{Counter, Kind, MAX_STACK_DEPTH, STACK_ID_NONE, SiteKey, SiteStats};

use crate::{
    bpf::{Counters, Kernel},
    error::TracerError,
    symbolize::{Frame, Symbolizer, trim_at_root},
};

/// One call site in a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    /// Stable short id of the site (hash of kind and frames).
    pub site_id: String,
    pub kind: &'static str,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub alloc_bytes: u64,
    /// Growth of outstanding bytes over the trend window, bytes per second.
    pub growth_bytes_per_s: f64,
    /// The recorded stack lacks its outer frames (see README).
    pub truncated: bool,
    /// Innermost first.
    pub frames: Vec<Frame>,
}

/// Everything the kernel side could not account, shown to the user.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Lost {
    /// Live blocks not tracked: the address map was full.
    pub addr_map_full: u64,
    /// Allocations not accounted: the site map was full.
    pub site_map_full: u64,
    /// Allocations whose stack could not be recorded (accounted as "[unknown stack]").
    pub stacks_lost: u64,
    /// Allocator calls lost: the per-thread map was full.
    pub pending_map_full: u64,
    /// Allocator returns that could not be matched to their call.
    pub unmatched_returns: u64,
    /// Sites whose stack is truncated.
    pub truncated_stacks: u64,
}

/// Informational counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Activity {
    pub alloc_calls: u64,
    pub free_calls: u64,
    pub failed_allocs: u64,
    pub nested_calls: u64,
    pub untracked_frees: u64,
    pub stale_entries: u64,
    pub partial_unmaps: u64,
    /// Fill of the address map, 0..1.
    pub addr_map_fill: f64,
    /// Fill of the site map, 0..1.
    pub site_map_fill: f64,
}

/// The state of the target at one instant.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// When the maps were read (the JSON envelope's `ts`).
    #[serde(skip)]
    pub ts: SystemTime,
    pub pid: u32,
    /// Sorted by outstanding bytes, descending.
    pub sites: Vec<SiteReport>,
    pub lost: Lost,
    pub activity: Activity,
    pub total_outstanding_bytes: u64,
}

struct SiteHistory {
    samples: VecDeque<(Instant, i64)>,
}

/// Reads the kernel maps and keeps what is needed across intervals.
pub struct Collector {
    pid: u32,
    window: Duration,
    symbols: Symbolizer,
    stacks: HashMap<u32, (Vec<Frame>, bool)>,
    history: HashMap<String, SiteHistory>,
}

impl Collector {
    pub fn new(pid: u32, symbols: Symbolizer, window: Duration) -> Self {
        Self {
            pid,
            window,
            symbols,
            stacks: HashMap::new(),
            history: HashMap::new(),
        }
    }

    pub fn symbolizer_mut(&mut self) -> &mut Symbolizer {
        &mut self.symbols
    }

    /// Takes a snapshot now.
    pub fn collect(&mut self, kernel: &Kernel) -> Result<Snapshot, TracerError> {
        let now = Instant::now();
        let sites = kernel.sites()?;
        let counters = kernel.counters()?;
        Ok(self.build(kernel, sites, counters, now))
    }

    fn build(
        &mut self,
        kernel: &Kernel,
        sites: Vec<(SiteKey, SiteStats)>,
        counters: Counters,
        now: Instant,
    ) -> Snapshot {
        // Several kernel stacks can symbolize to one call site (they differ
        // only in frames cut as junk): merge them, summing their statistics.
        let mut merged: HashMap<String, (SiteReport, i64, i64)> = HashMap::new();
        let mut live = 0u64;
        for (key, stats) in sites {
            let (frames, truncated) = self.frames_for(kernel, key.stack_id);
            let kind = Kind::from_u32(key.kind).map_or("unknown", Kind::as_str);
            let id = site_id(kind, &frames);
            let entry = merged.entry(id.clone()).or_insert_with(|| {
                (
                    SiteReport {
                        site_id: id,
                        kind,
                        outstanding_bytes: 0,
                        outstanding_count: 0,
                        allocs: 0,
                        frees: 0,
                        alloc_bytes: 0,
                        growth_bytes_per_s: 0.0,
                        truncated,
                        frames,
                    },
                    0,
                    0,
                )
            });
            entry.1 += stats.outstanding_bytes;
            entry.2 += stats.outstanding_count;
            entry.0.allocs += stats.allocs;
            entry.0.frees += stats.frees;
            entry.0.alloc_bytes += stats.alloc_bytes;
        }
        let mut reports = Vec::with_capacity(merged.len());
        for (_, (mut report, bytes, count)) in merged {
            report.growth_bytes_per_s = self.growth(&report.site_id, bytes, now);
            // A free may land an instant before its alloc's increment on
            // another CPU: clamp the transient negative.
            report.outstanding_bytes = bytes.max(0) as u64;
            report.outstanding_count = count.max(0) as u64;
            live += report.outstanding_count;
            reports.push(report);
        }
        self.history.retain(|_, h| {
            h.samples
                .back()
                .is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_secs(600))
        });
        reports.sort_by(|a, b| {
            b.outstanding_bytes
                .cmp(&a.outstanding_bytes)
                .then(b.allocs.cmp(&a.allocs))
                .then(a.site_id.cmp(&b.site_id))
        });
        let lost = Lost {
            addr_map_full: counters.get(Counter::AddrMapFull),
            site_map_full: counters.get(Counter::SiteMapFull),
            stacks_lost: counters.get(Counter::StackLost),
            pending_map_full: counters.get(Counter::PendingMapFull),
            unmatched_returns: counters.get(Counter::UnmatchedReturns),
            truncated_stacks: reports.iter().filter(|r| r.truncated).count() as u64,
        };
        let activity = Activity {
            alloc_calls: counters.get(Counter::AllocCalls),
            free_calls: counters.get(Counter::FreeCalls),
            failed_allocs: counters.get(Counter::FailedAllocs),
            nested_calls: counters.get(Counter::NestedCalls),
            untracked_frees: counters.get(Counter::UntrackedFrees),
            stale_entries: counters.get(Counter::StalePending),
            partial_unmaps: counters.get(Counter::PartialUnmaps),
            addr_map_fill: live as f64 / f64::from(kernel.sizes.allocs.max(1)),
            site_map_fill: reports.len() as f64 / f64::from(kernel.sizes.sites.max(1)),
        };
        Snapshot {
            ts: SystemTime::now(),
            pid: self.pid,
            total_outstanding_bytes: reports.iter().map(|r| r.outstanding_bytes).sum(),
            sites: reports,
            lost,
            activity,
        }
    }

    /// Symbolized frames of a stack, computed once per stack id: the kernel
    /// never reuses an id for another stack (no BPF_F_REUSE_STACKID).
    fn frames_for(&mut self, kernel: &Kernel, stack_id: u32) -> (Vec<Frame>, bool) {
        if stack_id == STACK_ID_NONE {
            return (vec![Frame::unknown(0, None).named("[unknown stack]")], true);
        }
        if let Some(cached) = self.stacks.get(&stack_id) {
            return cached.clone();
        }
        let ips = kernel.stack(stack_id).unwrap_or_default();
        let mut frames = self.symbols.symbolize_stack(&ips);
        let truncated = trim_at_root(&mut frames, ips.len(), MAX_STACK_DEPTH);
        // An address outside every known mapping may be a library loaded since
        // the last maps snapshot: do not cache, retry next interval.
        if !frames.iter().any(|f| f.module.is_none()) {
            self.stacks.insert(stack_id, (frames.clone(), truncated));
        }
        (frames, truncated)
    }

    /// Least-squares slope of outstanding bytes over the trend window.
    fn growth(&mut self, site: &str, bytes: i64, now: Instant) -> f64 {
        let h = self
            .history
            .entry(site.to_string())
            .or_insert_with(|| SiteHistory {
                samples: VecDeque::new(),
            });
        h.samples.push_back((now, bytes));
        while h
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
        {
            h.samples.pop_front();
        }
        let Some(&(t0, _)) = h.samples.front() else {
            return 0.0;
        };
        let pts: Vec<(f64, f64)> = h
            .samples
            .iter()
            .map(|(t, b)| (t.duration_since(t0).as_secs_f64(), *b as f64))
            .collect();
        slope(&pts)
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

/// A short id that stays the same for a site across runs of the same binary.
pub fn site_id(kind: &str, frames: &[Frame]) -> String {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(kind.as_bytes());
    for f in frames {
        eat(f.function.as_bytes());
        eat(&f.line.unwrap_or(0).to_le_bytes());
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
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

    #[test]
    fn site_ids_are_stable_and_distinct() {
        let fr = |n: &str, l| Frame {
            function: n.into(),
            file: None,
            line: Some(l),
            module: None,
            addr: 0,
            inlined: false,
        };
        let a = site_id("heap", &[fr("leak", 10), fr("main", 3)]);
        assert_eq!(a, site_id("heap", &[fr("leak", 10), fr("main", 3)]));
        assert_ne!(a, site_id("mmap", &[fr("leak", 10), fr("main", 3)]));
        assert_ne!(a, site_id("heap", &[fr("leak", 11), fr("main", 3)]));
        assert_eq!(a.len(), 12);
    }
}
