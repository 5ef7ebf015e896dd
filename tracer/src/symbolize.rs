//! Stage 5b: turn recorded instruction pointers into functions, files and lines.
//!
//! Addresses are made file-relative with our own snapshot of the target's maps
//! (so stacks seen in the last interval still resolve after the target exited),
//! then symbolized by blazesym from the ELF symbol table and DWARF, inlined
//! frames included. blazesym caches each parsed file.

use std::{
    collections::{HashMap, HashSet},
    io::IsTerminal,
    path::PathBuf,
    time::Duration,
};

use blazesym::symbolize::{self, Input, Symbolized, source::Source};

use crate::{
    object::{ElfObject, Segments},
    target::Maps,
};

pub use crate::schema::{Frame, is_user_frame};
use crate::schema::{Frames, SiteKind};

/// One site as symbolized from a kernel map or the Go runtime, before the
/// collector merges sites that symbolize alike and computes growth.
pub struct RawSite {
    pub kind: SiteKind,
    pub frames: Frames,
    pub truncated: bool,
    pub start_function: Option<Frame>,
    pub sampled: bool,
    /// Signed: a free can land an instant before its alloc's increment.
    pub bytes: i64,
    pub count: i64,
    pub allocs: u64,
    pub frees: u64,
    pub alloc_bytes: u64,
    /// Goroutine sites read from the runtime's list: live ones by state.
    pub states: std::collections::BTreeMap<String, u64>,
}

/// Functions in which a complete user stack ends.
const STACK_ROOTS: &[&str] = &[
    // Frames past C's main are the C runtime's start code: noise.
    "main",
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "runtime.goexit",
    "runtime.goexit.abi0",
    "runtime.mstart",
    "runtime.rt0_go",
];

/// Cuts a stack after its thread-root frame and says whether it is truncated.
///
/// Past the root, a frame-pointer walk reads whatever the C runtime left in
/// %rbp (it is not built with frame pointers), so those frames are junk that
/// would split one call site into several. A stack with no root frame, or one
/// that hit the recording depth limit, obviously lacks its outer frames:
/// binaries built without frame pointers give such stacks.
pub fn trim_at_root(frames: &mut Vec<Frame>, recorded_depth: usize, depth_limit: usize) -> bool {
    match frames
        .iter()
        .position(|f| STACK_ROOTS.contains(&f.function.as_str()))
    {
        Some(i) => {
            frames.truncate(i + 1);
            recorded_depth >= depth_limit
        }
        // Without libc's debug symbols its thread entry (start_thread, a
        // local symbol) has no name; a walk that ends inside libc reached it.
        None => !frames.last().is_some_and(is_in_libc),
    }
}

/// A frame no symbol covers: `module+0xoffset` (the file offset, which
/// `addr2line -e module` and `objdump --start-address` take), or `[unknown]`
/// outside every mapped file, whose module is then `[unmapped]` (every
/// frame has a module: consumers key on it).
fn unsymbolized(ip: u64, module: Option<String>, file_offset: u64) -> Frame {
    let Some(m) = module else {
        return Frame::unknown(ip, Some(UNMAPPED.into()));
    };
    let base = m.rsplit('/').next().unwrap_or(&m).to_string();
    let mut f = Frame::unknown(ip, Some(m));
    f.function = format!("{base}+{file_offset:#x}");
    f
}

/// The module of an address outside every mapping.
pub const UNMAPPED: &str = "[unmapped]";

/// Whether a (trimmed) stack ends in a thread-root frame.
pub fn ends_at_root(frames: &[Frame]) -> bool {
    frames
        .last()
        .is_some_and(|f| STACK_ROOTS.contains(&f.function.as_str()))
}

fn is_in_libc(f: &Frame) -> bool {
    f.module.as_deref().is_some_and(|m| {
        let name = m.rsplit('/').next().unwrap_or(m);
        name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
    })
}

/// Symbolizer for one target process.
pub struct Symbolizer {
    inner: symbolize::Symbolizer,
    maps: Maps,
    loaded: HashSet<PathBuf>,
    /// Every mapped file, held open: its `/proc/self/fd/N` path still reaches
    /// the inode after the target exits, whichever namespace it lives in.
    held: HashMap<((u32, u32), u64), Held>,
    /// Where separate debug files are looked for (`--debug-dir`, then
    /// /usr/lib/debug): by build id under `.build-id/`, and by debuglink.
    debug_dirs: Vec<PathBuf>,
    /// Modules some frame of which no symbol covers, and those the user was
    /// already told about.
    without_symbols: std::collections::BTreeSet<String>,
    told: std::collections::BTreeSet<String>,
}

