//! Go sites: goroutines by creation site, and the sampled heap by allocation
//! stack (from the runtime's own records, or the kernel's bucket counts for
//! stripped binaries), scaled like pprof's inuse_space.

use super::{GoTarget, call_targets, is_go_wrapper, scale_sample};
use crate::{
    error::TracerError,
    kernel::Kernel,
    schema::SiteKind,
    symbolize::{Frame, RawSite, Symbolizer, trim_at_root},
};

impl GoTarget {
    /// Once, when the goroutine list first outgrows what one snapshot
    /// reads: what the user should know about the counts.
    pub fn census_notice(&mut self) -> Option<String> {
        let (read, len, _) = self.census_progress?;
        if self.census_noticed {
            return None;
        }
        self.census_noticed = true;
        Some(format!(
            "{len} goroutine entries (live and dead): new entries are read at every snapshot, \
             older ones {read} per snapshot (--go-census-ms {}), so a goroutine's change of \
             state shows within about {} snapshots",
            self.census_budget.as_millis(),
            len.div_ceil(read.max(1))
        ))
    }

    /// Goroutine sites (exact counts) and sampled heap sites (scaled like
    /// pprof's inuse_space).
    pub fn sites(
        &mut self,
        kernel: &Kernel,
        symbols: &mut Symbolizer,
    ) -> Result<Vec<RawSite>, TracerError> {
        let mut raw = Vec::new();
        if self.plan.census.is_some() {
            raw.extend(self.census_sites(symbols));
        }
        for (key, stats) in kernel.go_sites(self.pid)? {
            // gopc is the return address of the `go` statement's call to
            // newproc; startpc is a function entry (+1 undoes the -1 applied
            // to return addresses).
            let frames = symbols.symbolize_stack(&[key.gopc]);
            let start = self.start_function(symbols, key.startpc);
            raw.push(RawSite {
                kind: SiteKind::Goroutine,
                frames: frames.into(),
                truncated: false,
                start_function: start,
                sampled: false,
                bytes: 0,
                count: stats.outstanding_count,
                allocs: stats.allocs,
                frees: stats.frees,
                alloc_bytes: 0,
                states: Default::default(),
            });
        }
        // (bucket, sampled allocs, sampled frees, sampled live objects)
        let buckets: Vec<(u64, u64, u64, u64)> = if self.plan.mem_profile.is_some() {
            // Read from the runtime's own records; none yet in `run` before
            // the executable is mapped.
            self.mem
                .mem_buckets()
                .iter()
                .map(|b| (b.addr, b.allocs, b.frees, b.allocs.saturating_sub(b.frees)))
                .collect()
        } else {
            kernel
                .go_buckets(self.pid)?
                .into_iter()
                .map(|(addr, s)| (addr, s.allocs, s.frees, s.outstanding_count.max(0) as u64))
                .collect()
        };
        if let Some(rate) = self.mem.rate() {
            self.rate = rate;
        }
        let rate = self.rate;
        for (addr, sampled_allocs, sampled_frees, live) in buckets {
            let Some(bucket) = self.mem.bucket(addr).cloned() else {
                continue;
            };
            let (objs, bytes) = scale_sample(live, bucket.size, rate);
            let (allocs, alloc_bytes) = scale_sample(sampled_allocs, bucket.size, rate);
            let (frees, _) = scale_sample(sampled_frees, bucket.size, rate);
            // A bucket's stack never changes: symbolized once.
            let (frames, truncated) = self
                .bucket_frames
                .entry(addr)
                .or_insert_with(|| {
                    let mut frames = symbols.symbolize_stack(&bucket.stack);
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
                    // The runtime already expanded inlined calls into PCs of
                    // their own, which DWARF expands again: drop the repeats.
                    frames.dedup_by(|b, a| {
                        a.function == b.function && a.file == b.file && a.line == b.line
                    });
                    let truncated = trim_at_root(&mut frames, bucket.stack.len(), 128);
                    (frames.into(), truncated)
                })
                .clone();
            raw.push(RawSite {
                kind: SiteKind::Heap,
                frames,
                truncated,
                start_function: None,
                sampled: true,
                bytes: bytes.round() as i64,
                count: objs.round() as i64,
                allocs: allocs.round() as u64,
                frees: frees.round() as u64,
                alloc_bytes: alloc_bytes.round() as u64,
                states: Default::default(),
            });
        }
        Ok(raw)
    }

