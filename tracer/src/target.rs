//! Stage 1: resolve the target process and check that this machine can trace it.
//!
//! Everything about the target is read through `/proc/PID/...`. Its files are
//! opened through whichever path leads to the very inode it maps: the path in
//! its maps (which the kernel prints relative to *our* root, right for chroots
//! and the host), the same path under `/proc/PID/root` (containers in another
//! mount namespace), or `/proc/PID/map_files/…` (deleted or replaced files).

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use procfs::{FromBufRead, FromRead, process::MMapPath};

use crate::error::TracerError;

const PF_KTHREAD: u64 = 0x0020_0000;

/// One file-backed mapping of the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub inode: u64,
    /// Device (major, minor) of the file.
    pub dev: (u32, u32),
    pub executable: bool,
    /// Path as the target sees it (inside its mount namespace).
    pub path: PathBuf,
    /// The file was deleted or replaced after being mapped.
    pub deleted: bool,
    /// A path from which we can open this very file (see the module docs).
    /// Equal to `path` until [`Maps::resolve_open_paths`] runs.
    pub open_path: PathBuf,
    /// The name the process was started by, when that is a symlink to
    /// this file (`redis-server` → `redis-check-rdb`): the kernel lists
    /// the target of the link, the user knows the link.
    pub alias: Option<PathBuf>,
}

impl Mapping {
    /// The module's name for the user: the name the program was started
    /// by, with " (deleted)" when the file was replaced or removed since.
    pub fn display_name(&self) -> String {
        let path = self.alias.as_ref().unwrap_or(&self.path).display();
        if self.deleted {
            format!("{path} (deleted)")
        } else {
            path.to_string()
        }
    }
}

/// The path process `pid` was started by (its argv[0], made absolute with
/// its working directory or PATH as it sees them) when that path is a
/// symlink leading to its executable, with the executable's device and
/// inode as its maps show them.
fn started_as(pid: u32) -> Option<(PathBuf, (u32, u32), u64)> {
    use std::os::unix::fs::MetadataExt;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = std::str::from_utf8(cmdline.split(|&b| b == 0).next()?).ok()?;
    // A process that sets its title (redis: "redis-server *:6379") writes
    // over argv: the name is its first word.
    let argv0 = argv0.split_whitespace().next()?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let candidates: Vec<PathBuf> = if argv0.contains('/') {
        let p = Path::new(argv0);
        if p.is_absolute() {
            vec![p.to_path_buf()]
        } else {
            // Relative to its working directory, as the process sees it.
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            vec![cwd.join(p)]
        }
    } else {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let path = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"PATH="))
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
            .to_string();
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| Path::new(d).join(argv0))
            .collect()
    };
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    candidates.into_iter().find_map(|c| {
        let link = std::fs::symlink_metadata(inside(&c)).ok()?;
        let target = std::fs::metadata(inside(&c)).ok()?;
        (link.file_type().is_symlink() && target.dev() == exe.dev() && target.ino() == exe.ino())
            .then(|| {
                (
                    c,
                    (libc::major(exe.dev()), libc::minor(exe.dev())),
                    exe.ino(),
                )
            })
    })
}

/// The file-backed mappings of a process at one moment.
#[derive(Clone, Debug, Default)]
pub struct Maps {
    pub mappings: Vec<Mapping>,
    /// Executable mappings backed by no file (JIT code, the vDSO): code a
    /// return address may point into, with nothing to symbolize.
    pub anon_code: Vec<(u64, u64)>,
}

