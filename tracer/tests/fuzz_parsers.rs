//! Fuzzing of every parser of input the traced process controls: its ELF
//! files (headers, segments, symbol tables, `.eh_frame` and `.debug_frame`
//! turned into unwind rows, Go's `.gopclntab` and build info, DWARF for the
//! runtime's offsets, the probe planners' code decoding) and its
//! `/proc/PID/maps`. The tracer runs as root on those: no input may panic
//! it or take it long.
//!
//! bolero drives the inputs. Under `cargo test` (and `cargo xtask test`) it
//! is a time-boxed random run, `TRACER_FUZZ_SECS` per target (default 3);
//! `cargo bolero test fuzz_parsers::...` runs the same targets under
//! libFuzzer. The ELF inputs are structure-aware: a real binary from the
//! repository (C, Rust, Go, stripped Go, libc) with random bytes written
//! into the regions the parsers read (ELF and program headers, section
//! headers, symbol and string tables, unwind and Go sections) and an
//! optional truncation, so runs reach deep into each parser instead of
//! stopping at the magic number.

use std::{
    io::Write,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bolero::check;
use tracer::{
    object::{ElfObject, ElfObjects},
    probes::{ObjectRef, plan_go, plan_libc},
    target::Maps,
};

/// Longest an input may take through every parser.
const PER_INPUT: Duration = Duration::from_secs(5);

fn fuzz_time() -> Duration {
    Duration::from_secs(
        std::env::var("TRACER_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    )
}

/// Real binaries to mutate: the fixtures `cargo xtask test` builds (C with
/// and without frame pointers, Rust, Go, stripped Go) and this machine's
/// libc. Missing ones are left out; at least libc is always there.
fn seeds() -> Vec<(PathBuf, Vec<u8>)> {
    let fixtures = std::env::var_os("TRACER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/build")
        });
    let mut paths: Vec<PathBuf> = [
        "allocs-nofp",
        "rustleak",
        "leaky-go1.27",
        "leaky-go1.27-stripped",
        "libchain.so",
    ]
    .iter()
    .map(|f| fixtures.join(f))
    .collect();
    paths.push("/lib/x86_64-linux-gnu/libc.so.6".into());
    let seeds: Vec<(PathBuf, Vec<u8>)> = paths
        .into_iter()
        .filter_map(|p| Some((p.clone(), std::fs::read(&p).ok()?)))
        .collect();
    assert!(!seeds.is_empty(), "no seed binary found");
    seeds
}

/// The byte ranges of `data` the parsers read: the ELF header, program
/// and section headers, and the sections that matter.
fn regions(data: &[u8]) -> Vec<(usize, usize)> {
    use object::{Object, ObjectSection};
    let mut out = vec![(0, 64.min(data.len()))];
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if let (Some(phoff), Some(phnum)) = (u64_at(0x20), u16_at(0x38)) {
        out.push((phoff, phnum * 56));
    }
    if let (Some(shoff), Some(shnum)) = (u64_at(0x28), u16_at(0x3c)) {
        out.push((shoff, shnum * 64));
    }
    if let Ok(file) = object::File::parse(data) {
        for s in file.sections() {
            let name = s.name().unwrap_or_default();
            if [
                ".eh_frame",
                ".eh_frame_hdr",
                ".debug_frame",
                ".gopclntab",
                ".go.buildinfo",
                ".symtab",
                ".strtab",
                ".dynsym",
                ".dynstr",
                ".note.gnu.build-id",
                ".debug_info",
                ".debug_abbrev",
                ".text",
                ".interp",
            ]
            .contains(&name)
                && let Some((off, len)) = s.file_range()
            {
                // The start of big sections, where their headers are.
                out.push((off as usize, (len as usize).min(1 << 16)));
            }
        }
    }
    out.retain(|&(o, l)| l > 0 && o < data.len());
    out
}

/// A seed with (at most 16 of) `mutations` (region, offset in it, byte)
/// applied, and cut at `truncate` (a fraction of its length, in 1/65536ths).
fn mutate(
    seed: &[u8],
    regions: &[(usize, usize)],
    mutations: &[(u8, u32, u8)],
    truncate: Option<u16>,
) -> Vec<u8> {
    let mut data = seed.to_vec();
    for &(r, off, byte) in mutations.iter().take(16) {
        let (start, len) = regions[r as usize % regions.len()];
        let at = start + off as usize % len;
        if let Some(b) = data.get_mut(at) {
            *b = byte;
        }
    }
    if let Some(t) = truncate {
        data.truncate(data.len() * t as usize / 65536);
    }
    data
}

/// An anonymous in-memory file holding `data`, and its /proc path.
fn memfd(data: &[u8]) -> (std::fs::File, PathBuf) {
    // SAFETY: a fresh descriptor, owned by the File from here.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(data).unwrap();
    (file, PathBuf::from(format!("/proc/self/fd/{fd}")))
}

/// Inputs run, and those that parsed as ELF and as Go (reported at the
/// end: a run that never gets past the header proves little).
static RUNS: [std::sync::atomic::AtomicU64; 3] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 3];

