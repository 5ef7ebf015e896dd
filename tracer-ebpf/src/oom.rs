//! The target's end as the kernel sees it: its OOM kill, its exit status.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    programs::TracePointContext,
};
use tracer_common::OomVictim;

use tracer_common::target;

use crate::maps::{EXIT_STATUS, OOM_VICTIM, PROC_EVENTS, TARGETS, TASK_EXIT_CODE, is_traced};

pub(crate) fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<u32, u32> {
    let pid: i32 = unsafe { ctx.read_at(8) }.map_err(|_| 1u32)?;
    if !is_traced(pid as u32) {
        return Ok(0);
    }
    let field = |off: usize| -> u64 { unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0) };
    let victim = OomVictim {
        pid: pid as u32,
        _pad: 0,
        total_vm_kb: field(16),
        anon_rss_kb: field(24),
        file_rss_kb: field(32),
        shmem_rss_kb: field(40),
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    OOM_VICTIM
        .insert(&(pid as u32), &victim, 0)
        .map_err(|_| 1u32)?;
    Ok(0)
}

/// sched:sched_process_exit runs in the exiting task, after do_exit set its
/// `exit_code` and before its parent can be told: the target's main
/// thread's status, for `target_exited` in `attach` mode.
pub(crate) fn try_process_exit(_ctx: &TracePointContext) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if tid != tgid || !is_traced(tgid) {
        return Ok(0);
    }
    let offset = unsafe { core::ptr::read_volatile(&TASK_EXIT_CODE) };
    if offset == 0 {
        return Ok(0);
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let code: i32 = unsafe { bpf_probe_read_kernel(task.add(offset as usize) as *const i32) }
        .map_err(|_| 1u32)?;
    EXIT_STATUS
        .insert(&tgid, &u64::from(code as u32), 0)
        .map_err(|_| 1u32)?;
    Ok(0)
}

/// task:task_newtask runs in the parent as a task is created (fields: pid
/// at 8, clone_flags at 32). A new process whose parent follows forks is a
/// target from birth, before it runs: its probes' events count as soon as
/// the collector attaches them.
pub(crate) fn try_process_fork(ctx: &TracePointContext) -> Result<u32, u32> {
    const CLONE_THREAD: u64 = 0x10000;
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(bits) = (unsafe { TARGETS.get(&parent) }).copied() else {
        return Ok(0);
    };
    if bits & target::FOLLOW_FORKS == 0 {
        return Ok(0);
    }
    let flags: u64 = unsafe { ctx.read_at(32) }.map_err(|_| 1u32)?;
    if flags & CLONE_THREAD != 0 {
        return Ok(0);
    }
    let child: i32 = unsafe { ctx.read_at(8) }.map_err(|_| 1u32)?;
    let bits = target::TRACED | target::FOLLOW_FORKS | target::NEW_CHILD;
    if TARGETS.insert(&(child as u32), &bits, 0).is_err() {
        crate::counters::count(tracer_common::Counter::ProcessMapFull);
        return Err(1);
    }
    crate::counters::count(tracer_common::Counter::ProcessesFollowed);
    let _ = PROC_EVENTS.output::<u32>(child as u32, 0);
    Ok(0)
}

/// sched:sched_process_exec runs in the process that exec'd: marks a
/// target so the collector re-plans for the new image at once.
pub(crate) fn try_process_exec(_ctx: &TracePointContext) -> Result<u32, u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(bits) = TARGETS.get_ptr_mut(&tgid) else {
        return Ok(0);
    };
    unsafe { *bits |= target::EXECED };
    let _ = PROC_EVENTS.output::<u32>(tgid, 0);
    Ok(0)
}
