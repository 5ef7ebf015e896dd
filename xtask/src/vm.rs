//! `cargo xtask vmtest`: the privileged suite on the kernels users run.
//!
//! Debian's 6.1 (Debian 12's stock kernel) and 6.12 cloud kernels boot under
//! qemu with TCG (nested KVM hangs on this machine's hosts) from an
//! initramfs that holds the tracer, the fixtures, the integration test
//! binaries and a busybox init. Inside, cgroup v2 is mounted with its
//! memory controller on (PSI is on by default in these kernels), so the
//! OOM tests' groups are v2 there; `vm.rs`'s own tests (nesting,
//! memory.high, PSI, fallbacks for missing features) run too. The init
//! prints one result line per test binary; the run fails unless every
//! binary passed on every kernel.
//!
//! The kernel packages are fetched with `apt-get download` and unpacked
//! under target/vm: nothing is installed into the host's /boot.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{root, toolchain};

/// A kernel series the suite boots, and the Debian package name pattern of
/// its cloud image (no modules needed: everything used is built in).
struct Series {
    name: &'static str,
    /// Anchored regex for `apt-cache search --names-only`.
    package: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
    },
    Series {
        name: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
    },
];

/// What runs in each VM: test binary, then libtest arguments (test names
/// to run, exactly). Chosen to cover each kernel-dependent path once; the
/// whole suite runs on the host.
const SUITE: &[(&str, &[&str])] = &[
    (
        "libc",
        &[
            "attach_reports_exact_sites_with_full_stacks",
            "attach_without_frame_pointers_keeps_call_sites_and_flags_truncation",
            "run_traces_from_the_first_allocation",
            "threads_freeing_each_others_blocks_and_realloc_corners_are_exact",
            "forked_children_are_traced_as_their_own_targets",
            "a_cgroup_v2_directory_is_traced_whole",
            "maps_too_large_for_the_tracers_own_cgroup_are_refused_then_shrunk",
        ],
    ),
    (
        "go",
        &[
            "blocked_goroutines_are_counted_per_site_and_wait_reason",
            "timers_leaked_before_attach_are_counted_then_named",
        ],
    ),
    (
        "oom",
        &[
            "c_leak_is_alerted_well_before_the_oom_kill",
            "go_timer_leak_is_alerted_tens_of_seconds_before_the_kill",
        ],
    ),
    ("vm", &["--ignored"]),
];

/// A whole VM run may take this long before it is killed as hung.
const VM_DEADLINE: Duration = Duration::from_secs(30 * 60);

fn vm_dir() -> PathBuf {
    root().join("target/vm")
}

