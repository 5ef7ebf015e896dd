//! The malloc family: entries remember a call until its return, returns
//! account the block to its stack's site, frees release it. The return half
//! and the block bookkeeping ([`record`], [`release`]) serve the mappings of
//! [`crate::mmap`] too.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_func_ip, bpf_get_prandom_u32,
        bpf_probe_read_user,
    },
    programs::{ProbeContext, RetProbeContext, tracing::StackIdContext},
};
use aya_log_ebpf::{info, warn};
use tracer_common::{
    AllocInfo, Counter, Kind, OP_NO_RETURN, OP_UNSAMPLED, Op, Pending, ProcKey, SiteKey,
    SiteStats,
};

use crate::{
    LOG_TARGET,
    counters::{add, count},
    maps::{ALLOCS, PENDING, SITES, is_target, sample_bytes},
    mmap::{MAP_FAILED, round_up_page},
    stacks::{read_stack, sp_of, user_stack_id},
};

/// A session entry's verdict: the kernel runs the return half only after 0.
const RETURN_WANTED: u32 = 0;
const NO_RETURN: u32 = 1;

/// Remembers an allocator call until its return probe. With `session` (the
/// entry half of a uprobe session), the verdict says whether the return half
/// must run: a call left out by sampling needs none, which saves the return
/// trap, the dearest part of an unsampled call.
#[inline(always)]
pub(crate) fn remember<C: EbpfContext>(
    ctx: &C,
    regs: *mut pt_regs,
    op: Op,
    size: u64,
    addr: u64,
    session: bool,
) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !is_target(id) {
        return Ok(NO_RETURN);
    }
    count(Counter::AllocCalls);
    let sp = sp_of(regs);
    if let Some(outer) = PENDING.get_ptr_mut(&id) {
        let o = unsafe { *outer };
        // An entry with no return probe is live while its frame is: its
        // return address still in the slot it was read from.
        let no_return = o.op & OP_NO_RETURN != 0;
        let frame_intact = !no_return
            || read_stack(o.sp).is_some_and(|v| v == o.ret_addr || is_return_trampoline(v));
        if frame_intact && o.sp > sp {
            // Called from inside another probed allocator call on this thread
            // (malloc → mmap for a large block): the outer call accounts it.
            count(Counter::NestedCalls);
            return Ok(NO_RETURN);
        }
        // A tail call from one probed function into another (glibc:
        // reallocarray → realloc → malloc): one logical call. Without a return
        // probe of its own, the next call from the same site at the same depth
        // looks the same; it calls the same function, a tail call another.
        let tail_call = frame_intact && o.sp == sp && (!no_return || o.op & 0xffff != op as u32);
        if tail_call {
            count(Counter::NestedCalls);
            if session || no_return {
                // The outer call's return (if probed) fires once, when the
                // inner one returns to its caller.
                return Ok(NO_RETURN);
            }
            // Classic uretprobes fire once per probed function: the last
            // one accounts the call.
            unsafe { (*outer).tail_calls += 1 };
            return Ok(RETURN_WANTED);
        }
        if !no_return && count(Counter::StalePending) == 0 {
            // An entry below our frame never returned (longjmp out of the
            // allocator, or its return probe was lost): replace it.
            info!(
                ctx,
                target: LOG_TARGET,
                "replacing an allocator entry whose return was never seen"
            );
        }
    }
    let sampled = is_sampled(op, size);
    if !sampled {
        count(Counter::Unsampled);
    }
    // An unsampled realloc still releases the block it replaces, if tracked
    // (looked up only then: realloc is on the hot path of exact mode too).
    let wants_return = !session
        || sampled
        || (matches!(op, Op::Realloc | Op::ReallocArray)
            && addr != 0
            && unsafe { ALLOCS.get(&ProcKey::new((id >> 32) as u32, addr)) }.is_some());
    let mut op_bits = op as u32;
    if !sampled {
        op_bits |= OP_UNSAMPLED;
    }
    let mut ret_addr = 0;
    if !wants_return {
        op_bits |= OP_NO_RETURN;
        ret_addr = read_stack(sp).unwrap_or(0);
    }
    // Unsampled calls are remembered too, so that the allocator's own mmap
    // calls inside them are still recognised as nested.
    let pending = Pending {
        size,
        addr,
        sp,
        op: op_bits,
        tail_calls: 0,
        ret_addr,
    };
    if PENDING.insert(&id, &pending, 0).is_err() {
        if count(Counter::PendingMapFull) == 0 {
            warn!(
                ctx,
                target: LOG_TARGET,
                "per-thread pending map full: allocations are being lost"
            );
        }
        return Err(NO_RETURN);
    }
    Ok(if wants_return {
        RETURN_WANTED
    } else {
        NO_RETURN
    })
}

