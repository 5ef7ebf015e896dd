//! The in-kernel DWARF unwinder's tables, shared by the collector (which
//! builds them from `.eh_frame`/`.debug_frame`) and the eBPF side (which walks
//! stacks with them).
//!
//! x86-64 only. Every rule is reduced to what the kernel needs to step from
//! one frame to its caller: the CFA (canonical frame address) from rsp or rbp
//! plus an offset, where the caller's rbp was saved, and the return address,
//! always at CFA-8.

/// How a row computes the CFA (stored in [`UnwindRow::cfa_kind`]).
pub mod cfa {
    /// No FDE covers the pc (a gap between functions): the walk ends there.
    pub const NONE: u8 = 0;
    /// CFA = rsp + offset.
    pub const RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 2;
    /// A lazy-binding PLT entry: CFA = rsp + offset, plus 8 once the entry
    /// has pushed its index (pc & 15 >= `rbp_offset`, the threshold).
    pub const PLT: u8 = 3;
    /// The signal return trampoline (`__restore_rt`): the interrupted
    /// registers are in the `ucontext` at rsp.
    pub const SIGNAL: u8 = 4;
    /// The return address is undefined: the outermost frame of a thread
    /// (`_start`, `clone`). The walk is complete.
    pub const END: u8 = 5;
    /// A rule the unwinder does not implement (a DWARF expression, another
    /// register): the walk ends, counted.
    pub const UNSUPPORTED: u8 = 6;
    /// Not a table row: the pc's mapping has no unwind table; its frames are
    /// walked with frame pointers (Go, JIT code, objects without CFI).
    pub const FRAME_POINTER: u8 = 7;
}

/// Where the caller's rbp is (stored in [`UnwindRow::rbp_kind`]).
pub mod rbp {
    /// rbp is unchanged in this frame (not saved, or not yet).
    pub const SAME: u8 = 0;
    /// Saved at CFA + offset.
    pub const AT_CFA: u8 = 1;
    /// Recoverable only by a rule the unwinder does not implement; a later
    /// rbp-based CFA ends the walk.
    pub const UNKNOWN: u8 = 2;
}

/// One row of an object's unwind table: the rule for pcs from `pc` up to the
/// next row's `pc`. Rows of one object are sorted by `pc`, which is relative
/// to the object's load address (its ELF virtual address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// First pc (ELF virtual address) the rule applies to.
    pub pc: u32,
    /// One of [`cfa`].
    pub cfa_kind: u8,
    /// One of [`rbp`].
    pub rbp_kind: u8,
    pub _pad: u16,
    /// Offsets are 32-bit: real frames exceed 64 KiB (Debian's python3 has
    /// one of 65,600 bytes).
    pub cfa_offset: i32,
    pub rbp_offset: i32,
}

/// One executable mapping of a process, as the unwinder needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    /// Subtracted from a pc to get the object's virtual address.
    pub bias: u64,
    /// The object's rows in the shared row array: `[rows_start,
    /// rows_start + rows_len)`. `rows_len == 0`: walk with frame pointers.
    pub rows_start: u32,
    pub rows_len: u32,
}

/// Executable mappings held per process.
pub const MAX_EXEC_MAPPINGS: usize = 256;

/// A process's executable mappings, sorted by `start`, non-overlapping.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcMappings {
    pub count: u32,
    pub _pad: u32,
    pub maps: [ExecMapping; MAX_EXEC_MAPPINGS],
}

impl Default for ProcMappings {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            maps: [ExecMapping::default(); MAX_EXEC_MAPPINGS],
        }
    }
}

/// Key of the per-pc rule cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PcKey {
    pub tgid: u32,
    pub _pad: u32,
    pub pc: u64,
}

/// Steps the binary search over a table may take: tables up to 2^24 rows.
pub const MAX_SEARCH_STEPS: u32 = 24;

/// Steps the search over a process's mappings may take (2^9 > 256).
pub const MAX_MAPPING_STEPS: u32 = 9;

/// Why a DWARF-unwound stack ended. The stack stored in the tracer's own
/// table ends with `UNWIND_END | reason`, after the last frame.
pub mod end {
    /// Reached the thread's root (a row with an undefined return address,
    /// or a frame-pointer walk reaching rbp = 0): the stack is whole.
    pub const ROOT: u64 = 0;
    /// A pc no table row covers.
    pub const NO_RULE: u64 = 1;
    /// A rule the unwinder does not implement.
    pub const UNSUPPORTED: u64 = 2;
    /// A return address outside every executable mapping (or 0 mid-walk
    /// where the table says the frame has a caller).
    pub const BAD_RETURN: u64 = 3;
    /// The target's stack could not be read.
    pub const READ_FAILED: u64 = 4;
    /// The stack is deeper than the tracer records.
    pub const DEPTH: u64 = 5;
    /// A pc in no mapping the unwinder knows (a library mapped since the
    /// last refresh).
    pub const NO_MAPPING: u64 = 6;
}

/// High bits marking the end record of a DWARF-unwound stack (no user pc is
/// in the kernel's half of the address space).
pub const UNWIND_END: u64 = 0xffff_ffff_ffff_ff00;

/// The end record's reason, if `ip` is one.
pub const fn end_reason(ip: u64) -> Option<u64> {
    if ip & UNWIND_END == UNWIND_END {
        Some(ip & 0xff)
    } else {
        None
    }
}

// The walker masks indexes into `ProcMappings::maps` with `len - 1`.
const _: () = assert!(MAX_EXEC_MAPPINGS.is_power_of_two());