/// Runs the suite on `which` ("6.1", "6.12" or "all"); the tracer, the
/// fixtures and the eBPF object must be built.
pub fn vmtest(which: &str, only: Option<&str>) -> Result<()> {
    let series: Vec<&Series> = SERIES
        .iter()
        .filter(|s| which == "all" || s.name == which)
        .collect();
    if series.is_empty() {
        bail!(
            "unknown kernel `{which}`: use one of {} or all",
            SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    }
    toolchain::apt_install(&[
        (
            "qemu-system-x86",
            "qemu: `vmtest` boots Debian's 6.1 and 6.12 kernels (TCG) to run the \
             privileged tests on them",
        ),
        (
            "busybox-static",
            "busybox: the shell and tools of the VMs' initramfs",
        ),
    ])?;
    // `--only BINARY` or `--only BINARY:TEST`.
    let (only_binary, only_test) = match only.map(|o| o.split_once(':')) {
        Some(Some((b, t))) => (Some(b), Some(t)),
        Some(None) => (only, None),
        None => (None, None),
    };
    let one_test: &'static [&'static str] = match only_test {
        Some(t) => Box::leak(vec![&*Box::leak(t.to_string().into_boxed_str())].into_boxed_slice()),
        None => &[],
    };
    let suite: Vec<(&str, &[&str])> = SUITE
        .iter()
        .copied()
        .filter(|(b, _)| only_binary.is_none_or(|o| o == *b))
        .map(|(b, args)| (b, if only_test.is_some() { one_test } else { args }))
        .collect();
    if suite.is_empty() {
        bail!(
            "no test binary `{}` in the VM suite: {}",
            only.unwrap_or_default(),
            SUITE.iter().map(|(b, _)| *b).collect::<Vec<_>>().join(", ")
        );
    }
    let tests = build_test_binaries()?;
    let initrd = build_initramfs(&tests, &suite)?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for s in series {
        let (kernel, release) = fetch_kernel(s)?;
        println!("vmtest: booting Linux {release} (qemu, TCG)");
        let started = Instant::now();
        let results = boot(s.name, &kernel, &initrd)?;
        for (binary, ok) in &results {
            if !ok {
                failed.push(format!("{release}: {binary}"));
            }
        }
        let ran: BTreeSet<&str> = results.iter().map(|(b, _)| b.as_str()).collect();
        for (binary, _) in &suite {
            if !ran.contains(binary) {
                failed.push(format!("{release}: {binary} did not run (the VM died?)"));
            }
        }
        summary.push(format!(
            "  Linux {release}: {} of {} test binaries passed in {:.0} s",
            results.iter().filter(|(_, ok)| *ok).count(),
            suite.len(),
            started.elapsed().as_secs_f64()
        ));
    }
    println!("\nvmtest:\n{}", summary.join("\n"));
    if !failed.is_empty() {
        bail!("vmtest failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// The newest Debian package of the series, downloaded and unpacked once
/// into target/vm/kernels/<series>; its vmlinuz and release.
fn fetch_kernel(s: &Series) -> Result<(PathBuf, String)> {
    let dir = vm_dir().join("kernels").join(s.name);
    let vmlinuz = dir.join("vmlinuz");
    let release_file = dir.join("release");
    if vmlinuz.exists()
        && let Ok(release) = std::fs::read_to_string(&release_file)
    {
        return Ok((vmlinuz, release.trim().to_string()));
    }
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", s.package])
        .output()
        .context("apt-cache")?;
    let mut packages: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    packages.sort_by_key(|p| version_key(p));
    let Some(package) = packages.pop() else {
        bail!(
            "no Debian package matches {} (run `apt-get update`; bookworm carries both series)",
            s.package
        );
    };
    println!("vmtest: downloading Debian's {package} (the kernel only, into target/vm)");
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_dir_all(dir.join("deb"));
    toolchain::run(
        Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", &package]),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    toolchain::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("deb")),
    )?;
    let boot = dir.join("deb/boot");
    let image = std::fs::read_dir(&boot)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the package has no /boot/vmlinuz-*")?;
    let release = image
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    std::fs::copy(&image, &vmlinuz)?;
    std::fs::write(&release_file, &release)?;
    let _ = std::fs::remove_dir_all(dir.join("deb"));
    let _ = std::fs::remove_file(&deb);
    Ok((vmlinuz, release))
}

/// Numeric parts of a package name, for "newest".
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Builds the integration tests and returns the executables of those the
/// suite runs, by name.
fn build_test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "--release",
            "-p",
            "tracer-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let name = v["target"]["name"].as_str().unwrap_or_default();
        if let (true, Some(exe)) = (
            SUITE.iter().any(|(b, _)| *b == name),
            v["executable"].as_str(),
        ) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for (b, _) in SUITE {
        if !found.iter().any(|(n, _)| n == b) {
            bail!("cargo built no test binary `{b}`");
        }
    }
    Ok(found)
}

/// Files of the VM's root, by path inside it.
struct Root {
    files: Vec<(String, Vec<u8>, u32)>,
    dirs: BTreeSet<String>,
}

impl Root {
    fn add(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let mut p = Path::new(path);
        while let Some(parent) = p.parent() {
            let s = parent.to_string_lossy().trim_start_matches('/').to_string();
            if s.is_empty() {
                break;
            }
            self.dirs.insert(s);
            p = parent;
        }
        self.files
            .push((path.trim_start_matches('/').to_string(), data, mode));
    }

    /// Without its debug sections (panic messages keep their file:line):
    /// the test binaries are ~50 MB each with them, all unpacked in RAM
    /// under emulation.
    fn add_stripped(
        &mut self,
        inside: &str,
        host: &Path,
        libs: &mut BTreeSet<PathBuf>,
    ) -> Result<()> {
        let stripped = vm_dir()
            .join("stripped")
            .join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(stripped.parent().unwrap())?;
        toolchain::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(host)
                .arg(&stripped),
        )?;
        self.add_elf(inside, &stripped, libs)
    }

    fn add_file(&mut self, inside: &str, host: &Path) -> Result<()> {
        let data = std::fs::read(host).with_context(|| host.display().to_string())?;
        let mode = std::fs::metadata(host)?.permissions().mode() & 0o7777;
        self.add(inside, data, mode);
        Ok(())
    }

    /// `host` and the shared libraries it loads, at their own paths.
    fn add_elf(&mut self, inside: &str, host: &Path, libs: &mut BTreeSet<PathBuf>) -> Result<()> {
        self.add_file(inside, host)?;
        let out = Command::new("ldd").arg(host).output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
        Ok(())
    }

    fn add_tree(&mut self, inside: &str, host: &Path, skip: &[&str]) -> Result<()> {
        for entry in std::fs::read_dir(host)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if skip.contains(&name.as_str()) {
                continue;
            }
            let path = entry.path();
            let inner = format!("{inside}/{name}");
            if path.is_dir() {
                self.add_tree(&inner, &path, skip)?;
            } else if path.is_file() {
                self.add_file(&inner, &path)?;
            }
        }
        Ok(())
    }

    fn write(&self, out: &Path) -> Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
        let mut ino = 1;
        for d in &self.dirs {
            let b = cpio::newc::Builder::new(d).ino(ino).mode(0o040755).nlink(2);
            ino += 1;
            w = b.write(w, 0).finish()?;
        }
        for (path, data, mode) in &self.files {
            let b = cpio::newc::Builder::new(path)
                .ino(ino)
                .mode(0o100000 | mode)
                .nlink(1);
            ino += 1;
            let mut writer = b.write(w, data.len() as u32);
            writer.write_all(data)?;
            w = writer.finish()?;
        }
        let mut w = cpio::newc::trailer(w)?;
        w.flush()?;
        Ok(())
    }
}

