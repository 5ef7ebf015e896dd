//! DWARF unwinding of user stacks for code built without frame pointers.
//!
//! The collector reduces each mapped object's `.eh_frame`/`.debug_frame` to
//! sorted rows ([`UnwindRow`]) in one shared array and lists each process's
//! executable mappings ([`ProcMappings`]). Here a walk steps frame by frame
//! with `bpf_loop` (the callback is verified once, whatever the depth): the
//! rule for a pc comes from the per-pc cache, else a binary search of the
//! process's mappings and then of the object's rows. The return address is
//! at CFA-8 on x86-64. Mappings without a table (Go, JIT code) are walked
//! with frame pointers, so one stack may mix both.
//!
//! The frames go to the per-CPU scratch buffer, then to the tracer's own
//! stack table with an end record saying why the walk stopped: nothing per
//! event crosses to userspace.

use core::ffi::c_void;

use aya_ebpf::{bindings::pt_regs, helpers::generated::bpf_loop};
use tracer_common::{
    Counter, MAX_STACK_DEPTH, StackBuf,
    unwind::{
        MAX_EXEC_MAPPINGS, MAX_MAPPING_STEPS, MAX_SEARCH_STEPS, PcKey, UNWIND_END, UnwindRow,
        cfa, end, rbp,
    },
};

use crate::{
    counters::count,
    maps::{STACK_SCRATCH, UNWIND_BISECT, UNWIND_CACHE, UNWIND_MAPPINGS, UNWIND_ROWS, UNWIND_WALK},
    stacks::read_stack,
};

/// Frames recorded; the last slot of the buffer holds the end record.
const MAX_FRAMES: u32 = MAX_STACK_DEPTH as u32 - 1;

/// Where a walk is, between two steps. Kept in a per-CPU map
/// ([`UNWIND_WALK`]), not on the stack: the verifier checks a `bpf_loop`
/// callback until its entry states converge, and values it cannot see (map
/// memory) converge at once, where a frame counter on the stack would be
/// followed through every depth.
#[repr(C)]
pub(crate) struct Walk {
    tgid: u32,
    /// Frames written so far.
    n: u32,
    pc: u64,
    sp: u64,
    bp: u64,
    /// 1 when `pc` is where execution is (the first frame, or a frame a
    /// signal interrupted), 0 when it is a return address (looked up at
    /// pc-1, inside the call).
    exact: u32,
    /// 0 once a frame's rbp could not be recovered.
    bp_known: u32,
    /// `end::* + 1` once the walk is over.
    done: u64,
    /// FNV-1a over the frames so far.
    hash: u64,
}

/// FNV-1a step.
#[inline(always)]
pub(crate) fn fnv(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x0100_0000_01b3)
}

/// The FNV-1a offset basis.
pub(crate) const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// What a walk left in the scratch buffer.
pub(crate) enum Walked {
    /// `n` entries (frames, then the end record), hashed.
    Stack { buf: *mut StackBuf, n: u32, hash: u64 },
    /// The first pc lies in no mapping the unwinder knows.
    NotMapped,
    /// No scratch buffer.
    Failed,
}

/// Whether process `tgid` is walked here (it maps code without frame
/// pointers that has unwind tables).
#[inline(always)]
pub(crate) fn wants(tgid: u32) -> bool {
    unsafe { UNWIND_MAPPINGS.get(&tgid) }.is_some()
}

/// Walks the current user stack from `regs` into the scratch buffer and
/// returns it and the number of entries used (frames plus the end record).
#[inline(always)]
pub(crate) fn walk(tgid: u32, regs: *mut pt_regs) -> Walked {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return Walked::Failed;
    };
    let Some(wp) = UNWIND_WALK.get_ptr_mut(0) else {
        return Walked::Failed;
    };
    // SAFETY: a per-CPU map value; uprobe programs do not nest on a CPU.
    let w = unsafe { &mut *wp };
    *w = Walk {
        tgid,
        n: 0,
        pc: unsafe { (*regs).rip },
        sp: unsafe { (*regs).rsp },
        bp: unsafe { (*regs).rbp },
        exact: 1,
        bp_known: 1,
        done: 0,
        hash: FNV_BASIS,
    };
    count(Counter::UnwindWalks);
    run_loop(MAX_STACK_DEPTH as u32, step);
    let reason = if w.done == 0 { end::DEPTH } else { w.done - 1 };
    if reason == end::NO_MAPPING && w.n == 0 {
        count(Counter::UnwindNoMapping);
        return Walked::NotMapped;
    }
    match reason {
        end::ROOT => {}
        end::NO_RULE => _ = count(Counter::UnwindNoRule),
        end::UNSUPPORTED => _ = count(Counter::UnwindUnsupported),
        end::BAD_RETURN => _ = count(Counter::UnwindBadReturn),
        end::READ_FAILED => _ = count(Counter::UnwindReadFailed),
        end::NO_MAPPING => _ = count(Counter::UnwindNoMapping),
        _ => _ = count(Counter::UnwindDepth),
    }
    let n = w.n;
    if n as usize >= MAX_STACK_DEPTH {
        return Walked::Failed;
    }
    let record = UNWIND_END | reason;
    // SAFETY: n < MAX_STACK_DEPTH, inside the buffer.
    unsafe { *(*buf).ips.as_mut_ptr().add(n as usize) = record };
    Walked::Stack {
        buf,
        n: n + 1,
        hash: fnv(w.hash, record),
    }
}

