//! Stage 2: choose probes — which functions of which mapped objects to hook.
//!
//! The allocator is found, not named: every object the target maps (its
//! executable included, for static binaries and allocators linked in) is read
//! for definitions of the malloc family and the mmap calls.

pub mod placement;

use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol, SymbolKind};
use tracer_common::{Op, Program};

use crate::{
    error::TracerError,
    object::{ElfObject, ElfObjects},
};

/// A hookable allocator function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Malloc,
    Calloc,
    Realloc,
    ReallocArray,
    PosixMemalign,
    AlignedAlloc,
    Memalign,
    Valloc,
    Pvalloc,
    Free,
    Mmap,
    Munmap,
    Mremap,
    /// jemalloc's `mallocx(size, flags)`.
    Mallocx,
    /// jemalloc's `rallocx(ptr, size, flags)`.
    Rallocx,
    /// jemalloc's `dallocx(ptr, flags)`, `sdallocx(ptr, size, flags)`.
    Dallocx,
    /// C++ `operator new` and `new[]` (plain, nothrow, aligned), where an
    /// allocator library defines them itself (tcmalloc): libstdc++'s call
    /// malloc, and are not probed (its object defines no malloc).
    CxxNew,
    /// C++ `operator delete` and `delete[]` (plain, sized, aligned).
    CxxDelete,
}

/// How a hook is wired to the eBPF programs.
pub struct Wiring {
    /// Entry program in the eBPF object.
    pub entry: Program,
    /// Cookie for programs shared by several functions.
    pub cookie: Option<Op>,
    /// Whether the shared return probe is needed (the result is the block).
    pub needs_return: bool,
}

impl Hook {
    /// How many arguments the function takes: the registers a probe past
    /// its entry must find untouched (see [`placement`]).
    pub const fn args(self) -> usize {
        match self {
            Hook::Malloc | Hook::Valloc | Hook::Pvalloc | Hook::Free => 1,
            Hook::Calloc
            | Hook::Realloc
            | Hook::AlignedAlloc
            | Hook::Memalign
            | Hook::Munmap
            | Hook::Mallocx => 2,
            // The widest of their signatures.
            Hook::ReallocArray
            | Hook::PosixMemalign
            | Hook::Rallocx
            | Hook::Dallocx
            | Hook::CxxNew
            | Hook::CxxDelete => 3,
            Hook::Mremap => 5,
            Hook::Mmap => 6,
        }
    }

    pub const ALL: [Hook; 18] = [
        Hook::Malloc,
        Hook::Calloc,
        Hook::Realloc,
        Hook::ReallocArray,
        Hook::PosixMemalign,
        Hook::AlignedAlloc,
        Hook::Memalign,
        Hook::Valloc,
        Hook::Pvalloc,
        Hook::Free,
        Hook::Mmap,
        Hook::Munmap,
        Hook::Mremap,
        Hook::Mallocx,
        Hook::Rallocx,
        Hook::Dallocx,
        Hook::CxxNew,
        Hook::CxxDelete,
    ];

