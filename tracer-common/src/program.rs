//! The kernel side's programs: their ELF names, how each attaches, and what
//! it accounts.
//!
//! The eBPF side names each program after its function, so
//! [`Program::name`] must equal that function's name; `tracer`'s unit tests
//! check every variant against the embedded object, and that the object has
//! no program missing here.

use crate::Kind;

/// One program of the eBPF object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// malloc(size), valloc(size), pvalloc(size); the [`Op`](crate::Op)
    /// comes from the attach cookie.
    SizeArg0,
    /// aligned_alloc(align, size), memalign(align, size); the op comes from
    /// the cookie.
    SizeArg1,
    /// calloc(n, size).
    CallocEnter,
    /// realloc(ptr, size).
    ReallocEnter,
    /// reallocarray(ptr, n, size).
    ReallocArrayEnter,
    /// posix_memalign(memptr, align, size).
    PosixMemalignEnter,
    /// mmap(addr, len, ...).
    MmapEnter,
    /// mremap(old, old_len, new_len, ...).
    MremapEnter,
    /// The one return probe of every allocating function.
    AllocReturn,
    /// free(ptr).
    FreeEnter,
    /// munmap(addr, len).
    MunmapEnter,
    /// Entry and return of every allocating function in one program, as
    /// uprobe sessions (the op from the cookie).
    AllocSession,
    /// Every RET of runtime.newproc1: a goroutine was created.
    GoNewproc1Ret,
    /// runtime.gdestroy / runtime.goexit0: a goroutine exited.
    GoGoexit,
    /// runtime.setprofilebucket: a sampled Go heap object was allocated.
    GoProfileBucket,
    /// runtime.mProf_Free: a sampled Go heap object was swept.
    GoProfileFree,
    /// runtime.(*timer).modify (Go ≥ 1.23): a timer may have been created.
    GoTimerModify,
    /// time.startTimer (Go ≤ 1.22): a timer was created.
    GoTimerStart,
    /// runtime.(*timer).stop / time.stopTimer: a timer was stopped.
    GoTimerStop,
    /// runtime.(*timer).unlockAndRun / runtime.runOneTimer (cookie 1): a
    /// timer fired.
    GoTimerFire,
    /// Tracepoint oom:mark_victim: the kernel's OOM killer chose a victim.
    OomMarkVictim,
    /// Tracepoint sched:sched_process_exit: the target's exit status (for
    /// `attach`, where the tracer is not the parent that waits for it).
    ProcessExit,
    /// Tracepoint task:task_newtask: a target's child (a new process, not a
    /// thread) becomes a target when its parent follows forks.
    ProcessFork,
    /// Tracepoint sched:sched_process_exec: a target exec'd (the collector
    /// re-plans for the new image).
    ProcessExec,
    /// Does nothing, at a function's entry: the tracer times calls of a
    /// function of its own with it, for the cost of a trap on this machine
    /// (the overhead estimate).
    CalibrateEntry,
    /// Does nothing, at a function's return (the cost of a return probe).
    CalibrateReturn,
}

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A uprobe on one instruction (a function's entry, or anywhere in it,
    /// e.g. the RET instructions of a Go function).
    Uprobe,
    /// A uretprobe: runs when the probed function returns.
    Uretprobe,
    /// A uprobe session (Linux 6.13+): the program runs at the entry and,
    /// when that run returned 0, at the return. Loaded and attached by the
    /// tracer itself (aya cannot yet).
    Session,
    /// A kernel tracepoint.
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
}

impl Program {
    /// Every program, in the order the loader loads them.
    pub const ALL: [Program; 26] = [
        Program::SizeArg0,
        Program::SizeArg1,
        Program::CallocEnter,
        Program::ReallocEnter,
        Program::ReallocArrayEnter,
        Program::PosixMemalignEnter,
        Program::MmapEnter,
        Program::MremapEnter,
        Program::AllocReturn,
        Program::FreeEnter,
        Program::MunmapEnter,
        Program::GoNewproc1Ret,
        Program::GoGoexit,
        Program::GoProfileBucket,
        Program::GoProfileFree,
        Program::GoTimerModify,
        Program::GoTimerStart,
        Program::GoTimerStop,
        Program::GoTimerFire,
        Program::AllocSession,
        Program::OomMarkVictim,
        Program::ProcessExit,
        Program::ProcessFork,
        Program::ProcessExec,
        Program::CalibrateEntry,
        Program::CalibrateReturn,
    ];

