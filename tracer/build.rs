//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The kernel side needs another compiler route (bpfel-unknown-none with
//! build-std and bpf-linker) than this crate, so it is built by xtask, which
//! knows how to find or install that route, and only picked up here.
//!
//! Without the object (a fresh checkout, `cargo check`, clippy, `cargo test
//! -p tracer` on a machine without the eBPF toolchain) an empty stub is
//! embedded instead, with a warning: everything compiles and the unit tests
//! run, while the binary refuses to load programs ("built without the eBPF
//! object: run `cargo xtask build`"). `cargo xtask build` always builds the
//! object first, so its binaries are never stubs.
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
    // A missing file keeps this script rerunning, so the real object is
    // picked up as soon as it is built.
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        let stub = PathBuf::from(env::var("OUT_DIR")?).join("tracer-ebpf-stub");
        std::fs::write(&stub, b"")?;
        println!(
            "cargo:warning=the eBPF object {} does not exist: embedding an empty stub, so this \
             tracer builds and its unit tests run but it cannot trace; run `cargo xtask build` \
             (or `cargo xtask build-ebpf` first) for a working binary",
            obj.display()
        );
        println!("cargo:rustc-env=TRACER_EBPF_OBJECT={}", stub.display());
        return Ok(());
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
