//! The Go runtime: goroutines by creation site, the memory profile's
//! buckets (stripped binaries), and pending timers by creation stack.
//!
//! Only entry uprobes and uprobes on RET instructions: a uretprobe rewrites the
//! return address, which Go's stack moves turn into a crash.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_probe_read_user},
    maps::HashMap,
    programs::ProbeContext,
};
use aya_log_ebpf::warn;
use tracer_common::{Counter, GoSiteKey, Kind, ProcKey, SiteKey, SiteStats};

use crate::{
    LOG_TARGET,
    counters::{add, count},
    heap::site_stats,
    maps::{GO_BUCKETS, GO_GOROUTINES, GO_SITES, GO_TIMERS, SITES, go_offsets, is_target},
    stacks::{sp_of, stack_id_of},
};

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    match unsafe { bpf_probe_read_user(addr as *const u64) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::GoReadErrors);
            None
        }
    }
}

/// The current process, if it is a target.
#[inline(always)]
fn target() -> Option<u32> {
    let id = bpf_get_current_pid_tgid();
    is_target(id).then_some((id >> 32) as u32)
}

#[inline(always)]
fn stats_entry<K>(map: &HashMap<K, SiteStats>, key: &K) -> Option<*mut SiteStats> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = map.insert(key, &SiteStats::default(), BPF_NOEXIST as u64);
    map.get_ptr_mut(key)
}

pub(crate) fn try_go_newproc1_ret(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    let newg = unsafe { (*ctx.regs).rax };
    if newg == 0 {
        return Ok(0);
    }
    let Some(off) = go_offsets(tgid) else {
        return Err(1);
    };
    let (Some(goid), Some(gopc), Some(startpc)) = (
        read_u64(newg + off.g_goid),
        read_u64(newg + off.g_gopc),
        read_u64(newg + off.g_startpc),
    ) else {
        return Err(1);
    };
    count(Counter::GoroutinesCreated);
    let key = GoSiteKey {
        gopc,
        startpc,
        tgid,
        _pad: 0,
    };
    let Some(site) = stats_entry(&GO_SITES, &key) else {
        count(Counter::GoMapFull);
        return Err(1);
    };
    add(unsafe { &raw mut (*site).allocs }, 1);
    if GO_GOROUTINES
        .insert(&ProcKey::new(tgid, goid), &key, 0)
        .is_err()
    {
        if count(Counter::GoMapFull) == 0 {
            warn!(ctx, target: LOG_TARGET, "goroutine map full: goroutines are being lost");
        }
        return Err(1);
    }
    add(unsafe { &raw mut (*site).outstanding_count }, 1);
    Ok(0)
}

pub(crate) fn try_go_goexit(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    let Some(off) = go_offsets(tgid) else {
        return Err(1);
    };
    let gp = unsafe { (*ctx.regs).rax };
    let Some(goid) = read_u64(gp + off.g_goid) else {
        return Err(1);
    };
    count(Counter::GoroutinesExited);
    let g = ProcKey::new(tgid, goid);
    // Created before attach: not tracked.
    let Some(key) = (unsafe { GO_GOROUTINES.get(&g) }).copied() else {
        return Ok(0);
    };
    let _ = GO_GOROUTINES.remove(&g);
    if let Some(site) = GO_SITES.get_ptr_mut(&key) {
        add(unsafe { &raw mut (*site).outstanding_count }, -1);
        add(unsafe { &raw mut (*site).frees }, 1);
    }
    Ok(0)
}

pub(crate) fn try_go_profile_bucket(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    let bucket = ProcKey::new(tgid, unsafe { (*ctx.regs).rbx });
    let Some(stats) = stats_entry(&GO_BUCKETS, &bucket) else {
        if count(Counter::GoMapFull) == 0 {
            warn!(ctx, target: LOG_TARGET, "Go bucket map full: heap samples are being lost");
        }
        return Err(1);
    };
    count(Counter::GoSamples);
    add(unsafe { &raw mut (*stats).allocs }, 1);
    add(unsafe { &raw mut (*stats).outstanding_count }, 1);
    Ok(0)
}