fn count(i: usize) {
    RUNS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Every parser of a code file, on `data`.
fn parse_all(data: &[u8]) {
    count(0);
    let (file, path) = memfd(data);
    let Ok(elf) = ElfObject::from_file(&file, Path::new("fuzz")) else {
        return;
    };
    count(1);
    let _ = tracer::unwind::table::rows_of(&elf);
    let _ = elf.interpreter();
    let _ = elf.function("malloc");
    let _ = elf.section_uncompressed(".debug_info");
    let _ = tracer::go::version::go_version(&elf);
    let _ = tracer::go::version::build_info(&elf);
    let _ = tracer::go::version::offsets_from_dwarf(&elf);
    let _ = tracer::go::version::dwarf_facts(&elf);
    if let Some(tab) = tracer::go::pclntab::Pclntab::parse(&elf.file()) {
        count(2);
        for (i, (_, entry, end)) in tab.functions().take(2000).enumerate() {
            if i % 50 == 0 {
                let _ = tab.symbolize(entry);
                let _ = tab.symbolize(end.saturating_sub(1));
            }
        }
        let _ = tab.find_function("runtime.newproc1");
    }
    let obj = ObjectRef {
        path: path.clone(),
        open_path: path,
    };
    let _ = plan_libc(std::slice::from_ref(&obj), &mut ElfObjects::new());
    let _ = plan_go(&obj, &mut ElfObjects::new());
}

#[test]
fn elf_files_never_panic_or_hang_the_tracer() {
    let seeds = seeds();
    let regions: Vec<Vec<(usize, usize)>> = seeds.iter().map(|(_, d)| regions(d)).collect();
    check!()
        .with_type::<(u8, Vec<(u8, u32, u8)>, Option<u16>)>()
        .with_test_time(fuzz_time())
        .for_each(|(seed, mutations, truncate)| {
            let i = *seed as usize % seeds.len();
            let data = mutate(&seeds[i].1, &regions[i], mutations, *truncate);
            let started = Instant::now();
            parse_all(&data);
            assert!(
                started.elapsed() < PER_INPUT,
                "{} mutated ({} changes, cut at {truncate:?}/65536) took {:?}",
                seeds[i].0.display(),
                mutations.len(),
                started.elapsed()
            );
        });
    let n = |i: usize| RUNS[i].load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "fuzz: {} ELF inputs, {} parsed as ELF, {} with a Go line table",
        n(0),
        n(1),
        n(2)
    );
    assert!(
        n(1) > 0 && n(2) > 0,
        "the mutations never reached the parsers' depths"
    );
}

#[test]
fn maps_text_never_panics_the_tracer() {
    check!()
        .with_type::<Vec<u8>>()
        .with_test_time(fuzz_time())
        .for_each(|text| {
            let _ = Maps::parse(text);
        });
    // Mutations of a real maps file.
    let real = std::fs::read("/proc/self/maps").unwrap();
    check!()
        .with_type::<Vec<(u16, u8)>>()
        .with_test_time(fuzz_time())
        .for_each(|edits| {
            let mut text = real.clone();
            for &(at, b) in edits {
                let n = text.len();
                text[at as usize % n] = b;
            }
            if let Ok(maps) = Maps::parse(&text) {
                let _ = maps.lookup(0x7f00_0000_0000);
                let _ = maps.executable_objects();
            }
        });
}