impl Maps {
    /// Parses the text of `/proc/PID/maps`. Anonymous and special mappings are
    /// skipped: they hold no code to symbolize or probe.
    pub fn parse(text: &[u8]) -> Result<Self, procfs::ProcError> {
        let maps = procfs::process::MemoryMaps::from_buf_read(text)?;
        let mut mappings = Vec::new();
        let mut anon_code = Vec::new();
        for m in maps {
            let MMapPath::Path(path) = &m.pathname else {
                if m.perms.contains(procfs::process::MMPermissions::EXECUTE) {
                    anon_code.push(m.address);
                }
                continue;
            };
            let (path, deleted) = match path.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
                Some(p) => (PathBuf::from(p), true),
                None => (path.clone(), false),
            };
            mappings.push(Mapping {
                start: m.address.0,
                end: m.address.1,
                offset: m.offset,
                inode: m.inode,
                dev: (m.dev.0 as u32, m.dev.1 as u32),
                executable: m.perms.contains(procfs::process::MMPermissions::EXECUTE),
                open_path: path.clone(),
                path,
                deleted,
                alias: None,
            });
        }
        Ok(Self {
            mappings,
            anon_code,
        })
    }

    /// Whether `addr` lies in executable memory: a frame-pointer walk that
    /// reads anything else (stack contents, data, text) has left the stack.
    pub fn is_code(&self, addr: u64) -> bool {
        self.mappings
            .iter()
            .any(|m| m.executable && m.start <= addr && addr < m.end)
            || self
                .anon_code
                .iter()
                .any(|&(lo, hi)| lo <= addr && addr < hi)
    }

    /// Reads and parses `/proc/PID/maps`, resolving the paths to open.
    pub fn read(pid: u32) -> Result<Self, TracerError> {
        let text = std::fs::read(format!("/proc/{pid}/maps")).map_err(|e| proc_error(pid, &e))?;
        Self::from_text(pid, &text)
    }

    /// [`Self::read`], or None when the text is what `last` holds (then
    /// nothing is parsed or resolved again); `last` gets the new text.
    pub fn read_if_changed(pid: u32, last: &mut Vec<u8>) -> Result<Option<Self>, TracerError> {
        let text = std::fs::read(format!("/proc/{pid}/maps")).map_err(|e| proc_error(pid, &e))?;
        if text == *last {
            return Ok(None);
        }
        let maps = Self::from_text(pid, &text)?;
        *last = text;
        Ok(Some(maps))
    }

    fn from_text(pid: u32, text: &[u8]) -> Result<Self, TracerError> {
        let mut maps = Self::parse(text).map_err(|source| TracerError::BadMaps { pid, source })?;
        maps.resolve_open_paths(pid);
        if let Some((alias, dev, inode)) = started_as(pid) {
            for m in maps
                .mappings
                .iter_mut()
                .filter(|m| m.inode == inode && m.dev == dev && m.path != alias)
            {
                m.alias = Some(alias.clone());
            }
        }
        Ok(maps)
    }

    /// Finds for every mapped file a path that opens that very inode. One
    /// path per file, so a file's segments share one parsed copy.
    pub fn resolve_open_paths(&mut self, pid: u32) {
        let mut by_file: std::collections::HashMap<((u32, u32), u64), PathBuf> =
            std::collections::HashMap::new();
        for m in &mut self.mappings {
            let path = by_file
                .entry((m.dev, m.inode))
                .or_insert_with(|| open_path(pid, m))
                .clone();
            m.open_path = path;
        }
    }

    /// The mapping holding `addr` and the file offset of `addr` in it.
    pub fn lookup(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let m = self
            .mappings
            .iter()
            .find(|m| m.start <= addr && addr < m.end)?;
        Some((m, addr - m.start + m.offset))
    }

    /// Distinct files mapped with execute permission, in mapping order.
    pub fn executable_objects(&self) -> Vec<&Mapping> {
        let mut seen = std::collections::HashSet::new();
        self.mappings
            .iter()
            .filter(|m| m.executable && seen.insert((m.inode, m.path.clone())))
            .collect()
    }
}

/// Whether `path` is the file `(dev, inode)`.
fn is_file(path: &Path, dev: (u32, u32), inode: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|md| {
        let d = md.dev();
        md.ino() == inode && (libc::major(d), libc::minor(d)) == dev
    })
}

fn open_path(pid: u32, m: &Mapping) -> PathBuf {
    if !m.deleted {
        if is_file(&m.path, m.dev, m.inode) {
            return m.path.clone();
        }
        let rooted = host_path(pid, false, &m.path);
        if is_file(&rooted, m.dev, m.inode) {
            return rooted;
        }
    }
    PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
}

fn proc_error(pid: u32, e: &io::Error) -> TracerError {
    match e.kind() {
        io::ErrorKind::NotFound => TracerError::NoSuchProcess(pid),
        io::ErrorKind::PermissionDenied => TracerError::NotPermitted {
            pid,
            reason: "its /proc entries are not readable by this user".into(),
        },
        _ => TracerError::NotPermitted {
            pid,
            reason: e.to_string(),
        },
    }
}

