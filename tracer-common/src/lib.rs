//! Types shared by the tracer's eBPF programs (kernel side) and its collector
//! (user side).
//!
//! Every type here crosses the kernel/user boundary through BPF maps, so each is
//! `#[repr(C)]`, `Copy`, made only of fixed-width integers, and laid out without
//! implicit padding (the padding would be uninitialised stack memory, which the
//! verifier rejects as a map key and which would make keys compare unequal).
#![no_std]

pub mod maps;
pub mod program;
pub mod unwind;

pub use program::{Attach, Program};

/// Which kind of memory a call site holds.
///
/// Stored as a `u32` in [`SiteKey::kind`] and [`AllocInfo::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Heap blocks from the malloc family.
    Heap = 0,
    /// Mappings from mmap/mremap.
    Mmap = 1,
    /// Go heap, from the runtime's sampled memory profile.
    GoHeap = 2,
    /// Live goroutines, by creation site.
    Goroutine = 3,
    /// Pending Go runtime timers, by creation stack.
    Timer = 4,
}

impl Kind {
    /// Decodes a kind stored in a map; `None` for values this build does not know.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Heap),
            1 => Some(Self::Mmap),
            2 => Some(Self::GoHeap),
            3 => Some(Self::Goroutine),
            4 => Some(Self::Timer),
            _ => None,
        }
    }

    /// The name used in the JSON stream and the table.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Heap => "heap",
            Self::Mmap => "mmap",
            Self::GoHeap => "heap",
            Self::Goroutine => "goroutine",
            Self::Timer => "timer",
        }
    }
}

/// The allocator operation whose entry was seen and whose return is awaited.
///
/// Used as the uprobe attach cookie and stored in [`Pending::op`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    ReallocArray = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Memalign = 7,
    Valloc = 8,
    Pvalloc = 9,
    Mmap = 10,
    Mremap = 11,
}

impl Op {
    /// Decodes an op stored in a map or cookie.
    pub const fn from_u64(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Malloc,
            2 => Self::Calloc,
            3 => Self::Realloc,
            4 => Self::ReallocArray,
            5 => Self::PosixMemalign,
            6 => Self::AlignedAlloc,
            7 => Self::Memalign,
            8 => Self::Valloc,
            9 => Self::Pvalloc,
            10 => Self::Mmap,
            11 => Self::Mremap,
            _ => return None,
        })
    }
}

/// Bit of [`Pending::op`] marking a call that sampling left out: its return
/// only releases what it replaces (realloc) and records nothing.
pub const OP_UNSAMPLED: u32 = 1 << 16;

/// Bit of [`Pending::op`] marking a call whose return is not probed (a
/// uprobe session skipped it: sampling left the call out). Nothing retires
/// the entry; it stays only to recognise the allocator's own calls inside it
/// (see [`Pending::ret_addr`]).
pub const OP_NO_RETURN: u32 = 1 << 17;

/// Stack id used when the kernel could not record the stack (table full or a
/// hash collision). The bytes are still accounted, under an "unknown stack" site.
pub const STACK_ID_NONE: u32 = u32::MAX;

/// Value of the per-thread map that carries an allocator call from its entry
/// probe to its return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Requested size in bytes (already multiplied out for calloc/reallocarray).
    pub size: u64,
    /// The block being resized (realloc, mremap) or the out-pointer
    /// (posix_memalign); 0 when unused.
    pub addr: u64,
    /// Stack pointer at entry. A return is matched to its entry by
    /// `sp_at_return == sp + 8`, which tells nested allocator calls (glibc's
    /// realloc(NULL, n) calls malloc through the probed symbol) from the outer one
    /// and detects entries whose return was never seen.
    pub sp: u64,
    /// An [`Op`].
    pub op: u32,
    /// Probed functions tail-called by this one (same stack pointer): each
    /// adds a return to skip before the final one accounts the call.
    pub tail_calls: u32,
    /// For [`OP_NO_RETURN`] entries: the return address at `sp` at entry. The
    /// call is still running while that stack slot holds it.
    pub ret_addr: u64,
}

/// Value of the address map: one live block or mapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    /// Bytes accounted: the size, or in sampling mode the sample's weight
    /// in bytes (max(size, rate)).
    pub size: u64,
    /// Blocks accounted: 1, or in sampling mode max(1, rate / size).
    pub weight: u64,
    /// Stack id in the stack table, or [`STACK_ID_NONE`].
    pub stack_id: u32,
    /// A [`Kind`].
    pub kind: u32,
}

