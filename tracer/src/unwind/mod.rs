//! Unwind tables for the kernel's DWARF walker: built once per mapped file
//! (shared by every process that maps it), placed in one row array, and
//! each traced process's executable mappings pointing into it.
//!
//! The kernel walks a process with these tables only once it is listed in
//! [`tracer_common::maps::UNWIND_MAPPINGS`]; until then (and for processes
//! mapping only code without tables, such as static Go binaries) its stacks
//! come from the kernel's frame-pointer walker.

pub mod table;

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Instant,
};

use tracer_common::unwind::{ExecMapping, MAX_EXEC_MAPPINGS, ProcMappings, UnwindRow};

pub use self::table::{TableStats, rows_of};
use crate::{error::TracerError, kernel::Kernel, object::ElfObjects, target::Maps};

/// A file's identity: what mappings of it share.
type FileId = (u64, u64);

/// One file's table and its place in the row array.
#[derive(Clone, Debug)]
struct Placed {
    start: u32,
    len: u32,
    /// Rows not yet written to the kernel (built before it was loaded).
    staged: Option<Vec<UnwindRow>>,
}

/// The tables of every file seen, and where they are in the kernel.
pub struct Unwinder {
    tables: HashMap<FileId, Placed>,
    /// Files whose table could not be placed (array full) or built.
    without: HashMap<FileId, String>,
    elves: ElfObjects,
    next: u32,
    capacity: u32,
    /// The last mappings installed per process, to skip unchanged ones.
    installed: HashMap<u32, Vec<ExecMapping>>,
    /// False when nothing is walked (`watch`: no probes).
    enabled: bool,
}

/// What [`Unwinder::install`] changed, for the user.
#[derive(Debug, Default)]
pub struct Installed {
    /// Rows of the files this process maps.
    pub rows: u64,
    /// Files walked with their tables.
    pub files: u64,
    /// Files walked with frame pointers (no call-frame information, Go).
    pub frame_pointer_files: Vec<String>,
    /// Files whose tables did not fit: raise `--unwind-rows`.
    pub full: Vec<String>,
}

impl Installed {
    /// Bytes of kernel memory the process's tables take.
    pub fn bytes(&self) -> u64 {
        self.rows * std::mem::size_of::<UnwindRow>() as u64
    }

    /// What the `attached` event says of it; None when nothing is walked
    /// with tables.
    pub fn info(&self) -> Option<crate::schema::UnwindInfo> {
        (self.rows > 0).then(|| crate::schema::UnwindInfo {
            rows: self.rows,
            bytes: self.bytes(),
            files: self.files,
            frame_pointer_files: self
                .frame_pointer_files
                .iter()
                .chain(&self.full)
                .cloned()
                .collect(),
        })
    }
}

impl Default for Unwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl Unwinder {
    pub fn new() -> Self {
        Self {
            tables: HashMap::new(),
            without: HashMap::new(),
            elves: ElfObjects::new(),
            next: 0,
            capacity: u32::MAX,
            installed: HashMap::new(),
            enabled: true,
        }
    }

