//! Finding (and installing) a toolchain route that can build the eBPF crate.
//!
//! The crate targets bpfel-unknown-none, which needs `-Z build-std=core`: the
//! Rust library sources of exactly the compiler's version, and bpf-linker
//! built against the compiler's LLVM major. Two routes provide that:
//! - Debian: `rustc-web` (rustc 1.96, LLVM 22) + `rust-web-src`, with
//!   RUSTC_BOOTSTRAP=1 so the stable compiler accepts `-Z build-std`;
//! - rustup: a nightly toolchain with the `rust-src` component.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// A compiler that can build the eBPF crate.
#[derive(Debug, Clone)]
pub enum Route {
    /// Debian's rustc-web with rust-web-src.
    Debian { rustc: PathBuf },
    /// A rustup nightly with rust-src.
    RustupNightly,
}

impl Route {
    pub fn describe(&self) -> String {
        match self {
            Route::Debian { rustc } => format!("Debian rustc-web ({})", rustc.display()),
            Route::RustupNightly => "rustup nightly with rust-src".into(),
        }
    }

    /// A `cargo build` command for the eBPF crate on this route.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new("cargo");
        // Settings inherited from the outer `cargo xtask` must not leak into
        // the inner build, which uses another compiler.
        for var in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTUP_TOOLCHAIN",
            "CARGO_BUILD_TARGET",
        ] {
            cmd.env_remove(var);
        }
        match self {
            Route::Debian { rustc } => {
                cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
            }
            Route::RustupNightly => {
                cmd.env("RUSTUP_TOOLCHAIN", "nightly");
            }
        }
        cmd
    }
}

/// Where the library sources of the compiler with this sysroot would be.
fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn sysroot_of(cmd: &mut Command) -> Option<PathBuf> {
    let out = cmd.arg("--print").arg("sysroot").output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The first working route, or what each route lacks.
pub fn find_route() -> std::result::Result<Route, Vec<String>> {
    let mut missing = Vec::new();
    let debian_rustc = PathBuf::from("/usr/bin/rustc");
    if debian_rustc.exists() {
        match sysroot_of(&mut Command::new(&debian_rustc)) {
            Some(root) if has_rust_src(&root) => {
                return Ok(Route::Debian {
                    rustc: debian_rustc,
                });
            }
            _ => missing.push(
                "Debian route: /usr/bin/rustc has no library sources (package rust-web-src)"
                    .to_string(),
            ),
        }
    } else {
        missing.push("Debian route: no /usr/bin/rustc (packages rustc-web, rust-web-src)".into());
    }
    let mut nightly = Command::new("rustup");
    nightly.args(["run", "nightly", "rustc"]);
    match sysroot_of(&mut nightly) {
        Some(root) if has_rust_src(&root) => return Ok(Route::RustupNightly),
        Some(_) => missing.push(
            "rustup route: the nightly toolchain has no rust-src \
             (`rustup component add rust-src --toolchain nightly`)"
                .into(),
        ),
        None => missing.push(
            "rustup route: no nightly toolchain \
             (`rustup toolchain install nightly --component rust-src`)"
                .into(),
        ),
    }
    Err(missing)
}

/// The bpf-linker binary, if one runs.
pub fn bpf_linker() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("bpf-linker")];
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string())
    }) {
        candidates.push(PathBuf::from(home).join("bin/bpf-linker"));
    }
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs Debian packages that are missing, explaining why.
pub fn apt_install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str)> = packages
        .iter()
        .filter(|(p, _)| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (pkg, why) in &missing {
        println!("setup: installing Debian package {pkg}: {why}");
    }
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    if !is_root() || Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "missing packages {}: install them with `sudo apt-get install -y {}`",
            names.join(", "),
            names.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// Makes sure a toolchain route and bpf-linker exist, installing what is
/// missing. Idempotent: prints and does nothing when all is there.
pub fn setup() -> Result<Route> {
    apt_install(&[
        ("gcc", "compiles the C test targets and demo"),
        (
            "g++",
            "compiles the C++ test target (new/delete under allocator libraries)",
        ),
        ("libc6-dev", "C headers for the test targets"),
        (
            "libc6-dbg",
            "libc's debug symbols, so stacks through libc resolve fully",
        ),
    ])?;
    let route = match find_route() {
        Ok(r) => r,
        Err(_) => {
            apt_install(&[
                (
                    "rustc-web",
                    "a rustc (1.96, LLVM 22) whose library sources Debian ships",
                ),
                (
                    "rust-web-src",
                    "library sources for -Z build-std=core on the BPF target",
                ),
            ])?;
            find_route().map_err(|missing| {
                anyhow::anyhow!(
                    "no toolchain can build the eBPF crate:\n  {}",
                    missing.join("\n  ")
                )
            })?
        }
    };
    if bpf_linker().is_none() {
        let llvm = match &route {
            Route::Debian { .. } => 22,
            // A nightly's LLVM major: read it from `rustc -vV`.
            Route::RustupNightly => nightly_llvm_major().unwrap_or(22),
        };
        let dev = format!("llvm-{llvm}-dev");
        apt_install(&[(dev.as_str(), "LLVM libraries bpf-linker links against")])?;
        println!(
            "setup: installing bpf-linker (links the eBPF object) against LLVM {llvm}; this takes ~2 min"
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{llvm}")])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC"))?;
        if bpf_linker().is_none() {
            bail!("bpf-linker was installed but does not run; check ~/.cargo/bin is on PATH");
        }
    }
    Ok(route)
}

fn nightly_llvm_major() -> Option<u32> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
}

/// Runs a command, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