    /// The exported symbol names.
    pub fn symbols(self) -> &'static [&'static str] {
        match self {
            Hook::Malloc => &["malloc"],
            Hook::Calloc => &["calloc"],
            Hook::Realloc => &["realloc"],
            Hook::ReallocArray => &["reallocarray"],
            Hook::PosixMemalign => &["posix_memalign"],
            Hook::AlignedAlloc => &["aligned_alloc"],
            Hook::Memalign => &["memalign"],
            Hook::Valloc => &["valloc"],
            Hook::Pvalloc => &["pvalloc"],
            Hook::Free => &["free"],
            Hook::Mmap => &["mmap"],
            Hook::Munmap => &["munmap"],
            Hook::Mremap => &["mremap"],
            Hook::Mallocx => &["mallocx"],
            Hook::Rallocx => &["rallocx"],
            Hook::Dallocx => &["dallocx", "sdallocx"],
            Hook::CxxNew => &[
                "_Znwm",
                "_Znam",
                "_ZnwmRKSt9nothrow_t",
                "_ZnamRKSt9nothrow_t",
                "_ZnwmSt11align_val_t",
                "_ZnamSt11align_val_t",
                "_ZnwmSt11align_val_tRKSt9nothrow_t",
                "_ZnamSt11align_val_tRKSt9nothrow_t",
            ],
            Hook::CxxDelete => &[
                "_ZdlPv",
                "_ZdaPv",
                "_ZdlPvm",
                "_ZdaPvm",
                "_ZdlPvRKSt9nothrow_t",
                "_ZdaPvRKSt9nothrow_t",
                "_ZdlPvSt11align_val_t",
                "_ZdaPvSt11align_val_t",
                "_ZdlPvmSt11align_val_t",
                "_ZdaPvmSt11align_val_t",
            ],
        }
    }

    pub fn wiring(self) -> Wiring {
        let (entry, cookie, needs_return) = match self {
            Hook::Malloc => (Program::SizeArg0, Some(Op::Malloc), true),
            Hook::Valloc => (Program::SizeArg0, Some(Op::Valloc), true),
            Hook::Pvalloc => (Program::SizeArg0, Some(Op::Pvalloc), true),
            Hook::AlignedAlloc => (Program::SizeArg1, Some(Op::AlignedAlloc), true),
            Hook::Memalign => (Program::SizeArg1, Some(Op::Memalign), true),
            Hook::Calloc => (Program::CallocEnter, None, true),
            Hook::Realloc => (Program::ReallocEnter, None, true),
            Hook::ReallocArray => (Program::ReallocArrayEnter, None, true),
            Hook::PosixMemalign => (Program::PosixMemalignEnter, None, true),
            Hook::Mmap => (Program::MmapEnter, None, true),
            Hook::Mremap => (Program::MremapEnter, None, true),
            Hook::Free => (Program::FreeEnter, None, false),
            Hook::Munmap => (Program::MunmapEnter, None, false),
            Hook::Mallocx | Hook::CxxNew => (Program::SizeArg0, Some(Op::Malloc), true),
            Hook::Rallocx => (Program::ReallocEnter, None, true),
            Hook::Dallocx | Hook::CxxDelete => (Program::FreeEnter, None, false),
        };
        Wiring {
            entry,
            cookie,
            needs_return,
        }
    }

    /// The operation of an allocating function (None for frees).
    pub fn op(self) -> Option<Op> {
        Some(match self {
            Hook::Malloc => Op::Malloc,
            Hook::Calloc => Op::Calloc,
            Hook::Realloc => Op::Realloc,
            Hook::ReallocArray => Op::ReallocArray,
            Hook::PosixMemalign => Op::PosixMemalign,
            Hook::AlignedAlloc => Op::AlignedAlloc,
            Hook::Memalign => Op::Memalign,
            Hook::Valloc => Op::Valloc,
            Hook::Pvalloc => Op::Pvalloc,
            Hook::Mmap => Op::Mmap,
            Hook::Mremap => Op::Mremap,
            Hook::Mallocx | Hook::CxxNew => Op::Malloc,
            Hook::Rallocx => Op::Realloc,
            Hook::Free | Hook::Munmap | Hook::Dallocx | Hook::CxxDelete => return None,
        })
    }

    /// The hook of symbol `name`, and the name as this tracer spells it.
    fn from_symbol(name: &str) -> Option<(Self, &'static str)> {
        Self::ALL
            .into_iter()
            .find_map(|h| Some((h, *h.symbols().iter().find(|s| **s == name)?)))
    }
}

/// An object file as the target sees it and as we can open it.
#[derive(Clone, Debug)]
pub struct ObjectRef {
    /// Path in the target's mount namespace (what the user recognises).
    pub path: PathBuf,
    /// Path we open and attach to, leading to the inode the target maps
    /// (see [`crate::target::Mapping::open_path`]).
    pub open_path: PathBuf,
}

/// One uprobe to attach.
#[derive(Clone, Debug)]
pub struct PlannedProbe {
    /// The probed function, for the user (`malloc`, `runtime.newproc1+0x1a3`).
    pub function: String,
    pub object: ObjectRef,
    /// File offset of the probed instruction.
    pub offset: u64,
    /// eBPF program to attach.
    pub program: Program,
    /// Attach cookie for programs shared by several functions.
    pub cookie: Option<u64>,
    /// Whether this probe frees (attached before anything that allocates).
    pub frees: bool,
    /// For the entry probe of an allocating function: its operation. With
    /// uprobe sessions the entry and the return become one probe here (see
    /// [`crate::kernel::uprobe_multi`]).
    pub op: Option<Op>,
    /// Attached only part of the time (a sample of Go timer creation
    /// stacks), switched by [`crate::kernel::Kernel::set_sampled_probes`].
    pub sampled: bool,
}