/// Key of the per-site statistics map. One session traces several
/// processes (children it follows, a cgroup's), whose stacks mean different
/// code: a site belongs to one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteKey {
    /// Stack id in the stack table, or [`STACK_ID_NONE`].
    pub stack_id: u32,
    /// A [`Kind`].
    pub kind: u32,
    /// The process (tgid).
    pub tgid: u32,
    pub _pad: u32,
}

/// Key of the maps holding something of one process by its address or id
/// (a live block, a pending timer, a goroutine id, a profile bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcKey {
    pub addr: u64,
    /// The process (tgid).
    pub tgid: u32,
    pub _pad: u32,
}

impl ProcKey {
    pub const fn new(tgid: u32, addr: u64) -> Self {
        Self {
            addr,
            tgid,
            _pad: 0,
        }
    }
}

/// Bits of a [`maps::TARGETS`] value.
pub mod target {
    /// Traced: its events count.
    pub const TRACED: u32 = 1;
    /// Its children (fork, clone without CLONE_THREAD) become targets too,
    /// with this bit, when they are born.
    pub const FOLLOW_FORKS: u32 = 1 << 1;
    /// Added by the kernel at its birth; the collector has not hooked it
    /// yet (it clears the bit once it has).
    pub const NEW_CHILD: u32 = 1 << 2;
    /// It exec'd since the collector last cleared the bit.
    pub const EXECED: u32 = 1 << 3;
}

/// Per-site statistics, updated with atomic adds by every CPU.
///
/// Outstanding values are signed: a free can be seen on one CPU an instant
/// before the matching alloc's increment lands on another, so a reader may see a
/// transient negative value, which it clamps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    pub outstanding_bytes: i64,
    pub outstanding_count: i64,
    /// Allocations made from this site since attach.
    pub allocs: u64,
    /// Bytes allocated from this site since attach.
    pub alloc_bytes: u64,
    /// Frees (or unmaps) of blocks allocated from this site.
    pub frees: u64,
    pub free_bytes: u64,
}

/// A goroutine creation site: the `go` statement's return address (`gopc`)
/// and the goroutine's start function (`startpc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoSiteKey {
    pub gopc: u64,
    pub startpc: u64,
    /// The process (tgid).
    pub tgid: u32,
    pub _pad: u32,
}

/// Struct offsets in the target's Go runtime, set as globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoOffsets {
    /// `runtime.g.goid`.
    pub g_goid: u64,
    /// `runtime.g.gopc`.
    pub g_gopc: u64,
    /// `runtime.g.startpc`.
    pub g_startpc: u64,
    /// `runtime.timer.period`.
    pub timer_period: u64,
    /// Runtime address range of `time.newTimer` (Go ≥ 1.23): a call of
    /// `(*timer).modify` returning there creates a timer.
    pub newtimer_lo: u64,
    pub newtimer_hi: u64,
    /// Non-zero: count channel timers too (Go ≤ 1.22, or asynctimerchan=1,
    /// where the runtime holds them until they fire).
    pub count_chan_timers: u64,
    /// Runtime address of `time.sendTime`, the callback of every channel
    /// timer (Go ≥ 1.23).
    pub sendtime_pc: u64,
}

/// The last OOM victim the kernel marked that was the target (from the
/// `oom:mark_victim` tracepoint). Sizes in KiB as the kernel reports them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomVictim {
    /// 0 until the target is marked.
    pub pid: u32,
    pub _pad: u32,
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ktime_ns: u64,
}

mod counters;
pub use counters::{COUNTER_COUNT, COUNTERS, Counter, CounterClass, CounterInfo};

/// Default sizes of the kernel maps; all configurable from the command line.
pub const DEFAULT_MAX_ALLOCS: u32 = 1 << 20;
pub const DEFAULT_MAX_SITES: u32 = 1 << 15;
pub const DEFAULT_MAX_STACKS: u32 = 1 << 15;
pub const DEFAULT_MAX_THREADS: u32 = 1 << 14;
pub const DEFAULT_MAX_GOROUTINES: u32 = 1 << 20;
/// Processes one session traces at once (a followed tree, a cgroup).
pub const DEFAULT_MAX_PROCESSES: u32 = 1 << 10;

/// Depth of the stacks the kernel records (the kernel's own maximum).
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack ids with this bit come from the tracer's own stack table (a stack
/// the kernel's table refused for a hash collision), not the kernel's.
pub const STACK_ID_OWN: u32 = 1 << 30;

