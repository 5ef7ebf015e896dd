//! Counter helpers: the per-CPU event counters ([`Counter`]) and atomic adds
//! to the statistics shared by all CPUs (map values).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use tracer_common::Counter;

use crate::maps::COUNTERS;

/// Counts a hit of the probe whose cookie is `cookie` (see
/// [`tracer_common::cookie`]).
#[inline(always)]
pub(crate) fn probe_hit(cookie: u64) {
    let slot = tracer_common::cookie_slot(cookie);
    if slot == 0 {
        return;
    }
    let Some(p) = crate::maps::PROBE_HITS.get_ptr_mut(slot) else {
        return;
    };
    // Per-CPU slot, no nesting: a plain add is safe.
    unsafe { *p += 1 };
}

#[inline(always)]
pub(crate) fn count(c: Counter) -> u64 {
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
pub(crate) fn add<T: Copy>(dst: *mut T, v: T) {
    // SAFETY: callers pass pointers into live map values.
    unsafe {
        atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, v);
    }
}