/// A live user process that the tracer can attach to.
#[derive(Clone, Debug)]
pub struct Target {
    pub pid: u32,
    /// Short command name, from `/proc/PID/comm`.
    pub comm: String,
    /// Path of the executable as the target sees it.
    pub exe: PathBuf,
    pub maps: Maps,
}

/// The process a thread id belongs to (itself for a process id): tracing is
/// per process, and `ps -L`, `top -H` and profilers show thread ids.
pub fn process_of(pid: u32) -> Result<u32, TracerError> {
    if pid == 0 {
        return Err(TracerError::NoSuchProcess(pid));
    }
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| proc_error(pid, &e))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(pid))
}

impl Target {
    /// Checks that `pid` is a live user process we may trace and reads its maps.
    pub fn resolve(pid: u32) -> Result<Self, TracerError> {
        if pid == 0 {
            return Err(TracerError::NoSuchProcess(pid));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| proc_error(pid, &e))?;
        let stat = procfs::process::Stat::from_read(stat.as_bytes()).map_err(|e| {
            TracerError::NotPermitted {
                pid,
                reason: e.to_string(),
            }
        })?;
        // A thread id is also a /proc entry; tracing works per process.
        if stat.pid as u32 != pid {
            return Err(TracerError::NoSuchProcess(pid));
        }
        if stat.state == 'Z' || stat.state == 'X' {
            return Err(TracerError::Zombie(pid));
        }
        if u64::from(stat.flags) & PF_KTHREAD != 0 {
            return Err(TracerError::KernelThread(pid));
        }
        let maps = Maps::read(pid)?;
        let exe =
            std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| proc_error(pid, &e))?;
        let exe = PathBuf::from(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        );
        Ok(Self {
            pid,
            comm: stat.comm,
            exe,
            maps,
        })
    }

    /// Whether the process is still running (not gone, not a zombie).
    /// Whether process `pid` is gone or on its way out (PF_EXITING: the
    /// kernel has begun tearing it down, and has moved it out of its
    /// cgroups to the root, e.g. after an OOM kill).
    pub fn is_exiting(pid: u32) -> bool {
        const PF_EXITING: u32 = 0x4;
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => procfs::process::Stat::from_read(s.as_bytes())
                .map(|st| st.state == 'Z' || st.state == 'X' || st.flags & PF_EXITING != 0)
                .unwrap_or(true),
            Err(_) => true,
        }
    }

    pub fn is_alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => procfs::process::Stat::from_read(s.as_bytes())
                .map(|st| st.state != 'Z' && st.state != 'X')
                .unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// `path` of process `pid` seen from here: through `/proc/PID/root` unless