    /// Goroutine sites from the runtime's list: live goroutines by creation
    /// site and start function, with their states. The runtime's own
    /// goroutines (GC workers, the finalizer...) are left out, as the
    /// goroutine profile's `runtime.isSystemGoroutine` does.
    fn census_sites(&mut self, symbols: &mut Symbolizer) -> Vec<RawSite> {
        self.census_progress = None;
        let census = match (&self.plan.census, self.allgs_addr) {
            (Some(layout), Some(addr)) => {
                let layout = super::CensusLayout {
                    allgs: addr,
                    ..layout.clone()
                };
                let started = std::time::Instant::now();
                match self.rolling.read(
                    &super::ProcessMemory(self.pid),
                    &layout,
                    self.census_budget,
                ) {
                    // g structs are never freed: in a live process every
                    // one reads. Most failing means the address space is
                    // being torn down (the target is exiting, its heap
                    // already unmapped): keep the last whole census rather
                    // than report its goroutines gone.
                    Ok(c) if c.unreadable > 0 && c.unreadable * 2 >= c.allglen => {
                        log::debug!(
                            "pid {}: {} of {} goroutine entries unreadable: exiting; the last \
                             census stands",
                            self.pid,
                            c.unreadable,
                            c.allglen
                        );
                        self.census_before_exit()
                    }
                    Ok(c) => {
                        log::debug!(
                            "pid {}: read {} of {} goroutine entries in {:.1} ms ({} unreadable, {} unread)",
                            self.pid,
                            c.read_now,
                            c.allglen,
                            started.elapsed().as_secs_f64() * 1e3,
                            c.unreadable,
                            c.unread
                        );
                        if c.read_now < c.allglen {
                            self.census_progress = Some((c.read_now, c.allglen, c.unread));
                        }
                        self.last_census = Some(c.clone());
                        Some(c)
                    }
                    // Gone (the final report after exit).
                    Err(e) => {
                        if running(self.pid) && !std::mem::replace(&mut self.census_warned, true) {
                            log::warn!(
                                "pid {}: goroutine list unreadable while it runs: {e}",
                                self.pid
                            );
                        }
                        log::debug!("pid {}: goroutine list unreadable: {e}", self.pid);
                        self.census_before_exit()
                    }
                }
            }
            (Some(_), None) => {
                // `run` starts with no maps: only a running target whose
                // maps were read and lack it is worth a warning.
                if running(self.pid)
                    && self.maps_seen
                    && !std::mem::replace(&mut self.census_warned, true)
                {
                    log::warn!(
                        "pid {}: runtime.allgs not found in the maps: no goroutine census",
                        self.pid
                    );
                }
                self.census_before_exit()
            }
            _ => self.census_before_exit(),
        };
        let Some(census) = census else {
            return Vec::new();
        };
        let mut raw = Vec::new();
        for g in census.groups {
            // Resolved once per start pc (cached): runtime start functions
            // (and their gowrap closures) stay in the runtime.
            let start = self.start_function(symbols, g.startpc);
            if start
                .as_ref()
                .is_some_and(|f| f.function.starts_with("runtime.") && f.function != "runtime.main")
            {
                continue;
            }
            // gopc is the return address of the `go` statement's call;
            // symbolized once.
            let frames = self
                .creators
                .entry(g.gopc)
                .or_insert_with(|| symbols.symbolize_stack(&[g.gopc]).into())
                .clone();
            // Created by the runtime itself (the main goroutine, workers).
            if frames
                .first()
                .is_some_and(|f| f.function.starts_with("runtime."))
            {
                continue;
            }
            raw.push(RawSite {
                kind: SiteKind::Goroutine,
                frames,
                truncated: false,
                start_function: start,
                sampled: false,
                bytes: 0,
                count: g.count as i64,
                allocs: 0,
                frees: 0,
                alloc_bytes: 0,
                states: g.states,
            });
        }
        raw
    }

    /// The goroutine list as last seen alive: read at the exit stop
    /// (`run`), else at the last snapshot.
    fn census_before_exit(&self) -> Option<super::Census> {
        self.exit_census
            .as_ref()
            .and_then(|s| s.lock().ok()?.clone())
            .or_else(|| self.last_census.clone())
    }

    /// The function a goroutine runs. For `go f(x)` Go ≥ 1.22 starts a
    /// generated `gowrapN` closure that calls f: report f, found by decoding
    /// the wrapper's first call outside the runtime.
    fn start_function(&mut self, symbols: &mut Symbolizer, startpc: u64) -> Option<Frame> {
        if let Some(f) = self.starts.get(&startpc) {
            return Some(f.clone());
        }
        // startpc is an entry, not a return address: +1 undoes the -1.
        let start = symbols.symbolize_stack(&[startpc + 1]).pop()?;
        let mut resolved = start.clone();
        if is_go_wrapper(&start.function)
            && let Some(code) = self.mem.read_bytes(startpc, 256)
        {
            for target in call_targets(&code, startpc) {
                if let Some(f) = symbols.symbolize_stack(&[target + 1]).pop()
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
}

/// Whether process `pid` is running: neither gone nor a zombie (whose
/// memory is gone already).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X" | "x"))
    })
}
