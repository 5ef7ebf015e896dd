//! Kernel side of the tracer: uprobes on the allocator of one process keep, per
//! call stack, the bytes and blocks it still holds.
//!
//! Accounting happens here, not per event in userspace: the return probe of
//! every allocation records `address → (size, stack)` and atomically adds to the
//! stack's statistics; the free probe removes the address and subtracts. The
//! collector only reads the site map once per interval, so the cost per
//! allocation is a few map operations and one stack walk, with no event sent.
#![no_std]
#![no_main]
// The BPF target has no `fetch_add` on core's atomics (it declares no CAS), but
// LLVM lowers an unused atomicrmw add to BPF_ATOMIC_ADD; the intrinsic is the
// way to reach it.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_func_ip, bpf_get_prandom_u32,
        bpf_probe_read_user,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, StackTrace},
    programs::{ProbeContext, RetProbeContext, TracePointContext, tracing::StackIdContext},
};
use aya_log_ebpf::{info, warn};
use tracer_common::{
    AllocInfo, COUNTER_COUNT, Counter, DEFAULT_MAX_ALLOCS, DEFAULT_MAX_GOROUTINES,
    DEFAULT_MAX_SITES, DEFAULT_MAX_STACKS, DEFAULT_MAX_THREADS, GoOffsets, GoSiteKey, Kind,
    MAX_STACK_DEPTH, OP_NO_RETURN, OP_UNSAMPLED, OomVictim, Op, Pending, STACK_ID_NONE,
    STACK_ID_OWN, SiteKey, SiteStats, StackBuf,
};

/// Process (tgid) whose events count; 0 accepts every process. Set before load.
/// The perf event is already scoped to the target, this guards against a
/// probe shared with another consumer on the same inode.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Sampling rate in bytes (`--sample-bytes`); 0 traces every allocation.
/// Set before load.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

/// Page size of the target, for rounding mapping lengths. Set before load.
#[unsafe(no_mangle)]
static PAGE_SIZE: u64 = 4096;

/// Struct offsets of the target's Go runtime. Set before load.
#[unsafe(no_mangle)]
static GO_OFFSETS: GoOffsets = GoOffsets {
    g_goid: 0,
    g_gopc: 0,
    g_startpc: 0,
    timer_period: 0,
    newtimer_lo: 0,
    newtimer_hi: 0,
    count_chan_timers: 0,
    sendtime_pc: 0,
};

/// Pending timers created since attach: *runtime.timer → creation stack id.
#[map]
static GO_TIMERS: HashMap<u64, u32> = HashMap::with_max_entries(DEFAULT_MAX_GOROUTINES, 0);

/// Live goroutines created since attach: goid → creation site. Keyed by goid:
/// g structs are reused, goids are not.
#[map]
static GO_GOROUTINES: HashMap<u64, GoSiteKey> =
    HashMap::with_max_entries(DEFAULT_MAX_GOROUTINES, 0);

/// Goroutines per creation site: outstanding_count = alive, allocs = created,
/// frees = exited.
#[map]
static GO_SITES: HashMap<GoSiteKey, SiteStats> = HashMap::with_max_entries(DEFAULT_MAX_SITES, 0);

/// The Go runtime's memory-profile buckets seen since attach: allocs and
/// frees of sampled objects. The bucket (never freed by the runtime) holds the
/// allocation stack and the object size, read by the collector.
#[map]
static GO_BUCKETS: HashMap<u64, SiteStats> = HashMap::with_max_entries(DEFAULT_MAX_SITES, 0);

/// Allocator calls in flight, per thread. LRU: entries whose return is not
/// probed (OP_NO_RETURN) are never removed, and threads that exit leave theirs
/// behind; the least recently used go first, never a call in flight unless
/// more threads than the map holds are inside the allocator at once.
#[map]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(DEFAULT_MAX_THREADS, 0);

#[map]
static ALLOCS: HashMap<u64, AllocInfo> = HashMap::with_max_entries(DEFAULT_MAX_ALLOCS, 0);

#[map]
static SITES: HashMap<SiteKey, SiteStats> = HashMap::with_max_entries(DEFAULT_MAX_SITES, 0);

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(DEFAULT_MAX_STACKS, 0);

