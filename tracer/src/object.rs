//! One ELF file, read once: [`ElfObject`] owns the file's bytes and answers
//! what the planners and the symbolizer ask of it (build id, Go or not,
//! loadable segments, symbols, sections, interpreter). [`Segments`] is the one
//! translation between virtual addresses and file offsets.
//!
//! A bottom-floor module: it knows nothing above [`crate::error`].

use std::{
    borrow::Cow,
    collections::HashMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::error::TracerError;

/// One loadable segment (`PT_LOAD`): where its file-backed bytes are in the
/// file and in the address space. The zero-filled tail (memsz past filesz)
/// has no file bytes and is left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    /// Bytes present in the file (`p_filesz`).
    pub file_size: u64,
}

impl Segment {
    fn contains_vaddr(&self, va: u64) -> bool {
        va >= self.vaddr && va - self.vaddr < self.file_size
    }

    fn contains_offset(&self, off: u64) -> bool {
        off >= self.offset && off - self.offset < self.file_size
    }
}

/// A binary's loadable segments, in program-header order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments(Vec<Segment>);

impl Segments {
    pub fn new(segments: Vec<Segment>) -> Self {
        Self(segments)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.0.iter()
    }

    /// File offset of virtual address `va`, through the first segment whose
    /// file-backed bytes contain it.
    pub fn vaddr_to_offset(&self, va: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|s| s.contains_vaddr(va))
            .map(|s| va - s.vaddr + s.offset)
    }

    /// Virtual address of file offset `off`, through the first segment whose
    /// file-backed bytes contain it.
    pub fn offset_to_vaddr(&self, off: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|s| s.contains_offset(off))
            .map(|s| off - s.offset + s.vaddr)
    }

    /// Virtual address at which a mapping of the file from `offset` (page
    /// aligned, as in /proc/PID/maps) starts: through the segment the
    /// loader mapped there, the last one whose page-aligned start is at or
    /// below `offset`. Not [`Self::offset_to_vaddr`]: when a segment does
    /// not start on a page boundary, the page before it also belongs to the
    /// previous segment, at another virtual distance.
    pub fn mapping_vaddr(&self, offset: u64, page: u64) -> Option<u64> {
        let s = self
            .0
            .iter()
            .filter(|s| s.offset & !(page - 1) <= offset && offset < s.offset + s.file_size.max(1))
            .max_by_key(|s| s.offset)?;
        (s.vaddr + offset).checked_sub(s.offset)
    }

    /// File range of the `len` bytes at virtual address `va`, when one
    /// segment holds all of them in the file.
    pub fn file_range(&self, va: u64, len: u64) -> Option<Range<usize>> {
        let s = self.0.iter().find(|s| {
            va >= s.vaddr
                && (va - s.vaddr)
                    .checked_add(len)
                    .is_some_and(|end| end <= s.file_size)
        })?;
        let start = usize::try_from(va - s.vaddr + s.offset).ok()?;
        Some(start..start.checked_add(usize::try_from(len).ok()?)?)
    }

    /// (virtual address, file offset) of the first segment that maps the
    /// file from its start: the mapping a process's load bias is read from.
    pub fn at_file_start(&self) -> Option<(u64, u64)> {
        self.0
            .iter()
            .find(|s| s.offset == 0)
            .map(|s| (s.vaddr, s.offset))
    }
}

/// A symbol of the symbol table (`.symtab`), with the file offset of its
/// address when a loadable segment holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub file_offset: Option<u64>,
}

