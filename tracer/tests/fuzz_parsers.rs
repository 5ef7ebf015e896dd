//! Fuzzing of every parser of input the traced process controls: its ELF
//! files (headers, segments, symbol tables, `.eh_frame` and `.debug_frame`
//! turned into unwind rows, Go's `.gopclntab` and build info, DWARF for the
//! runtime's offsets, the probe planners' code decoding), its
//! `/proc/PID/maps`, and its Go runtime's structures read from its memory
//! (the goroutine list, the timer heaps, the memory profile's buckets). The
//! tracer runs as root on those: no input may panic it, take it long, or
//! make it allocate much (a counting allocator measures each input's peak).
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
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    io::Write,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bolero::check;
use tracer::{
    go::{
        BufferMemory, CensusLayout, MemProfileLayout, Pending, RuntimeMem, TimerHeapLayout,
        census::{self, RollingCensus},
        timers,
    },
    object::{ElfObject, ElfObjects},
    probes::{ObjectRef, plan_go, plan_libc},
    target::Maps,
};

/// Longest an input may take through every parser.
const PER_INPUT: Duration = Duration::from_secs(5);

/// Most an input may make the parsers hold at once, whatever its size.
const MAX_PEAK: usize = 256 << 20;

/// The allocator of this test binary: the system's, counting the bytes
/// each thread holds and its peak (each test runs its parsers on one
/// thread; bolero's bookkeeping is outside the measured spans).
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // try_with: nothing to count on a thread being torn down.
    let _ = HELD.try_with(|held| {
        let now = held.get() + delta;
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counting
// only reads the layouts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the most bytes it held at once beyond what was
/// held before (allocated and not yet freed), with its duration.
fn measured(f: impl FnOnce()) -> (usize, Duration) {
    let before = HELD.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let started = Instant::now();
    f();
    let took = started.elapsed();
    let peak = PEAK.with(Cell::get) - before;
    (peak.max(0) as usize, took)
}

/// The largest peak seen per test, for the report at the end.
static LARGEST_PEAK: [std::sync::atomic::AtomicUsize; 2] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 2];

/// Fails when one input took longer than [`PER_INPUT`] or held more than
/// [`MAX_PEAK`] or `per_byte` times its size plus `slack`.
fn check_bounds(
    test: usize,
    what: &dyn Fn() -> String,
    input_len: usize,
    (peak, took): (usize, Duration),
    per_byte: usize,
    slack: usize,
) {
    LARGEST_PEAK[test].fetch_max(peak, std::sync::atomic::Ordering::Relaxed);
    assert!(took < PER_INPUT, "{} took {took:?}", what());
    let bound = MAX_PEAK.min(input_len.saturating_mul(per_byte).saturating_add(slack));
    assert!(
        peak <= bound,
        "{} held {peak} bytes at once (bound {bound} for {input_len} bytes of input)",
        what()
    );
}

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
            let spent = measured(|| parse_all(&data));
            check_bounds(
                0,
                &|| {
                    format!(
                        "{} mutated ({} changes, cut at {truncate:?}/65536)",
                        seeds[i].0.display(),
                        mutations.len()
                    )
                },
                data.len(),
                spent,
                ELF_BYTES_PER_BYTE,
                ELF_SLACK,
            );
        });
    let n = |i: usize| RUNS[i].load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "fuzz: {} ELF inputs, {} parsed as ELF, {} with a Go line table; largest peak {} KiB",
        n(0),
        n(1),
        n(2),
        LARGEST_PEAK[0].load(std::sync::atomic::Ordering::Relaxed) >> 10
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

/// What parsing an ELF file may hold per byte of it, plus a constant: its
/// tables (unwind rows, the Go line table's functions, DWARF units) are
/// built from it, the file itself is mapped, not allocated.
const ELF_BYTES_PER_BYTE: usize = 16;
const ELF_SLACK: usize = 64 << 20;

