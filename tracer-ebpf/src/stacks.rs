//! The target's user stack: its pointer, its words, and the id of the whole
//! stack, from the kernel's stack table or, on a hash collision there, the
//! tracer's own (see [`crate::maps::OWN_STACKS`]). A future DWARF unwinder
//! for binaries without frame pointers belongs here.

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
