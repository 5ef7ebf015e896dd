//! mmap, mremap and munmap: lengths rounded to pages, accounted as
//! [`Kind::Mmap`] blocks by the shared return half in [`crate::heap`].

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::ProbeContext};
use tracer_common::{Counter, Kind, Op};

use crate::{
    counters::count,
    heap::{release, remember},
    maps::{PAGE_SIZE, is_target},
};

pub(crate) const MAP_FAILED: u64 = u64::MAX;

pub(crate) fn try_mmap(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(len) = ctx.arg::<u64>(1) else {
        return Err(1);
    };
    remember(ctx, ctx.regs, Op::Mmap, round_up_page(len), 0, false).map(|_| 0)
}

pub(crate) fn try_mremap(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(old), Some(new_len)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(2)) else {
        return Err(1);
    };
    remember(
        ctx,
        ctx.regs,
        Op::Mremap,
        round_up_page(new_len),
        old,
        false,
    )
    .map(|_| 0)
}

#[inline(always)]
pub(crate) fn round_up_page(len: u64) -> u64 {
    let page = unsafe { core::ptr::read_volatile(&PAGE_SIZE) };
    let mask = page.wrapping_sub(1);
    len.saturating_add(mask) & !mask
}

pub(crate) fn try_munmap(ctx: &ProbeContext) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !is_target(id) {
        return Ok(0);
    }
    let (Some(addr), Some(len)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return Err(1);
    };
    count(Counter::FreeCalls);
    // glibc's free() unmaps large chunks itself; those addresses were never
    // recorded as mappings (the mmap inside malloc was nested) and are ignored
    // by the kind check in release().
    release((id >> 32) as u32, addr, Kind::Mmap, round_up_page(len));
    Ok(0)
}
