//! The Go runtime probes for a Go executable, and what the collector needs
//! to know about its runtime (offsets, where the memory profile lives).

use tracer_common::Program;

use crate::{
    error::TracerError,
    object::ElfObjects,
    probes::{ObjectRef, PlannedProbe},
};

/// What a Go executable gets hooked with, and what the collector needs to
/// know about its runtime.
#[derive(Clone, Debug)]
pub struct GoPlan {
    pub version: super::GoVersion,
    pub offsets: tracer_common::GoOffsets,
    /// False when the version is newer than the offset table (warned about).
    pub known_version: bool,
    pub probes: Vec<PlannedProbe>,
    /// Virtual address of `runtime.MemProfileRate`, when the symbol table has it.
    pub mem_profile_rate: Option<u64>,
    /// Where the memory profile is read from, when the binary has symbols
    /// and DWARF; else heap samples come from probes.
    pub mem_profile: Option<super::MemProfileLayout>,
    /// The executable, to translate its virtual addresses.
    pub object: ObjectRef,
    /// (virtual address, file offset) of its first loadable segment.
    pub first_segment: (u64, u64),
    /// Virtual address range of `time.newTimer` (Go ≥ 1.23).
    pub newtimer: Option<(u64, u64)>,
    /// Virtual address of `time.sendTime` (Go ≥ 1.23).
    pub sendtime: Option<u64>,
    /// Virtual address of `time.goFunc`, which runs `time.AfterFunc`'s
    /// function: a pending timer is named by that function instead.
    pub gofunc: Option<u64>,
    /// Position-independent executable: runtime addresses need the load bias.
    pub pie: bool,
    /// Where the runtime's goroutine list is: goroutines are then read from
    /// it each snapshot, and creation and exit get no probe.
    pub census: Option<super::CensusLayout>,
    /// Where the runtime's timer heaps are: a timer's stop and firing then
    /// get no probe (a snapshot retires the timers no heap holds).
    pub timer_heaps: Option<super::TimerHeapLayout>,
}