/// Whether a stack word is the kernel's return-probe trampoline: another
/// consumer's uretprobe on the same function (another tool, or another
/// tracer) swaps the return address for it right after our entry ran. It is
/// the start of the task's page-aligned `[uprobes]` area; a real return
/// address follows a call instruction and is practically never page-aligned.
#[inline(always)]
fn is_return_trampoline(v: u64) -> bool {
    v != 0 && v & 0xfff == 0
}

pub(crate) fn try_alloc_session(ctx: &ProbeContext) -> Result<u32, u32> {
    let regs = ctx.regs;
    // The entry runs at the probed instruction, the return at the caller.
    let ip = unsafe { core::ptr::read_volatile(&(*regs).rip) };
    let entry_ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    if ip != entry_ip {
        let _ = on_return(ctx, regs);
        return Ok(0);
    }
    let cookie = unsafe { bpf_get_attach_cookie(ctx.regs.cast()) };
    if !crate::own(cookie) {
        return Err(NO_RETURN);
    }
    crate::counters::probe_hit(cookie);
    let Some(op) = cookie_op(ctx) else {
        return Err(NO_RETURN);
    };
    // Loaded unconditionally: the verifier rejects context reads under
    // branches that it cannot prove in bounds.
    let (a0, a1, a2) = unsafe {
        (
            core::ptr::read_volatile(&(*regs).rdi),
            core::ptr::read_volatile(&(*regs).rsi),
            core::ptr::read_volatile(&(*regs).rdx),
        )
    };
    let (size, addr) = match op {
        Op::Malloc | Op::Valloc => (a0, 0),
        Op::Pvalloc => (round_up_page(if a0 == 0 { 1 } else { a0 }), 0),
        Op::AlignedAlloc | Op::Memalign => (a1, 0),
        Op::Calloc => (mul_or_max(a0, a1), 0),
        Op::Realloc => (a1, a0),
        Op::ReallocArray => (mul_or_max(a1, a2), a0),
        Op::PosixMemalign => (a2, a0),
        Op::Mmap => (round_up_page(a1), 0),
        Op::Mremap => (round_up_page(a2), a0),
    };
    remember(ctx, regs, op, size, addr, true)
}

/// Bernoulli sampling by size: a heap block of `size` bytes is kept with
/// probability min(1, size / rate) and then weighs 1/p (Horvitz–Thompson),
/// which makes the totals unbiased. Mappings are always kept.
#[inline(always)]
fn is_sampled(op: Op, size: u64) -> bool {
    let rate = sample_bytes();
    if rate == 0 || size >= rate || matches!(op, Op::Mmap | Op::Mremap) {
        return true;
    }
    // A uniform draw in [0, rate) without division: (u32 * rate) >> 32.
    let r = (u64::from(unsafe { bpf_get_prandom_u32() }) * (rate & 0xffff_ffff)) >> 32;
    r < size
}

/// Bytes and blocks one kept allocation of `size` stands for.
#[inline(always)]
fn weights(size: u64, kind: Kind) -> (u64, u64) {
    let rate = sample_bytes();
    if rate == 0 || size >= rate || matches!(kind, Kind::Mmap) || size == 0 {
        return (size, 1);
    }
    (rate, rate / size)
}

#[inline(always)]
fn cookie_op(ctx: &ProbeContext) -> Option<Op> {
    Op::from_u64(tracer_common::cookie_value(unsafe {
        bpf_get_attach_cookie(ctx.regs.cast())
    }))
}

#[inline(always)]
pub(crate) fn try_size_arg(ctx: &ProbeContext, n: usize) -> Result<u32, u32> {
    let Some(op) = cookie_op(ctx) else {
        return Err(1);
    };
    let Some(size) = ctx.arg::<u64>(n) else {
        return Err(1);
    };
    let size = if matches!(op, Op::Pvalloc) {
        round_up_page(if size == 0 { 1 } else { size })
    } else {
        size
    };
    remember(ctx, ctx.regs, op, size, 0, false).map(|_| 0)
}

pub(crate) fn try_calloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(n), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return Err(1);
    };
    // An overflowing product makes calloc fail; remember it anyway so the
    // return (NULL) is matched and counted as a failed allocation.
    remember(ctx, ctx.regs, Op::Calloc, mul_or_max(n, size), 0, false).map(|_| 0)
}

/// `a * b`, or `u64::MAX` on overflow. `checked_mul` (and the `MAX / a` test,
/// which LLVM recognises as the same thing) lowers to a 128-bit multiply that
/// BPF cannot do, so the product is built from 32-bit halves.
#[inline(always)]
fn mul_or_max(a: u64, b: u64) -> u64 {
    let (ah, al, bh, bl) = (a >> 32, a & 0xffff_ffff, b >> 32, b & 0xffff_ffff);
    if ah != 0 && bh != 0 {
        return u64::MAX;
    }
    let cross = ah * bl + al * bh;
    if cross >> 32 != 0 {
        return u64::MAX;
    }
    let lo = al * bl;
    let product = lo.wrapping_add(cross << 32);
    if product < lo { u64::MAX } else { product }
}