    /// The program's name in the object (its function's name), as the
    /// `attached` event reports it.
    pub const fn name(self) -> &'static str {
        match self {
            Program::SizeArg0 => "size_arg0",
            Program::SizeArg1 => "size_arg1",
            Program::CallocEnter => "calloc_enter",
            Program::ReallocEnter => "realloc_enter",
            Program::ReallocArrayEnter => "reallocarray_enter",
            Program::PosixMemalignEnter => "posix_memalign_enter",
            Program::MmapEnter => "mmap_enter",
            Program::MremapEnter => "mremap_enter",
            Program::AllocReturn => "alloc_return",
            Program::FreeEnter => "free_enter",
            Program::MunmapEnter => "munmap_enter",
            Program::AllocSession => "alloc_session",
            Program::GoNewproc1Ret => "go_newproc1_ret",
            Program::GoGoexit => "go_goexit",
            Program::GoProfileBucket => "go_profile_bucket",
            Program::GoProfileFree => "go_profile_free",
            Program::GoTimerModify => "go_timer_modify",
            Program::GoTimerStart => "go_timer_start",
            Program::GoTimerStop => "go_timer_stop",
            Program::GoTimerFire => "go_timer_fire",
            Program::OomMarkVictim => "oom_mark_victim",
            Program::ProcessExit => "process_exit",
            Program::ProcessFork => "process_fork",
            Program::ProcessExec => "process_exec",
            Program::CalibrateEntry => "calibrate_entry",
            Program::CalibrateReturn => "calibrate_return",
        }
    }

    /// How the program is attached.
    pub const fn attach(self) -> Attach {
        match self {
            Program::AllocReturn | Program::CalibrateReturn => Attach::Uretprobe,
            Program::AllocSession => Attach::Session,
            Program::OomMarkVictim => Attach::Tracepoint {
                category: "oom",
                name: "mark_victim",
            },
            Program::ProcessExit => Attach::Tracepoint {
                category: "sched",
                name: "sched_process_exit",
            },
            Program::ProcessFork => Attach::Tracepoint {
                category: "task",
                name: "task_newtask",
            },
            Program::ProcessExec => Attach::Tracepoint {
                category: "sched",
                name: "sched_process_exec",
            },
            _ => Attach::Uprobe,
        }
    }

    /// Whether the program releases what others account (a free, an unmap,
    /// an exit, a stop): such probes go live before those that allocate, so
    /// that nothing allocated through a live probe is freed unseen.
    pub const fn frees(self) -> bool {
        matches!(
            self,
            Program::FreeEnter
                | Program::MunmapEnter
                | Program::GoGoexit
                | Program::GoProfileFree
                | Program::GoTimerStop
                | Program::GoTimerFire
        )
    }

    /// What the program allocates or frees; `None` for the programs that
    /// serve heap blocks and mappings alike (by the call's
    /// [`Op`](crate::Op): [`Program::AllocReturn`],
    /// [`Program::AllocSession`]) and for the OOM tracepoint.
    pub const fn kind(self) -> Option<Kind> {
        Some(match self {
            Program::SizeArg0
            | Program::SizeArg1
            | Program::CallocEnter
            | Program::ReallocEnter
            | Program::ReallocArrayEnter
            | Program::PosixMemalignEnter
            | Program::FreeEnter => Kind::Heap,
            Program::MmapEnter | Program::MremapEnter | Program::MunmapEnter => Kind::Mmap,
            Program::GoNewproc1Ret | Program::GoGoexit => Kind::Goroutine,
            Program::GoProfileBucket | Program::GoProfileFree => Kind::GoHeap,
            Program::GoTimerModify
            | Program::GoTimerStart
            | Program::GoTimerStop
            | Program::GoTimerFire => Kind::Timer,
            Program::AllocReturn
            | Program::AllocSession
            | Program::OomMarkVictim
            | Program::ProcessExit
            | Program::ProcessFork
            | Program::ProcessExec
            | Program::CalibrateEntry
            | Program::CalibrateReturn => {
                return None;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_every_variant_is_listed() {
        for (i, a) in Program::ALL.iter().enumerate() {
            for b in &Program::ALL[i + 1..] {
                assert_ne!(a, b);
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
