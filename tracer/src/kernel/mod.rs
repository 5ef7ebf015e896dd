//! Stages 3 and 4: load and attach the eBPF programs, then read the kernel maps.
//!
//! Configure → load → attach: globals and map sizes are set on the loader
//! before the object reaches the kernel; probes attach last, so no event
//! arrives before the maps are ready.

pub mod uprobe_multi;

use std::{
    collections::HashMap as StdHashMap,
    num::NonZeroU32,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use tracer_common::{
    AllocInfo, Attach, COUNTER_COUNT, Counter, GoOffsets, GoSiteKey, OomVictim, PROBE_SLOTS,
    ProcKey, Program, STACK_ID_OWN, SiteKey, SiteStats, StackBuf, maps,
    unwind::{ProcMappings, UnwindRow, end_reason},
};

use self::uprobe_multi::{MultiKind, MultiProgram};
use crate::{
    error::TracerError,
    overhead::{ProgramRuns, RunKind, TrapCost},
    probes::PlannedProbe,
};

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
    /// Processes traced at once (followed children, a cgroup's).
    pub processes: u32,
    /// Heap sampling rate in bytes (`--sample-bytes`); 0: every allocation.
    pub sample_bytes: u64,
    /// Rows of the unwind-table array (see [`crate::unwind`]).
    pub unwind_rows: u32,
    /// Whether sampling may start while tracing (`--max-overhead`): the
    /// allocation probes are then uprobe sessions from the start.
    pub adaptive_sampling: bool,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            allocs: tracer_common::DEFAULT_MAX_ALLOCS,
            sites: tracer_common::DEFAULT_MAX_SITES,
            stacks: tracer_common::DEFAULT_MAX_STACKS,
            threads: tracer_common::DEFAULT_MAX_THREADS,
            goroutines: tracer_common::DEFAULT_MAX_GOROUTINES,
            processes: tracer_common::DEFAULT_MAX_PROCESSES,
            sample_bytes: 0,
            unwind_rows: 0,
            adaptive_sampling: false,
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
    #[error("turned off by TRACER_UPROBE_MULTI=0")]
    MultiTurnedOff,
    #[error("turned off by TRACER_OOM_TRACEPOINT=0")]
    OomTracepointTurnedOff,
    #[error(
        "this kernel cannot create {0} links (uprobe_multi needs Linux 6.6+, uprobe sessions 6.13+)"
    )]
    LinkUnsupported(&'static str, #[source] std::io::Error),
    #[error("tracefs is not mounted and mounting it failed")]
    Tracefs(#[source] std::io::Error),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{0} is not a tracepoint program")]
    NotTracepoint(&'static str),
    #[error("no kernel BTF giving task_struct.exit_code (/sys/kernel/btf/vmlinux)")]
    NoTaskLayout,
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
    /// The site map as last read ([`Kernel::read_sites`]), by process.
    site_cache: StdHashMap<u32, Vec<(SiteKey, SiteStats)>>,
    targets: HashMap<MapData, u32, u32>,
    /// Taken by the session ([`Kernel::take_process_events`]).
    proc_events: Option<RingBuf<MapData>>,
    go_runtimes: HashMap<MapData, u32, GoOffsets>,
    allocs: HashMap<MapData, ProcKey, AllocInfo>,
    go_goroutines: HashMap<MapData, ProcKey, GoSiteKey>,
    stacks: StackTraceMap<MapData>,
    /// Stacks the kernel's table refused for a hash collision.
    own_stacks: HashMap<MapData, u32, StackBuf>,
    counters: PerCpuArray<MapData, u64>,
    go_sites: HashMap<MapData, GoSiteKey, SiteStats>,
    go_buckets: HashMap<MapData, ProcKey, SiteStats>,
    go_timers: HashMap<MapData, ProcKey, u32>,
    oom_victim: HashMap<MapData, u32, OomVictim>,
    unwind_rows: Array<MapData, UnwindRow>,
    unwind_mappings: HashMap<MapData, u32, ProcMappings>,
    pub sizes: MapSizes,
    /// With sampling, allocator entries and returns run as uprobe sessions
    /// (see [`uprobe_multi`]); else why not.
    session: Result<MultiProgram, KernelError>,
    /// The uprobe programs loaded for batched links (see [`uprobe_multi`]);
    /// else why not, and aya loaded them for one perf event per probe.
    multi: Result<Vec<(Program, MultiProgram)>, KernelError>,
    /// The uprobe links, by process, owned here to detach them all at once
    /// on drop.
    links: Vec<(u32, Link)>,
    /// Probes attached part of the time, by process, with their link while
    /// attached.
    sampled: Vec<(u32, PlannedProbe, Option<Link>)>,
    /// Tracepoints attached, by program.
    tracepoints: Vec<Program>,
    /// Run-time statistics of every eBPF program, on while held (the
    /// overhead estimate); None where the kernel refused.
    _stats: Option<OwnedFd>,
    /// Per slot of the probe-hit counters, less one: the probe's program,
    /// and whether the kernel emulates its instruction (else it
    /// single-steps it).
    slots: Vec<(Program, bool)>,
    /// The heap sampling rate, as the programs read it.
    sample_rate: Array<MapData, u64>,
    /// Targets' exit statuses (see [`Kernel::watch_exit`]).
    exit_status: HashMap<MapData, u32, u64>,
    /// Each counted probe's hits, by slot.
    probe_hits: PerCpuArray<MapData, u64>,
    /// Whether every probe was taken off ([`Kernel::detach_probes`]).
    detached: bool,
}

/// An attached probe, or a batch of them.
enum Link {
    /// One probe, through a perf event (kernels before 6.6).
    Perf(#[allow(dead_code)] UProbeLink),
    /// A `uprobe_multi` link: every probe of one program in one file.
    Multi(#[allow(dead_code)] OwnedFd),
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters(pub [u64; COUNTER_COUNT as usize]);

impl Default for Counters {
    fn default() -> Self {
        Self([0; COUNTER_COUNT as usize])
    }
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

fn load_err(e: impl std::fmt::Display) -> TracerError {
    TracerError::Load(e.to_string())
}

/// The least the tracer's own process takes beside its maps (its code,
/// symbol tables, buffers): measured at 27 MiB attached to a small C
/// program, more for large binaries.
const TRACER_OWN_BYTES: u64 = 32 << 20;

/// What to do when the maps do not fit the tracer's own memory cgroup.
const SHRINK_MAPS: &str = "eBPF maps are charged to the memory cgroup of the process that \
    creates them (Linux 5.11+): run the tracer outside the target's container (from the host, \
    not `kubectl exec` into the pod), or shrink the maps with --max-allocs, --max-sites, \
    --max-stacks and --max-goroutines";

/// A load error, with what to do when the kernel refused a map its memory.
fn load_error(e: aya::EbpfError) -> TracerError {
    let refused = match &e {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) => {
            matches!(io_error.raw_os_error(), Some(libc::ENOMEM | libc::EPERM))
        }
        _ => false,
    };
    if refused {
        TracerError::Load(format!(
            "{}: the kernel refused memory for the map; {SHRINK_MAPS}",
            crate::error::chain(&e)
        ))
    } else {
        load_err(crate::error::chain(&e))
    }
}

impl MapSizes {
    /// The maps of a session with no uprobes (`tracer watch`): the
    /// processes' maps as asked, one entry for every other, so that
    /// watching costs no kernel memory for blocks, sites or stacks.
    pub fn without_probes(self) -> Self {
        Self {
            allocs: 1,
            sites: 1,
            stacks: 1,
            threads: 1,
            goroutines: 1,
            unwind_rows: 1,
            sample_bytes: 0,
            adaptive_sampling: false,
            ..self
        }
    }

    /// The kernel memory the maps take at load, as Linux 6.x accounts it:
    /// the preallocated maps whole (the stack tables, 1 KiB a stack; the
    /// LRU maps), the others their bucket array (16 B per slot, a power of
    /// two); their entries come as they are used.
    pub fn kernel_bytes(&self) -> u64 {
        let buckets = |n: u32| 16 * u64::from(n.max(1)).next_power_of_two();
        let stacks = u64::from(self.stacks) * (1040 + 1088);
        let hashes = buckets(self.allocs)
            + 2 * buckets(self.goroutines)
            + 3 * buckets(self.sites)
            + 5 * buckets(self.processes);
        let lru = u64::from(self.threads) * 112 + 16384 * 96;
        let rows = u64::from(self.unwind_rows.max(1))
            * std::mem::size_of::<tracer_common::unwind::UnwindRow>() as u64;
        // Ring buffers, per-CPU arrays, the small ones.
        let rest = 1 << 20;
        stacks + hashes + lru + rows + rest
    }

    /// Refuses, before anything is created, maps that do not fit in what
    /// the tracer's own memory cgroup has left: the kernel would charge
    /// them there, and the OOM killer would take the tracer (or a process
    /// beside it) instead of failing the load.
    fn check_fits(&self) -> Result<(), TracerError> {
        let own = crate::alert::memlimit::Source::of_pid(std::process::id());
        let Ok(state) = own.read() else {
            return Ok(());
        };
        let (Some(cgroup), Some(limit)) = (state.cgroup, state.limit_bytes) else {
            return Ok(());
        };
        let need = self.kernel_bytes();
        let free = limit.saturating_sub(state.usage_bytes);
        if need + TRACER_OWN_BYTES <= free {
            return Ok(());
        }
        Err(TracerError::MapsDoNotFit {
            need,
            free,
            limit,
            cgroup,
            hint: SHRINK_MAPS,
        })
    }
}

impl Kernel {
    /// Loads the programs with map sizes `sizes`. Nothing counts until a
    /// process is added ([`Kernel::add_target`]).
    pub fn load(sizes: MapSizes) -> Result<Self, TracerError> {
        if EBPF_OBJECT.is_empty() {
            return Err(TracerError::NoEbpfObject);
        }
        sizes.check_fits()?;
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let mut ebpf = EbpfLoader::new()
            .override_global(maps::PAGE_SIZE, &page_size, true)
            .override_global(
                maps::TASK_EXIT_CODE,
                &task_exit_code_offset().unwrap_or(0),
                true,
            )
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
            .map_max_entries(maps::TARGETS, sizes.processes)
            .map_max_entries(maps::GO_RUNTIMES, sizes.processes)
            .map_max_entries(maps::OOM_VICTIM, sizes.processes)
            .map_max_entries(maps::EXIT_STATUS, sizes.processes)
            .map_max_entries(maps::UNWIND_MAPPINGS, sizes.processes)
            .load(EBPF_OBJECT)
            .map_err(load_error)?;
        // Before any map is taken out of `ebpf`: the program shares them all.
        let session = if sizes.sample_bytes == 0 && !sizes.adaptive_sampling {
            Err(KernelError::NotSampling)
        } else if std::env::var_os("TRACER_UPROBE_SESSION").is_some_and(|v| v == "0") {
            Err(KernelError::TurnedOff)
        } else {
            MultiProgram::load(
                EBPF_OBJECT,
                Program::AllocSession,
                MultiKind::Session,
                &ebpf,
            )
        };
        let multi = if std::env::var_os("TRACER_UPROBE_MULTI").is_some_and(|v| v == "0") {
            Err(KernelError::MultiTurnedOff)
        } else {
            Program::ALL
                .iter()
                .filter_map(|&p| {
                    let kind = match p.attach() {
                        Attach::Uprobe => MultiKind::Entry,
                        Attach::Uretprobe => MultiKind::Return,
                        _ => return None,
                    };
                    Some(MultiProgram::load(EBPF_OBJECT, p, kind, &ebpf).map(|m| (p, m)))
                })
                .collect()
        };
        if let Err(e) = &multi {
            log::info!(
                "uprobes attach one by one (each takes ~0.1 s to detach): batched \
                 uprobe_multi links unavailable: {}",
                crate::error::chain(e)
            );
        }
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::info!(
                    "no eBPF run-time statistics ({e}): the overhead estimate prices traps only"
                );
                None
            }
        };
        // The logger must stay alive: dropping it closes the log map's fd.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logging unavailable: {e}");
                None
            }
        };
        // The uprobes for perf events where batched links are unavailable;
        // the session program is loaded above, the tracepoint by
        // watch_oom_kills.
        for program in Program::ALL {
            if multi.is_ok() || !matches!(program.attach(), Attach::Uprobe | Attach::Uretprobe) {
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
        let oom_victim = HashMap::try_from(take(&mut ebpf, maps::OOM_VICTIM)?).map_err(load_err)?;
        let targets = HashMap::try_from(take(&mut ebpf, maps::TARGETS)?).map_err(load_err)?;
        let proc_events =
            RingBuf::try_from(take(&mut ebpf, maps::PROC_EVENTS)?).map_err(load_err)?;
        let go_runtimes =
            HashMap::try_from(take(&mut ebpf, maps::GO_RUNTIMES)?).map_err(load_err)?;
        let allocs = HashMap::try_from(take(&mut ebpf, maps::ALLOCS)?).map_err(load_err)?;
        let go_goroutines =
            HashMap::try_from(take(&mut ebpf, maps::GO_GOROUTINES)?).map_err(load_err)?;
        let unwind_rows = Array::try_from(take(&mut ebpf, maps::UNWIND_ROWS)?).map_err(load_err)?;
        let unwind_mappings =
            HashMap::try_from(take(&mut ebpf, maps::UNWIND_MAPPINGS)?).map_err(load_err)?;
        let probe_hits =
            PerCpuArray::try_from(take(&mut ebpf, maps::PROBE_HITS)?).map_err(load_err)?;
        let exit_status =
            HashMap::try_from(take(&mut ebpf, maps::EXIT_STATUS)?).map_err(load_err)?;
        let mut sample_rate: Array<MapData, u64> =
            Array::try_from(take(&mut ebpf, maps::SAMPLE_RATE)?).map_err(load_err)?;
        sample_rate
            .set(0, sizes.sample_bytes, 0)
            .map_err(|e| load_err(format!("setting the sampling rate: {e}")))?;
        Ok(Self {
            ebpf,
            logger,
            sites,
            site_cache: StdHashMap::new(),
            targets,
            proc_events: Some(proc_events),
            go_runtimes,
            allocs,
            go_goroutines,
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
            multi,
            links: Vec::new(),
            sampled: Vec::new(),
            tracepoints: Vec::new(),
            _stats: stats,
            slots: Vec::new(),
            sample_rate,
            exit_status,
            probe_hits,
            detached: false,
        })
    }

    /// The running kernel and the optional features found in it.
    pub fn info(&self) -> crate::schema::KernelInfo {
        crate::schema::KernelInfo {
            release: crate::target::kernel_release(),
            batched_uprobes: self.multi.is_ok(),
            uprobe_sessions: match &self.session {
                Err(KernelError::NotSampling) => None,
                s => Some(s.is_ok()),
            },
        }
    }

    /// Why probes attach one by one, when they do.
    pub fn batching_unavailable(&self) -> Option<String> {
        self.multi.as_ref().err().map(|e| crate::error::chain(e))
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
        // Each entry probe counts its hits in a slot its cookie names, and
        // the slot remembers what the probe runs and on which instruction.
        let plan: Vec<PlannedProbe> = plan
            .iter()
            .map(|p| {
                let mut p = p.clone();
                let session = p.op.is_some() && self.session.is_ok();
                let (program, value) = match p.op {
                    Some(op) if session => (Program::AllocSession, op as u64),
                    _ => (p.program, p.cookie.unwrap_or(0)),
                };
                let counted = matches!(program.attach(), Attach::Uprobe | Attach::Session);
                let slot = if counted && (self.slots.len() as u32) < PROBE_SLOTS - 1 {
                    self.slots
                        .push((program, is_emulated_at(&p.object.open_path, p.offset)));
                    self.slots.len() as u32
                } else {
                    0
                };
                p.cookie = Some(tracer_common::cookie(value as u32, slot, pid));
                p
            })
            .collect();
        let plan = &plan[..];
        // One link per (program, file) where the kernel has batched links,
        // attached in the order of each batch's first probe: frees before
        // anything that allocates, returns before their entries. Entries of
        // allocating functions become sessions, attached last.
        let mut batches: Vec<(Program, &PlannedProbe, Vec<&PlannedProbe>)> = Vec::new();
        let mut sessions: Vec<(&PlannedProbe, Vec<&PlannedProbe>)> = Vec::new();
        let same_file =
            |a: &PlannedProbe, b: &PlannedProbe| a.object.open_path == b.object.open_path;
        for probe in plan {
            if self.session.is_ok() {
                if probe.program == Program::AllocReturn {
                    continue;
                }
                if probe.op.is_some() {
                    match sessions.iter_mut().find(|(p, _)| same_file(p, probe)) {
                        Some((_, v)) => v.push(probe),
                        None => sessions.push((probe, vec![probe])),
                    }
                    continue;
                }
            }
            if self.multi.is_ok() && !probe.sampled {
                match batches
                    .iter_mut()
                    .find(|(prog, p, _)| *prog == probe.program && same_file(p, probe))
                {
                    Some((_, _, v)) => v.push(probe),
                    None => batches.push((probe.program, probe, vec![probe])),
                }
                continue;
            }
            let link = self.attach_one(probe, pid, scope)?;
            if probe.sampled {
                self.sampled.push((pid, probe.clone(), Some(link)));
            } else {
                self.links.push((pid, link));
            }
            attached.push(attached_probe(probe, probe.program));
        }
        for (program, _, probes) in batches {
            let fd = match &self.multi {
                Ok(programs) => match programs.iter().find(|(p, _)| *p == program) {
                    Some((_, m)) => attach_batch(m, &probes, pid)?,
                    None => return Err(batch_err(&probes, "no batched program".into())),
                },
                Err(_) => continue,
            };
            self.links.push((pid, Link::Multi(fd)));
            attached.extend(probes.iter().map(|p| attached_probe(p, program)));
        }
        if let Ok(program) = &self.session {
            for (_, probes) in sessions {
                let fd = attach_batch(program, &probes, pid)?;
                self.links.push((pid, Link::Multi(fd)));
                attached.extend(
                    probes
                        .iter()
                        .map(|p| attached_probe(p, Program::AllocSession)),
                );
            }
        }
        Ok(attached)
    }

    /// Attaches one probe, batched if the kernel can (a batch of one).
    fn attach_one(
        &mut self,
        probe: &PlannedProbe,
        pid: u32,
        scope: UProbeScope,
    ) -> Result<Link, TracerError> {
        if let Ok(programs) = &self.multi {
            return match programs.iter().find(|(p, _)| *p == probe.program) {
                Some((_, m)) => attach_batch(m, &[probe], pid).map(Link::Multi),
                None => Err(batch_err(&[probe], "no batched program".into())),
            };
        }
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
            .map(Link::Perf)
            .map_err(|e| attach_err(crate::error::chain(&e)))
    }

    /// Attaches (`on`) or detaches the probes planned as `sampled`; true if
    /// any changed. A link closes in the background: closing one takes the
    /// kernel tens of milliseconds, which the collector should not wait for.
    pub fn set_sampled_probes(&mut self, pid: u32, on: bool) -> Result<bool, TracerError> {
        let scope = probe_scope(pid);
        let mut changed = false;
        for i in 0..self.sampled.len() {
            if self.sampled[i].0 != pid {
                continue;
            }
            match (on, self.sampled[i].2.is_some()) {
                (true, false) => {
                    let probe = self.sampled[i].1.clone();
                    let link = self.attach_one(&probe, pid, scope)?;
                    self.sampled[i].2 = Some(link);
                    changed = true;
                }
                (false, true) => {
                    if let Some(link) = self.sampled[i].2.take() {
                        std::thread::spawn(move || drop(link));
                    }
                    changed = true;
                }
                _ => {}
            }
        }
        Ok(changed)
    }

    /// Each program's hits and time since load, but the calibration's;
    /// None if the kernel's statistics are unreadable.
    pub fn probe_runs(&self) -> Option<Vec<ProgramRuns>> {
        // Each counted probe's hits, summed over CPUs, by program and kind
        // of instruction.
        let mut hits: StdHashMap<Program, (u64, u64)> = StdHashMap::new();
        for (i, (program, emulated)) in self.slots.iter().enumerate() {
            let Ok(per_cpu) = self.probe_hits.get(&(i as u32 + 1), 0) else {
                continue;
            };
            let n: u64 = per_cpu.iter().sum();
            let e = hits.entry(*program).or_default();
            if *emulated {
                e.0 += n;
            } else {
                e.1 += n;
            }
        }
        let mut all = Vec::new();
        let mut add = |program: Program, (bpf_ns, runs): (u64, u64)| {
            let kind = match program.attach() {
                Attach::Uprobe => RunKind::Entry,
                Attach::Uretprobe => RunKind::Return,
                Attach::Session => RunKind::Session,
                Attach::Tracepoint { .. } => return,
            };
            let (emulated_hits, stepped_hits) = hits.get(&program).copied().unwrap_or_default();
            all.push(ProgramRuns {
                program,
                kind,
                runs,
                bpf_ns,
                emulated_hits,
                stepped_hits,
            });
        };
        let calibration =
            |p: &Program| matches!(p, Program::CalibrateEntry | Program::CalibrateReturn);
        match &self.multi {
            Ok(programs) => {
                for (p, m) in programs.iter().filter(|(p, _)| !calibration(p)) {
                    add(*p, m.run_stats().ok()?);
                }
            }
            Err(_) => {
                for p in Program::ALL.iter().filter(|p| !calibration(p)) {
                    if !matches!(p.attach(), Attach::Uprobe | Attach::Uretprobe) {
                        continue;
                    }
                    let Some(prog) = self.ebpf.program(p.name()) else {
                        continue;
                    };
                    let Ok(fd) = prog.fd() else {
                        continue;
                    };
                    add(*p, uprobe_multi::run_stats(fd.as_fd()).ok()?);
                }
            }
        }
        if let Ok(session) = &self.session {
            add(Program::AllocSession, session.run_stats().ok()?);
        }
        Some(all)
    }

    /// Times functions of the tracer's own, bare and under an empty program
    /// (at an emulated and at a single-stepped entry, then at a return):
    /// what a trap costs here. Takes some 0.1 s.
    pub fn calibrate(&mut self) -> Result<TrapCost, TracerError> {
        use crate::overhead::{
            CalibrationPoint, calibration_point, time_calls, tracer_calibration_emulated,
            tracer_calibration_stepped,
        };
        const CALLS: u64 = 5_000;
        let failed = |reason: String| TracerError::Attach {
            function: "tracer_calibration_point".into(),
            path: PathBuf::from("/proc/self/exe"),
            reason,
        };
        let me = std::process::id();
        let mut timed = |program: Program, f: CalibrationPoint| -> Result<f64, TracerError> {
            let (path, offset) = calibration_point(f)
                .ok_or_else(|| failed("not found in the tracer's own mappings".into()))?;
            let bare = time_calls(f, CALLS);
            let link = match &self.multi {
                Ok(programs) => {
                    let (_, m) = programs
                        .iter()
                        .find(|(p, _)| *p == program)
                        .ok_or_else(|| failed(format!("no program {}", program.name())))?;
                    Link::Multi(
                        m.attach(&path, &[offset], &[0], me)
                            .map_err(|e| failed(e.to_string()))?,
                    )
                }
                Err(_) => {
                    let prog: &mut UProbe = self
                        .ebpf
                        .program_mut(program.name())
                        .ok_or_else(|| failed(format!("no program {}", program.name())))?
                        .try_into()
                        .map_err(|e| failed(format!("{e}")))?;
                    let point = UProbeAttachPoint {
                        location: UProbeAttachLocation::AbsoluteOffset(offset),
                        cookie: None,
                    };
                    let id = prog
                        .attach(point, &path, probe_scope(me))
                        .map_err(|e| failed(crate::error::chain(&e)))?;
                    Link::Perf(
                        prog.take_link(id)
                            .map_err(|e| failed(crate::error::chain(&e)))?,
                    )
                }
            };
            let probed = time_calls(f, CALLS);
            // Closing waits for the kernel; nobody needs to.
            std::thread::spawn(move || drop(link));
            Ok((probed - bare).max(0.0))
        };
        Ok(TrapCost {
            emulated_ns: timed(Program::CalibrateEntry, tracer_calibration_emulated)?,
            stepped_ns: timed(Program::CalibrateEntry, tracer_calibration_stepped)?,
            return_ns: timed(Program::CalibrateReturn, tracer_calibration_emulated)?,
        })
    }

    /// Whether [`Kernel::detach_probes`] took every probe off.
    pub fn probes_detached(&self) -> bool {
        self.detached
    }

    /// The heap sampling rate in bytes (0: every allocation).
    pub fn sample_bytes(&self) -> u64 {
        self.sample_rate.get(&0, 0).unwrap_or(0)
    }

    /// Whether sampling leaves out calls' return traps (uprobe sessions):
    /// only then does a higher rate lower the cost much.
    pub fn sampling_skips_returns(&self) -> bool {
        self.session.is_ok()
    }

    /// Changes the heap sampling rate while tracing. Blocks kept before
    /// keep their weight; a call in flight at the change is weighed at the
    /// new rate.
    pub fn set_sample_bytes(&mut self, rate: u64) -> Result<(), TracerError> {
        self.sample_rate
            .set(0, rate, 0)
            .map_err(|e| TracerError::MapRead {
                map: maps::SAMPLE_RATE,
                reason: e.to_string(),
            })?;
        self.sizes.sample_bytes = rate;
        Ok(())
    }

    /// Takes every probe off the target (in parallel, in the background):
    /// the maps keep what they counted.
    pub fn detach_probes(&mut self) {
        self.detached = true;
        let links: Vec<Link> = std::mem::take(&mut self.links)
            .into_iter()
            .map(|(_, l)| l)
            .chain(self.sampled.drain(..).filter_map(|(_, _, l)| l))
            .collect();
        std::thread::spawn(move || close_links(links));
    }

    /// Takes process `pid`'s probes off (in the background): it is no
    /// longer traced.
    pub fn detach_process(&mut self, pid: u32) {
        let links = self.take_links_of(pid);
        if !links.is_empty() {
            std::thread::spawn(move || close_links(links));
        }
    }

    /// Takes process `pid`'s probes off and returns once the kernel has
    /// dropped them (one grace period, the links closed in parallel).
    pub fn detach_process_now(&mut self, pid: u32) {
        close_links(self.take_links_of(pid));
    }

    fn take_links_of(&mut self, pid: u32) -> Vec<Link> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(p, _)| *p == pid);
        self.links = kept;
        let (gone_sampled, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sampled)
            .into_iter()
            .partition(|(p, _, _)| *p == pid);
        self.sampled = kept;
        gone.into_iter()
            .map(|(_, l)| l)
            .chain(gone_sampled.into_iter().filter_map(|(_, _, l)| l))
            .collect()
    }

    /// Makes process `tgid` a target (`bits`: [`tracer_common::target`]),
    /// with its Go runtime's offsets for a Go program.
    pub fn add_target(
        &mut self,
        tgid: u32,
        bits: u32,
        go: Option<GoOffsets>,
    ) -> Result<(), TracerError> {
        let write = |map, e: aya::maps::MapError| TracerError::MapWrite {
            map,
            reason: e.to_string(),
        };
        match go {
            Some(o) => self
                .go_runtimes
                .insert(tgid, o, 0)
                .map_err(|e| write(maps::GO_RUNTIMES, e))?,
            None => {
                let _ = self.go_runtimes.remove(&tgid);
            }
        }
        self.targets
            .insert(tgid, bits, 0)
            .map_err(|e| write(maps::TARGETS, e))
    }

    /// The ring buffer that wakes the session when a target forks or execs
    /// (see [`Kernel::watch_processes`]); once.
    pub fn take_process_events(&mut self) -> Option<RingBuf<MapData>> {
        self.proc_events.take()
    }

    /// Every target and its bits, the children the kernel added included.
    pub fn targets(&self) -> Vec<(u32, u32)> {
        self.targets.iter().filter_map(Result::ok).collect()
    }

    /// Clears `bits` of target `tgid`'s (a child hooked, an exec handled).
    pub fn clear_target_bits(&mut self, tgid: u32, bits: u32) {
        if let Ok(v) = self.targets.get(&tgid, 0) {
            // The kernel may set a bit in between (another exec): only the
            // handled ones are cleared, and an exec marked during the
            // handling is seen at the next look.
            let _ = self.targets.insert(tgid, v & !bits, 0);
        }
    }

    /// Stops tracing process `tgid`: its probes and its entries in the
    /// maps that steer the programs go; its sites stay until
    /// [`Kernel::forget_processes`].
    pub fn remove_target(&mut self, tgid: u32) {
        self.detach_process(tgid);
        let _ = self.targets.remove(&tgid);
        let _ = self.go_runtimes.remove(&tgid);
        let _ = self.remove_unwind_mappings(tgid);
    }

    /// Drops every entry of processes `gone` (exited, their final report
    /// out) from the accounting maps, which would otherwise fill with the
    /// dead: a sweep of each map, once for all of them.
    pub fn forget_processes(&mut self, gone: &std::collections::HashSet<u32>) {
        if gone.is_empty() {
            return;
        }
        fn sweep<K: aya::Pod, V: aya::Pod>(
            map: &mut HashMap<MapData, K, V>,
            dead: impl Fn(&K) -> bool,
        ) -> usize {
            let keys: Vec<K> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| dead(k))
                .collect();
            keys.iter().filter(|k| map.remove(k).is_ok()).count()
        }
        let n = sweep(&mut self.allocs, |k| gone.contains(&k.tgid))
            + sweep(&mut self.sites, |k| gone.contains(&k.tgid))
            + sweep(&mut self.go_sites, |k| gone.contains(&k.tgid))
            + sweep(&mut self.go_buckets, |k| gone.contains(&k.tgid))
            + sweep(&mut self.go_timers, |k| gone.contains(&k.tgid))
            + sweep(&mut self.go_goroutines, |k| gone.contains(&k.tgid))
            + sweep(&mut self.exit_status, |k| gone.contains(k))
            + sweep(&mut self.oom_victim, |k| gone.contains(k));
        for tgid in gone {
            let _ = self.targets.remove(tgid);
        }
        log::debug!("forgot {n} map entries of {} exited processes", gone.len());
    }

    /// Whether any probe is planned as `sampled`.
    pub fn has_sampled_probes(&self) -> bool {
        !self.sampled.is_empty()
    }

    /// Reads the whole site map once, for [`Kernel::sites`] of every process.
    pub fn read_sites(&mut self) -> Result<(), TracerError> {
        self.site_cache.clear();
        for r in self.sites.iter() {
            let (k, v) = r.map_err(|e| TracerError::MapRead {
                map: maps::SITES,
                reason: e.to_string(),
            })?;
            self.site_cache.entry(k.tgid).or_default().push((k, v));
        }
        Ok(())
    }

    /// Statistics of process `tgid`'s sites, as [`Kernel::read_sites`] last
    /// read them.
    pub fn sites(&self, tgid: u32) -> Vec<(SiteKey, SiteStats)> {
        self.site_cache.get(&tgid).cloned().unwrap_or_default()
    }

    /// Watches the kernel's OOM killer (tracepoint oom:mark_victim). Needs
    /// tracefs, which is mounted at /sys/kernel/tracing when it is not.
    pub fn watch_oom_kills(&mut self) -> Result<(), KernelError> {
        if std::env::var_os("TRACER_OOM_TRACEPOINT").is_some_and(|v| v == "0") {
            return Err(KernelError::OomTracepointTurnedOff);
        }
        self.attach_tracepoint(Program::OomMarkVictim)
    }

    /// Records the targets' exit statuses (tracepoint
    /// sched:sched_process_exit) for [`Kernel::exit_status`]: `attach` is
    /// not the target's parent, so no wait(2) tells it.
    pub fn watch_exit(&mut self) -> Result<(), KernelError> {
        if task_exit_code_offset().is_none() {
            return Err(KernelError::NoTaskLayout);
        }
        self.attach_tracepoint(Program::ProcessExit)
    }

    /// Marks targets that exec (tracepoint sched:sched_process_exec) and,
    /// for those that follow forks, makes their children targets (task:
    /// task_newtask) from birth.
    pub fn watch_processes(&mut self) -> Result<(), KernelError> {
        self.attach_tracepoint(Program::ProcessExec)?;
        self.attach_tracepoint(Program::ProcessFork)
    }

    /// Target `tgid`'s exit status as wait(2) gives it, once it exited.
    pub fn exit_status(&self, tgid: u32) -> Option<u32> {
        self.exit_status.get(&tgid, 0).ok().map(|v| v as u32)
    }

    fn attach_tracepoint(&mut self, program: Program) -> Result<(), KernelError> {
        if self.tracepoints.contains(&program) {
            return Ok(());
        }
        ensure_tracefs()?;
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
        self.tracepoints.push(program);
        Ok(())
    }

    /// The OOM victim record, once the kernel has marked target `tgid`.
    pub fn oom_victim(&self, tgid: u32) -> Option<OomVictim> {
        self.oom_victim.get(&tgid, 0).ok().filter(|v| v.pid != 0)
    }

    /// Process `tgid`'s timers pending since their creation probe: timer →
    /// creation stack id.
    pub fn go_timers(&self, tgid: u32) -> Result<Vec<(u64, u32)>, TracerError> {
        Ok(read_all(&self.go_timers, maps::GO_TIMERS)?
            .into_iter()
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, v)| (k.addr, v))
            .collect())
    }

    /// Forgets process `tgid`'s timer `t` (retired: no timer heap holds it).
    pub fn remove_go_timer(&mut self, tgid: u32, t: u64) {
        let _ = self.go_timers.remove(&ProcKey::new(tgid, t));
    }

    /// Process `tgid`'s goroutines per creation site.
    pub fn go_sites(&self, tgid: u32) -> Result<Vec<(GoSiteKey, SiteStats)>, TracerError> {
        Ok(read_all(&self.go_sites, maps::GO_SITES)?
            .into_iter()
            .filter(|(k, _)| k.tgid == tgid)
            .collect())
    }

    /// Process `tgid`'s sampled objects per Go memory-profile bucket.
    pub fn go_buckets(&self, tgid: u32) -> Result<Vec<(u64, SiteStats)>, TracerError> {
        Ok(read_all(&self.go_buckets, maps::GO_BUCKETS)?
            .into_iter()
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, v)| (k.addr, v))
            .collect())
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