/// An ELF file's bytes, mapped once, and what is read from its headers.
///
/// The parsed [`object::File`] borrows the bytes, so it cannot sit next to
/// them in this struct without a self-referential type. Rather than a crate
/// for that (`self_cell`/`ouroboros`) or a leaked `'static` buffer, the bytes
/// are owned here and [`ElfObject::file`] parses on demand: parsing is the ELF
/// header, program and section header tables and locating the symbol tables
/// (slices of the mapping, no copying), microseconds even for large files,
/// and the things asked for on every lookup (segments, build id) are
/// extracted once in [`ElfObject::open`].
pub struct ElfObject {
    path: PathBuf,
    /// Read-only mapping: pages are read as touched, so a large binary of
    /// which only the headers and a few functions are needed is not read
    /// whole.
    data: memmap2::Mmap,
    segments: Segments,
    build_id: Option<Vec<u8>>,
    is_go: bool,
}

impl std::fmt::Debug for ElfObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfObject")
            .field("path", &self.path)
            .field("len", &self.data.len())
            .field("segments", &self.segments)
            .field("is_go", &self.is_go)
            .finish()
    }
}

/// The smallest valid ELF64 header (no sections, no segments): what
/// [`ElfObject::file`] parses should the mapped file have stopped being ELF
/// since it was opened (rewritten in place), so that lookups find nothing
/// rather than panic.
#[repr(C, align(8))]
struct EmptyElf([u8; 64]);

static EMPTY_ELF: EmptyElf = EmptyElf([
    0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, // e_ident
    3, 0, 0x3e, 0, 1, 0, 0, 0, // e_type ET_DYN, e_machine x86-64, e_version
    0, 0, 0, 0, 0, 0, 0, 0, // e_entry
    0, 0, 0, 0, 0, 0, 0, 0, // e_phoff
    0, 0, 0, 0, 0, 0, 0, 0, // e_shoff
    0, 0, 0, 0, 64, 0, 56, 0, // e_flags, e_ehsize, e_phentsize
    0, 0, 64, 0, 0, 0, 0, 0, // e_phnum, e_shentsize, e_shnum, e_shstrndx
]);

impl ElfObject {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, TracerError> {
        let file = std::fs::File::open(path).map_err(|e| unreadable(path, e.to_string()))?;
        Self::from_file(&file, path)
    }