/// A separate debug file and the binary's segments, to translate offsets for it.
type DebugFile = (PathBuf, Segments);

/// A mapped file kept open for symbolization.
struct Held {
    _file: std::fs::File,
    /// `/proc/self/fd/N`.
    via: PathBuf,
    /// Separate debug file found by build id, with the binary's segments
    /// to translate offsets for it.
    debug: Option<DebugFile>,
    /// For a Go binary without DWARF (built with `-ldflags=-s -w`): its
    /// `.gopclntab`, with the segments to reach virtual addresses.
    pclntab: Option<(crate::go::pclntab::Pclntab, Segments)>,
}

/// The system's directory of separate debug files (Debian's -dbg and
/// -dbgsym packages install theirs under `.build-id/` there).
pub const SYSTEM_DEBUG_DIR: &str = "/usr/lib/debug";

/// What symbolization needs to know about a file beyond blazesym, read in one
/// parse when the file is opened: its separate debug file (by build id) or,
/// for a Go binary without DWARF, its `.gopclntab`.
///
/// blazesym finds debug files itself from a binary's canonical path, but a
/// file of a container (or of an exited process) has no path valid here.
fn inspect(
    elf: &ElfObject,
    debug_dirs: &[PathBuf],
) -> (
    Option<DebugFile>,
    Option<(crate::go::pclntab::Pclntab, Segments)>,
) {
    let segments = elf.segments().clone();
    let debug = elf.build_id().filter(|id| id.len() >= 2).and_then(|id| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        debug_dirs
            .iter()
            .map(|d| d.join(format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..])))
            .find(|p| p.exists())
    });
    if let Some(path) = debug {
        return (Some((path, segments)), None);
    }
    let pclntab = (!elf.has_dwarf())
        .then(|| crate::go::pclntab::Pclntab::parse(&elf.file()))
        .flatten()
        .map(|tab| (tab, segments));
    (None, pclntab)
}

impl Symbolizer {
    pub fn new(maps: Maps) -> Self {
        Self::with_debug_dirs(maps, &[])
    }

    /// A symbolizer that also looks for separate debug files in `dirs`
    /// (before the system's /usr/lib/debug).
    pub fn with_debug_dirs(maps: Maps, dirs: &[PathBuf]) -> Self {
        let mut debug_dirs = dirs.to_vec();
        debug_dirs.push(PathBuf::from(SYSTEM_DEBUG_DIR));
        let inner = symbolize::Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            // Paths under /proc/PID/root vanish with the target; keep what we
            // parsed instead of re-checking the file each time.
            .enable_auto_reload(false)
            // For .gnu_debuglink; build ids are looked up by us (`inspect`).
            .set_debug_dirs(Some(&debug_dirs))
            .build();
        let mut s = Self {
            inner,
            maps: Maps::default(),
            loaded: HashSet::new(),
            held: HashMap::new(),
            debug_dirs,
            without_symbols: Default::default(),
            told: Default::default(),
        };
        s.update_maps(maps);
        s
    }

    /// Modules with frames no symbol covers that were not reported yet (each
    /// is reported once).
    pub fn new_modules_without_symbols(&mut self) -> Vec<String> {
        let new: Vec<String> = self
            .without_symbols
            .difference(&self.told)
            .cloned()
            .collect();
        self.told.extend(new.iter().cloned());
        new
    }

    /// The maps snapshot addresses are resolved against.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Replaces the maps snapshot (the target may have loaded libraries) and
    /// opens the files not held yet.
    pub fn update_maps(&mut self, maps: Maps) {
        for m in maps.mappings.iter().filter(|m| m.executable) {
            let key = (m.dev, m.inode);
            if self.held.contains_key(&key) {
                continue;
            }
            match std::fs::File::open(&m.open_path) {
                Ok(f) => {
                    use std::os::fd::AsRawFd;
                    let via = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                    let (debug, pclntab) = match ElfObject::from_file(&f, &m.open_path) {
                        Ok(elf) => inspect(&elf, &self.debug_dirs),
                        Err(e) => {
                            log::debug!("{e}");
                            (None, None)
                        }
                    };
                    self.held.insert(
                        key,
                        Held {
                            _file: f,
                            via,
                            debug,
                            pclntab,
                        },
                    );
                }
                Err(e) => log::debug!("cannot open {}: {e}", m.open_path.display()),
            }
        }
        self.maps = maps;
    }

