//! How close the target is to being OOM-killed: its memory cgroup (v2 or v1)
//! or, without a cgroup limit, the whole system.
//!
//! Usage is counted as the kernel's OOM decision sees it: what the cgroup is
//! charged minus the page cache it can reclaim first (inactive file pages) —
//! the "working set" — not only what the tracer saw allocated.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// Values above this are "no limit" (v1 writes PAGE_COUNTER_MAX * page size).
const UNLIMITED: u64 = 1 << 60;

pub use crate::schema::{MemoryState, Scope};

/// Where a process's memory limit lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Cgroup v2 directory, with its ancestors up to the mount (the tightest
    /// limit on the path applies).
    V2 {
        dir: PathBuf,
        mount: PathBuf,
    },
    /// Cgroup v1 memory directory (hierarchical_memory_limit covers ancestors).
    V1 {
        dir: PathBuf,
    },
    System,
}

impl Source {
    /// Finds the memory cgroup of `pid` from /proc/PID/cgroup and our mounts.
    pub fn of_pid(pid: u32) -> Self {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Self::resolve(&cgroups, &mounts, Path::new("/"))
    }

    /// Resolves from the texts of /proc/PID/cgroup and /proc/self/mountinfo,
    /// with paths under `root` (tests point it at recorded files).
    pub fn resolve(cgroups: &str, mountinfo: &str, root: &Path) -> Self {
        let (mut v1_mount, mut v2_mount) = (None, None);
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).unwrap_or("");
            let mut r = right.split_whitespace();
            let fstype = r.next().unwrap_or("");
            let opts = r.nth(1).unwrap_or("");
            if fstype == "cgroup" && opts.split(',').any(|o| o == "memory") {
                v1_mount = Some(mount_point.to_string());
            } else if fstype == "cgroup2" {
                v2_mount = Some(mount_point.to_string());
            }
        }
        let under = |mount: &str, rel: &str| {
            root.join(mount.trim_start_matches('/'))
                .join(rel.trim_start_matches('/'))
        };
        for line in cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (id, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(id), Some(controllers), Some(path)) = (id, controllers, path) else {
                continue;
            };
            if id == "0"
                && controllers.is_empty()
                && let Some(m) = &v2_mount
            {
                let dir = under(m, path);
                // cgroup2 is mounted, but is the memory controller on it?
                if dir.join("memory.max").exists() || dir.join("memory.current").exists() {
                    return Source::V2 {
                        dir,
                        mount: under(m, "/"),
                    };
                }
            }
            if controllers.split(',').any(|c| c == "memory")
                && let Some(m) = &v1_mount
            {
                let dir = under(m, path);
                if dir.join("memory.usage_in_bytes").exists() {
                    return Source::V1 { dir };
                }
            }
        }
        Source::System
    }

    /// Reads usage and limit now.
    pub fn read(&self) -> std::io::Result<MemoryState> {
        let cgroup = match self {
            Source::V2 { dir, mount } => read_v2(dir, mount)?,
            Source::V1 { dir } => read_v1(dir)?,
            Source::System => return read_system(Path::new("/proc/meminfo")),
        };
        if cgroup.limit_bytes.is_some() {
            return Ok(cgroup);
        }
        Ok(unlimited_cgroup(
            cgroup,
            read_system(Path::new("/proc/meminfo"))?,
        ))
    }
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    s.trim()
        .parse()
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

/// `key value` lines (memory.stat, memory.events, oom_control).
fn keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?, it.next()?.parse().ok()?))
        })
        .collect()
}

/// `some avg10=1.23 ...` from a PSI file.
fn psi_some_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()
}

fn v2_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        v => v.parse().ok().filter(|&n| n < UNLIMITED),
    }
}

