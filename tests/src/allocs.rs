//! What `tests/fixtures/c/allocs.c` leaves behind, known from its source:
//! the truth the libc, export and VM tests assert against.

use std::path::PathBuf;

use crate::source;

/// What tests/fixtures/c/allocs.c leaves behind, per site:
/// (kind, innermost function, SITE marker, outstanding bytes, outstanding
/// blocks, allocs, frees).
pub const EXPECTED: &[(&str, &str, &str, u64, u64, u64, u64)] = &[
    ("heap", "leak_malloc", "leak_malloc", 10_000, 10, 10, 0),
    ("heap", "leak_calloc", "leak_calloc", 5_120, 5, 5, 0),
    ("heap", "grow_realloc", "realloc_grow", 15_000, 3, 3, 0),
    // realloc moved these blocks to the realloc site.
    ("heap", "grow_realloc", "realloc_seed", 0, 0, 3, 3),
    (
        "heap",
        "leak_posix_memalign",
        "posix_memalign",
        8_192,
        4,
        4,
        0,
    ),
    (
        "heap",
        "leak_aligned_alloc",
        "aligned_alloc",
        8_192,
        2,
        2,
        0,
    ),
    ("heap", "leak_memalign", "memalign", 1_000, 2, 2, 0),
    ("heap", "leak_reallocarray", "reallocarray", 1_000, 1, 1, 0),
    ("mmap", "leak_mmap", "mmap", 131_072, 2, 3, 1),
    // Served by mmap inside malloc: a heap site, never also an mmap site.
    ("heap", "leak_big", "big_malloc", 2 << 20, 2, 2, 0),
    ("heap", "inline_alloc", "inline_inner", 2_100, 3, 3, 0),
    ("heap", "churn", "churn", 0, 0, 10_000, 10_000),
    ("heap", "thread_main", "thread_malloc", 12_000, 4, 4, 0),
];

/// The fixture's source, whose `SITE:` markers give each site's line.
pub fn src() -> PathBuf {
    source("c/allocs.c")
}

/// The expected row of the site at `marker`.
pub fn expected(
    marker: &str,
) -> &'static (&'static str, &'static str, &'static str, u64, u64, u64, u64) {
    EXPECTED
        .iter()
        .find(|e| e.2 == marker)
        .unwrap_or_else(|| panic!("no expected site {marker}"))
}

/// Outstanding bytes the fixture leaves at `marker`.
pub fn bytes_at(marker: &str) -> u64 {
    expected(marker).3
}

/// The heap sites a traced run of the fixture leaves: its own, plus one
/// per thread it starts, where glibc's `pthread_create` callocs the new
/// thread's DTV (kept with the thread's cached stack after the join).
pub fn heap_sites() -> usize {
    let threads = std::fs::read_to_string(src())
        .unwrap()
        .matches("pthread_create(")
        .count();
    EXPECTED.iter().filter(|e| e.0 == "heap").count() + threads
}