fn attached_probe(probe: &PlannedProbe, program: Program) -> AttachedProbe {
    AttachedProbe {
        function: probe.function.clone(),
        path: probe.object.path.display().to_string(),
        offset: probe.offset,
        program: program.name().into(),
    }
}

fn batch_err(probes: &[&PlannedProbe], reason: String) -> TracerError {
    TracerError::Attach {
        function: probes
            .iter()
            .map(|p| p.function.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        path: probes
            .first()
            .map(|p| p.object.path.clone())
            .unwrap_or_default(),
        reason,
    }
}

/// One batched link for `probes`, all in one file.
fn attach_batch(
    program: &MultiProgram,
    probes: &[&PlannedProbe],
    pid: u32,
) -> Result<OwnedFd, TracerError> {
    let Some(first) = probes.first() else {
        return Err(batch_err(probes, "no probe".into()));
    };
    let offsets: Vec<u64> = probes.iter().map(|p| p.offset).collect();
    // Set by `attach`: the operation or the program's own value, and the
    // probe's hit slot.
    let cookies: Vec<u64> = probes.iter().map(|p| p.cookie.unwrap_or(0)).collect();
    program
        .attach(&first.object.open_path, &offsets, &cookies, pid)
        .map_err(|e| batch_err(probes, format!("uprobe_multi link: {e}")))
}

/// Whether the kernel emulates the instruction at `offset` of `path` at a
/// uprobe (else it single-steps it). Unreadable: assumed emulated.
fn is_emulated_at(path: &std::path::Path, offset: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut code = [0u8; 16];
    let Ok(file) = std::fs::File::open(path) else {
        return true;
    };
    let Ok(n) = file.read_at(&mut code, offset) else {
        return true;
    };
    let ins =
        iced_x86::Decoder::with_ip(64, &code[..n], 0, iced_x86::DecoderOptions::NONE).decode();
    crate::probes::placement::is_emulated(&ins)
}

/// Uprobes of one process, or of all (pid 0).
fn probe_scope(pid: u32) -> UProbeScope {
    match NonZeroU32::new(pid) {
        Some(p) => UProbeScope::OneProcess(p),
        None => UProbeScope::AllProcesses,
    }
}

impl Drop for Kernel {
    /// Detaches every link at once. Each waits for an RCU grace period in
    /// the kernel (~0.1 s); one after another that is seconds, while the
    /// target keeps paying for the probes. A batched link waits once for all
    /// its probes (see [`uprobe_multi`]); perf-event links, one per probe,
    /// are closed in parallel.
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.links).into_iter().map(|(_, l)| l);
        let sampled = self.sampled.drain(..).filter_map(|(_, _, l)| l);
        close_links(links.chain(sampled).collect());
    }
}

/// Closes links in parallel, each on a thread of its own: each waits for an
/// RCU grace period. A link no thread could be spawned for is dropped by the
/// failed spawn, in turn.
fn close_links(links: Vec<Link>) {
    std::thread::scope(|s| {
        for link in links {
            let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(link));
        }
    });
}

/// Offset of `exit_code` in the running kernel's `task_struct`, from its
/// BTF (read once).
fn task_exit_code_offset() -> Option<u32> {
    static OFFSET: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux").ok()?;
        btf.resolve_types_by_name("task_struct")
            .ok()?
            .iter()
            .find_map(|t| match t {
                btf_rs::Type::Struct(s) => s.members.iter().find_map(|m| {
                    (btf.resolve_name(m).ok()? == "exit_code"
                        && m.bitfield_size().unwrap_or(0) == 0)
                        .then(|| m.bit_offset() / 8)
                }),
                _ => None,
            })
            .filter(|&o| o > 0)
    })
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