    /// An unwinder that installs nothing.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::new()
        }
    }

    /// Holds at most `rows` rows (the kernel array's size).
    pub fn limit(&mut self, rows: u32) {
        self.capacity = rows;
    }

    /// Builds the tables of `paths` before the kernel is loaded, so the row
    /// array can be sized for them.
    pub fn prepare<'a>(&mut self, paths: impl IntoIterator<Item = &'a Path>) {
        let started = Instant::now();
        for path in paths {
            let Ok(md) = std::fs::metadata(path) else {
                continue;
            };
            self.place((md.dev(), md.ino()), path);
        }
        log::info!(
            "unwind tables: {} rows for {} files built in {:.0} ms",
            self.next,
            self.tables.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }

    /// Rows the kernel's array should hold: what is built, plus room for
    /// libraries loaded later (`extra`).
    pub fn capacity_for(&self, extra: u32) -> u32 {
        self.next.saturating_add(extra).max(1)
    }

    /// Writes the staged tables to the loaded kernel; its array holds
    /// `capacity` rows.
    pub fn flush(&mut self, kernel: &mut Kernel, capacity: u32) -> Result<(), TracerError> {
        self.capacity = capacity;
        for placed in self.tables.values_mut() {
            if let Some(rows) = placed.staged.take() {
                kernel.write_unwind_rows(placed.start, &rows)?;
            }
        }
        Ok(())
    }

    /// Builds (once) and places the table of file `id` at `path`; false when
    /// it has none.
    fn place(&mut self, id: FileId, path: &Path) -> Option<&mut Placed> {
        if self.without.contains_key(&id) {
            return None;
        }
        if !self.tables.contains_key(&id) {
            let obj = match self.elves.get(path) {
                Ok(o) => o,
                Err(e) => {
                    self.without.insert(id, crate::error::chain(&e));
                    return None;
                }
            };
            // Go code has frame pointers and no CFI for most of it.
            let (rows, stats) = if obj.is_go() {
                (Vec::new(), TableStats::default())
            } else {
                rows_of(&obj)
            };
            log::debug!(
                "unwind table of {}: {} rows from {} FDEs ({} unusable, {} unsupported rows)",
                path.display(),
                rows.len(),
                stats.fdes,
                stats.bad_fdes,
                stats.unsupported_rows
            );
            if rows.is_empty() {
                self.without
                    .insert(id, "no call-frame information".to_string());
                return None;
            }
            let len = rows.len() as u32;
            if self.next.saturating_add(len) > self.capacity {
                self.without
                    .insert(id, "the unwind row array is full".to_string());
                return None;
            }
            self.tables.insert(
                id,
                Placed {
                    start: self.next,
                    len,
                    staged: Some(rows),
                },
            );
            self.next += len;
        }
        self.tables.get_mut(&id)
    }

    /// Lists process `pid`'s executable mappings in the kernel, building the
    /// tables of files not seen before. A process without any table is left
    /// to the frame-pointer walker. `None` when nothing changed.
    pub fn install(
        &mut self,
        kernel: &mut Kernel,
        pid: u32,
        maps: &Maps,
    ) -> Result<Option<Installed>, TracerError> {
        if !self.enabled || maps.mappings.is_empty() {
            return Ok(None);
        }
        let mut entries: Vec<ExecMapping> = Vec::new();
        let mut out = Installed::default();
        let mut counted = std::collections::HashSet::new();
        for m in maps.mappings.iter().filter(|m| m.executable) {
            let id = (dev_of(m.dev), m.inode);
            let path: PathBuf = m.open_path.clone();
            let placed = self.place(id, &path).map(|p| (p.start, p.len));
            if let Some(p) = self.tables.get_mut(&id)
                && let Some(rows) = p.staged.take()
            {
                kernel.write_unwind_rows(p.start, &rows)?;
            }
            let Some(obj) = self.elves.get(&path).ok() else {
                continue;
            };
            let Some(vaddr) = obj.segments().mapping_vaddr(m.offset, page_size()) else {
                continue;
            };
            let (rows_start, rows_len) = placed.unwrap_or((0, 0));
            if placed.is_some() && counted.insert(id) {
                out.rows += u64::from(rows_len);
                out.files += 1;
            }
            if placed.is_none() && counted.insert(id) {
                let why = self.without.get(&id).map(String::as_str).unwrap_or("");
                let name = m.path.display().to_string();
                if why.contains("full") {
                    out.full.push(name);
                } else {
                    out.frame_pointer_files.push(name);
                }
            }
            entries.push(ExecMapping {
                start: m.start,
                end: m.end,
                bias: m.start.wrapping_sub(vaddr),
                rows_start,
                rows_len,
            });
        }
        // Executable anonymous memory (JIT code, the vDSO): frame pointers.
        for &(start, end) in &maps.anon_code {
            entries.push(ExecMapping {
                start,
                end,
                ..ExecMapping::default()
            });
        }
        entries.sort_by_key(|e| e.start);
        entries.truncate(MAX_EXEC_MAPPINGS);
        if self.installed.get(&pid) == Some(&entries) {
            return Ok(None);
        }
        if entries.iter().all(|e| e.rows_len == 0) {
            kernel.remove_unwind_mappings(pid)?;
        } else {
            let mut value = Box::<ProcMappings>::default();
            value.count = entries.len() as u32;
            value.maps[..entries.len()].copy_from_slice(&entries);
            kernel.set_unwind_mappings(pid, &value)?;
        }
        self.installed.insert(pid, entries);
        Ok(Some(out))
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64
}

/// The kernel's dev_t of a (major, minor) pair, as `stat` gives it.
fn dev_of((major, minor): (u32, u32)) -> u64 {
    libc::makedev(major, minor)
}
