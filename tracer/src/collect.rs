//! Stage 5a: collect — read the kernel's per-site statistics each interval,
//! symbolize new stacks once, and compute each site's growth.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Deserializer, Serialize};
use tracer_common::{Counter, Kind, MAX_STACK_DEPTH, STACK_ID_NONE};

use crate::{
    error::TracerError,
    kernel::{Counters, Kernel},
    symbolize::{Frame, Symbolizer, trim_at_root},
};

/// One call site in a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteReport {
    /// Stable short id of the site (hash of kind and frames).
    pub site_id: String,
    #[serde(deserialize_with = "de_kind")]
    pub kind: KindName,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub allocs: u64,
    pub frees: u64,
    pub alloc_bytes: u64,
    /// Growth of outstanding bytes over the trend window, bytes per second.
    pub growth_bytes_per_s: f64,
    /// Growth of the outstanding count over the trend window, per second
    /// (goroutines and timers grow in count).
    pub growth_count_per_s: f64,
    /// For goroutine sites: the goroutine's start function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_function: Option<Frame>,
    /// Figures are estimates scaled up from samples (Go's heap profile,
    /// `--sample-bytes`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    /// The recorded stack lacks its outer frames (see README).
    pub truncated: bool,
    /// Innermost first.
    pub frames: Vec<Frame>,
}

impl SiteReport {
    /// The frame to name as the culprit: the program's own code nearest the
    /// allocation, past allocator and standard-library frames.
    pub fn culprit(&self) -> Option<&Frame> {
        self.frames
            .iter()
            .find(|f| crate::symbolize::is_user_frame(&f.function))
            .or(self.frames.first())
    }
}

/// Everything the kernel side could not account, shown to the user.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
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
    /// Go goroutines, timers or heap samples not tracked: a Go map was full.
    pub go_map_full: u64,
    /// Go runtime structures that could not be read (goroutines, timers).
    pub go_read_errors: u64,
}

/// Informational counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Activity {
    pub alloc_calls: u64,
    pub free_calls: u64,
    pub failed_allocs: u64,
    pub nested_calls: u64,
    pub untracked_frees: u64,
    pub stale_entries: u64,
    pub partial_unmaps: u64,
    /// Allocations left out by `--sample-bytes`.
    pub unsampled: u64,
    /// Goroutines created / exited since attach.
    pub goroutines_created: u64,
    pub goroutines_exited: u64,
    /// Go heap samples recorded / freed since attach.
    pub go_samples: u64,
    pub go_sample_frees: u64,
    /// Timers created / retired since attach.
    pub timers_created: u64,
    pub timers_retired: u64,
    /// Fill of the address map, 0..1.
    pub addr_map_fill: f64,
    /// Fill of the site map, 0..1.
    pub site_map_fill: f64,
}

/// The state of the target at one instant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the maps were read (the JSON envelope's `ts`).
    #[serde(skip, default = "SystemTime::now")]
    pub ts: SystemTime,
    pub pid: u32,
    /// Sorted by outstanding bytes, descending.
    pub sites: Vec<SiteReport>,
    pub lost: Lost,
    pub activity: Activity,
    pub total_outstanding_bytes: u64,
    /// The target's memory against its limit (set by the session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::alert::MemoryStatus>,
    /// The executable mappings of the modules the sites' frames are in (for
    /// pprof's mapping table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<ModuleMapping>,
}

/// Where a module's code was mapped in the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleMapping {
    /// The path as the target sees it (frames' `module`).
    pub path: String,
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
}

/// A site kind's name (`heap`, `goroutine`…). An alias keeps serde from
/// tying deserialized snapshots to a `'static` input.
pub type KindName = &'static str;

/// Kinds are a closed set: map a recorded name back to its static name.
fn de_kind<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let name = String::deserialize(d)?;
    (0..)
        .map_while(Kind::from_u32)
        .map(Kind::as_str)
        .find(|k| *k == name)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown site kind `{name}`")))
}

struct SiteHistory {
    samples: VecDeque<(Instant, i64, i64)>,
}

/// One site as read from a kernel map, before merging.
struct Raw {
    kind: &'static str,
    frames: Vec<Frame>,
    truncated: bool,
    start_function: Option<Frame>,
    sampled: bool,
    bytes: i64,
    count: i64,
    allocs: u64,
    frees: u64,
    alloc_bytes: u64,
}

/// The Go side of a target: its runtime's memory and heap sampling rate.
pub struct GoState {
    pub mem: crate::golang::RuntimeMem,
    /// Sampling rate last read from the target (for scaling).
    pub rate: u64,
    pub plan: crate::probes::GoPlan,
}

