//! The target's user stack: its pointer, its words, and the id of the whole
//! stack, from the kernel's stack table or, on a hash collision there, the
//! tracer's own (see [`crate::maps::OWN_STACKS`]), or, for processes mapping
//! code without frame pointers, from the DWARF unwinder ([`crate::unwind`]).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::bpf_probe_read_user,
    programs::tracing::StackIdContext,
};
use aya_log_ebpf::warn;
use tracer_common::{Counter, MAX_STACK_DEPTH, STACK_ID_NONE, STACK_ID_OWN, StackBuf};

use crate::{
    LOG_TARGET,
    unwind::{FNV_BASIS, Walked, fnv},
    counters::count,
    maps::{OWN_STACKS, STACK_SCRATCH, STACKS},
};

#[inline(always)]
pub(crate) fn sp_of(regs: *mut pt_regs) -> u64 {
    unsafe { (*regs).rsp }
}

/// A word of the target's stack.
#[inline(always)]
pub(crate) fn read_stack(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// The id of the current user stack: the kernel's table, else (a hash
/// collision there) the tracer's own; `STACK_ID_NONE` when both fail.
#[inline(always)]
pub(crate) fn stack_id_of<C: StackIdContext>(ctx: &C) -> u32 {
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
        warn!(ctx, target: LOG_TARGET, "stack tables full: stacks are being lost");
    }
    STACK_ID_NONE
}

/// The id of the user stack at `regs` (a return probe's: the caller's
/// registers): the DWARF unwinder's for processes it walks, else the
/// frame-pointer walk's ([`stack_id_of`]).
#[inline(always)]
pub(crate) fn user_stack_id<C: StackIdContext>(ctx: &C, regs: *mut pt_regs, tgid: u32) -> u32 {
    let walked = if crate::unwind::wants(tgid) {
        crate::unwind::walk(tgid, regs)
    } else {
        Walked::NotMapped
    };
    // One call of each path: the verifier checks a callee once per call site.
    match walked {
        Walked::Stack { buf, n, hash } => {
            if let Some(id) = store_walked(buf, n, hash) {
                return id;
            }
        }
        // Not walked here, or the first pc is in no mapping the unwinder
        // knows yet (a process just started, its maps being read): the
        // kernel's frame-pointer walk.
        Walked::NotMapped => return stack_id_of(ctx),
        Walked::Failed => {}
    }
    if count(Counter::StackLost) == 0 {
        warn!(ctx, target: LOG_TARGET, "stack tables full: stacks are being lost");
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
    // bpf_get_stack zeroes the buffer past the stack: hashing and storing
    // it whole keeps one stack one entry.
    let mut h = FNV_BASIS;
    for i in 0..MAX_STACK_DEPTH {
        // SAFETY: i < MAX_STACK_DEPTH, inside the buffer.
        h = fnv(h, unsafe { *(*buf).ips.as_ptr().add(i) });
    }
    store_walked(buf, MAX_STACK_DEPTH as u32, h)
}

/// Stores a stack (the first `n` entries of `buf`, the per-CPU
/// scratch, ending with its end record; `hash` covers them) in the tracer's
/// own table, if new, and returns its id. What follows the end record in
/// the buffer is left as it is: readers stop at the record.
#[inline(never)]
fn store_walked(buf: *mut StackBuf, n: u32, hash: u64) -> Option<u32> {
    let id = STACK_ID_OWN | (hash as u32 & (STACK_ID_OWN - 1));
    if unsafe { OWN_STACKS.get(&id) }.is_none() {
        let _ = OWN_STACKS.insert(&id, unsafe { &*buf }, BPF_NOEXIST as u64);
    }
    let stored = OWN_STACKS.get_ptr(&id)?;
    for i in 0..MAX_STACK_DEPTH {
        if i as u32 >= n {
            break;
        }
        // Read back through the stack and bounded again: with the early
        // exit on `n`, LLVM turns the index into a moving pointer and a
        // count, and verifiers before ~6.8 lose their bond (Linux 6.1
        // rejected the load at the buffer's end). An index checked right
        // before the access verifies on every kernel.
        // SAFETY: `i` is a live local.
        let i = unsafe { core::ptr::read_volatile(&i) };
        if i >= MAX_STACK_DEPTH {
            break;
        }
        // SAFETY: both point at live buffers of MAX_STACK_DEPTH addresses.
        let (a, b) = unsafe { (*(*stored).ips.as_ptr().add(i), *(*buf).ips.as_ptr().add(i)) };
        if a != b {
            // Two stacks with the same 30 bits: lost, not confused.
            return None;
        }
    }
    Some(id)
}