// The kernel's stack table refuses a stack whose hash lands in a bucket
// another stack holds (with S stacks in N buckets, about S - N(1 - e^-S/N)
// of them). Those go to the tracer's own table, keyed by 30 bits of a 64-bit
// hash of the whole stack (compared in full on every hit).

/// Scratch for one stack, per CPU (too large for the BPF stack).
#[map]
static STACK_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

/// Not preallocated: 1 KiB per entry, and only colliding stacks come here.
#[map]
static OWN_STACKS: HashMap<u32, StackBuf> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

const MAP_FAILED: u64 = u64::MAX;

#[inline(always)]
fn count(c: Counter) -> u64 {
    let Some(p) = COUNTERS.get_ptr_mut(c as u32) else {
        return 0;
    };
    // Per-CPU slot and uprobe programs do not nest on one CPU: a plain add is safe.
    unsafe {
        let old = *p;
        *p = old + 1;
        old
    }
}

/// Atomic add to a counter shared by all CPUs (a map value).
#[inline(always)]
fn add<T: Copy>(dst: *mut T, v: T) {
    // SAFETY: callers pass pointers into live map values.
    unsafe {
        atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, v);
    }
}

#[inline(always)]
fn target_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

/// True when the event comes from the traced process.
#[inline(always)]
fn is_target(pid_tgid: u64) -> bool {
    let want = target_tgid();
    if want == 0 || (pid_tgid >> 32) as u32 == want {
        return true;
    }
    count(Counter::OtherProcess);
    false
}

#[inline(always)]
fn sp_of(regs: *mut pt_regs) -> u64 {
    unsafe { (*regs).rsp }
}

// ---------------------------------------------------------------- entries

/// A session entry's verdict: the kernel runs the return half only after 0.
const RETURN_WANTED: u32 = 0;
const NO_RETURN: u32 = 1;

/// Remembers an allocator call until its return probe. With `session` (the
/// entry half of a uprobe session), the verdict says whether the return half
/// must run: a call left out by sampling needs none, which saves the return
/// trap, the dearest part of an unsampled call.
#[inline(always)]
fn remember<C: EbpfContext>(
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
            && unsafe { ALLOCS.get(&addr) }.is_some());
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

/// A word of the target's stack.
#[inline(always)]
fn read_stack(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Entry and return of every allocating function in one program, for uprobe
/// sessions (Linux 6.13+, loaded by the tracer itself: aya cannot yet). The
/// entry's verdict decides whether the return half runs at all, so the
/// program's return value matters: written without `#[uprobe]`, whose
/// wrapper always returns 0.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
    match try_alloc_session(&ProbeContext::new(ctx)) {
        Ok(v) | Err(v) => v,
    }
}

fn try_alloc_session(ctx: &ProbeContext) -> Result<u32, u32> {
    let regs = ctx.regs;
    // The entry runs at the probed instruction, the return at the caller.
    let ip = unsafe { core::ptr::read_volatile(&(*regs).rip) };
    let entry_ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    if ip != entry_ip {
        let _ = on_return(ctx, regs);
        return Ok(0);
    }
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

#[inline(always)]
fn sample_bytes() -> u64 {
    unsafe { core::ptr::read_volatile(&SAMPLE_BYTES) }
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
    Op::from_u64(unsafe { bpf_get_attach_cookie(ctx.regs.cast()) })
}

/// malloc(size), valloc(size), pvalloc(size): the op comes from the cookie.
#[uprobe]
pub fn size_arg0(ctx: ProbeContext) -> u32 {
    match try_size_arg(&ctx, 0) {
        Ok(v) | Err(v) => v,
    }
}

/// aligned_alloc(align, size), memalign(align, size).
#[uprobe]
pub fn size_arg1(ctx: ProbeContext) -> u32 {
    match try_size_arg(&ctx, 1) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_size_arg(ctx: &ProbeContext, n: usize) -> Result<u32, u32> {
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

/// calloc(n, size).
#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    match try_calloc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_calloc(ctx: &ProbeContext) -> Result<u32, u32> {
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

/// realloc(ptr, size).
#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    match try_realloc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_realloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(ptr), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return Err(1);
    };
    remember(ctx, ctx.regs, Op::Realloc, size, ptr, false).map(|_| 0)
}

/// reallocarray(ptr, n, size).
#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    match try_reallocarray(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_reallocarray(ctx: &ProbeContext) -> Result<u32, u32> {
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

/// posix_memalign(memptr, align, size).
#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    match try_posix_memalign(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_posix_memalign(ctx: &ProbeContext) -> Result<u32, u32> {
    let (Some(memptr), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(2)) else {
        return Err(1);
    };
    remember(ctx, ctx.regs, Op::PosixMemalign, size, memptr, false).map(|_| 0)
}