/// Reads the kernel maps and keeps what is needed across intervals.
pub struct Collector {
    pid: u32,
    window: Duration,
    symbols: Symbolizer,
    stacks: HashMap<u32, (Vec<Frame>, bool)>,
    history: HashMap<String, SiteHistory>,
    go: Option<GoState>,
    /// Resolved goroutine start functions by startpc.
    starts: HashMap<u64, Frame>,
}

impl Collector {
    pub fn new(pid: u32, symbols: Symbolizer, window: Duration) -> Self {
        Self {
            pid,
            window,
            symbols,
            stacks: HashMap::new(),
            history: HashMap::new(),
            go: None,
            starts: HashMap::new(),
        }
    }

    /// Enables the Go sites (goroutines, sampled heap) for a Go target.
    pub fn with_go(mut self, go: GoState) -> Self {
        self.go = Some(go);
        self
    }

    pub fn go_mut(&mut self) -> Option<&mut GoState> {
        self.go.as_mut()
    }

    pub fn symbolizer_mut(&mut self) -> &mut Symbolizer {
        &mut self.symbols
    }

    /// Takes a snapshot now.
    pub fn collect(&mut self, kernel: &Kernel) -> Result<Snapshot, TracerError> {
        let now = Instant::now();
        let mut raw = Vec::new();
        for (key, stats) in kernel.sites()? {
            let (mut frames, truncated) = self.frames_for(kernel, key.stack_id);
            if key.kind == Kind::Timer as u32 {
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
                    frames.drain(..internal);
                }
            }
            raw.push(Raw {
                kind: Kind::from_u32(key.kind).map_or("unknown", Kind::as_str),
                frames,
                truncated,
                start_function: None,
                sampled: kernel.sizes.sample_bytes > 0 && key.kind == Kind::Heap as u32,
                bytes: stats.outstanding_bytes,
                count: stats.outstanding_count,
                allocs: stats.allocs,
                frees: stats.frees,
                alloc_bytes: stats.alloc_bytes,
            });
        }
        if self.go.is_some() {
            self.go_sites(kernel, &mut raw)?;
        }
        let counters = kernel.counters()?;
        Ok(self.build(kernel, raw, counters, now))
    }

    /// Goroutine sites (exact counts) and sampled heap sites (scaled like
    /// pprof's inuse_space).
    fn go_sites(&mut self, kernel: &Kernel, raw: &mut Vec<Raw>) -> Result<(), TracerError> {
        for (key, stats) in kernel.go_sites()? {
            // gopc is the return address of the `go` statement's call to
            // newproc; startpc is a function entry (+1 undoes the -1 applied
            // to return addresses).
            let frames = self.symbols.symbolize_stack(&[key.gopc]);
            let start = self.start_function(key.startpc);
            raw.push(Raw {
                kind: Kind::Goroutine.as_str(),
                frames,
                truncated: false,
                start_function: start,
                sampled: false,
                bytes: 0,
                count: stats.outstanding_count,
                allocs: stats.allocs,
                frees: stats.frees,
                alloc_bytes: 0,
            });
        }
        let Some(go) = self.go.as_mut() else {
            return Ok(());
        };
        // (bucket, sampled allocs, sampled frees, sampled live objects)
        let buckets: Vec<(u64, u64, u64, u64)> = if go.plan.mem_profile.is_some() {
            // Read from the runtime's own records; none yet in `run` before
            // the executable is mapped.
            go.mem
                .mem_buckets()
                .iter()
                .map(|b| (b.addr, b.allocs, b.frees, b.allocs.saturating_sub(b.frees)))
                .collect()
        } else {
            kernel
                .go_buckets()?
                .into_iter()
                .map(|(addr, s)| (addr, s.allocs, s.frees, s.outstanding_count.max(0) as u64))
                .collect()
        };
        if let Some(rate) = go.mem.rate() {
            go.rate = rate;
        }
        let rate = go.rate;
        for (addr, sampled_allocs, sampled_frees, live) in buckets {
            let Some(bucket) = go.mem.bucket(addr).cloned() else {
                continue;
            };
            let (objs, bytes) = crate::golang::scale_sample(live, bucket.size, rate);
            let (allocs, alloc_bytes) =
                crate::golang::scale_sample(sampled_allocs, bucket.size, rate);
            let (frees, _) = crate::golang::scale_sample(sampled_frees, bucket.size, rate);
            let mut frames = self.symbols.symbolize_stack(&bucket.stack);
            // The allocator's own frames say nothing about the call site.
            let internal = frames
                .iter()
                .take_while(|f| {
                    f.function.starts_with("runtime.malloc")
                        || f.function.starts_with("runtime.mProf")
                        || f.function == "runtime.profilealloc"
                })
                .count();
            if internal < frames.len() {
                frames.drain(..internal);
            }
            // The runtime already expanded inlined calls into PCs of their
            // own, which DWARF expands again: drop the repeats.
            frames
                .dedup_by(|b, a| a.function == b.function && a.file == b.file && a.line == b.line);
            let truncated = trim_at_root(&mut frames, bucket.stack.len(), 128);
            raw.push(Raw {
                kind: Kind::GoHeap.as_str(),
                frames,
                truncated,
                start_function: None,
                sampled: true,
                bytes: bytes.round() as i64,
                count: objs.round() as i64,
                allocs: allocs.round() as u64,
                frees: frees.round() as u64,
                alloc_bytes: alloc_bytes.round() as u64,
            });
        }
        Ok(())
    }

    /// The function a goroutine runs. For `go f(x)` Go ≥ 1.22 starts a
    /// generated `gowrapN` closure that calls f: report f, found by decoding
    /// the wrapper's first call outside the runtime.
    fn start_function(&mut self, startpc: u64) -> Option<Frame> {
        if let Some(f) = self.starts.get(&startpc) {
            return Some(f.clone());
        }
        // startpc is an entry, not a return address: +1 undoes the -1.
        let start = self.symbols.symbolize_stack(&[startpc + 1]).pop()?;
        let mut resolved = start.clone();
        if crate::golang::is_go_wrapper(&start.function)
            && let Some(code) = self
                .go
                .as_ref()
                .and_then(|g| g.mem.read_bytes(startpc, 256))
        {
            for target in crate::golang::call_targets(&code, startpc) {
                if let Some(f) = self.symbols.symbolize_stack(&[target + 1]).pop()
                    && !f.function.starts_with("runtime.")
                    && f.function != "[unknown]"
                {
                    resolved = f;
                    break;
                }
            }
        }
        self.starts.insert(startpc, resolved.clone());
        Some(resolved)
    }

    fn build(
        &mut self,
        kernel: &Kernel,
        sites: Vec<Raw>,
        counters: Counters,
        now: Instant,
    ) -> Snapshot {
        // Several kernel stacks can symbolize to one call site (they differ
        // only in frames cut as junk): merge them, summing their statistics.
        let mut merged: HashMap<String, (SiteReport, i64, i64)> = HashMap::new();
        let mut live = 0u64;
        for site in sites {
            let mut id_frames = site.frames.clone();
            id_frames.extend(site.start_function.clone());
            let id = site_id(site.kind, &id_frames);
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
                        start_function: site.start_function.clone(),
                        sampled: site.sampled,
                        truncated: site.truncated,
                        frames: site.frames.clone(),
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
        }
        let mut reports = Vec::with_capacity(merged.len());
        for (_, (mut report, bytes, count)) in merged {
            (report.growth_bytes_per_s, report.growth_count_per_s) =
                self.growth(&report.site_id, bytes, count, now);
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
                .is_some_and(|(t, _, _)| now.duration_since(*t) < Duration::from_secs(600))
        });
        reports.sort_by(|a, b| {
            b.outstanding_bytes
                .cmp(&a.outstanding_bytes)
                .then(b.allocs.cmp(&a.allocs))
                .then(a.site_id.cmp(&b.site_id))
        });
        let mappings = self.mappings_of(&reports);
        let lost = Lost {
            addr_map_full: counters.get(Counter::AddrMapFull),
            site_map_full: counters.get(Counter::SiteMapFull),
            stacks_lost: counters.get(Counter::StackLost),
            pending_map_full: counters.get(Counter::PendingMapFull),
            unmatched_returns: counters.get(Counter::UnmatchedReturns),
            truncated_stacks: reports.iter().filter(|r| r.truncated).count() as u64,
            go_map_full: counters.get(Counter::GoMapFull),
            go_read_errors: counters.get(Counter::GoReadErrors),
        };
        let activity = Activity {
            alloc_calls: counters.get(Counter::AllocCalls),
            free_calls: counters.get(Counter::FreeCalls),
            failed_allocs: counters.get(Counter::FailedAllocs),
            nested_calls: counters.get(Counter::NestedCalls),
            untracked_frees: counters.get(Counter::UntrackedFrees),
            stale_entries: counters.get(Counter::StalePending),
            partial_unmaps: counters.get(Counter::PartialUnmaps),
            unsampled: counters.get(Counter::Unsampled),
            goroutines_created: counters.get(Counter::GoroutinesCreated),
            goroutines_exited: counters.get(Counter::GoroutinesExited),
            go_samples: counters.get(Counter::GoSamples),
            go_sample_frees: counters.get(Counter::GoSampleFrees),
            timers_created: counters.get(Counter::TimersCreated),
            timers_retired: counters.get(Counter::TimersRetired),
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
            memory: None,
            mappings,
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
                let path = m.path.display().to_string();
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
