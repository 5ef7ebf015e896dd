//! The target's end as the kernel sees it: its OOM kill, its exit status.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    programs::TracePointContext,
};
use tracer_common::OomVictim;

use crate::maps::{EXIT_STATUS, OOM_VICTIM, TASK_EXIT_CODE, target_tgid};

pub(crate) fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<u32, u32> {
    let pid: i32 = unsafe { ctx.read_at(8) }.map_err(|_| 1u32)?;
    let want = target_tgid();
    if want != 0 && pid as u32 != want {
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
    OOM_VICTIM.set(0, &victim, 0).map_err(|_| 1u32)?;
    Ok(0)
}

/// sched:sched_process_exit runs in the exiting task, after do_exit set its
/// `exit_code` and before its parent can be told: the target's main
/// thread's status, for `target_exited` in `attach` mode.
pub(crate) fn try_process_exit(_ctx: &TracePointContext) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let want = target_tgid();
    if want == 0 || tgid != want || tid != tgid {
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
        .set(0, &(u64::from(code as u32) | (1 << 32)), 0)
        .map_err(|_| 1u32)?;
    Ok(0)
}