/// `same_root`.
pub fn host_path(pid: u32, same_root: bool, path: &Path) -> PathBuf {
    if same_root {
        path.to_path_buf()
    } else {
        Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// Kernel interfaces the tracer relies on; overridable so tests can simulate a
/// kernel without them.
fn btf_path() -> PathBuf {
    std::env::var_os("TRACER_BTF_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/sys/kernel/btf/vmlinux".into())
}

fn uprobe_pmu_path() -> PathBuf {
    std::env::var_os("TRACER_UPROBE_PMU_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/sys/bus/event_source/devices/uprobe/type".into())
}

/// Checks privileges and kernel features before anything is loaded, so the
/// user gets one sentence instead of a verifier or perf_event_open errno.
pub fn check_environment() -> Result<(), TracerError> {
    let release = kernel_release();
    if kernel_version(&release).is_some_and(|v| v < MIN_KERNEL) {
        return Err(TracerError::KernelTooOld {
            release,
            minimum: MIN_KERNEL_TEXT,
        });
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing = missing_capabilities(cap_eff);
    if !missing.is_empty() {
        return Err(TracerError::MissingCapabilities {
            missing: missing.join(", "),
        });
    }
    let pmu = uprobe_pmu_path();
    if !pmu.exists() {
        return Err(TracerError::NoUprobes(pmu));
    }
    let btf = btf_path();
    if !btf.exists() {
        return Err(TracerError::NoBtf(btf));
    }
    Ok(())
}

/// The oldest kernel supported: the eBPF side needs 5.17 (bpf_loop) at
/// least, and 6.1 (Debian 12's) is the oldest `cargo xtask vmtest` boots.
pub const MIN_KERNEL: (u32, u32) = (6, 1);
const MIN_KERNEL_TEXT: &str = "6.1";

/// The running kernel's release, as uname(2) reports it (`setarch
/// --uname-2.6` shows what an old kernel gets).
pub fn kernel_release() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates every field.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// (major, minor) of a release such as `6.1.0-57-cloud-amd64`; None when it
/// does not start with numbers (then nothing is refused on its account).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Names of the capabilities missing from the effective set `cap_eff` for
/// loading tracing programs: CAP_SYS_ADMIN alone, or CAP_BPF with CAP_PERFMON.
pub fn missing_capabilities(cap_eff: u64) -> Vec<&'static str> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let has = |c: u32| cap_eff & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) {
        return vec![];
    }
    let mut missing = vec![];
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/demo
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234 /usr/bin/demo
55d0c1c4e000-55d0c1c6f000 rw-p 00000000 00:00 0 [heap]
7f1e2a000000-7f1e2a026000 r--p 00000000 fe:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2a026000-7f1e2a17b000 r-xp 00026000 fe:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2a200000-7f1e2a201000 r-xp 00000000 fe:01 77 /tmp/gone.so (deleted)
7f1e2b000000-7f1e2b001000 r-xp 00000000 00:00 0 
7fff5e7c0000-7fff5e7e1000 rw-p 00000000 00:00 0 [stack]
7fff5e7f0000-7fff5e7f2000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn kernel_releases_parse_and_compare() {
        assert_eq!(kernel_version("6.1.0-57-cloud-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.113+deb12-cloud-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("2.6.60-57-cloud-amd64"), Some((2, 6)));
        assert_eq!(kernel_version("weird"), None);
        assert!(kernel_version("5.19.1").unwrap() < MIN_KERNEL);
        assert!(kernel_version("6.0.9").unwrap() < MIN_KERNEL);
        assert!(kernel_version("6.1.0").unwrap() >= MIN_KERNEL);
        assert!(kernel_version("10.0.1").unwrap() >= MIN_KERNEL);
    }

    #[test]
    fn a_thread_id_resolves_to_its_process() {
        let me = std::process::id();
        assert_eq!(process_of(me).unwrap(), me);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        assert_ne!(tid, me);
        assert_eq!(process_of(tid).unwrap(), me);
        t.join().unwrap();
        assert!(matches!(
            process_of(u32::MAX - 1),
            Err(TracerError::NoSuchProcess(_))
        ));
    }

    #[test]
    fn code_is_executable_memory_only() {
        let maps = Maps::parse(MAPS.as_bytes()).unwrap();
        assert!(maps.is_code(0x55d0c0a01800), "the executable's text");
        assert!(maps.is_code(0x7f1e2a100000), "libc's text");
        assert!(maps.is_code(0x7f1e2b000010), "anonymous code (JIT)");
        assert!(maps.is_code(0x7fff5e7f0100), "the vDSO");
        assert!(
            !maps.is_code(0x55d0c0a00800),
            "read-only data of the executable"
        );
        assert!(!maps.is_code(0x55d0c1c4e100), "the heap");
        assert!(!maps.is_code(0x7fff5e7c0100), "the stack");
        assert!(
            !maps.is_code(0x646d65747379732f),
            "ASCII text read as an address"
        );
    }

    #[test]
    fn a_program_started_through_a_symlink_is_named_by_it() {
        let dir = std::env::temp_dir().join(format!("tracer-alias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("my-server");
        let _ = std::fs::remove_file(&link);
        let real = std::fs::canonicalize("/bin/sleep").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut child = std::process::Command::new(&link).arg("30").spawn().unwrap();
        let pid = child.id();
        // Once the loader has mapped libc, the exec is long done.
        let mut maps = None;
        for _ in 0..400 {
            if let Ok(m) = Maps::read(pid)
                && m.mappings.iter().any(|m| m.path == real)
                && m.mappings
                    .iter()
                    .any(|m| m.path.to_string_lossy().contains("libc"))
            {
                maps = Some(m);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let maps = maps.expect("sleep started");
        let exe = maps.mappings.iter().find(|m| m.path == real).unwrap();
        assert_eq!(exe.display_name(), link.display().to_string());
        let libc = maps
            .mappings
            .iter()
            .find(|m| m.path.to_string_lossy().contains("libc"))
            .unwrap();
        assert_eq!(libc.display_name(), libc.path.display().to_string());
    }

    #[test]
    fn a_replaced_file_says_so_in_its_name() {
        let maps = Maps::parse(
            b"7f1e2a200000-7f1e2a201000 r-xp 00000000 fe:01 77 /tmp/gone.so (deleted)\n",
        )
        .unwrap();
        assert_eq!(maps.mappings[0].display_name(), "/tmp/gone.so (deleted)");
    }

    #[test]
    fn parses_file_mappings_only() {
        let maps = Maps::parse(MAPS.as_bytes()).unwrap();
        assert_eq!(maps.mappings.len(), 5);
        assert!(maps.mappings.iter().all(|m| m.path.is_absolute()));
        let gone = maps.mappings.last().unwrap();
        assert!(gone.deleted);
        assert_eq!(gone.path, PathBuf::from("/tmp/gone.so"));
    }

    #[test]
    fn lookup_gives_file_offsets() {
        let maps = Maps::parse(MAPS.as_bytes()).unwrap();
        let (m, off) = maps.lookup(0x7f1e2a026000 + 0x10).unwrap();
        assert_eq!(m.path, PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(off, 0x26010);
        let (m, off) = maps.lookup(0x55d0c0a01abc).unwrap();
        assert_eq!(m.path, PathBuf::from("/usr/bin/demo"));
        assert_eq!(off, 0x1abc);
        assert!(maps.lookup(0x55d0c1c4e100).is_none(), "heap is anonymous");
        assert!(maps.lookup(0x10).is_none());
    }

    #[test]
    fn executable_objects_are_distinct() {
        let maps = Maps::parse(MAPS.as_bytes()).unwrap();
        let objs: Vec<_> = maps
            .executable_objects()
            .iter()
            .map(|m| m.path.clone())
            .collect();
        assert_eq!(
            objs,
            vec![
                PathBuf::from("/usr/bin/demo"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/tmp/gone.so"),
            ]
        );
    }

    #[test]
    fn deleted_files_open_through_map_files() {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join(format!("tracer-unit-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        std::fs::remove_file(&path).unwrap();
        let maps = Maps::read(std::process::id()).unwrap();
        let (m, off) = maps.lookup(addr as u64 + 100).unwrap();
        assert!(m.deleted);
        assert_eq!(off, 100);
        assert_eq!(
            m.open_path,
            PathBuf::from(format!(
                "/proc/{}/map_files/{:x}-{:x}",
                std::process::id(),
                m.start,
                m.end
            ))
        );
        unsafe { libc::munmap(addr, 8192) };
    }

    #[test]
    fn capability_rules() {
        assert!(missing_capabilities(1 << 21).is_empty());
        assert!(missing_capabilities((1 << 38) | (1 << 39)).is_empty());
        assert_eq!(missing_capabilities(1 << 39), vec!["CAP_PERFMON"]);
        assert_eq!(missing_capabilities(0), vec!["CAP_BPF", "CAP_PERFMON"]);
    }

    #[test]
    fn container_paths_go_through_proc_root() {
        assert_eq!(
            host_path(7, false, Path::new("/usr/lib/libc.so.6")),
            PathBuf::from("/proc/7/root/usr/lib/libc.so.6")
        );
        assert_eq!(
            host_path(7, true, Path::new("/usr/lib/libc.so.6")),
            PathBuf::from("/usr/lib/libc.so.6")
        );
    }

    #[test]
    fn resolves_self_and_rejects_bad_pids() {
        let me = Target::resolve(std::process::id()).unwrap();
        assert!(!me.maps.executable_objects().is_empty());
        // Our own files open directly by their own path.
        for m in &me.maps.mappings {
            if !m.deleted && m.path.exists() {
                assert_eq!(m.open_path, m.path);
            }
        }
        assert!(matches!(
            Target::resolve(0),
            Err(TracerError::NoSuchProcess(0))
        ));
        assert!(matches!(
            Target::resolve(u32::MAX - 1),
            Err(TracerError::NoSuchProcess(_))
        ));
    }
}