    /// Maps and parses an already open file; `path` names it in errors.
    pub fn from_file(file: &std::fs::File, path: &Path) -> Result<Self, TracerError> {
        // SAFETY: the mapping is read-only and owned by this value, and only
        // read through `&[u8]`. A file truncated by someone else while mapped
        // would fault on access, as with any mmap reader (blazesym maps the
        // same files); the tracer only maps binaries that processes are
        // running or about to run, which are replaced, not rewritten.
        let data =
            unsafe { memmap2::Mmap::map(file) }.map_err(|e| unreadable(path, e.to_string()))?;
        let parsed = object::File::parse(&*data).map_err(|e| unreadable(path, e.to_string()))?;
        let segments = Segments::new(
            parsed
                .segments()
                .map(|s| {
                    let (offset, file_size) = s.file_range();
                    Segment {
                        vaddr: s.address(),
                        offset,
                        file_size,
                    }
                })
                .collect(),
        );
        let build_id = parsed.build_id().ok().flatten().map(<[u8]>::to_vec);
        let is_go = parsed.section_by_name(".go.buildinfo").is_some()
            || parsed.section_by_name(".gopclntab").is_some();
        drop(parsed);
        Ok(Self {
            path: path.to_path_buf(),
            data,
            segments,
            build_id,
            is_go,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The parsed file (see the type's documentation for why on demand).
    pub fn file(&self) -> object::File<'_> {
        object::File::parse(&*self.data).unwrap_or_else(|_| {
            object::File::parse(&EMPTY_ELF.0[..]).expect("the empty ELF header parses")
        })
    }

    /// Its loadable segments.
    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    /// The `NT_GNU_BUILD_ID` note.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// Built by Go: has `.go.buildinfo` or `.gopclntab`.
    pub fn is_go(&self) -> bool {
        self.is_go
    }

    /// A dynamic object (shared library or position-independent executable).
    pub fn is_dynamic(&self) -> bool {
        self.file().kind() == object::ObjectKind::Dynamic
    }

    /// The file's `len` bytes at virtual address `va`, when one segment holds
    /// them all in the file.
    pub fn read_at_vaddr(&self, va: u64, len: u64) -> Option<&[u8]> {
        self.data.get(self.segments.file_range(va, len)?)
    }

    /// The file's bytes from `offset`, `len` long.
    pub fn read_at_offset(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.data
            .get(start..start.checked_add(usize::try_from(len).ok()?)?)
    }

    fn symbol(&self, name: &str, kind: SymbolKind) -> Option<Symbol> {
        let file = self.file();
        let sym = file
            .symbols()
            .find(|s| s.kind() == kind && s.name() == Ok(name))?;
        Some(Symbol {
            name: name.to_string(),
            addr: sym.address(),
            size: sym.size(),
            file_offset: self.segments.vaddr_to_offset(sym.address()),
        })
    }

    /// A function of the symbol table (`.symtab`) by its exact name.
    pub fn function(&self, name: &str) -> Option<Symbol> {
        self.symbol(name, SymbolKind::Text)
    }

    /// A data object of the symbol table (`.symtab`) by its exact name.
    pub fn data_symbol(&self, name: &str) -> Option<Symbol> {
        self.symbol(name, SymbolKind::Data)
    }

    /// Raw bytes of the first section called `name` (compressed as stored).
    pub fn section_data(&self, name: &str) -> Option<&[u8]> {
        self.file().section_by_name(name)?.data().ok()
    }

    /// Bytes of the first section called `name`, decompressed if need be
    /// (see [`section_bytes`]).
    pub fn section_uncompressed(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        section_bytes(&self.file().section_by_name(name)?)
    }

    /// Whether it has DWARF debug information.
    pub fn has_dwarf(&self) -> bool {
        let file = self.file();
        file.section_by_name(".debug_info").is_some()
            || file.section_by_name(".zdebug_info").is_some()
    }

    /// The dynamic loader it asks for (`PT_INTERP`); none for a static
    /// executable or most libraries.
    pub fn interpreter(&self) -> Option<String> {
        use object::read::elf::ProgramHeader;
        let object::File::Elf64(elf) = self.file() else {
            return None;
        };
        let endian = elf.endian();
        let data = elf.data();
        for ph in elf.elf_program_headers() {
            if ph.p_type(endian) == object::elf::PT_INTERP {
                let bytes = ph.data(endian, data).ok()?;
                let s = std::str::from_utf8(bytes).ok()?;
                return Some(s.trim_end_matches('\0').to_string());
            }
        }
        None
    }
}

fn unreadable(path: &Path, reason: String) -> TracerError {
    TracerError::UnreadableBinary {
        path: path.to_path_buf(),
        reason,
    }
}

/// The files of one plan, each opened and parsed once however many planners
/// ask for it. Keyed by the path opened.
#[derive(Default)]
pub struct ElfObjects {
    open: HashMap<PathBuf, Arc<ElfObject>>,
}

impl ElfObjects {
    pub fn new() -> Self {
        Self::default()
    }

    /// The file at `path`, opened on first use. Failures are not kept: the
    /// next ask tries again.
    pub fn get(&mut self, path: &Path) -> Result<Arc<ElfObject>, TracerError> {
        if let Some(o) = self.open.get(path) {
            return Ok(o.clone());
        }
        let o = Arc::new(ElfObject::open(path)?);
        self.open.insert(path.to_path_buf(), o.clone());
        Ok(o)
    }

    /// How many files are open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// A section's bytes, decompressed if need be, with memory bounded by what
/// the compressed data really inflates to. `object`'s own decompression
/// reserves the size the compression header claims up front: a target's
/// file claiming 1.4 GB made the tracer allocate that much (found by the
/// fuzzer). The claimed size is still checked against the result.
pub fn section_bytes<'d>(section: &impl object::ObjectSection<'d>) -> Option<Cow<'d, [u8]>> {
    use object::CompressionFormat;
    use std::io::Read;
    let compressed = section.compressed_data().ok()?;
    let claimed = compressed.uncompressed_size;
    let mut out = Vec::new();
    match compressed.format {
        CompressionFormat::None => return Some(Cow::Borrowed(compressed.data)),
        CompressionFormat::Zlib => {
            flate2::read::ZlibDecoder::new(compressed.data)
                .take(claimed)
                .read_to_end(&mut out)
                .ok()?;
        }
        CompressionFormat::Zstandard => {
            let mut input = compressed.data;
            let decoder = ruzstd::decoding::StreamingDecoder::new(&mut input).ok()?;
            decoder.take(claimed).read_to_end(&mut out).ok()?;
        }
        _ => return None,
    }
    (out.len() as u64 == claimed).then_some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_take_the_vaddr_of_the_segment_mapped_there() {
        // Rust/lld-style: text not page aligned in the file, and one page
        // before it shared with the read-only segment.
        let segs = Segments::new(vec![
            Segment {
                vaddr: 0,
                offset: 0,
                file_size: 0x13bb0,
            },
            Segment {
                vaddr: 0x14bb0,
                offset: 0x13bb0,
                file_size: 0x3eb83,
            },
        ]);
        assert_eq!(segs.mapping_vaddr(0x13000, 4096), Some(0x14000));
        assert_eq!(segs.mapping_vaddr(0, 4096), Some(0));
    }

    fn segs() -> Segments {
        Segments::new(vec![
            Segment {
                vaddr: 0,
                offset: 0,
                file_size: 0x1000,
            },
            Segment {
                vaddr: 0x1000,
                offset: 0x1000,
                file_size: 0x5000,
            },
            // Data: file offset and address differ.
            Segment {
                vaddr: 0x7000,
                offset: 0x6000,
                file_size: 0x800,
            },
            // bss only: no file bytes.
            Segment {
                vaddr: 0x9000,
                offset: 0x6800,
                file_size: 0,
            },
        ])
    }

    #[test]
    fn offsets_and_addresses_translate_through_segments() {
        let s = segs();
        assert_eq!(s.offset_to_vaddr(0x1234), Some(0x1234));
        assert_eq!(s.offset_to_vaddr(0x6010), Some(0x7010));
        assert_eq!(s.offset_to_vaddr(0x9000), None);
        assert_eq!(s.offset_to_vaddr(0x6800), None, "end is exclusive");
        assert_eq!(s.vaddr_to_offset(0x7010), Some(0x6010));
        assert_eq!(s.vaddr_to_offset(0x6fff), None, "between segments");
        assert_eq!(s.vaddr_to_offset(0x7800), None, "end is exclusive");
        assert_eq!(s.vaddr_to_offset(0x9000), None, "no file bytes");
        assert_eq!(s.vaddr_to_offset(u64::MAX), None, "no overflow");
        for va in [0, 0xfff, 0x1000, 0x5fff, 0x7000, 0x77ff] {
            let off = s.vaddr_to_offset(va).unwrap();
            assert_eq!(s.offset_to_vaddr(off), Some(va), "{va:#x}");
        }
        assert_eq!(s.at_file_start(), Some((0, 0)));
        assert_eq!(Segments::default().at_file_start(), None);
    }

    #[test]
    fn ranges_must_fit_one_segment() {
        let s = segs();
        assert_eq!(s.file_range(0x7000, 8), Some(0x6000..0x6008));
        assert_eq!(s.file_range(0x77f8, 8), Some(0x67f8..0x6800));
        assert_eq!(s.file_range(0x77f9, 8), None, "runs past the file bytes");
        assert_eq!(s.file_range(0x9000, 8), None);
        assert_eq!(s.file_range(0x7000, u64::MAX), None, "no overflow");
    }

    fn libc() -> PathBuf {
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("glibc")
    }

    /// `nm -D --defined-only` addresses of `name`.
    fn nm_address(path: &Path, name: &str) -> u64 {
        let out = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(path)
            .output()
            .expect("nm");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let (addr, _, sym) = (w.next()?, w.next()?, w.next()?);
                (sym.split('@').next() == Some(name)).then(|| u64::from_str_radix(addr, 16).ok())?
            })
            .unwrap_or_else(|| panic!("{name} in nm -D"))
    }