/// A user stack in the tracer's own table: return addresses, innermost first,
/// zero-filled after the last.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBuf {
    pub ips: [u64; MAX_STACK_DEPTH],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), made of plain integers, without padding.
    unsafe impl aya::Pod for super::Pending {}
    unsafe impl aya::Pod for super::AllocInfo {}
    unsafe impl aya::Pod for super::SiteKey {}
    unsafe impl aya::Pod for super::ProcKey {}
    unsafe impl aya::Pod for super::SiteStats {}
    unsafe impl aya::Pod for super::GoSiteKey {}
    unsafe impl aya::Pod for super::GoOffsets {}
    unsafe impl aya::Pod for super::StackBuf {}
    unsafe impl aya::Pod for super::OomVictim {}
    unsafe impl aya::Pod for super::unwind::UnwindRow {}
    unsafe impl aya::Pod for super::unwind::ExecMapping {}
    unsafe impl aya::Pod for super::unwind::ProcMappings {}
    unsafe impl aya::Pod for super::unwind::PcKey {}
}

/// Probes counted one by one ([`maps::PROBE_HITS`]): the slots a cookie
/// can name.
pub const PROBE_SLOTS: u32 = 1024;
// A slot must fit the 16 bits a cookie gives it.
const _: () = assert!(PROBE_SLOTS <= 0xffff);

/// An attach cookie: the program's own `value` (an [`Op`], a flag) in the
/// low 16 bits; the probe's slot in [`maps::PROBE_HITS`] (0: not counted)
/// in the next 16, so the user side learns each probe's hits and prices
/// each by the instruction it sits on; and in the high half the process the
/// probe was attached for (0: any).
///
/// The process is there because kernels before ~6.10 run the programs of
/// every per-process perf-event uprobe on a file whenever any of those
/// processes hits it (the pid filter only decides where breakpoints go):
/// with two traced processes sharing libc, each return was accounted once
/// per process. The programs ignore a hit for another process
/// ([`cookie_is_for`]).
pub const fn cookie(value: u32, slot: u32, tgid: u32) -> u64 {
    ((tgid as u64) << 32) | (((slot & 0xffff) as u64) << 16) | (value & 0xffff) as u64
}

/// The program's own value of a cookie (see [`cookie`]).
pub const fn cookie_value(cookie: u64) -> u64 {
    cookie & 0xffff
}

/// The probe slot of a cookie (see [`cookie`]).
pub const fn cookie_slot(cookie: u64) -> u32 {
    ((cookie >> 16) & 0xffff) as u32
}

/// Whether a hit of the probe with `cookie` in process `tgid` is its own.
pub const fn cookie_is_for(cookie: u64, tgid: u32) -> bool {
    let owner = (cookie >> 32) as u32;
    owner == 0 || owner == tgid
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // Padding would reach the kernel as uninitialised bytes; sizes equal to the
    // sum of the fields prove there is none.
    #[test]
    fn cookies_carry_value_slot_and_process() {
        let c = cookie(7, 1023, 4_194_304);
        assert_eq!(cookie_value(c), 7);
        assert_eq!(cookie_slot(c), 1023);
        assert!(cookie_is_for(c, 4_194_304));
        assert!(!cookie_is_for(c, 42));
        assert!(cookie_is_for(cookie(1, 0, 0), 42));
    }

    #[test]
    fn no_hidden_padding() {
        assert_eq!(size_of::<Pending>(), 8 * 3 + 4 + 4 + 8);
        assert_eq!(size_of::<AllocInfo>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<SiteKey>(), 4 * 4);
        assert_eq!(size_of::<ProcKey>(), 8 + 4 + 4);
        assert_eq!(size_of::<SiteStats>(), 8 * 6);
        assert_eq!(size_of::<GoSiteKey>(), 24);
        assert_eq!(size_of::<OomVictim>(), 8 * 6);
        assert_eq!(size_of::<GoOffsets>(), 8 * 8);
        assert_eq!(size_of::<StackBuf>(), 8 * MAX_STACK_DEPTH);
        assert_eq!(size_of::<unwind::UnwindRow>(), 4 + 1 + 1 + 2 + 4 + 4);
        assert_eq!(size_of::<unwind::ExecMapping>(), 8 * 3 + 4 + 4);
        assert_eq!(
            size_of::<unwind::ProcMappings>(),
            8 + size_of::<unwind::ExecMapping>() * unwind::MAX_EXEC_MAPPINGS
        );
        assert_eq!(size_of::<unwind::PcKey>(), 16);
    }

    #[test]
    fn kinds_and_ops_round_trip() {
        for k in [
            Kind::Heap,
            Kind::Mmap,
            Kind::GoHeap,
            Kind::Goroutine,
            Kind::Timer,
        ] {
            assert_eq!(Kind::from_u32(k as u32), Some(k));
        }
        assert_eq!(Kind::from_u32(99), None);
        for v in 1..=11u64 {
            assert_eq!(Op::from_u64(v).map(|o| o as u64), Some(v));
        }
        assert_eq!(Op::from_u64(0), None);
    }
}
