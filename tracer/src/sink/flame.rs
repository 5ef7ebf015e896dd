//! In-use memory as folded stacks and as a flame graph (inferno), written
//! from the final snapshot.

use std::{io::Write, path::Path};

use crate::collect::Snapshot;

/// Folded-stack lines (`heap;main;run_all;leak 10000`): one per site holding
/// bytes, outermost frame first under a root naming the kind, weighted by
/// outstanding bytes.
pub fn folded(snap: &Snapshot) -> Vec<String> {
    snap.sites
        .iter()
        .filter(|s| s.outstanding_bytes > 0)
        .map(|s| {
            let mut names: Vec<String> = vec![s.kind.to_string()];
            // ';' separates frames and ' ' the weight: keep them out of names.
            names.extend(
                s.frames
                    .iter()
                    .rev()
                    .map(|f| f.function.replace([';', ' '], "_")),
            );
            format!("{} {}", names.join(";"), s.outstanding_bytes)
        })
        .collect()
}

/// Writes the folded stacks to `path`.
pub fn write_folded(snap: &Snapshot, path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for line in folded(snap) {
        writeln!(f, "{line}")?;
    }
    f.flush()
}

/// An in-use memory flame graph (SVG) of `snap`; None when no site holds
/// memory.
pub fn flamegraph_svg(snap: &Snapshot) -> Option<Vec<u8>> {
    let lines = folded(snap);
    if lines.is_empty() {
        return None;
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!("in-use memory, pid {}", snap.pid);
    opts.count_name = "bytes".into();
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out).ok()?;
    Some(out)
}

/// Writes an in-use memory flame graph (SVG) to `path`; false when no site
/// holds memory (inferno refuses an empty graph; nothing held is no failure).
pub fn write_flamegraph(snap: &Snapshot, path: &Path) -> std::io::Result<bool> {
    let lines = folded(snap);
    if lines.is_empty() {
        log::warn!("no call site holds memory: {} not written", path.display());
        return Ok(false);
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!("in-use memory, pid {}", snap.pid);
    opts.count_name = "bytes".into();
    let f = std::io::BufWriter::new(std::fs::File::create(path)?);
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), f)?;
    Ok(true)
}