pub(crate) fn try_realloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(ptr), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return Err(1);
    };
    remember(ctx, ctx.regs, Op::Realloc, size, ptr, false).map(|_| 0)
}

pub(crate) fn try_reallocarray(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(ptr), Some(n), Some(size)) =
        (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2))
    else {
        return Err(1);
    };
    remember(
        ctx,
        ctx.regs,
        Op::ReallocArray,
        mul_or_max(n, size),
        ptr,
        false,
    )
    .map(|_| 0)
}

pub(crate) fn try_posix_memalign(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(memptr), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(2)) else {
        return Err(1);
    };
    remember(ctx, ctx.regs, Op::PosixMemalign, size, memptr, false).map(|_| 0)
}

pub(crate) fn try_alloc_return(ctx: &RetProbeContext) -> Result<u32, u32> {
    on_return(ctx, ctx.regs)
}

/// The return half of an allocator call: matches the pending entry and
/// accounts the result (in `regs`).
#[inline(always)]
fn on_return<C: StackIdContext>(ctx: &C, regs: *mut pt_regs) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !is_target(id) {
        return Ok(0);
    }
    let Some(pending) = (unsafe { PENDING.get(&id) }).copied() else {
        // Attached while the call was in progress.
        count(Counter::UnmatchedReturns);
        return Ok(0);
    };
    if pending.op & OP_NO_RETURN != 0 {
        // Nothing of that call is due: this return matches no entry.
        count(Counter::UnmatchedReturns);
        return Ok(0);
    }
    // `ret` popped the return address: sp is 8 above the entry's.
    let sp = sp_of(regs);
    if pending.sp > sp {
        // Return of a nested call skipped at its entry; the outer one is pending.
        return Ok(0);
    }
    if pending.sp.wrapping_add(8) == sp && pending.tail_calls > 0 {
        // One of the returns of a tail-call chain; the last one accounts.
        if let Some(p) = PENDING.get_ptr_mut(&id) {
            unsafe { (*p).tail_calls -= 1 };
        }
        return Ok(0);
    }
    let _ = PENDING.remove(&id);
    if pending.sp.wrapping_add(8) != sp {
        count(Counter::UnmatchedReturns);
        return Ok(0);
    }
    let ret: u64 = unsafe { core::ptr::read_volatile(&(*regs).rax) };
    let tgid = (id >> 32) as u32;
    let Some(op) = Op::from_u64(u64::from(pending.op & !OP_UNSAMPLED)) else {
        return Err(1);
    };
    if pending.op & OP_UNSAMPLED != 0 {
        // Left out by sampling: only what a successful realloc replaced (if
        // it was kept) changes.
        if matches!(op, Op::Realloc | Op::ReallocArray)
            && pending.addr != 0
            && (ret != 0 || pending.size == 0)
        {
            release(tgid, pending.addr, Kind::Heap, u64::MAX);
        }
        return Ok(0);
    }
    // One call of `record` (and of the stack walk in it): the verifier
    // checks an inlined walk once per call site.
    let (addr, kind) = match op {
        Op::Malloc | Op::Calloc | Op::AlignedAlloc | Op::Memalign | Op::Valloc | Op::Pvalloc => {
            if ret == 0 {
                count(Counter::FailedAllocs);
                return Ok(0);
            }
            (ret, Kind::Heap)
        }
        Op::PosixMemalign => {
            // Returns an error number, the block goes through the out-pointer.
            if ret as u32 != 0 {
                count(Counter::FailedAllocs);
                return Ok(0);
            }
            let Ok(p) = (unsafe { bpf_probe_read_user(pending.addr as *const u64) }) else {
                count(Counter::UnmatchedReturns);
                return Err(1);
            };
            (p, Kind::Heap)
        }
        Op::Realloc | Op::ReallocArray => {
            if ret == 0 {
                // realloc(p, 0) frees p and returns NULL; any other NULL is a
                // failure that leaves p allocated.
                if pending.size == 0 && pending.addr != 0 {
                    release(tgid, pending.addr, Kind::Heap, u64::MAX);
                } else {
                    count(Counter::FailedAllocs);
                }
                return Ok(0);
            }
            if pending.addr != 0 {
                release(tgid, pending.addr, Kind::Heap, u64::MAX);
            }
            (ret, Kind::Heap)
        }
        Op::Mmap | Op::Mremap => {
            if ret == MAP_FAILED {
                count(Counter::FailedAllocs);
                return Ok(0);
            }
            if matches!(op, Op::Mremap) {
                release(tgid, pending.addr, Kind::Mmap, u64::MAX);
            }
            (ret, Kind::Mmap)
        }
    };
    record(ctx, regs, tgid, addr, pending.size, kind);
    Ok(0)
}