/// Calls `cb` up to `n` times (until it returns 1), with no context: the
/// callbacks keep their state in per-CPU maps.
#[inline(always)]
fn run_loop(n: u32, cb: extern "C" fn(u64, *mut c_void) -> i64) {
    // SAFETY: `cb` is a static function of the callback's signature.
    // Transmuted, not cast through an integer: the loader must see the
    // function symbol to relocate it.
    unsafe {
        let cb: *mut c_void =
            core::mem::transmute::<extern "C" fn(u64, *mut c_void) -> i64, *mut c_void>(cb);
        bpf_loop(n, cb, core::ptr::null_mut(), 0);
    }
}

/// One frame: records `w.pc` and steps to its caller. 0 continues, 1 stops.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(wp) = UNWIND_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a per-CPU map value; uprobe programs do not nest on a CPU.
    let w = unsafe { &mut *wp };
    match step_frame(w) {
        Ok(()) => 0,
        Err(reason) => {
            w.done = reason + 1;
            1
        }
    }
}

#[inline(always)]
fn step_frame(w: &mut Walk) -> Result<(), u64> {
    if w.n >= MAX_FRAMES {
        return Err(end::DEPTH);
    }
    let buf = STACK_SCRATCH.get_ptr_mut(0).ok_or(end::READ_FAILED)?;
    let lookup_pc = if w.exact != 0 { w.pc } else { w.pc - 1 };
    let row = rule_for(w.tgid, lookup_pc, w.n);
    // A pc in a known mapping is a real frame, even when its rule is
    // missing or unsupported (the walk ends after it).
    if let Err(e) = row
        && e != end::NO_RULE
        && e != end::UNSUPPORTED
    {
        return Err(e);
    }
    let i = w.n as usize;
    if i < MAX_STACK_DEPTH {
        // SAFETY: i < MAX_STACK_DEPTH, inside the buffer.
        unsafe { *(*buf).ips.as_mut_ptr().add(i) = w.pc };
    }
    w.n += 1;
    w.hash = fnv(w.hash, w.pc);
    let row = row?;
    let cfa = match row.cfa_kind {
        cfa::END => return Err(end::ROOT),
        cfa::FRAME_POINTER => {
            if w.bp == 0 {
                // The outermost frame of a frame-pointer chain.
                return Err(end::ROOT);
            }
            if w.bp_known == 0 {
                return Err(end::UNSUPPORTED);
            }
            let ra = read_stack(w.bp + 8).ok_or(end::READ_FAILED)?;
            let bp = read_stack(w.bp).ok_or(end::READ_FAILED)?;
            w.sp = w.bp + 16;
            w.bp = bp;
            return next(w, ra);
        }
        cfa::RSP => w.sp.wrapping_add(row.cfa_offset as i64 as u64),
        cfa::RBP => {
            if w.bp_known == 0 {
                return Err(end::UNSUPPORTED);
            }
            w.bp.wrapping_add(row.cfa_offset as i64 as u64)
        }
        cfa::PLT => {
            let pushed = if (w.pc & 15) as i32 >= row.rbp_offset {
                8
            } else {
                0
            };
            w.sp.wrapping_add(row.cfa_offset as i64 as u64) + pushed
        }
        cfa::SIGNAL => {
            // rsp is at the kernel's rt_sigframe past its return address:
            // the ucontext, whose mcontext (40 bytes in) holds the
            // interrupted registers: rbp at 80, rsp at 120, rip at 128.
            let mc = w.sp + 40;
            let bp = read_stack(mc + 80).ok_or(end::READ_FAILED)?;
            let sp = read_stack(mc + 120).ok_or(end::READ_FAILED)?;
            let pc = read_stack(mc + 128).ok_or(end::READ_FAILED)?;
            w.bp = bp;
            w.bp_known = 1;
            w.sp = sp;
            w.pc = pc;
            // Interrupted, not called: the pc is where it stopped.
            w.exact = 1;
            return if pc == 0 { Err(end::ROOT) } else { Ok(()) };
        }
        cfa::UNSUPPORTED => return Err(end::UNSUPPORTED),
        _ => return Err(end::NO_RULE),
    };
    let ra = read_stack(cfa.wrapping_sub(8)).ok_or(end::READ_FAILED)?;
    match row.rbp_kind {
        rbp::AT_CFA => {
            w.bp = read_stack(cfa.wrapping_add(row.rbp_offset as i64 as u64))
                .ok_or(end::READ_FAILED)?;
            w.bp_known = 1;
        }
        rbp::SAME => {}
        _ => w.bp_known = 0,
    }
    w.sp = cfa;
    next(w, ra)
}

/// Continues at return address `ra`.
#[inline(always)]
fn next(w: &mut Walk, ra: u64) -> Result<(), u64> {
    if ra == 0 {
        // The conventional end of a thread's chain.
        return Err(end::ROOT);
    }
    w.pc = ra;
    w.exact = 0;
    Ok(())
}

