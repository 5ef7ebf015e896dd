//! Stages 3 and 4: load and attach the eBPF programs, then read the kernel maps.
//!
//! Configure → load → attach: globals and map sizes are set on the loader
//! before the object reaches the kernel; probes attach last, so no event
//! arrives before the maps are ready.

use std::{collections::HashMap as StdHashMap, num::NonZeroU32, os::fd::OwnedFd, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, StackTraceMap},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use tracer_common::{
    COUNTER_COUNT, Counter, GoOffsets, GoSiteKey, OomVictim, STACK_ID_OWN, SiteKey, SiteStats,
    StackBuf,
};

use crate::{error::TracerError, probes::PlannedProbe, uprobe_session::SessionProgram};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at build time;
/// empty when it was absent at build time (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TRACER_EBPF_OBJECT"));

/// Sizes of the kernel maps.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Live blocks tracked at once.
    pub allocs: u32,
    /// Distinct (stack, kind) sites.
    pub sites: u32,
    /// Distinct stacks.
    pub stacks: u32,
    /// Threads inside an allocator call at once.
    pub threads: u32,
    /// Live goroutines tracked at once.
    pub goroutines: u32,
    /// Heap sampling rate in bytes (`--sample-bytes`); 0: every allocation.
    pub sample_bytes: u64,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            allocs: tracer_common::DEFAULT_MAX_ALLOCS,
            sites: tracer_common::DEFAULT_MAX_SITES,
            stacks: tracer_common::DEFAULT_MAX_STACKS,
            threads: tracer_common::DEFAULT_MAX_THREADS,
            goroutines: tracer_common::DEFAULT_MAX_GOROUTINES,
            sample_bytes: 0,
        }
    }
}

/// A probe that is live in the kernel.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AttachedProbe {
    pub function: String,
    pub path: String,
    pub offset: u64,
    pub program: String,
}

/// Loaded programs, their links and maps.
pub struct Kernel {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    sites: HashMap<MapData, SiteKey, SiteStats>,
    stacks: StackTraceMap<MapData>,
    /// Stacks the kernel's table refused for a hash collision.
    own_stacks: HashMap<MapData, u32, StackBuf>,
    counters: PerCpuArray<MapData, u64>,
    go_sites: HashMap<MapData, GoSiteKey, SiteStats>,
    go_buckets: HashMap<MapData, u64, SiteStats>,
    oom_victim: Array<MapData, OomVictim>,
    pub sizes: MapSizes,
    /// With sampling, allocator entries and returns run as uprobe sessions
    /// (see [`crate::uprobe_session`]); else why not.
    session: Result<SessionProgram, String>,
    /// The session links, live while held.
    session_links: Vec<OwnedFd>,
}

/// Counter totals summed over CPUs, indexed by [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; COUNTER_COUNT as usize]);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

fn load_err(e: impl std::fmt::Display) -> TracerError {
    TracerError::Load(e.to_string())
}