/// The VM's init: mounts, cgroup v2 with its memory controller, loopback,
/// then each test binary with the harness's environment, one result line
/// each, and power off.
fn init_script(suite: &[(&str, &[&str])]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "+memory +cpu +pids" > /sys/fs/cgroup/cgroup.subtree_control
ip link set lo up
ulimit -l unlimited
export CI=true HOME=/root PATH=/bin RUST_BACKTRACE=1
export TRACER_BIN=/tracer/bin/tracer TRACER_FIXTURES=/tracer/fixtures TRACER_WORKSPACE=/tracer/workspace
echo "vmtest: up: Linux $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control), PSI: $(head -c 40 /proc/pressure/memory 2>/dev/null || echo none)"
"#,
    );
    for (binary, args) in suite {
        s.push_str(&format!(
            "echo 'vmtest: begin {binary}'\n\
             /tracer/tests/{binary} --test-threads 1 {} {}\n\
             echo \"vmtest: result {binary} $?\"\n",
            if args.contains(&"--ignored") {
                ""
            } else {
                "--exact --include-ignored"
            },
            args.join(" ")
        ));
    }
    s.push_str("echo 'vmtest: done'\npoweroff -f\n");
    s
}

fn build_initramfs(tests: &[(String, PathBuf)], suite: &[(&str, &[&str])]) -> Result<PathBuf> {
    let mut root = Root {
        files: Vec::new(),
        dirs: BTreeSet::new(),
    };
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox-static is not installed")?;
    root.add_file("/bin/busybox", busybox)?;
    root.add("/init", init_script(suite).into_bytes(), 0o755);
    let mut libs = BTreeSet::new();
    root.add_stripped("/tracer/bin/tracer", &crate::tracer_bin(), &mut libs)?;
    for (name, exe) in tests {
        root.add_stripped(&format!("/tracer/tests/{name}"), exe, &mut libs)?;
    }
    for entry in std::fs::read_dir(crate::fixtures_dir())?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_file() {
            root.add_elf(&format!("/tracer/fixtures/{name}"), &path, &mut libs)?;
        }
    }
    // The harness reads the fixtures' sources (their SITE markers) and the
    // JSON Schema from TRACER_WORKSPACE.
    root.add_tree(
        "/tracer/workspace/tests/fixtures",
        &root_path("tests/fixtures"),
        &["build"],
    )?;
    root.add_tree("/tracer/workspace/schema", &root_path("schema"), &[])?;
    for lib in &libs {
        let inside = lib.to_string_lossy().to_string();
        let real = std::fs::canonicalize(lib)?;
        root.add_file(&inside, &real)?;
        // libc6-dbg's symbols, as on the host: frames inside libc have
        // names there, and the tests' stacks end in start_thread/clone.
        if let Some(debug) = debug_file(&real) {
            root.add_file(&debug.to_string_lossy(), &debug)?;
        }
    }
    for d in ["proc", "sys", "dev", "tmp", "root", "run"] {
        root.dirs.insert(d.to_string());
    }
    let out = vm_dir().join("initramfs.cpio");
    std::fs::create_dir_all(vm_dir())?;
    root.write(&out)?;
    println!(
        "vmtest: initramfs {} ({} MiB: tracer, {} test binaries, fixtures, {} libraries)",
        out.display(),
        std::fs::metadata(&out)?.len() >> 20,
        tests.len(),
        libs.len()
    );
    Ok(out)
}