/// mmap(addr, len, prot, flags, fd, off).
#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    match try_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_mmap(ctx: &ProbeContext) -> Result<u32, u32> {
    let Some(len) = ctx.arg::<u64>(1) else {
        return Err(1);
    };
    remember(ctx, ctx.regs, Op::Mmap, round_up_page(len), 0, false).map(|_| 0)
}

/// mremap(old, old_len, new_len, flags, ...).
#[uprobe]
pub fn mremap_enter(ctx: ProbeContext) -> u32 {
    match try_mremap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_mremap(ctx: &ProbeContext) -> Result<u32, u32> {
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
fn round_up_page(len: u64) -> u64 {
    let page = unsafe { core::ptr::read_volatile(&PAGE_SIZE) };
    let mask = page.wrapping_sub(1);
    len.saturating_add(mask) & !mask
}

// ---------------------------------------------------------------- returns

/// The one return probe of every allocating function: matches the pending
/// entry and accounts the result.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    match try_alloc_return(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_alloc_return(ctx: &RetProbeContext) -> Result<u32, u32> {
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
            release(pending.addr, Kind::Heap, u64::MAX);
        }
        return Ok(0);
    }
    match op {
        Op::Malloc | Op::Calloc | Op::AlignedAlloc | Op::Memalign | Op::Valloc | Op::Pvalloc => {
            if ret == 0 {
                count(Counter::FailedAllocs);
                return Ok(0);
            }
            record(ctx, ret, pending.size, Kind::Heap);
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
            record(ctx, p, pending.size, Kind::Heap);
        }
        Op::Realloc | Op::ReallocArray => {
            if ret == 0 {
                // realloc(p, 0) frees p and returns NULL; any other NULL is a
                // failure that leaves p allocated.
                if pending.size == 0 && pending.addr != 0 {
                    release(pending.addr, Kind::Heap, u64::MAX);
                } else {
                    count(Counter::FailedAllocs);
                }
                return Ok(0);
            }
            if pending.addr != 0 {
                release(pending.addr, Kind::Heap, u64::MAX);
            }
            record(ctx, ret, pending.size, Kind::Heap);
        }
        Op::Mmap | Op::Mremap => {
            if ret == MAP_FAILED {
                count(Counter::FailedAllocs);
                return Ok(0);
            }
            if matches!(op, Op::Mremap) {
                release(pending.addr, Kind::Mmap, u64::MAX);
            }
            record(ctx, ret, pending.size, Kind::Mmap);
        }
    }
    Ok(0)
}

/// The id of the current user stack: the kernel's table, else (a hash
/// collision there) the tracer's own; `STACK_ID_NONE` when both fail.
#[inline(always)]
fn stack_id_of<C: StackIdContext>(ctx: &C) -> u32 {
    const EEXIST: i32 = 17;
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => return id as u32,
        Err(e) if -e == EEXIST => {
            if let Some(id) = own_stack_id(ctx) {
                return id;
            }
        }
        Err(_) => {}
    }
    if count(Counter::StackLost) == 0 {
        warn!(ctx, "stack tables full: stacks are being lost");
    }
    STACK_ID_NONE
}