    /// Symbolizes a stack of return addresses, innermost first. Inlined
    /// functions become frames of their own, innermost first.
    pub fn symbolize_stack(&mut self, ips: &[u64]) -> Vec<Frame> {
        let mut from_pclntab: Vec<(usize, Vec<Frame>)> = Vec::new();
        // Group by object so each file is asked once per stack; the key says
        // whether the addresses are file offsets or (for debug files) virtual.
        let mut by_module: HashMap<(PathBuf, bool), Vec<(usize, u64)>> = HashMap::new();
        let mut module_of: Vec<Option<String>> = vec![None; ips.len()];
        let mut offset_of: Vec<u64> = vec![0; ips.len()];
        // Whether a symbol (DWARF, ELF or .gopclntab) named the address.
        let mut named = vec![false; ips.len()];
        for (i, &ip) in ips.iter().enumerate() {
            // A return address points after the call; ip-1 lies inside it,
            // which gives the right line and the right inlining context.
            let probe = ip.saturating_sub(1);
            if let Some((m, off)) = self.maps.lookup(probe) {
                module_of[i] = Some(m.display_name());
                offset_of[i] = off;
                let held = self.held.get(&(m.dev, m.inode));
                let module = module_of[i].clone();
                if let Some((tab, segs)) = held.and_then(|h| h.pclntab.as_ref())
                    && let Some(va) = segs.offset_to_vaddr(off)
                {
                    let frames: Vec<Frame> = tab
                        .symbolize(va)
                        .into_iter()
                        .map(|f| Frame {
                            function: f.function,
                            file: f.file,
                            line: f.line,
                            module: module.clone(),
                            addr: ip,
                            inlined: f.inlined,
                        })
                        .collect();
                    if !frames.is_empty() {
                        from_pclntab.push((i, frames));
                        continue;
                    }
                }
                let debug = held.and_then(|h| {
                    let (path, segs) = h.debug.as_ref()?;
                    Some((path.clone(), segs.offset_to_vaddr(off)?))
                });
                let (key, addr) = match (debug, held) {
                    (Some((path, vaddr)), _) => ((path, true), vaddr),
                    (None, Some(h)) => ((h.via.clone(), false), off),
                    (None, None) => ((m.open_path.clone(), false), off),
                };
                by_module.entry(key).or_default().push((i, addr));
            }
        }
        let mut per_ip: Vec<Vec<Frame>> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| vec![unsymbolized(ip, module_of[i].clone(), offset_of[i])])
            .collect();
        for ((path, virt), items) in by_module {
            let addrs: Vec<u64> = items.iter().map(|(_, o)| *o).collect();
            let progress = self.progress_for(&path);
            let src = Source::Elf(symbolize::source::Elf::new(&path));
            let input = if virt {
                Input::VirtOffset(&addrs[..])
            } else {
                Input::FileOffset(&addrs[..])
            };
            let results = match self.inner.symbolize(&src, input) {
                Ok(r) => r,
                Err(e) => {
                    log::debug!("cannot symbolize in {}: {e}", path.display());
                    continue;
                }
            };
            if let Some(p) = progress {
                p.finish_and_clear();
            }
            for ((i, _), sym) in items.iter().zip(results) {
                if let Symbolized::Sym(sym) = sym {
                    per_ip[*i] = frames_of(&sym, ips[*i], module_of[*i].clone());
                    named[*i] = true;
                }
            }
        }
        for (i, frames) in from_pclntab {
            per_ip[i] = frames;
            named[i] = true;
        }
        for (i, m) in module_of.iter().enumerate() {
            if let Some(m) = m
                && !named[i]
            {
                self.without_symbols.insert(m.clone());
            }
        }
        per_ip.into_iter().flatten().collect()
    }

    /// A spinner on an interactive terminal while a large binary's symbols
    /// and debug information load for the first time.
    fn progress_for(&mut self, path: &PathBuf) -> Option<indicatif::ProgressBar> {
        if !self.loaded.insert(path.clone()) {
            return None;
        }
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size < 32 << 20 || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner().with_message(format!(
            "loading symbols of {} ({} MiB)",
            path.display(),
            size >> 20
        ));
        bar.enable_steady_tick(Duration::from_millis(100));
        Some(bar)
    }
}