/// The separate debug file of `elf` under /usr/lib/debug/.build-id, if
/// installed.
fn debug_file(elf: &Path) -> Option<PathBuf> {
    let out = Command::new("readelf").arg("-n").arg(elf).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID:"))?
        .trim();
    if id.len() < 3 {
        return None;
    }
    let path = PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    path.exists().then_some(path)
}

fn root_path(rel: &str) -> PathBuf {
    root().join(rel)
}

/// Boots one kernel, streams its console (prefixed, and kept in
/// target/vm/<series>.log), and returns each test binary's result.
fn boot(series: &str, kernel: &Path, initrd: &Path) -> Result<Vec<(String, bool)>> {
    let log_path = vm_dir().join(format!("{series}.log"));
    let mut log = std::fs::File::create(&log_path)?;
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "4096",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 loglevel=1 mitigations=off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + VM_DEADLINE;
    let mut results = Vec::new();
    let mut done = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                writeln!(log, "{line}")?;
                println!("[{series}] {line}");
                if let Some(rest) = line.strip_prefix("vmtest: result ") {
                    let mut it = rest.split_whitespace();
                    let (Some(binary), Some(rc)) = (it.next(), it.next()) else {
                        continue;
                    };
                    results.push((binary.to_string(), rc == "0"));
                }
                if line.starts_with("vmtest: done") {
                    done = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                bail!(
                    "the Linux {series} VM ran past {} min; console in {}",
                    VM_DEADLINE.as_secs() / 60,
                    log_path.display()
                );
            }
        }
    }
    let _ = child.wait();
    if !done {
        println!(
            "vmtest: the Linux {series} VM stopped before its suite ended; console in {}",
            log_path.display()
        );
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_sorts_numerically() {
        let mut v = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v[2], "linux-image-6.1.0-57-cloud-amd64-unsigned");
    }

    #[test]
    fn the_init_runs_every_binary_of_the_suite() {
        let s = init_script(SUITE);
        for (b, _) in SUITE {
            assert!(s.contains(&format!("/tracer/tests/{b} ")), "{b}");
            assert!(s.contains(&format!("vmtest: result {b} $?")), "{b}");
        }
        assert!(s.contains("--ignored"));
    }
}