/// Accounts a new block at `addr` to the current user stack.
#[inline(always)]
fn record<C: StackIdContext>(
    ctx: &C,
    regs: *mut pt_regs,
    tgid: u32,
    addr: u64,
    size: u64,
    kind: Kind,
) {
    // At the return probe the registers are the caller's, so the walk starts
    // at the call site itself.
    let stack_id = user_stack_id(ctx, regs, tgid);
    let block = ProcKey::new(tgid, addr);
    // A block at this address that we still hold was freed by a path we do not
    // see; drop it so its bytes are not reported as leaked forever.
    if unsafe { ALLOCS.get(&block) }.is_some() {
        count(Counter::UntrackedFrees);
        release(tgid, addr, kind, u64::MAX);
    }
    let key = SiteKey {
        stack_id,
        kind: kind as u32,
        tgid,
        _pad: 0,
    };
    let Some(site) = site_stats(&key) else {
        if count(Counter::SiteMapFull) == 0 {
            warn!(ctx, target: LOG_TARGET, "site map full: allocations are being lost");
        }
        return;
    };
    let (bytes, blocks) = weights(size, kind);
    let info = AllocInfo {
        size: bytes,
        weight: blocks,
        stack_id,
        kind: kind as u32,
    };
    // SAFETY: `site` points into a map value that lives as long as the map.
    unsafe {
        add(&raw mut (*site).allocs, blocks);
        add(&raw mut (*site).alloc_bytes, bytes);
    }
    if ALLOCS.insert(&block, &info, 0).is_err() {
        // Without the address its free could not be matched: counting it as
        // outstanding would report a leak that is not there.
        if count(Counter::AddrMapFull) == 0 {
            warn!(ctx, target: LOG_TARGET, "address map full: allocations are being lost");
        }
        return;
    }
    unsafe {
        add(&raw mut (*site).outstanding_bytes, bytes as i64);
        add(&raw mut (*site).outstanding_count, blocks as i64);
    }
}

#[inline(always)]
pub(crate) fn site_stats(key: &SiteKey) -> Option<*mut SiteStats> {
    if let Some(p) = SITES.get_ptr_mut(key) {
        return Some(p);
    }
    // Two CPUs may race to create the site; NOEXIST lets exactly one win and
    // both then add to the same entry.
    let _ = SITES.insert(key, &SiteStats::default(), BPF_NOEXIST as u64);
    SITES.get_ptr_mut(key)
}

/// Removes `len` bytes from the start of the tracked block at `addr`
/// (`u64::MAX`: the whole block).
#[inline(always)]
pub(crate) fn release(tgid: u32, addr: u64, kind: Kind, len: u64) {
    let block = ProcKey::new(tgid, addr);
    let Some(info) = (unsafe { ALLOCS.get(&block) }).copied() else {
        count(Counter::UntrackedFrees);
        return;
    };
    if info.kind != kind as u32 {
        count(Counter::UntrackedFrees);
        return;
    }
    let key = SiteKey {
        stack_id: info.stack_id,
        kind: info.kind,
        tgid,
        _pad: 0,
    };
    if len < info.size {
        // munmap of the head of a mapping: the tail stays, re-keyed at its start.
        let rest = AllocInfo {
            size: info.size - len,
            ..info
        };
        if ALLOCS
            .insert(&ProcKey::new(tgid, addr + len), &rest, 0)
            .is_err()
        {
            count(Counter::AddrMapFull);
        }
        let _ = ALLOCS.remove(&block);
        count(Counter::PartialUnmaps);
        if let Some(site) = SITES.get_ptr_mut(&key) {
            unsafe {
                add(&raw mut (*site).outstanding_bytes, -(len as i64));
                add(&raw mut (*site).free_bytes, len);
            }
        }
        return;
    }
    let _ = ALLOCS.remove(&block);
    let Some(site) = SITES.get_ptr_mut(&key) else {
        return;
    };
    unsafe {
        add(&raw mut (*site).outstanding_bytes, -(info.size as i64));
        add(&raw mut (*site).outstanding_count, -(info.weight as i64));
        add(&raw mut (*site).frees, info.weight);
        add(&raw mut (*site).free_bytes, info.size);
    }
}

pub(crate) fn try_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    if !is_target(id) {
        return Ok(0);
    }
    let Some(ptr) = ctx.arg::<u64>(0) else {
        return Err(1);
    };
    if ptr == 0 {
        return Ok(0);
    }
    count(Counter::FreeCalls);
    release((id >> 32) as u32, ptr, Kind::Heap, u64::MAX);
    Ok(0)
}