impl PlannedProbe {
    /// The probes for one allocator function: the shared return probe first
    /// (an entry without its return would linger), at the function's entry
    /// where the stack top is the return address; then the entry probe at
    /// `entry + shift`, the cheapest equivalent instruction (see
    /// [`placement`]).
    fn for_hook(hook: Hook, name: &str, object: &ObjectRef, offset: u64, shift: u64) -> Vec<Self> {
        let w = hook.wiring();
        let mut out = Vec::with_capacity(2);
        let probe = |program: Program, cookie, at: u64| Self {
            function: if at == offset {
                name.to_string()
            } else {
                format!("{name}+{:#x}", at - offset)
            },
            object: object.clone(),
            offset: at,
            program,
            cookie,
            frees: program.frees(),
            op: None,
            sampled: false,
        };
        if w.needs_return {
            // At the entry probe's instruction: placement keeps the stack
            // pointer as at entry, so the return address is still on top, and
            // one trap serves both.
            out.push(probe(Program::AllocReturn, None, offset + shift));
        }
        let mut entry = probe(w.entry, w.cookie.map(|o| o as u64), offset + shift);
        entry.op = hook.op();
        out.push(entry);
        out
    }
}

/// Defined function symbols of interest in one ELF file: file offset of the
/// function and the shift to its cheapest entry-probe point.
pub fn allocator_symbols(elf: &ElfObject) -> Vec<(Hook, &'static str, u64, u64)> {
    let file = elf.file();
    let mut found: Vec<(Hook, &'static str, u64, u64)> = Vec::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if !sym.is_definition() || sym.kind() != SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names from .symtab look like "malloc@@GLIBC_2.2.5".
        let name = name.split('@').next().unwrap_or(name);
        let Some((hook, name)) = Hook::from_symbol(name) else {
            continue;
        };
        if found.iter().any(|(_, n, _, _)| *n == name) {
            continue;
        }
        let Some(offset) = elf.segments().vaddr_to_offset(sym.address()) else {
            continue;
        };
        let len = sym.size().clamp(1, 64);
        let shift = elf
            .read_at_offset(offset, len)
            .map_or(0, |code| placement::entry_offset(code, hook.args()));
        found.push((hook, name, offset, shift));
    }
    found
}

/// True for the dynamic loader, whose private minimal malloc only serves
/// itself before libc is up; probing it would add traps for nothing.
fn is_dynamic_loader(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ld-linux"))
}

/// Chooses the allocator probes for the given objects: every function of the
/// malloc family in every object that defines `malloc`, and the mmap calls
/// wherever they are defined. Aliases (same offset in one file, e.g. memalign
/// and aligned_alloc in some glibc versions) are hooked once, since two probes
/// at one address would both fire for one call. Empty when no object defines
/// malloc (a pure Go binary). Files come from `elves`, shared with the
/// other planners.
pub fn plan_libc(
    objects: &[ObjectRef],
    elves: &mut ElfObjects,
) -> Result<Vec<PlannedProbe>, TracerError> {
    let mut probes = Vec::new();
    for obj in objects {
        if is_dynamic_loader(&obj.path) {
            continue;
        }
        let symbols = match elves.get(&obj.open_path) {
            Ok(elf) => allocator_symbols(&elf),
            // A library we cannot parse (e.g. a mapped data file with +x) only
            // matters if it is the allocator; the caller reports NoAllocator.
            Err(e) => {
                log::debug!("skipping {}: {e}", obj.path.display());
                continue;
            }
        };
        let defines_malloc = symbols.iter().any(|(h, _, _, _)| *h == Hook::Malloc);
        let mut offsets = std::collections::HashSet::new();
        for (hook, name, offset, shift) in symbols {
            let is_mmap_family = matches!(hook, Hook::Mmap | Hook::Munmap | Hook::Mremap);
            if !defines_malloc && !is_mmap_family {
                continue;
            }
            if !offsets.insert(offset) {
                continue;
            }
            probes.extend(PlannedProbe::for_hook(hook, name, obj, offset, shift));
        }
    }
    // "malloc+0x4": placed past the entry, on a cheaper instruction.
    if !probes
        .iter()
        .any(|p| p.function.split('+').next() == Some("malloc"))
    {
        return Ok(Vec::new());
    }
    // Frees go live before allocations: a block allocated by a live probe and
    // freed through a not-yet-live one would be reported as leaked forever.
    probes.sort_by_key(|p| !p.frees);
    Ok(probes)
}

pub use crate::go::plan::{GoPlan, plan_go};

/// The objects a live process maps with code.
pub fn objects_of(target: &crate::target::Target) -> Vec<ObjectRef> {
    target
        .maps
        .executable_objects()
        .into_iter()
        .map(|m| ObjectRef {
            path: m.path.clone(),
            open_path: m.open_path.clone(),
        })
        .collect()
}