/// Plans the Go runtime probes for `obj` if it is a Go executable. The file
/// comes from `elves`, shared with the other planners.
pub fn plan_go(obj: &ObjectRef, elves: &mut ElfObjects) -> Result<Option<GoPlan>, TracerError> {
    let elf = elves.get(&obj.open_path).map_err(|e| match e {
        // Named as the user knows it, not by the path we open.
        TracerError::UnreadableBinary { reason, .. } => TracerError::UnreadableBinary {
            path: obj.path.clone(),
            reason,
        },
        e => e,
    })?;
    let elf = &*elf;
    let Some(version) = super::go_version(elf) else {
        return Ok(None);
    };
    if version.major == 1 && version.minor < super::OLDEST_MINOR {
        log::warn!(
            "{} was built by {version}, older than the oldest Go release this tracer \
             knows (1.{}): its goroutines, timers and Go heap are not traced (libc \
             allocations still are)",
            obj.path.display(),
            super::OLDEST_MINOR
        );
        return Ok(None);
    }
    // Offsets from DWARF when the binary has it: right for any release. The
    // per-release table serves stripped binaries.
    let (offsets, known_version, cycle, dwarf_timer_heap) = match super::dwarf_facts(elf) {
        Some(f) => {
            log::debug!("{}: Go runtime offsets from DWARF", obj.path.display());
            (f.offsets, true, f.mem_record_cycle, f.timer_heap)
        }
        None => {
            let (o, known) = super::offsets_for(&version);
            (o, known, None, None)
        }
    };
    // With the symbol table and DWARF, the heap profile is read from the
    // runtime's own records (as runtime.MemProfile does): no probe on the
    // sampling path at all. Stripped binaries get the two heap probes.
    let mem_profile = elf
        .data_symbol("runtime.mbuckets")
        .map(|s| s.addr)
        .zip(cycle)
        .filter(|(_, cycle)| *cycle >= 16 && cycle % 8 == 0)
        .map(|(mbuckets, cycle_size)| super::MemProfileLayout {
            mbuckets,
            cycle_size,
        });
    let pclntab = super::pclntab::Pclntab::parse(&elf.file());
    let pcln = pclntab.as_ref();
    let mut probes = Vec::new();
    let mut missing = Vec::new();
    let probe = |function: String, offset: u64, program: Program| PlannedProbe {
        function,
        object: obj.clone(),
        offset,
        program,
        cookie: None,
        frees: program.frees(),
        op: None,
        sampled: false,
    };
    let file_off = |f: &super::Function, va: u64| f.file_offset + (va - f.addr);
    // An "entry" probe on the first push rbp past the stack-growth prologue.
    let entry_probe = |f: &super::Function, program: Program| {
        let code = super::code(elf, f)?;
        let at = super::after_prologue(code, f.addr).unwrap_or(f.addr);
        Some(probe(f.name.clone(), file_off(f, at), program))
    };
    // Goroutines from the runtime's own list when it can be found (no trap
    // per goroutine); else probes on their creation and exit.
    let census = if std::env::var_os("TRACER_GO_CENSUS").is_some_and(|v| v == "0") {
        None
    } else {
        super::CensusLayout::find(elf, pcln, &offsets)
    };
    match &census {
        Some(c) => log::debug!(
            "{}: goroutines read from runtime.allgs at {:#x} ({} wait reasons)",
            obj.path.display(),
            c.allgs,
            c.wait_reasons.len()
        ),
        None => log::info!(
            "{}: runtime.allgs not found: goroutines traced with probes",
            obj.path.display()
        ),
    }
    // Exits before creations, frees before allocations.
    let mut entries = Vec::new();
    if census.is_none() {
        let exit = super::function(elf, pcln, "runtime.gdestroy")
            .or_else(|| super::function(elf, pcln, "runtime.goexit0"));
        entries.push((exit, Program::GoGoexit, "runtime.gdestroy/goexit0"));
    }
    if mem_profile.is_none() {
        // Heap samples through probes only where the profile cannot be read.
        entries.push((
            super::function(elf, pcln, "runtime.mProf_Free"),
            Program::GoProfileFree,
            "runtime.mProf_Free",
        ));
        entries.push((
            super::function(elf, pcln, "runtime.setprofilebucket"),
            Program::GoProfileBucket,
            "runtime.setprofilebucket",
        ));
    }
    for (f, program, name) in entries {
        match f.as_ref().and_then(|f| entry_probe(f, program)) {
            Some(p) => probes.push(p),
            None => missing.push(name),
        }
    }
    if census.is_some() {
        // Read from the runtime's list.
    } else if let Some(f) = super::function(elf, pcln, "runtime.newproc1")
        && let Some(code) = super::code(elf, &f)
    {
        for ret in super::ret_sites(code, f.addr) {
            let name = format!("{}+{:#x}", f.name, ret - f.addr);
            probes.push(probe(name, file_off(&f, ret), Program::GoNewproc1Ret));
        }
    } else {
        missing.push("runtime.newproc1");
    }
    // Timers: creation (for its stack); stop and final firing only where
    // the timer heaps cannot be read.
    let timer_heaps = if std::env::var_os("TRACER_GO_TIMER_HEAPS").is_some_and(|v| v == "0") {
        None
    } else if version.major == 1 {
        super::TimerHeapLayout::find(
            elf,
            pcln,
            version.minor,
            offsets.timer_period,
            dwarf_timer_heap,
        )
    } else {
        None
    };
    match &timer_heaps {
        Some(t) => log::debug!(
            "{}: timers retired from the runtime's heaps (allp {:#x}, heap at p+{:#x})",
            obj.path.display(),
            t.allp,
            t.heap
        ),
        None => log::info!(
            "{}: timer heaps not found: timer stops and firings traced with probes",
            obj.path.display()
        ),
    }
    let mut newtimer = None;
    let (_, modinfo) = super::build_info(elf).unwrap_or_default();
    let mut offsets = offsets;
    offsets.count_chan_timers =
        u64::from((version.major == 1 && version.minor <= 22) || super::async_timer_chan(&modinfo));
    let new_timers = version.major > 1 || version.minor >= 23;
    let timer_hooks: &[(&str, Program, Option<u64>)] = match (new_timers, timer_heaps.is_some()) {
        (true, false) => &[
            ("runtime.(*timer).stop", Program::GoTimerStop, None),
            ("runtime.(*timer).unlockAndRun", Program::GoTimerFire, None),
            ("runtime.(*timer).modify", Program::GoTimerModify, None),
        ],
        (true, true) => &[("runtime.(*timer).modify", Program::GoTimerModify, None)],
        (false, false) => &[
            ("time.stopTimer", Program::GoTimerStop, None),
            ("runtime.runOneTimer", Program::GoTimerFire, Some(1)),
            ("time.startTimer", Program::GoTimerStart, None),
        ],
        (false, true) => &[("time.startTimer", Program::GoTimerStart, None)],
    };
    for (name, program, cookie) in timer_hooks {
        let Some(f) = super::function(elf, pcln, name) else {
            // The linker drops the timer code of programs that use no timers.
            log::info!("{name} is not in {}: no timer sites", obj.path.display());
            continue;
        };
        let Some(code) = super::code(elf, &f) else {
            continue;
        };
        let at = super::after_prologue(code, f.addr).unwrap_or(f.addr);
        let mut p = probe(f.name.clone(), file_off(&f, at), *program);
        p.cookie = *cookie;
        // With the heaps read, the creation probe only names the creating
        // code: a bounded sample of creation stacks is enough.
        p.sampled = timer_heaps.is_some();
        probes.push(p);
    }
    let mut sendtime = None;
    if new_timers {
        newtimer = super::function(elf, pcln, "time.newTimer").map(|f| (f.addr, f.addr + f.size));
        sendtime = super::function(elf, pcln, "time.sendTime").map(|f| f.addr);
    }
    if !missing.is_empty() {
        log::warn!(
            "{}: Go runtime functions not found ({}): this Go runtime is laid out \
             differently; those sites will not be traced",
            obj.path.display(),
            missing.join(", ")
        );
    }
    let first_segment = elf.segments().at_file_start().unwrap_or((0, 0));
    Ok(Some(GoPlan {
        version,
        offsets,
        known_version,
        probes,
        mem_profile_rate: elf
            .data_symbol("runtime.MemProfileRate")
            .map(|s| s.addr)
            .or_else(|| super::find_mem_profile_rate(elf, pcln?)),
        mem_profile,
        object: obj.clone(),
        first_segment,
        newtimer,
        sendtime,
        gofunc: super::function(elf, pcln, "time.goFunc").map(|f| f.addr),
        pie: elf.is_dynamic(),
        census,
        timer_heaps,
    }))
}
