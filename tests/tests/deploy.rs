//! The node-agent manifests in `deploy/`: the Kubernetes ones validated
//! against the API's schemas (PyPI's kubernetes-validate, strict), the
//! systemd unit by `systemd-analyze verify`; and both checked for what the
//! tracer needs on a node.

use std::{path::PathBuf, process::Command};

fn deploy(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

#[test]
fn the_daemonset_passes_the_kubernetes_schemas_and_has_what_the_tracer_needs() {
    let tools = std::env::var_os("TRACER_PYTOOLS").expect(
        "TRACER_PYTOOLS: run through `cargo xtask test`, which installs kubernetes-validate",
    );
    let manifest = deploy("kubernetes/tracer-daemonset.yaml");
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            "1.30.0",
        ])
        .arg(&manifest)
        .env("PYTHONPATH", &tools)
        .output()
        .expect("python3");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    for kind in ["namespace", "configmap", "daemonset"] {
        assert!(
            report.contains(&format!("passed for resource {kind}/tracer")),
            "{report}"
        );
    }
    let text = std::fs::read_to_string(&manifest).unwrap();
    for needed in [
        "hostPID: true",
        "\"BPF\"",
        "\"PERFMON\"",
        "\"SYS_PTRACE\"",
        "\"SYS_RESOURCE\"",
        "path: /sys/kernel/tracing",
        "path: /sys/fs/cgroup",
        "path: /sys/kernel/btf",
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/port: \"9464\"",
        "- 0.0.0.0:9464",
        "- --alertmanager",
        "- --cgroup",
    ] {
        assert!(text.contains(needed), "the DaemonSet lacks {needed}");
    }
}

#[test]
fn the_systemd_unit_verifies_and_runs_the_tracer_on_the_services_cgroup() {
    let unit = std::fs::read_to_string(deploy("systemd/tracer@.service")).unwrap();
    assert!(unit.contains("--cgroup /sys/fs/cgroup/system.slice/%i.service"));
    assert!(unit.contains("--alertmanager ${TRACER_ALERTMANAGER}"));
    assert!(unit.contains("CAP_BPF CAP_PERFMON CAP_SYS_PTRACE"));
    // Verified as an instance of a service this machine has, with the
    // tracer built here as its binary.
    let service = ["cron", "ssh", "apt-daily", "e2scrub_reap"]
        .into_iter()
        .find(|s| {
            ["/usr/lib/systemd/system", "/lib/systemd/system"]
                .iter()
                .any(|d| {
                    std::path::Path::new(d)
                        .join(format!("{s}.service"))
                        .exists()
                })
        })
        .expect("a service unit to instantiate tracer@ with");
    let dir = std::env::temp_dir().join(format!("tracer-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("tracer@{service}.service"));
    let bin = std::env::var("TRACER_BIN").unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release/tracer")
            .display()
            .to_string()
    });
    std::fs::write(&file, unit.replace("/usr/local/bin/tracer", &bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&file)
        .output()
        .expect("systemd-analyze (Debian: systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let report =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && report.trim().is_empty(), "{report}");
}