    /// `readelf -lW` LOAD rows as (offset, vaddr, filesz).
    fn readelf_loads(path: &Path) -> Vec<(u64, u64, u64)> {
        let out = std::process::Command::new("readelf")
            .arg("-lW")
            .arg(path)
            .output()
            .expect("readelf");
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with("LOAD"))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (hex(w[1]), hex(w[2]), hex(w[4]))
            })
            .collect()
    }

    #[test]
    fn libc_segments_and_malloc_agree_with_binutils() {
        let path = libc();
        let elf = ElfObject::open(&path).unwrap();
        assert_eq!(elf.path(), path);
        assert!(!elf.is_go());
        assert!(elf.is_dynamic());
        assert!(elf.build_id().is_some_and(|id| id.len() >= 16));
        // glibc's libc.so.6 runs as a program too, so it names its loader.
        assert!(elf.interpreter().is_some_and(|i| i.contains("ld-linux")));
        let loads = readelf_loads(&path);
        let ours: Vec<(u64, u64, u64)> = elf
            .segments()
            .iter()
            .map(|s| (s.offset, s.vaddr, s.file_size))
            .collect();
        assert_eq!(ours, loads);
        // malloc from the dynamic symbol table, as nm -D sees it.
        let addr = nm_address(&path, "malloc");
        let file = elf.file();
        let sym = file
            .dynamic_symbols()
            .find(|s| {
                s.name()
                    .is_ok_and(|n| n.split('@').next() == Some("malloc"))
            })
            .unwrap();
        assert_eq!(sym.address(), addr);
        let (off, va, _) = loads
            .iter()
            .copied()
            .find(|(_, va, size)| *va <= addr && addr < va + size)
            .unwrap();
        let offset = elf.segments().vaddr_to_offset(addr).unwrap();
        assert_eq!(offset, addr - va + off);
        assert_eq!(elf.segments().offset_to_vaddr(offset), Some(addr));
        assert_eq!(
            elf.read_at_vaddr(addr, 16),
            elf.read_at_offset(offset, 16),
            "the same bytes either way"
        );
        assert!(elf.section_data(".dynsym").is_some());
        assert!(elf.section_data(".no-such-section").is_none());
    }

    #[test]
    fn own_executable() {
        let elf = ElfObject::open(Path::new("/proc/self/exe")).unwrap();
        assert!(!elf.is_go());
        // Test binaries keep their symbol table: this very function is in it
        // under its mangled name; a plain one is `main`.
        let main = elf.function("main").expect("main in .symtab");
        let off = main.file_offset.expect("main is in a loadable segment");
        assert_eq!(elf.segments().offset_to_vaddr(off), Some(main.addr));
        assert!(elf.interpreter().is_some_and(|i| i.contains("ld-linux")));
        assert!(elf.data_symbol("main").is_none(), "main is no data object");
        assert_eq!(elf.segments().at_file_start().map(|s| s.1), Some(0));
    }

    #[test]
    fn shared_between_planners() {
        let mut objects = ElfObjects::new();
        let a = objects.get(&libc()).unwrap();
        let b = objects.get(&libc()).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "opened once");
        assert_eq!(objects.len(), 1);
        assert!(objects.get(Path::new("/no/such/file")).is_err());
        assert!(
            objects.get(Path::new("/proc/self/status")).is_err(),
            "not ELF"
        );
    }

    #[test]
    fn empty_elf_parses() {
        let file = object::File::parse(&EMPTY_ELF.0[..]).unwrap();
        assert_eq!(file.segments().count(), 0);
        assert_eq!(file.symbols().count(), 0);
    }
}
