//! Stages 3 and 4: load and attach the eBPF programs, then read the kernel maps.
//!
//! Configure → load → attach: globals and map sizes are set on the loader
//! before the object reaches the kernel; probes attach last, so no event
//! arrives before the maps are ready.

pub mod uprobe_session;

use std::{collections::HashMap as StdHashMap, num::NonZeroU32, os::fd::OwnedFd, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, StackTraceMap},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use tracer_common::{
    Attach, COUNTER_COUNT, Counter, GoOffsets, GoSiteKey, OomVictim, Program, STACK_ID_OWN,
    SiteKey, SiteStats, StackBuf, maps,
    unwind::{ProcMappings, UnwindRow, end_reason},
};

use self::uprobe_session::SessionProgram;
use crate::{error::TracerError, probes::PlannedProbe};

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
    /// Rows of the unwind-table array (see [`crate::unwind`]).
    pub unwind_rows: u32,
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
            unwind_rows: 0,
        }
    }
}

pub use crate::schema::AttachedProbe;

/// Why an optional kernel feature (uprobe sessions, the OOM tracepoint) is
/// not in use. Not fatal: the tracer falls back and says so.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("not sampling (every call needs its return)")]
    NotSampling,
    #[error("turned off by TRACER_UPROBE_SESSION=0")]
    TurnedOff,
    #[error("tracefs is not mounted and mounting it failed")]
    Tracefs(#[source] std::io::Error),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{0} is not a tracepoint program")]
    NotTracepoint(&'static str),
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object")]
    Object(#[source] aya_obj::ParseError),
    #[error("relocating the eBPF object")]
    Relocate(#[source] aya_obj::relocation::EbpfRelocationError),
    #[error("the eBPF object's license has a NUL byte")]
    License,
    #[error("the verifier refused {program} ({log})")]
    Verifier {
        program: &'static str,
        log: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bpf(BPF_PROG_LOAD) of {program}")]
    Syscall {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
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
    go_timers: HashMap<MapData, u64, u32>,
    oom_victim: Array<MapData, OomVictim>,
    unwind_rows: Array<MapData, UnwindRow>,
    unwind_mappings: HashMap<MapData, u32, ProcMappings>,
    pub sizes: MapSizes,
    /// With sampling, allocator entries and returns run as uprobe sessions
    /// (see [`uprobe_session`]); else why not.
    session: Result<SessionProgram, KernelError>,
    /// The session links, live while held.
    session_links: Vec<OwnedFd>,
    /// The uprobe links, owned here to detach them all at once on drop.
    links: Vec<UProbeLink>,
    /// Probes attached part of the time, with their link while attached.
    sampled: Vec<(PlannedProbe, Option<UProbeLink>)>,
}

/// A recorded stack: return addresses, innermost first, and for stacks
/// walked by the DWARF unwinder why the walk ended
/// ([`tracer_common::unwind::end`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawStack {
    pub ips: Vec<u64>,
    pub end: Option<u64>,
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
            .override_global(maps::TARGET_TGID, &tgid, true)
            .override_global(maps::PAGE_SIZE, &page_size, true)
            .override_global(maps::GO_OFFSETS, &go, true)
            .override_global(maps::SAMPLE_BYTES, &sizes.sample_bytes, true)
            .map_max_entries(maps::GO_GOROUTINES, sizes.goroutines)
            .map_max_entries(maps::GO_TIMERS, sizes.goroutines)
            .map_max_entries(maps::GO_SITES, sizes.sites)
            .map_max_entries(maps::GO_BUCKETS, sizes.sites)
            .map_max_entries(maps::ALLOCS, sizes.allocs)
            .map_max_entries(maps::SITES, sizes.sites)
            .map_max_entries(maps::STACKS, sizes.stacks)
            .map_max_entries(maps::OWN_STACKS, sizes.stacks)
            .map_max_entries(maps::PENDING, sizes.threads)
            .map_max_entries(maps::UNWIND_ROWS, sizes.unwind_rows.max(1))
            .load(EBPF_OBJECT)
            .map_err(load_err)?;
        // Before any map is taken out of `ebpf`: the program shares them all.
        let session = if sizes.sample_bytes == 0 {
            Err(KernelError::NotSampling)
        } else if std::env::var_os("TRACER_UPROBE_SESSION").is_some_and(|v| v == "0") {
            Err(KernelError::TurnedOff)
        } else {
            SessionProgram::load(EBPF_OBJECT, Program::AllocSession, &ebpf)
        };
        // The logger must stay alive: dropping it closes the log map's fd.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logging unavailable: {e}");
                None
            }
        };
        // The uprobes; the session program is loaded above, the tracepoint
        // by watch_oom_kills.
        for program in Program::ALL {
            if !matches!(program.attach(), Attach::Uprobe | Attach::Uretprobe) {
                continue;
            }
            let name = program.name();
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
        let sites = HashMap::try_from(take(&mut ebpf, maps::SITES)?).map_err(load_err)?;
        let stacks = StackTraceMap::try_from(take(&mut ebpf, maps::STACKS)?).map_err(load_err)?;
        let own_stacks = HashMap::try_from(take(&mut ebpf, maps::OWN_STACKS)?).map_err(load_err)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?).map_err(load_err)?;
        let go_sites = HashMap::try_from(take(&mut ebpf, maps::GO_SITES)?).map_err(load_err)?;
        let go_buckets = HashMap::try_from(take(&mut ebpf, maps::GO_BUCKETS)?).map_err(load_err)?;
        let go_timers = HashMap::try_from(take(&mut ebpf, maps::GO_TIMERS)?).map_err(load_err)?;
        let oom_victim = Array::try_from(take(&mut ebpf, maps::OOM_VICTIM)?).map_err(load_err)?;
        let unwind_rows = Array::try_from(take(&mut ebpf, maps::UNWIND_ROWS)?).map_err(load_err)?;
        let unwind_mappings =
            HashMap::try_from(take(&mut ebpf, maps::UNWIND_MAPPINGS)?).map_err(load_err)?;
        Ok(Self {
            ebpf,
            logger,
            sites,
            stacks,
            own_stacks,
            counters,
            go_sites,
            go_buckets,
            go_timers,
            oom_victim,
            unwind_rows,
            unwind_mappings,
            sizes,
            session,
            session_links: Vec::new(),
            links: Vec::new(),
            sampled: Vec::new(),
        })
    }

    /// Why sampled calls still pay for a return probe, when they do.
    pub fn session_unavailable(&self) -> Option<String> {
        match &self.session {
            Err(why) if self.sizes.sample_bytes > 0 => Some(crate::error::chain(why)),
            _ => None,
        }
    }

    /// Attaches every planned probe to process `pid`. Returns what is live.
    pub fn attach(
        &mut self,
        plan: &[PlannedProbe],
        pid: u32,
    ) -> Result<Vec<AttachedProbe>, TracerError> {
        let scope = probe_scope(pid);
        let mut attached = Vec::new();
        // Entries of allocating functions become sessions: one link per file,
        // attached after the frees (which the plan puts first).
        let mut sessions: Vec<(PathBuf, Vec<&PlannedProbe>)> = Vec::new();
        for probe in plan {
            if self.session.is_ok() {
                if probe.program == Program::AllocReturn {
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
            let link = self.attach_one(probe, scope)?;
            if probe.sampled {
                self.sampled.push((probe.clone(), Some(link)));
            } else {
                self.links.push(link);
            }
            attached.push(AttachedProbe {
                function: probe.function.clone(),
                path: probe.object.path.display().to_string(),
                offset: probe.offset,
                program: probe.program.name().into(),
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
                    program: Program::AllocSession.name().into(),
                }));
            }
        }
        Ok(attached)
    }

    fn attach_one(
        &mut self,
        probe: &PlannedProbe,
        scope: UProbeScope,
    ) -> Result<UProbeLink, TracerError> {
        let attach_err = |reason: String| TracerError::Attach {
            function: probe.function.clone(),
            path: probe.object.path.clone(),
            reason,
        };
        let name = probe.program.name();
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| attach_err(format!("program {name} missing")))?
            .try_into()
            .map_err(|e| attach_err(format!("{e}")))?;
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(probe.offset),
            cookie: probe.cookie,
        };
        let id = prog
            .attach(point, &probe.object.open_path, scope)
            .map_err(|e| attach_err(crate::error::chain(&e)))?;
        prog.take_link(id)
            .map_err(|e| attach_err(crate::error::chain(&e)))
    }

    /// Attaches (`on`) or detaches the probes planned as `sampled`; true if
    /// any changed. A link closes in the background: closing one takes the
    /// kernel tens of milliseconds, which the collector should not wait for.
    pub fn set_sampled_probes(&mut self, pid: u32, on: bool) -> Result<bool, TracerError> {
        let scope = probe_scope(pid);
        let mut changed = false;
        for i in 0..self.sampled.len() {
            match (on, self.sampled[i].1.is_some()) {
                (true, false) => {
                    let probe = self.sampled[i].0.clone();
                    let link = self.attach_one(&probe, scope)?;
                    self.sampled[i].1 = Some(link);
                    changed = true;
                }
                (false, true) => {
                    if let Some(link) = self.sampled[i].1.take() {
                        std::thread::spawn(move || drop(link));
                    }
                    changed = true;
                }
                _ => {}
            }
        }
        Ok(changed)
    }

    /// Whether any probe is planned as `sampled`.
    pub fn has_sampled_probes(&self) -> bool {
        !self.sampled.is_empty()
    }

    /// Current statistics of every site.
    pub fn sites(&self) -> Result<Vec<(SiteKey, SiteStats)>, TracerError> {
        self.sites
            .iter()
            .map(|r| {
                r.map_err(|e| TracerError::MapRead {
                    map: maps::SITES,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Watches the kernel's OOM killer (tracepoint oom:mark_victim). Needs
    /// tracefs, which is mounted at /sys/kernel/tracing when it is not.
    pub fn watch_oom_kills(&mut self) -> Result<(), KernelError> {
        ensure_tracefs()?;
        let program = Program::OomMarkVictim;
        let Attach::Tracepoint { category, name } = program.attach() else {
            return Err(KernelError::NotTracepoint(program.name()));
        };
        let failed = |source| KernelError::Program {
            program: program.name(),
            source,
        };
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(program.name())
            .ok_or(KernelError::MissingProgram(program.name()))?
            .try_into()
            .map_err(failed)?;
        prog.load().map_err(failed)?;
        prog.attach(category, name).map_err(failed)?;
        Ok(())
    }

    /// The OOM victim record, once the kernel has marked the target.
    pub fn oom_victim(&self) -> Option<OomVictim> {
        self.oom_victim.get(&0, 0).ok().filter(|v| v.pid != 0)
    }

    /// Goroutines per creation site.
    /// Timers pending since their creation probe: timer → creation stack id.
    pub fn go_timers(&self) -> Result<Vec<(u64, u32)>, TracerError> {
        self.go_timers
            .iter()
            .map(|r| {
                r.map_err(|e| TracerError::MapRead {
                    map: maps::GO_TIMERS,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Forgets timer `t` (retired: no timer heap holds it).
    pub fn remove_go_timer(&mut self, t: u64) {
        let _ = self.go_timers.remove(&t);
    }

    pub fn go_sites(&self) -> Result<Vec<(GoSiteKey, SiteStats)>, TracerError> {
        read_all(&self.go_sites, maps::GO_SITES)
    }

    /// Sampled objects per Go memory-profile bucket.
    pub fn go_buckets(&self) -> Result<Vec<(u64, SiteStats)>, TracerError> {
        read_all(&self.go_buckets, maps::GO_BUCKETS)
    }

    /// Instruction pointers of a recorded stack, innermost first.
    pub fn stack(&self, stack_id: u32) -> Option<RawStack> {
        if stack_id & STACK_ID_OWN != 0 {
            let buf = self.own_stacks.get(&stack_id, 0).ok()?;
            // A walked stack ends at its end record (what follows is stale);
            // a frame-pointer one at the first 0.
            let mut ips = Vec::new();
            let mut end = None;
            for &ip in buf.ips.iter().take_while(|&&ip| ip != 0) {
                if let Some(reason) = end_reason(ip) {
                    end = Some(reason);
                    break;
                }
                ips.push(ip);
            }
            return Some(RawStack { ips, end });
        }
        let trace = self.stacks.get(&stack_id, 0).ok()?;
        Some(RawStack {
            ips: trace.frames().iter().map(|f| f.ip).collect(),
            end: None,
        })
    }

    /// Writes unwind rows at `start` of the row array.
    pub fn write_unwind_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), TracerError> {
        for (i, row) in rows.iter().enumerate() {
            self.unwind_rows
                .set(start + i as u32, row, 0)
                .map_err(|e| TracerError::MapWrite {
                    map: maps::UNWIND_ROWS,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Lists process `pid`'s executable mappings for the DWARF walker.
    pub fn set_unwind_mappings(&mut self, pid: u32, m: &ProcMappings) -> Result<(), TracerError> {
        self.unwind_mappings
            .insert(pid, m, 0)
            .map_err(|e| TracerError::MapWrite {
                map: maps::UNWIND_MAPPINGS,
                reason: e.to_string(),
            })
    }

    /// Leaves process `pid` to the frame-pointer walker.
    pub fn remove_unwind_mappings(&mut self, pid: u32) -> Result<(), TracerError> {
        match self.unwind_mappings.remove(&pid) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // aya reports a missing key on delete as the syscall's ENOENT.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(TracerError::MapWrite {
                map: maps::UNWIND_MAPPINGS,
                reason: e.to_string(),
            }),
        }
    }

    /// Counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters, TracerError> {
        let mut out = Counters::default();
        for i in 0..COUNTER_COUNT {
            let per_cpu = self.counters.get(&i, 0).map_err(|e| TracerError::MapRead {
                map: maps::COUNTERS,
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

/// Uprobes of one process, or of all (pid 0).
fn probe_scope(pid: u32) -> UProbeScope {
    match NonZeroU32::new(pid) {
        Some(p) => UProbeScope::OneProcess(p),
        None => UProbeScope::AllProcesses,
    }
}

impl Drop for Kernel {
    /// Detaches every probe at once. Each detach waits ~110 ms in the kernel
    /// (uprobe unregistration); one after another that is seconds for a few
    /// dozen probes, while the target keeps paying for them. The kernel still
    /// serializes most of that work: measured with 22 probes, 3.0 s from
    /// Ctrl-C to exit before, 1.9 s in parallel. One uprobe_multi link per
    /// program and file (Linux 6.6+) would unregister in one batch.
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.links);
        let sessions = std::mem::take(&mut self.session_links);
        // A closure no thread could be spawned for is dropped by the failed
        // spawn: its link is then detached here, in turn.
        std::thread::scope(|s| {
            for link in links {
                let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(link));
            }
            for fd in sessions {
                let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(fd));
            }
        });
    }
}

/// Mounts tracefs at /sys/kernel/tracing if no tracefs is there (tracepoint
/// attachment reads event ids from it), as bpftrace and perf do.
fn ensure_tracefs() -> Result<(), KernelError> {
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
        return Err(KernelError::Tracefs(std::io::Error::last_os_error()));
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

/// The verifier log is long; keep its last lines, which say what failed.
fn verifier_detail(e: &aya::programs::ProgramError) -> String {
    let full = crate::error::chain(e);
    let lines: Vec<&str> = full.lines().collect();
    if lines.len() <= 12 {
        return full;
    }
    lines[lines.len() - 12..].join("\n")
}

/// Per-site counters keyed for lookup by the collector.
pub type SiteTable = StdHashMap<SiteKey, SiteStats>;

#[cfg(test)]
mod tests {
    use aya_obj::ProgramSection;
    use object::{Object, ObjectSection, ObjectSymbol};

    use super::*;

    /// Names the object holds that belong to aya-log, not to the tracer.
    const AYA_LOG: [&str; 2] = ["AYA_LOGS", "AYA_LOG_LEVEL"];

    #[test]
    fn every_program_is_in_the_object_with_its_attach_kind() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        for program in Program::ALL {
            let name = program.name();
            let found = obj
                .programs
                .get(name)
                .unwrap_or_else(|| panic!("{program:?}: no program {name} in the object"));
            let fits = match program.attach() {
                // A session program is an ordinary uprobe program in the
                // object; only its load (expected attach type) differs.
                Attach::Uprobe | Attach::Session => {
                    matches!(found.section, ProgramSection::UProbe { .. })
                }
                Attach::Uretprobe => matches!(found.section, ProgramSection::URetProbe { .. }),
                Attach::Tracepoint { .. } => matches!(found.section, ProgramSection::TracePoint),
            };
            assert!(fits, "{program:?}: {:?} in the object", found.section);
        }
        for name in obj.programs.keys() {
            assert!(
                Program::ALL.iter().any(|p| p.name() == name),
                "program {name} of the object has no Program variant"
            );
        }
    }

    #[test]
    fn every_map_and_global_name_is_in_the_object() {
        let file = object::File::parse(EBPF_OBJECT).unwrap();
        // (symbol, section) of every global data symbol.
        let symbols: Vec<(String, String)> = file
            .symbols()
            .filter(|s| s.is_global() && s.is_definition())
            .filter_map(|s| {
                let section = file.section_by_index(s.section_index()?).ok()?;
                Some((s.name().ok()?.to_string(), section.name().ok()?.to_string()))
            })
            .collect();
        let section_of = |name: &str| {
            symbols
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.as_str())
        };
        for name in maps::MAPS {
            assert_eq!(section_of(name), Some("maps"), "map {name}");
        }
        let is_data = |s: &str| {
            [".rodata", ".data", ".bss"]
                .iter()
                .any(|d| s.starts_with(d))
        };
        for name in maps::GLOBALS {
            assert!(
                section_of(name).is_some_and(is_data),
                "global {name}: {:?}",
                section_of(name)
            );
        }
        // Conversely, nothing the tracer defines is missing from the lists.
        for (name, section) in &symbols {
            let listed = if section == "maps" {
                maps::MAPS.contains(&name.as_str())
            } else if is_data(section) {
                maps::GLOBALS.contains(&name.as_str())
            } else {
                continue;
            };
            assert!(
                listed || AYA_LOG.contains(&name.as_str()),
                "{name} (in {section}) is not in tracer_common::maps"
            );
        }
        // And aya sees the same maps.
        let obj = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        for name in maps::MAPS {
            assert!(obj.maps.contains_key(name), "aya finds no map {name}");
        }
    }
}