pub(crate) fn try_go_profile_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    let bucket = ProcKey::new(tgid, unsafe { (*ctx.regs).rax });
    count(Counter::GoSampleFrees);
    // A bucket first seen now only holds objects sampled before attach.
    let Some(stats) = GO_BUCKETS.get_ptr_mut(&bucket) else {
        return Ok(0);
    };
    // Objects sampled before attach may be freed now: never go below zero.
    let live = unsafe { core::ptr::read_volatile(&raw const (*stats).outstanding_count) };
    if live > 0 {
        add(unsafe { &raw mut (*stats).outstanding_count }, -1);
        add(unsafe { &raw mut (*stats).frees }, 1);
    }
    Ok(0)
}

/// A timer became pending: account it to the current stack.
#[inline(always)]
fn timer_created(ctx: &ProbeContext, tgid: u32, t: u64) {
    let t = ProcKey::new(tgid, t);
    if unsafe { GO_TIMERS.get(&t) }.is_some() {
        return; // re-armed while pending: still one pending timer
    }
    // The probe sits on a `push rbp`, where the kernel's walk also reports
    // the direct caller.
    let stack_id = stack_id_of(ctx);
    let key = SiteKey {
        stack_id,
        kind: Kind::Timer as u32,
        tgid,
        _pad: 0,
    };
    let Some(site) = site_stats(&key) else {
        count(Counter::SiteMapFull);
        return;
    };
    add(unsafe { &raw mut (*site).allocs }, 1);
    if GO_TIMERS.insert(&t, &stack_id, 0).is_err() {
        if count(Counter::GoMapFull) == 0 {
            warn!(ctx, target: LOG_TARGET, "timer map full: timers are being lost");
        }
        return;
    }
    count(Counter::TimersCreated);
    add(unsafe { &raw mut (*site).outstanding_count }, 1);
}

/// A timer stopped or fired for good.
#[inline(always)]
fn timer_retired(tgid: u32, t: u64) {
    let t = ProcKey::new(tgid, t);
    let Some(stack_id) = (unsafe { GO_TIMERS.get(&t) }).copied() else {
        return; // created before attach, or already retired
    };
    let _ = GO_TIMERS.remove(&t);
    count(Counter::TimersRetired);
    let key = SiteKey {
        stack_id,
        kind: Kind::Timer as u32,
        tgid,
        _pad: 0,
    };
    if let Some(site) = SITES.get_ptr_mut(&key) {
        add(unsafe { &raw mut (*site).outstanding_count }, -1);
        add(unsafe { &raw mut (*site).frees }, 1);
    }
}

pub(crate) fn try_go_timer_modify(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    let Some(off) = go_offsets(tgid) else {
        return Err(1);
    };
    let t = unsafe { (*ctx.regs).rax };
    // Not yet past `push rbp`: the return address is at the stack top.
    let Some(caller) = read_u64(sp_of(ctx.regs)) else {
        return Err(1);
    };
    if caller < off.newtimer_lo || caller >= off.newtimer_hi {
        return Ok(0); // a reset
    }
    // Channel timers are collectable garbage in Go ≥ 1.23; they are the ones
    // armed with time.sendTime (f, a *funcval, in RDI; its code pointer first).
    if off.count_chan_timers == 0 {
        let f = unsafe { (*ctx.regs).rdi };
        let Some(code) = read_u64(f) else {
            return Err(1);
        };
        if code == off.sendtime_pc {
            return Ok(0);
        }
    }
    timer_created(ctx, tgid, t);
    Ok(0)
}

pub(crate) fn try_go_timer_start(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    timer_created(ctx, tgid, unsafe { (*ctx.regs).rax });
    Ok(0)
}

pub(crate) fn try_go_timer_stop(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    timer_retired(tgid, unsafe { (*ctx.regs).rax });
    Ok(0)
}

pub(crate) fn try_go_timer_fire(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(tgid) = target() else {
        return Ok(0);
    };
    let old_runtime =
        tracer_common::cookie_value(unsafe { bpf_get_attach_cookie(ctx.regs.cast()) }) == 1;
    // Two plain loads: LLVM would otherwise pick the field offset first and
    // dereference a modified context pointer, which the verifier rejects.
    let (rax, rbx) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.regs).rax),
            core::ptr::read_volatile(&raw const (*ctx.regs).rbx),
        )
    };
    let t = if old_runtime { rbx } else { rax };
    if unsafe { GO_TIMERS.get(&ProcKey::new(tgid, t)) }.is_none() {
        return Ok(0);
    }
    let Some(off) = go_offsets(tgid) else {
        return Err(1);
    };
    let Some(period) = read_u64(t + off.timer_period) else {
        return Err(1);
    };
    if period == 0 {
        timer_retired(tgid, t);
    }
    Ok(0)
}
