//! Kernel side of the tracer: uprobes on the allocator of one process keep, per
//! call stack, the bytes and blocks it still holds.
//!
//! Accounting happens here, not per event in userspace: the return probe of
//! every allocation records `address → (size, stack)` and atomically adds to the
//! stack's statistics; the free probe removes the address and subtracts. The
//! collector only reads the site map once per interval, so the cost per
//! allocation is a few map operations and one stack walk, with no event sent.
//!
//! This file holds only the programs' entry points (their ELF names are
//! [`tracer_common::program::Program`]'s); the work is in the modules:
//! [`heap`] (allocator entries and returns, the accounting), [`mmap`]
//! (mappings), [`go`] (Go runtime), [`oom`] (the OOM killer's victim),
//! [`stacks`] (stack ids), [`maps`] (maps and globals), [`counters`].
#![no_std]
#![no_main]
// The BPF target has no `fetch_add` on core's atomics (it declares no CAS), but
// LLVM lowers an unused atomicrmw add to BPF_ATOMIC_ADD; the intrinsic is the
// way to reach it.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod counters;
mod go;
mod heap;
mod maps;
mod mmap;
mod oom;
mod stacks;
mod unwind;

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};

/// Target of every log record the programs send: the crate's name, as before
/// the split into modules (`module_path!()`, the default, would now name the
/// module), so the log lines and `TRACER_LOG` filters stay as they were.
pub(crate) const LOG_TARGET: &str = "tracer";

/// Whether the probe running `ctx` fired in the process it was attached
/// for (see [`tracer_common::cookie`]: older kernels run every process's
/// perf-event probe on a shared file); if so its hit is counted (the
/// overhead estimate).
#[inline(always)]
fn hit(ctx: &ProbeContext) -> bool {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.regs.cast()) };
    if !own(cookie) {
        return false;
    }
    counters::probe_hit(cookie);
    true
}

/// Whether a probe with `cookie` fired in its own process.
#[inline(always)]
pub(crate) fn own(cookie: u64) -> bool {
    tracer_common::cookie_is_for(cookie, (bpf_get_current_pid_tgid() >> 32) as u32)
}

// ---------------------------------------------------------------- entries

/// Entry and return of every allocating function in one program, for uprobe
/// sessions (Linux 6.13+, loaded by the tracer itself: aya cannot yet). The
/// entry's verdict decides whether the return half runs at all, so the
/// program's return value matters: written without `#[uprobe]`, whose
/// wrapper always returns 0.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
    match heap::try_alloc_session(&ProbeContext::new(ctx)) {
        Ok(v) | Err(v) => v,
    }
}

/// malloc(size), valloc(size), pvalloc(size): the op comes from the cookie.
#[uprobe]
pub fn size_arg0(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_size_arg(&ctx, 0) {
        Ok(v) | Err(v) => v,
    }
}

/// aligned_alloc(align, size), memalign(align, size).
#[uprobe]
pub fn size_arg1(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_size_arg(&ctx, 1) {
        Ok(v) | Err(v) => v,
    }
}

/// calloc(n, size).
#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_calloc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// realloc(ptr, size).
#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_realloc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// reallocarray(ptr, n, size).
#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_reallocarray(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// posix_memalign(memptr, align, size).
#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_posix_memalign(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// mmap(addr, len, prot, flags, fd, off).
#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match mmap::try_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// mremap(old, old_len, new_len, flags, ...).
#[uprobe]
pub fn mremap_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match mmap::try_mremap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

// ---------------------------------------------------------------- returns

/// The one return probe of every allocating function: matches the pending
/// entry and accounts the result.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    if !own(unsafe { bpf_get_attach_cookie(ctx.regs.cast()) }) {
        return 0;
    }
    match heap::try_alloc_return(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

// ---------------------------------------------------------- calibration

/// Nothing, at an entry: what a probe costs before any work (the tracer
/// times a function of its own under it).
#[uprobe]
pub fn calibrate_entry(_ctx: ProbeContext) -> u32 {
    0
}

/// Nothing, at a return.
#[uretprobe]
pub fn calibrate_return(_ctx: RetProbeContext) -> u32 {
    0
}

// ---------------------------------------------------------------- frees

/// free(ptr).
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match heap::try_free(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// munmap(addr, len).
#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match mmap::try_munmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

// ---------------------------------------------------------------- Go
//
// Only entry uprobes and uprobes on RET instructions: a uretprobe rewrites the
// return address, which Go's stack moves turn into a crash.

/// On every RET of runtime.newproc1: the new g is in RAX.
#[uprobe]
pub fn go_newproc1_ret(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_newproc1_ret(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// runtime.gdestroy(gp) (Go ≥ 1.22) or runtime.goexit0(gp) (1.21), after the
/// prologue: gp in RAX.
#[uprobe]
pub fn go_goexit(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_goexit(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// runtime.setprofilebucket(p, b): a sampled object p was allocated from
/// bucket b (in RBX).
#[uprobe]
pub fn go_profile_bucket(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_profile_bucket(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// runtime.mProf_Free(b, ...): a sampled object of bucket b (in RAX) was swept.
#[uprobe]
pub fn go_profile_free(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_profile_free(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// Go ≥ 1.23: runtime.(*timer).modify(t, ...) after its prologue. Called by
/// time.newTimer for every new timer, and by resets.
#[uprobe]
pub fn go_timer_modify(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_timer_modify(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// Go ≤ 1.22: time.startTimer(t) after its prologue.
#[uprobe]
pub fn go_timer_start(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_timer_start(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// A stop: runtime.(*timer).stop(t) (≥ 1.23) or time.stopTimer(t) (≤ 1.22),
/// t in RAX.
#[uprobe]
pub fn go_timer_stop(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_timer_stop(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// A firing: runtime.(*timer).unlockAndRun(t, now) (≥ 1.23, t in RAX) or
/// runtime.runOneTimer(pp, t, now) (≤ 1.22, t in RBX; cookie 1). Final only
/// for one-shot timers (period 0).
#[uprobe]
pub fn go_timer_fire(ctx: ProbeContext) -> u32 {
    if !hit(&ctx) {
        return 0;
    }
    match go::try_go_timer_fire(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

// ---------------------------------------------------------------- OOM kill

/// The kernel's OOM killer chose a victim (tracepoint oom:mark_victim, whose
/// fields are: pid at 8, total_vm 16, anon_rss 24, file_rss 32, shmem_rss 40,
/// in KiB). Recorded when it is the target.
#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    match oom::try_oom_mark_victim(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// The target's main thread exits (tracepoint sched:sched_process_exit):
/// its exit status.
#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    match oom::try_process_exit(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// A task is created (tracepoint task:task_newtask): the children of
/// targets that follow forks become targets.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    match oom::try_process_fork(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// A process exec'd (tracepoint sched:sched_process_exec): a target's image
/// changed.
#[tracepoint]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    match oom::try_process_exec(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