/// The stack in the tracer's own table, added if new.
#[inline(never)]
fn own_stack_id<C: EbpfContext>(ctx: &C) -> Option<u32> {
    let buf = STACK_SCRATCH.get_ptr_mut(0)?;
    let size = core::mem::size_of::<StackBuf>() as u32;
    // SAFETY: `buf` points at a per-CPU map value of `size` bytes.
    let len = unsafe {
        aya_ebpf::helpers::bpf_get_stack(ctx.as_ptr(), buf.cast(), size, BPF_F_USER_STACK as u64)
    };
    if len <= 0 {
        return None;
    }
    let n = (len as usize / 8).min(MAX_STACK_DEPTH);
    // FNV-1a over the addresses; the rest of the buffer is zeroed so the
    // stored stack ends where the walk did.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_STACK_DEPTH {
        // SAFETY: i < MAX_STACK_DEPTH, inside the buffer.
        let slot = unsafe { (*buf).ips.as_mut_ptr().add(i) };
        if i >= n {
            unsafe { *slot = 0 };
        } else {
            h = (h ^ unsafe { *slot }).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let id = STACK_ID_OWN | (h as u32 & (STACK_ID_OWN - 1));
    if unsafe { OWN_STACKS.get(&id) }.is_none() {
        // NOEXIST: if another CPU stores a stack under this id first, the
        // comparison below decides.
        let _ = OWN_STACKS.insert(&id, unsafe { &*buf }, BPF_NOEXIST as u64);
    }
    let stored = OWN_STACKS.get_ptr(&id)?;
    for i in 0..MAX_STACK_DEPTH {
        // SAFETY: both point at live buffers of MAX_STACK_DEPTH addresses.
        let (a, b) = unsafe { (*(*stored).ips.as_ptr().add(i), *(*buf).ips.as_ptr().add(i)) };
        if a != b {
            // Two stacks with the same 30 bits: lost, not confused.
            return None;
        }
    }
    Some(id)
}

/// Accounts a new block at `addr` to the current user stack.
#[inline(always)]
fn record<C: StackIdContext>(ctx: &C, addr: u64, size: u64, kind: Kind) {
    // At the return probe the registers are the caller's, so the frame-pointer
    // walk starts at the call site itself.
    let stack_id = stack_id_of(ctx);
    // A block at this address that we still hold was freed by a path we do not
    // see; drop it so its bytes are not reported as leaked forever.
    if unsafe { ALLOCS.get(&addr) }.is_some() {
        count(Counter::UntrackedFrees);
        release(addr, kind, u64::MAX);
    }
    let key = SiteKey {
        stack_id,
        kind: kind as u32,
    };
    let Some(site) = site_stats(&key) else {
        if count(Counter::SiteMapFull) == 0 {
            warn!(ctx, "site map full: allocations are being lost");
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
    if ALLOCS.insert(&addr, &info, 0).is_err() {
        // Without the address its free could not be matched: counting it as
        // outstanding would report a leak that is not there.
        if count(Counter::AddrMapFull) == 0 {
            warn!(ctx, "address map full: allocations are being lost");
        }
        return;
    }
    unsafe {
        add(&raw mut (*site).outstanding_bytes, bytes as i64);
        add(&raw mut (*site).outstanding_count, blocks as i64);
    }
}

#[inline(always)]
fn site_stats(key: &SiteKey) -> Option<*mut SiteStats> {
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
fn release(addr: u64, kind: Kind, len: u64) {
    let Some(info) = (unsafe { ALLOCS.get(&addr) }).copied() else {
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
    };
    if len < info.size {
        // munmap of the head of a mapping: the tail stays, re-keyed at its start.
        let rest = AllocInfo {
            size: info.size - len,
            ..info
        };
        if ALLOCS.insert(&(addr + len), &rest, 0).is_err() {
            count(Counter::AddrMapFull);
        }
        let _ = ALLOCS.remove(&addr);
        count(Counter::PartialUnmaps);
        if let Some(site) = SITES.get_ptr_mut(&key) {
            unsafe {
                add(&raw mut (*site).outstanding_bytes, -(len as i64));
                add(&raw mut (*site).free_bytes, len);
            }
        }
        return;
    }
    let _ = ALLOCS.remove(&addr);
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

// ---------------------------------------------------------------- frees

/// free(ptr).
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    match try_free(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_free(ctx: &ProbeContext) -> Result<u32, u32> {
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
    release(ptr, Kind::Heap, u64::MAX);
    Ok(0)
}

/// munmap(addr, len).
#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    match try_munmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_munmap(ctx: &ProbeContext) -> Result<u32, u32> {
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
    release(addr, Kind::Mmap, round_up_page(len));
    Ok(0)
}

// ---------------------------------------------------------------- Go
//
// Only entry uprobes and uprobes on RET instructions: a uretprobe rewrites the
// return address, which Go's stack moves turn into a crash.

#[inline(always)]
fn go_offsets() -> GoOffsets {
    unsafe { core::ptr::read_volatile(&GO_OFFSETS) }
}

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

#[inline(always)]
fn stats_entry<K>(map: &HashMap<K, SiteStats>, key: &K) -> Option<*mut SiteStats> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = map.insert(key, &SiteStats::default(), BPF_NOEXIST as u64);
    map.get_ptr_mut(key)
}

/// On every RET of runtime.newproc1: the new g is in RAX.
#[uprobe]
pub fn go_newproc1_ret(ctx: ProbeContext) -> u32 {
    match try_go_newproc1_ret(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_newproc1_ret(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    let newg = unsafe { (*ctx.regs).rax };
    if newg == 0 {
        return Ok(0);
    }
    let off = go_offsets();
    let (Some(goid), Some(gopc), Some(startpc)) = (
        read_u64(newg + off.g_goid),
        read_u64(newg + off.g_gopc),
        read_u64(newg + off.g_startpc),
    ) else {
        return Err(1);
    };
    count(Counter::GoroutinesCreated);
    let key = GoSiteKey { gopc, startpc };
    let Some(site) = stats_entry(&GO_SITES, &key) else {
        count(Counter::GoMapFull);
        return Err(1);
    };
    add(unsafe { &raw mut (*site).allocs }, 1);
    if GO_GOROUTINES.insert(&goid, &key, 0).is_err() {
        if count(Counter::GoMapFull) == 0 {
            warn!(ctx, "goroutine map full: goroutines are being lost");
        }
        return Err(1);
    }
    add(unsafe { &raw mut (*site).outstanding_count }, 1);
    Ok(0)
}

/// runtime.gdestroy(gp) (Go ≥ 1.22) or runtime.goexit0(gp) (1.21), after the
/// prologue: gp in RAX.
#[uprobe]
pub fn go_goexit(ctx: ProbeContext) -> u32 {
    match try_go_goexit(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_goexit(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    let gp = unsafe { (*ctx.regs).rax };
    let Some(goid) = read_u64(gp + go_offsets().g_goid) else {
        return Err(1);
    };
    count(Counter::GoroutinesExited);
    // Created before attach: not tracked.
    let Some(key) = (unsafe { GO_GOROUTINES.get(&goid) }).copied() else {
        return Ok(0);
    };
    let _ = GO_GOROUTINES.remove(&goid);
    if let Some(site) = GO_SITES.get_ptr_mut(&key) {
        add(unsafe { &raw mut (*site).outstanding_count }, -1);
        add(unsafe { &raw mut (*site).frees }, 1);
    }
    Ok(0)
}

/// runtime.setprofilebucket(p, b): a sampled object p was allocated from
/// bucket b (in RBX).
#[uprobe]
pub fn go_profile_bucket(ctx: ProbeContext) -> u32 {
    match try_go_profile_bucket(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_profile_bucket(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    let bucket = unsafe { (*ctx.regs).rbx };
    let Some(stats) = stats_entry(&GO_BUCKETS, &bucket) else {
        if count(Counter::GoMapFull) == 0 {
            warn!(ctx, "Go bucket map full: heap samples are being lost");
        }
        return Err(1);
    };
    count(Counter::GoSamples);
    add(unsafe { &raw mut (*stats).allocs }, 1);
    add(unsafe { &raw mut (*stats).outstanding_count }, 1);
    Ok(0)
}

/// runtime.mProf_Free(b, ...): a sampled object of bucket b (in RAX) was swept.
#[uprobe]
pub fn go_profile_free(ctx: ProbeContext) -> u32 {
    match try_go_profile_free(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_profile_free(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    let bucket = unsafe { (*ctx.regs).rax };
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
fn timer_created(ctx: &ProbeContext, t: u64) {
    if unsafe { GO_TIMERS.get(&t) }.is_some() {
        return; // re-armed while pending: still one pending timer
    }
    // The probe sits on a `push rbp`, where the kernel's walk also reports
    // the direct caller.
    let stack_id = stack_id_of(ctx);
    let key = SiteKey {
        stack_id,
        kind: Kind::Timer as u32,
    };
    let Some(site) = site_stats(&key) else {
        count(Counter::SiteMapFull);
        return;
    };
    add(unsafe { &raw mut (*site).allocs }, 1);
    if GO_TIMERS.insert(&t, &stack_id, 0).is_err() {
        if count(Counter::GoMapFull) == 0 {
            warn!(ctx, "timer map full: timers are being lost");
        }
        return;
    }
    count(Counter::TimersCreated);
    add(unsafe { &raw mut (*site).outstanding_count }, 1);
}

/// A timer stopped or fired for good.
#[inline(always)]
fn timer_retired(t: u64) {
    let Some(stack_id) = (unsafe { GO_TIMERS.get(&t) }).copied() else {
        return; // created before attach, or already retired
    };
    let _ = GO_TIMERS.remove(&t);
    count(Counter::TimersRetired);
    let key = SiteKey {
        stack_id,
        kind: Kind::Timer as u32,
    };
    if let Some(site) = SITES.get_ptr_mut(&key) {
        add(unsafe { &raw mut (*site).outstanding_count }, -1);
        add(unsafe { &raw mut (*site).frees }, 1);
    }
}

/// Go ≥ 1.23: runtime.(*timer).modify(t, ...) after its prologue. Called by
/// time.newTimer for every new timer, and by resets.
#[uprobe]
pub fn go_timer_modify(ctx: ProbeContext) -> u32 {
    match try_go_timer_modify(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_timer_modify(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    let off = go_offsets();
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
    timer_created(ctx, t);
    Ok(0)
}

/// Go ≤ 1.22: time.startTimer(t) after its prologue.
#[uprobe]
pub fn go_timer_start(ctx: ProbeContext) -> u32 {
    match try_go_timer_start(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_timer_start(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    timer_created(ctx, unsafe { (*ctx.regs).rax });
    Ok(0)
}

/// A stop: runtime.(*timer).stop(t) (≥ 1.23) or time.stopTimer(t) (≤ 1.22),
/// t in RAX.
#[uprobe]
pub fn go_timer_stop(ctx: ProbeContext) -> u32 {
    match try_go_timer_stop(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_timer_stop(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    timer_retired(unsafe { (*ctx.regs).rax });
    Ok(0)
}

/// A firing: runtime.(*timer).unlockAndRun(t, now) (≥ 1.23, t in RAX) or
/// runtime.runOneTimer(pp, t, now) (≤ 1.22, t in RBX; cookie 1). Final only
/// for one-shot timers (period 0).
#[uprobe]
pub fn go_timer_fire(ctx: ProbeContext) -> u32 {
    match try_go_timer_fire(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_go_timer_fire(ctx: &ProbeContext) -> Result<u32, u32> {
    if !is_target(bpf_get_current_pid_tgid()) {
        return Ok(0);
    }
    let old_runtime = unsafe { bpf_get_attach_cookie(ctx.regs.cast()) } == 1;
    // Two plain loads: LLVM would otherwise pick the field offset first and
    // dereference a modified context pointer, which the verifier rejects.
    let (rax, rbx) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.regs).rax),
            core::ptr::read_volatile(&raw const (*ctx.regs).rbx),
        )
    };
    let t = if old_runtime { rbx } else { rax };
    if unsafe { GO_TIMERS.get(&t) }.is_none() {
        return Ok(0);
    }
    let Some(period) = read_u64(t + go_offsets().timer_period) else {
        return Err(1);
    };
    if period == 0 {
        timer_retired(t);
    }
    Ok(0)
}

// ---------------------------------------------------------------- OOM kill

#[map]
static OOM_VICTIM: Array<OomVictim> = Array::with_max_entries(1, 0);

/// The kernel's OOM killer chose a victim (tracepoint oom:mark_victim, whose
/// fields are: pid at 8, total_vm 16, anon_rss 24, file_rss 32, shmem_rss 40,
/// in KiB). Recorded when it is the target.
#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    match try_oom_mark_victim(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<u32, u32> {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