/// The rule at `pc`: the cache, else the mapping and table searches (and
/// the cache is filled).
#[inline(always)]
fn rule_for(tgid: u32, pc: u64, depth: u32) -> Result<UnwindRow, u64> {
    let key = PcKey { tgid, _pad: 0, pc };
    if let Some(row) = unsafe { UNWIND_CACHE.get(&key) } {
        count(Counter::UnwindCacheHits);
        return Ok(*row);
    }
    count(Counter::UnwindCacheMisses);
    let row = search(tgid, pc).map_err(|e| {
        // Past the first frame, a pc outside every known mapping is a
        // return address that is not one.
        if e == end::NO_MAPPING && depth > 0 {
            end::BAD_RETURN
        } else {
            e
        }
    })?;
    let _ = UNWIND_CACHE.insert(&key, &row, 0);
    Ok(row)
}

/// A binary search in progress: the answer is in `[lo, hi)`. In a per-CPU
/// map ([`UNWIND_BISECT`]) for the reason given at [`Walk`].
#[repr(C)]
pub(crate) struct Bisect {
    lo: u32,
    hi: u32,
    key: u64,
    tgid: u32,
    _pad: u32,
}

/// One step over a process's mappings: the last one starting at or below
/// `key`. A `bpf_loop` callback, like [`step`], so the verifier checks one
/// step rather than every path through all of them.
extern "C" fn bisect_mappings(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(bp) = UNWIND_BISECT.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a per-CPU map value; uprobe programs do not nest on a CPU.
    let b = unsafe { &mut *bp };
    if b.hi <= b.lo + 1 {
        return 1;
    }
    let mid = b.lo + (b.hi - b.lo) / 2;
    let Some(procs) = (unsafe { UNWIND_MAPPINGS.get(&b.tgid) }) else {
        return 1;
    };
    // Masked: the verifier must see the index bounded (the length is a
    // power of two).
    let Some(m) = procs.maps.get(mid as usize & (MAX_EXEC_MAPPINGS - 1)) else {
        return 1;
    };
    if m.start <= b.key {
        b.lo = mid;
    } else {
        b.hi = mid;
    }
    0
}

/// One step over the row array: the last row at or below `key`.
extern "C" fn bisect_rows(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(bp) = UNWIND_BISECT.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a per-CPU map value; uprobe programs do not nest on a CPU.
    let b = unsafe { &mut *bp };
    if b.hi <= b.lo + 1 {
        return 1;
    }
    let mid = b.lo + (b.hi - b.lo) / 2;
    let Some(row) = UNWIND_ROWS.get(mid) else {
        return 1;
    };
    if u64::from(row.pc) <= b.key {
        b.lo = mid;
    } else {
        b.hi = mid;
    }
    0
}

/// Runs the search `cb` from `[lo, hi)` for `key`; the index found.
#[inline(always)]
fn bisect(
    lo: u32,
    hi: u32,
    key: u64,
    tgid: u32,
    steps: u32,
    cb: extern "C" fn(u64, *mut c_void) -> i64,
) -> Option<u32> {
    let bp = UNWIND_BISECT.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value; uprobe programs do not nest on a CPU.
    unsafe {
        *bp = Bisect {
            lo,
            hi,
            key,
            tgid,
            _pad: 0,
        }
    };
    run_loop(steps, cb);
    Some(unsafe { (*bp).lo })
}

#[inline(never)]
fn search(tgid: u32, pc: u64) -> Result<UnwindRow, u64> {
    let procs = unsafe { UNWIND_MAPPINGS.get(&tgid) }.ok_or(end::NO_MAPPING)?;
    let count = procs.count.min(MAX_EXEC_MAPPINGS as u32);
    if count == 0 {
        return Err(end::NO_MAPPING);
    }
    let lo = bisect(0, count, pc, tgid, MAX_MAPPING_STEPS, bisect_mappings)
        .ok_or(end::NO_MAPPING)?;
    let Some(m) = procs.maps.get(lo as usize & (MAX_EXEC_MAPPINGS - 1)) else {
        return Err(end::NO_MAPPING);
    };
    if pc < m.start || pc >= m.end {
        return Err(end::NO_MAPPING);
    }
    if m.rows_len == 0 {
        return Ok(UnwindRow {
            cfa_kind: cfa::FRAME_POINTER,
            ..UnwindRow::default()
        });
    }
    let vpc = pc.wrapping_sub(m.bias);
    if vpc > u64::from(u32::MAX) {
        return Err(end::NO_RULE);
    }
    let first = UNWIND_ROWS.get(m.rows_start).ok_or(end::NO_RULE)?;
    if u64::from(first.pc) > vpc {
        return Err(end::NO_RULE);
    }
    let (start, end) = (m.rows_start, m.rows_start.saturating_add(m.rows_len));
    let lo = bisect(start, end, vpc, tgid, MAX_SEARCH_STEPS, bisect_rows).ok_or(end::NO_RULE)?;
    UNWIND_ROWS.get(lo).copied().ok_or(end::NO_RULE)
}