fn read_v2(dir: &Path, mount: &Path) -> std::io::Result<MemoryState> {
    let current = read_u64(&dir.join("memory.current"))?;
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let inactive_file = keyed(&stat).get("inactive_file").copied().unwrap_or(0);
    // The tightest memory.max / memory.high from here up to the mount.
    let (mut limit, mut high) = (None::<u64>, None::<u64>);
    let mut d = dir.to_path_buf();
    loop {
        if let Ok(t) = std::fs::read_to_string(d.join("memory.max"))
            && let Some(v) = v2_limit(&t)
        {
            limit = Some(limit.map_or(v, |l| l.min(v)));
        }
        if let Ok(t) = std::fs::read_to_string(d.join("memory.high"))
            && let Some(v) = v2_limit(&t)
        {
            high = Some(high.map_or(v, |h| h.min(v)));
        }
        if d == mount || !d.pop() || !d.starts_with(mount) {
            break;
        }
    }
    let events = std::fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
    let pressure = std::fs::read_to_string(dir.join("memory.pressure")).unwrap_or_default();
    Ok(MemoryState {
        scope: Scope::CgroupV2,
        cgroup: Some(dir.to_path_buf()),
        usage_bytes: current.saturating_sub(inactive_file),
        limit_bytes: limit,
        high_bytes: high,
        high_events: keyed(&events).get("high").copied(),
        oom_kills: keyed(&events).get("oom_kill").copied(),
        pressure_some_avg10: psi_some_avg10(&pressure),
    })
}

fn read_v1(dir: &Path) -> std::io::Result<MemoryState> {
    let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
    let stat_text = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let stat = keyed(&stat_text);
    let inactive_file = stat
        .get("total_inactive_file")
        .or(stat.get("inactive_file"))
        .copied()
        .unwrap_or(0);
    // hierarchical_memory_limit is the tightest limit of this group and its
    // ancestors.
    let limit = stat
        .get("hierarchical_memory_limit")
        .copied()
        .or_else(|| read_u64(&dir.join("memory.limit_in_bytes")).ok())
        .filter(|&l| l < UNLIMITED);
    let oom = std::fs::read_to_string(dir.join("memory.oom_control")).unwrap_or_default();
    let pressure = std::fs::read_to_string(dir.join("memory.pressure")).unwrap_or_default();
    Ok(MemoryState {
        scope: Scope::CgroupV1,
        cgroup: Some(dir.to_path_buf()),
        usage_bytes: usage.saturating_sub(inactive_file),
        limit_bytes: limit,
        high_bytes: None,
        high_events: None,
        oom_kills: keyed(&oom).get("oom_kill").copied(),
        pressure_some_avg10: psi_some_avg10(&pressure),
    })
}

/// A cgroup without a limit is bounded by the system: the global OOM killer
/// fires when the machine runs out, so the machine's usage and size are what
/// count. The cgroup's own kill counter and pressure are kept.
fn unlimited_cgroup(cgroup: MemoryState, system: MemoryState) -> MemoryState {
    MemoryState {
        oom_kills: cgroup.oom_kills,
        high_bytes: cgroup.high_bytes,
        high_events: cgroup.high_events,
        pressure_some_avg10: cgroup.pressure_some_avg10.or(system.pressure_some_avg10),
        cgroup: cgroup.cgroup,
        ..system
    }
}