/// Go runtime inputs run, and those where goroutines, pending timers and
/// profile buckets were found (how deep the mutations reach).
static GO_RUNS: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

fn count_go(i: usize) {
    GO_RUNS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Where the made-up Go runtime's memory starts.
const BASE: u64 = 0x7f00_0000_0000;

/// Size of the made-up Go runtime's memory.
const GO_MEMORY: usize = 0x4000;

/// A little Go runtime laid out in [`GO_MEMORY`] bytes at [`BASE`], for the
/// layouts [`read_go_runtime`] reads with: `allgs` (at +0) listing four
/// waiting goroutines, `allp` (at +0x10) two Ps whose timer heaps hold
/// pending timers (Go 1.23 entries), and `mbuckets` (at +0x20) a list of
/// two memory-profile buckets. Mutations start from a runtime that reads.
fn go_runtime_seed() -> Vec<u8> {
    let mut m = vec![0u8; GO_MEMORY];
    let mut put = |at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let ptr = |off: usize| BASE + off as u64;
    // allgs: 4 g structs of 0x200 bytes at +0x2000.
    put(0x0, ptr(0x1000));
    put(0x8, 4);
    for i in 0..4 {
        let g = 0x2000 + i * 0x200;
        put(0x1000 + i * 8, ptr(g));
        put(g + 0x98, 4); // _Gwaiting, and the wait reason below
        put(g + 0xb8, 1);
        put(g + 0x120, 0x40_1000 + i as u64 % 2);
        put(g + 0x130, 0x40_2000);
    }
    // allp: 2 Ps at +0x1200 and +0x1300, their heaps (slice at p + 0x48)
    // of 3 entries {*timer, when} at +0x1800 and +0x1900.
    put(0x10, ptr(0x1100));
    put(0x18, 2);
    for p in 0..2 {
        let (pp, heap) = (0x1200 + p * 0x100, 0x1800 + p * 0x100);
        put(0x1100 + p * 8, ptr(pp));
        put(pp + 0x48, ptr(heap));
        put(pp + 0x50, 3);
        for t in 0..3 {
            // Timers of 0x80 bytes at +0x2a00: state (u8 at 9) heaped,
            // f (at period + 8 = 0x20) a funcval at +0x3f00.
            let timer = 0x2a00 + (p * 3 + t) * 0x80;
            put(heap + t * 16, ptr(timer));
            put(heap + t * 16 + 8, 1_000_000);
            put(timer + 8, 1 << 8);
            put(timer + 0x20, ptr(0x3f00));
            put(timer + 0x30, ptr(0x3f08));
        }
    }
    put(0x3f00, 0x40_3000);
    put(0x3f08, 0x40_4000);
    // mbuckets: two buckets at +0x3000 and +0x3400: next, allnext, typ
    // (memProfile), hash, size, nstk, the stack, then 4 cycles of 32 bytes.
    put(0x20, ptr(0x3000));
    for (b, next) in [(0x3000, ptr(0x3400)), (0x3400, 0)] {
        put(b + 8, next);
        put(b + 16, 1);
        put(b + 32, 64);
        put(b + 40, 2);
        put(b + 48, 0x40_1000);
        put(b + 56, 0x40_2000);
        put(b + 64, 5);
        put(b + 72, 2);
    }
    m
}

/// The made-up memory of a Go target: [`go_runtime_seed`] with `pokes`
/// (offset, value) written over it as words and `edits` as bytes, cut at
/// `truncate` (in 1/65536ths). A poked value with its low bit clear becomes
/// a pointer into the memory (its offset the rest of it), so mutations
/// relink structures; with it set, the rest is the raw word (a torn length,
/// a wild pointer).
fn go_memory(pokes: &[(u16, u64)], edits: &[(u16, u8)], truncate: Option<u16>) -> BufferMemory {
    let mut bytes = go_runtime_seed();
    let len = bytes.len();
    for &(at, value) in pokes.iter().take(16) {
        let at = (at as usize % (len - 7)) & !7;
        let word = if value & 1 == 0 {
            BASE + (value >> 1) % len as u64
        } else {
            value >> 1
        };
        bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
    }
    for &(at, b) in edits.iter().take(16) {
        bytes[at as usize % len] = b;
    }
    if let Some(t) = truncate {
        bytes.truncate(len * t as usize / 65536);
    }
    BufferMemory::new().with(BASE, bytes)
}

/// Every reader of a Go runtime's structures, over `mem`: the goroutine
/// list (whole and rolling), the timer heaps (both layouts), the memory
/// profile and its buckets.
fn read_go_runtime(mem: &BufferMemory) {
    let mbuckets_at = 0x20;
    count_go(0);
    let census = CensusLayout {
        allgs: BASE,
        status: 0x98,
        waitreason: 0xb8,
        gopc: 0x120,
        startpc: 0x130,
        wait_reasons: vec![String::new(), "IO wait".into()],
    };
    if census::read(mem, 0, &census).is_ok_and(|c| !c.groups.is_empty()) {
        count_go(1);
    }
    let mut rolling = RollingCensus::default();
    for _ in 0..2 {
        let _ = rolling.read(mem, &census, Duration::ZERO);
    }
    for (entry, pending) in [
        (8, Pending::Status { offset: 0x40 }),
        (16, Pending::State { offset: 9 }),
    ] {
        let layout = TimerHeapLayout {
            allp: BASE + 16,
            heap: 0x48,
            entry,
            pending,
            period: 0x18,
        };
        if timers::pending(mem, BASE + 16, BASE + 0x100, &layout).is_ok_and(|t| !t.is_empty()) {
            count_go(2);
        }
    }
    let mut runtime = RuntimeMem::over(mem.clone());
    runtime.set_profile(
        BASE + mbuckets_at,
        MemProfileLayout {
            mbuckets: 0,
            cycle_size: 32,
        },
    );
    let buckets: Vec<u64> = runtime.mem_buckets().iter().map(|b| b.addr).collect();
    if !buckets.is_empty() {
        count_go(3);
    }
    for addr in buckets
        .into_iter()
        .take(64)
        .chain([BASE, BASE + mbuckets_at])
    {
        let _ = runtime.bucket(addr);
    }
}

#[test]
fn go_runtime_memory_never_panics_or_bloats_the_tracer() {
    // The seed itself reads whole: the mutations start from depth.
    let seed = go_memory(&[], &[], None);
    read_go_runtime(&seed);
    let n = |i: usize| GO_RUNS[i].load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (n(1), n(2), n(3)),
        (1, 1, 1),
        "the seed runtime's goroutines, timers (1.23 entries) and buckets"
    );
    check!()
        .with_type::<(Vec<(u16, u64)>, Vec<(u16, u8)>, Option<u16>)>()
        .with_test_time(fuzz_time())
        .for_each(|(pokes, edits, truncate)| {
            let mem = go_memory(pokes, edits, *truncate);
            let len = mem.regions()[0].1.len();
            let spent = measured(|| read_go_runtime(&mem));
            // Chunked reads (at most a few MiB at once) and sets of what was
            // read: bounded by the memory readable, never by a length read.
            check_bounds(
                1,
                &|| {
                    format!(
                        "{len} bytes of Go runtime memory with {} pokes and {} edits",
                        pokes.len(),
                        edits.len()
                    )
                },
                len,
                spent,
                64,
                8 << 20,
            );
        });
    let n = |i: usize| GO_RUNS[i].load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "fuzz: {} Go runtime memories, {} with goroutines, {} with pending timers, {} with \
         profile buckets; largest peak {} KiB",
        n(0),
        n(1),
        n(2),
        n(3),
        LARGEST_PEAK[1].load(std::sync::atomic::Ordering::Relaxed) >> 10
    );
}