impl Kernel {
    /// Loads the programs for process `tgid` (0: any process) with map sizes
    /// `sizes` and, for a Go target, its runtime's struct offsets.
    pub fn load(tgid: u32, sizes: MapSizes, go: GoOffsets) -> Result<Self, TracerError> {
        if EBPF_OBJECT.is_empty() {
            return Err(TracerError::NoEbpfObject);
        }
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &tgid, true)
            .override_global("PAGE_SIZE", &page_size, true)
            .override_global("GO_OFFSETS", &go, true)
            .override_global("SAMPLE_BYTES", &sizes.sample_bytes, true)
            .map_max_entries("GO_GOROUTINES", sizes.goroutines)
            .map_max_entries("GO_TIMERS", sizes.goroutines)
            .map_max_entries("GO_SITES", sizes.sites)
            .map_max_entries("GO_BUCKETS", sizes.sites)
            .map_max_entries("ALLOCS", sizes.allocs)
            .map_max_entries("SITES", sizes.sites)
            .map_max_entries("STACKS", sizes.stacks)
            .map_max_entries("OWN_STACKS", sizes.stacks)
            .map_max_entries("PENDING", sizes.threads)
            .load(EBPF_OBJECT)
            .map_err(load_err)?;
        // Before any map is taken out of `ebpf`: the program shares them all.
        let session = if sizes.sample_bytes == 0 {
            Err("not sampling (every call needs its return)".to_string())
        } else if std::env::var_os("TRACER_UPROBE_SESSION").is_some_and(|v| v == "0") {
            Err("turned off by TRACER_UPROBE_SESSION=0".to_string())
        } else {
            SessionProgram::load(EBPF_OBJECT, "alloc_session", &ebpf)
        };
        // The logger must stay alive: dropping it closes the log map's fd.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logging unavailable: {e}");
                None
            }
        };
        for name in [
            "size_arg0",
            "size_arg1",
            "calloc_enter",
            "realloc_enter",
            "reallocarray_enter",
            "posix_memalign_enter",
            "mmap_enter",
            "mremap_enter",
            "alloc_return",
            "free_enter",
            "munmap_enter",
            "go_newproc1_ret",
            "go_goexit",
            "go_profile_bucket",
            "go_profile_free",
            "go_timer_modify",
            "go_timer_start",
            "go_timer_stop",
            "go_timer_fire",
        ] {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| load_err(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(load_err)?;
            prog.load()
                .map_err(|e| load_err(format!("{name}: {}", verifier_detail(&e))))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_err(format!("map {name} missing from the object")))
        };
        let sites = HashMap::try_from(take(&mut ebpf, "SITES")?).map_err(load_err)?;
        let stacks = StackTraceMap::try_from(take(&mut ebpf, "STACKS")?).map_err(load_err)?;
        let own_stacks = HashMap::try_from(take(&mut ebpf, "OWN_STACKS")?).map_err(load_err)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?).map_err(load_err)?;
        let go_sites = HashMap::try_from(take(&mut ebpf, "GO_SITES")?).map_err(load_err)?;
        let go_buckets = HashMap::try_from(take(&mut ebpf, "GO_BUCKETS")?).map_err(load_err)?;
        let oom_victim = Array::try_from(take(&mut ebpf, "OOM_VICTIM")?).map_err(load_err)?;
        Ok(Self {
            ebpf,
            logger,
            sites,
            stacks,
            own_stacks,
            counters,
            go_sites,
            go_buckets,
            oom_victim,
            sizes,
            session,
            session_links: Vec::new(),
        })
    }

    /// Why sampled calls still pay for a return probe, when they do.
    pub fn session_unavailable(&self) -> Option<&str> {
        match &self.session {
            Err(why) if self.sizes.sample_bytes > 0 => Some(why),
            _ => None,
        }
    }

    /// Attaches every planned probe to process `pid`. Returns what is live.
    pub fn attach(
        &mut self,
        plan: &[PlannedProbe],
        pid: u32,
    ) -> Result<Vec<AttachedProbe>, TracerError> {
        let scope = match NonZeroU32::new(pid) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        let mut attached = Vec::new();
        // Entries of allocating functions become sessions: one link per file,
        // attached after the frees (which the plan puts first).
        let mut sessions: Vec<(PathBuf, Vec<&PlannedProbe>)> = Vec::new();
        for probe in plan {
            if self.session.is_ok() {
                if probe.program == "alloc_return" {
                    continue;
                }
                if probe.op.is_some() {
                    let path = &probe.object.open_path;
                    match sessions.iter_mut().find(|(p, _)| p == path) {
                        Some((_, v)) => v.push(probe),
                        None => sessions.push((path.clone(), vec![probe])),
                    }
                    continue;
                }
            }
            let attach_err = |reason: String| TracerError::Attach {
                function: probe.function.clone(),
                path: probe.object.path.clone(),
                reason,
            };
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(probe.program)
                .ok_or_else(|| attach_err(format!("program {} missing", probe.program)))?
                .try_into()
                .map_err(|e| attach_err(format!("{e}")))?;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(probe.offset),
                cookie: probe.cookie,
            };
            prog.attach(point, &probe.object.open_path, scope)
                .map_err(|e| attach_err(error_chain(&e)))?;
            attached.push(AttachedProbe {
                function: probe.function.clone(),
                path: probe.object.path.display().to_string(),
                offset: probe.offset,
                program: probe.program.into(),
            });
        }
        if let Ok(program) = &self.session {
            for (path, probes) in sessions {
                let offsets: Vec<u64> = probes.iter().map(|p| p.offset).collect();
                let cookies: Vec<u64> = probes
                    .iter()
                    .map(|p| p.op.map_or(0, |o| o as u64))
                    .collect();
                let link = program
                    .attach(&path, &offsets, &cookies, pid)
                    .map_err(|e| TracerError::Attach {
                        function: probes
                            .iter()
                            .map(|p| p.function.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        path: probes[0].object.path.clone(),
                        reason: format!("uprobe session: {e}"),
                    })?;
                self.session_links.push(link);
                attached.extend(probes.iter().map(|p| AttachedProbe {
                    function: p.function.clone(),
                    path: p.object.path.display().to_string(),
                    offset: p.offset,
                    program: "alloc_session".into(),
                }));
            }
        }
        Ok(attached)
    }

    /// Current statistics of every site.
    pub fn sites(&self) -> Result<Vec<(SiteKey, SiteStats)>, TracerError> {
        self.sites
            .iter()
            .map(|r| {
                r.map_err(|e| TracerError::MapRead {
                    map: "SITES",
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Watches the kernel's OOM killer (tracepoint oom:mark_victim). Needs
    /// tracefs, which is mounted at /sys/kernel/tracing when it is not.
    pub fn watch_oom_kills(&mut self) -> Result<(), String> {
        ensure_tracefs()?;
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut("oom_mark_victim")
            .ok_or("program oom_mark_victim missing")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load().map_err(|e| error_chain(&e))?;
        prog.attach("oom", "mark_victim")
            .map_err(|e| error_chain(&e))?;
        Ok(())
    }

    /// The OOM victim record, once the kernel has marked the target.
    pub fn oom_victim(&self) -> Option<OomVictim> {
        self.oom_victim.get(&0, 0).ok().filter(|v| v.pid != 0)
    }

    /// Goroutines per creation site.
    pub fn go_sites(&self) -> Result<Vec<(GoSiteKey, SiteStats)>, TracerError> {
        read_all(&self.go_sites, "GO_SITES")
    }

    /// Sampled objects per Go memory-profile bucket.
    pub fn go_buckets(&self) -> Result<Vec<(u64, SiteStats)>, TracerError> {
        read_all(&self.go_buckets, "GO_BUCKETS")
    }

    /// Instruction pointers of a recorded stack, innermost first.
    pub fn stack(&self, stack_id: u32) -> Option<Vec<u64>> {
        if stack_id & STACK_ID_OWN != 0 {
            let buf = self.own_stacks.get(&stack_id, 0).ok()?;
            return Some(buf.ips.iter().copied().take_while(|&ip| ip != 0).collect());
        }
        let trace = self.stacks.get(&stack_id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// Counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters, TracerError> {
        let mut out = Counters::default();
        for i in 0..COUNTER_COUNT {
            let per_cpu = self.counters.get(&i, 0).map_err(|e| TracerError::MapRead {
                map: "COUNTERS",
                reason: e.to_string(),
            })?;
            out.0[i as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Forwards the eBPF side's log records to the `log` facade.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

/// Mounts tracefs at /sys/kernel/tracing if no tracefs is there (tracepoint
/// attachment reads event ids from it), as bpftrace and perf do.
fn ensure_tracefs() -> Result<(), String> {
    let dir = std::path::Path::new("/sys/kernel/tracing");
    if dir.join("events").exists()
        || std::path::Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("tracefs"), c("/sys/kernel/tracing"), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!(
            "tracefs is not mounted and mounting it failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    log::info!("mounted tracefs at /sys/kernel/tracing to watch the OOM killer");
    Ok(())
}

fn read_all<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, TracerError> {
    map.iter()
        .map(|r| {
            r.map_err(|e| TracerError::MapRead {
                map: name,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// The verifier log is long; keep its last lines, which say what failed.
fn verifier_detail(e: &aya::programs::ProgramError) -> String {
    let full = error_chain(e);
    let lines: Vec<&str> = full.lines().collect();
    if lines.len() <= 12 {
        return full;
    }
    lines[lines.len() - 12..].join("\n")
}

/// Per-site counters keyed for lookup by the collector.
pub type SiteTable = StdHashMap<SiteKey, SiteStats>;