/// Frames for one address, innermost (deepest inlined) first.
fn frames_of(sym: &symbolize::Sym<'_>, addr: u64, module: Option<String>) -> Vec<Frame> {
    let loc = |ci: Option<&symbolize::CodeInfo<'_>>| -> (Option<String>, Option<u32>) {
        match ci {
            Some(ci) => (
                Some(match &ci.dir {
                    Some(d) => d.join(&ci.file).display().to_string(),
                    None => ci.file.to_string_lossy().into_owned(),
                }),
                ci.line,
            ),
            None => (None, None),
        }
    };
    // blazesym reports the outer (real) function with `code_info` at the
    // line where it calls the first inlined function, and `inlined`
    // outermost-first, each with its location inside that inlined function;
    // the innermost one's location is where the address itself is.
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    for inl in sym.inlined.iter().rev() {
        let (file, line) = loc(inl.code_info.as_ref());
        frames.push(Frame {
            function: inl.name.to_string(),
            file,
            line,
            module: module.clone(),
            addr,
            inlined: true,
        });
    }
    let (file, line) = loc(sym.code_info.as_deref());
    frames.push(Frame {
        function: sym.name.to_string(),
        file,
        line,
        module,
        addr,
        inlined: false,
    });
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> Frame {
        Frame {
            function: name.into(),
            file: None,
            line: None,
            module: None,
            addr: 0,
            inlined: false,
        }
    }

    #[test]
    fn trims_junk_after_root_and_flags_truncation() {
        let mut v = vec![
            f("leak"),
            f("main"),
            f("__libc_start_call_main"),
            f("[unknown]"),
        ];
        assert!(!trim_at_root(&mut v, 4, 127));
        assert_eq!(v.len(), 2, "the C runtime and junk after main are cut");
        let mut v = vec![
            f("worker"),
            Frame::unknown(9, Some("/lib/libc.so.6".into())),
        ];
        assert!(
            !trim_at_root(&mut v, 2, 127),
            "a walk ending in libc is complete"
        );
        let mut v = vec![f("worker"), f("start_thread"), f("clone3")];
        assert!(!trim_at_root(&mut v, 3, 127));
        assert_eq!(v.last().unwrap().function, "start_thread");
        let mut v = vec![f("leak"), f("[unknown]")];
        assert!(trim_at_root(&mut v, 2, 127), "no root: truncated");
        assert_eq!(v.len(), 2, "nothing is cut without a root");
        assert!(trim_at_root(&mut vec![], 0, 127));
        let mut deep: Vec<Frame> = (0..126).map(|_| f("x")).collect();
        deep.push(f("start_thread"));
        assert!(trim_at_root(&mut deep, 127, 127), "depth limit reached");
    }

    #[test]
    fn short_form() {
        let mut fr = f("leak");
        fr.file = Some("/src/a/leaky.c".into());
        fr.line = Some(42);
        assert_eq!(fr.short(), "leak (leaky.c:42)");
        let u = Frame::unknown(1, Some("/usr/lib/libfoo.so".into()));
        assert_eq!(u.short(), "[unknown] (libfoo.so)");
    }

    #[inline(never)]
    fn here() -> u64 {
        // The address of a call's return point inside this test binary.
        let ip: u64;
        unsafe { std::arch::asm!("lea {}, [rip]", out(reg) ip) };
        ip
    }

    #[test]
    fn symbolizes_own_code_with_lines() {
        let pid = std::process::id();
        let maps = Maps::read(pid).unwrap();
        let mut s = Symbolizer::new(maps);
        let ip = here();
        let frames = s.symbolize_stack(&[ip + 1]);
        let top = frames
            .iter()
            .find(|f| f.function.contains("here"))
            .unwrap_or_else(|| panic!("no frame for `here` in {frames:?}"));
        assert!(
            top.file.as_deref().unwrap().ends_with("symbolize.rs"),
            "{top:?}"
        );
        assert!(top.line.is_some());
        assert_eq!(
            s.symbolize_stack(&[0x10])[0].function,
            "[unknown]",
            "unmapped address"
        );
    }
}
