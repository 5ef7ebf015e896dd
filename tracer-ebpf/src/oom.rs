//! The kernel's OOM killer: the victim's record when it is the target.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TracePointContext};
use tracer_common::OomVictim;

use crate::maps::{OOM_VICTIM, target_tgid};

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