/// The system as a whole: usage = MemTotal - MemAvailable (+ swap in use),
/// limit = MemTotal + SwapTotal.
pub fn read_system(meminfo: &Path) -> std::io::Result<MemoryState> {
    let text = std::fs::read_to_string(meminfo)?;
    let kb = |k: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let (total, available) = (kb("MemTotal"), kb("MemAvailable"));
    let (swap_total, swap_free) = (kb("SwapTotal"), kb("SwapFree"));
    let pressure = std::fs::read_to_string("/proc/pressure/memory").unwrap_or_default();
    Ok(MemoryState {
        scope: Scope::System,
        cgroup: None,
        usage_bytes: total.saturating_sub(available) + swap_total.saturating_sub(swap_free),
        limit_bytes: Some(total + swap_total),
        high_bytes: None,
        high_events: None,
        oom_kills: None,
        pressure_some_avg10: psi_some_avg10(&pressure),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tracer-memlimit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v2_with_ancestor_limits_and_psi() {
        let root = tmp("v2");
        let base = root.join("sys/fs/cgroup/unified");
        let svc = base.join("system.slice/app.service");
        // Recorded from a v2 host: the parent slice is tighter on memory.max.
        write(&base.join("system.slice"), "memory.max", "67108864\n");
        write(&base.join("system.slice"), "memory.high", "max\n");
        write(&svc, "memory.max", "134217728\n");
        write(&svc, "memory.high", "100663296\n");
        write(&svc, "memory.current", "52428800\n");
        write(
            &svc,
            "memory.stat",
            "anon 41943040\nfile 10485760\ninactive_file 4194304\nactive_file 6291456\n",
        );
        write(
            &svc,
            "memory.events",
            "low 0\nhigh 12\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        write(
            &svc,
            "memory.pressure",
            "some avg10=2.50 avg60=1.00 avg300=0.20 total=12345\nfull avg10=0.10 avg60=0.00 avg300=0.00 total=100\n",
        );
        let src = Source::resolve("0::/system.slice/app.service\n", MOUNTS, &root);
        assert_eq!(
            src,
            Source::V2 {
                dir: svc.clone(),
                mount: base.clone()
            }
        );
        let st = src.read().unwrap();
        assert_eq!(st.scope, Scope::CgroupV2);
        assert_eq!(st.usage_bytes, 52428800 - 4194304);
        assert_eq!(
            st.limit_bytes,
            Some(67108864),
            "the parent's limit is tighter"
        );
        assert_eq!(st.high_bytes, Some(100663296));
        assert_eq!(st.high_events, Some(12));
        assert_eq!(st.oom_kills, Some(1));
        assert_eq!(st.pressure_some_avg10, Some(2.5));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn v2_unlimited() {
        let root = tmp("v2max");
        let svc = root.join("sys/fs/cgroup/unified/a");
        write(&svc, "memory.max", "max\n");
        write(&svc, "memory.current", "1000\n");
        let src = Source::resolve("0::/a\n", MOUNTS, &root);
        let Source::V2 { dir, mount } = &src else {
            panic!("{src:?}")
        };
        let st = read_v2(dir, mount).unwrap();
        assert_eq!(st.limit_bytes, None);
        assert_eq!(st.usage_bytes, 1000);
        // Read as a whole, the machine bounds it.
        let bounded = src.read().unwrap();
        assert_eq!(bounded.scope, Scope::System);
        assert!(bounded.limit_bytes.is_some());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn v1_when_v2_has_no_memory_controller() {
        let root = tmp("v1");
        // cgroup2 is mounted but without memory files: v1 applies.
        std::fs::create_dir_all(root.join("sys/fs/cgroup/unified")).unwrap();
        let grp = root.join("sys/fs/cgroup/memory/t");
        write(&grp, "memory.usage_in_bytes", "60000000\n");
        write(&grp, "memory.limit_in_bytes", "67108864\n");
        write(
            &grp,
            "memory.stat",
            "cache 8000000\nrss 52000000\nhierarchical_memory_limit 67108864\ntotal_inactive_file 2000000\n",
        );
        write(
            &grp,
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        let cg = "4:memory:/t\n0::/\n";
        let src = Source::resolve(cg, MOUNTS, &root);
        assert_eq!(src, Source::V1 { dir: grp.clone() });
        let st = src.read().unwrap();
        assert_eq!(st.usage_bytes, 58000000);
        assert_eq!(st.limit_bytes, Some(67108864));
        assert_eq!(st.oom_kills, Some(2));
        write(
            &grp,
            "memory.stat",
            "hierarchical_memory_limit 9223372036854771712\n",
        );
        write(&grp, "memory.limit_in_bytes", "9223372036854771712\n");
        let unlimited = read_v1(&grp).unwrap();
        assert_eq!(unlimited.limit_bytes, None, "v1 'unlimited'");
        // The system bounds an unlimited cgroup.
        let sys_dir = tmp("sys-bound");
        write(
            &sys_dir,
            "meminfo",
            "MemTotal: 1000 kB\nMemAvailable: 400 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
        );
        let sys = read_system(&sys_dir.join("meminfo")).unwrap();
        let st = unlimited_cgroup(unlimited, sys);
        assert_eq!(st.scope, Scope::System);
        assert_eq!(st.limit_bytes, Some(1000 * 1024));
        assert_eq!(st.usage_bytes, 600 * 1024);
        assert_eq!(st.oom_kills, Some(2), "the cgroup's kill counter is kept");
        assert_eq!(st.cgroup.as_deref(), Some(grp.as_path()));
        std::fs::remove_dir_all(sys_dir).unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn system_from_meminfo() {
        let root = tmp("sys");
        write(
            &root,
            "meminfo",
            "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\nSwapTotal:       200 kB\nSwapFree:        150 kB\n",
        );
        let st = read_system(&root.join("meminfo")).unwrap();
        assert_eq!(st.usage_bytes, (600 + 50) * 1024);
        assert_eq!(st.limit_bytes, Some(1200 * 1024));
        assert_eq!(Source::resolve("", MOUNTS, &root), Source::System);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn own_process_resolves() {
        // Whatever this machine has, reading it works.
        let st = Source::of_pid(std::process::id()).read().unwrap();
        assert!(st.usage_bytes > 0);
    }
}
