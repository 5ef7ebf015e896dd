//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The kernel side needs another compiler route (bpfel-unknown-none with
//! build-std and bpf-linker) than this crate, so it is built by xtask, which
//! knows how to find or install that route, and only picked up here.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .expect("crate lives in the workspace")
        .to_path_buf();
    let obj = match env::var_os("TRACER_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => root.join("target/ebpf/bpfel-unknown-none/release/tracer"),
    };
    println!("cargo:rerun-if-env-changed=TRACER_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        anyhow::bail!(
            "the eBPF object {} does not exist: run `cargo xtask build-ebpf` first \
             (or `cargo xtask build`, which does both)",
            obj.display()
        );
    }
    // A stale object would silently run old kernel code: warn when any eBPF
    // source is newer than it.
    let built = obj.metadata()?.modified()?;
    for dir in [root.join("tracer-ebpf/src"), root.join("tracer-common/src")] {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
            if entry.metadata()?.modified()? > built {
                println!(
                    "cargo:warning={} is newer than the eBPF object; run `cargo xtask build-ebpf`",
                    entry.path().display()
                );
            }
        }
    }
    println!("cargo:rustc-env=TRACER_EBPF_OBJECT={}", obj.display());
    Ok(())
}