/// The objects a command will map once started, without running it: its
/// executable and the libraries its dynamic loader resolves (`ld.so --list`
/// loads nothing and runs no code of the program). The executable is opened
/// through `elves`, for the planners to reuse.
pub fn objects_of_command(
    exe: &Path,
    elves: &mut ElfObjects,
) -> Result<Vec<ObjectRef>, TracerError> {
    let unreadable = |reason: String| TracerError::UnreadableBinary {
        path: exe.to_path_buf(),
        reason,
    };
    let elf = elves.get(exe)?;
    let mut objects = vec![ObjectRef {
        path: exe.to_path_buf(),
        open_path: exe.to_path_buf(),
    }];
    let Some(interp) = elf.interpreter() else {
        return Ok(objects); // static executable
    };
    let out = std::process::Command::new(&interp)
        .arg("--list")
        .arg(exe)
        .output()
        .map_err(|e| unreadable(format!("cannot run its loader {interp}: {e}")))?;
    if !out.status.success() {
        return Err(unreadable(format!(
            "its loader {interp} could not resolve its libraries: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for path in parse_ld_list(&String::from_utf8_lossy(&out.stdout)) {
        objects.push(ObjectRef {
            path: path.clone(),
            open_path: path,
        });
    }
    Ok(objects)
}

/// Library paths from `ld.so --list` output
/// (`libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`).
pub fn parse_ld_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let rhs = l.split("=>").nth(1).unwrap_or(l).trim();
            let path = rhs.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libc_path() -> PathBuf {
        let maps = crate::target::Maps::read(std::process::id()).unwrap();
        maps.mappings
            .iter()
            .find(|m| {
                m.path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
            })
            .map(|m| m.path.clone())
            .expect("test binary links libc")
    }

    #[test]
    fn finds_malloc_family_in_libc() {
        let syms = allocator_symbols(&ElfObject::open(&libc_path()).unwrap());
        for hook in [
            Hook::Malloc,
            Hook::Free,
            Hook::Calloc,
            Hook::Realloc,
            Hook::Mmap,
        ] {
            assert!(
                syms.iter().any(|(h, _, off, _)| *h == hook && *off > 0),
                "{hook:?} not found"
            );
        }
    }

    #[test]
    fn every_symbol_names_one_hook() {
        let mut seen = std::collections::HashSet::new();
        for h in Hook::ALL {
            for s in h.symbols() {
                assert!(seen.insert(*s), "{s} listed twice");
                assert_eq!(Hook::from_symbol(s), Some((h, *s)));
            }
        }
        assert_eq!(Hook::from_symbol("_Znwm"), Some((Hook::CxxNew, "_Znwm")));
        assert_eq!(
            Hook::from_symbol("sdallocx"),
            Some((Hook::Dallocx, "sdallocx"))
        );
        assert_eq!(Hook::from_symbol("operator new"), None);
    }

    #[test]
    fn plan_dedupes_aliases_and_needs_malloc() {
        let libc = ObjectRef {
            path: libc_path(),
            open_path: libc_path(),
        };
        let mut elves = ElfObjects::new();
        let plan = plan_libc(std::slice::from_ref(&libc), &mut elves).unwrap();
        assert_eq!(elves.len(), 1);
        let first_alloc = plan.iter().position(|p| !p.frees).unwrap();
        assert!(
            plan[first_alloc..].iter().all(|p| !p.frees),
            "frees are attached first"
        );
        let mut entries: Vec<_> = plan
            .iter()
            .filter(|p| p.program != Program::AllocReturn)
            .map(|p| p.offset)
            .collect();
        entries.sort();
        let n = entries.len();
        entries.dedup();
        assert_eq!(n, entries.len(), "one entry probe per address");
        // Every return probe precedes its entry probe, which is at or just
        // after the function's entry.
        for (i, p) in plan
            .iter()
            .enumerate()
            .filter(|(_, p)| p.program == Program::AllocReturn)
        {
            assert!(plan[i + 1].offset >= p.offset && plan[i + 1].offset < p.offset + 64);
        }
        // glibc's free starts with a single-stepped `test`: moved.
        let free = plan
            .iter()
            .find(|p| p.program == Program::FreeEnter)
            .unwrap();
        assert!(free.function.starts_with("free+"), "{}", free.function);
        let none = ObjectRef {
            path: "/nonexistent".into(),
            open_path: "/nonexistent".into(),
        };
        assert!(plan_libc(&[none], &mut elves).unwrap().is_empty());
    }

    #[test]
    fn parses_loader_listing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f55)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f66)\n";
        assert_eq!(
            parse_ld_list(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
