//! Stage 1 for a whole container: a cgroup directory (v1 or v2), or a
//! container id resolved to its cgroup, and the processes in it.

use std::path::{Path, PathBuf};

use crate::{alert::memlimit, error::TracerError};

/// A cgroup the tracer traces every process of.
#[derive(Clone, Debug)]
pub struct Cgroup {
    /// Its directory (under a v1 hierarchy or the v2 mount).
    pub dir: PathBuf,
}

impl Cgroup {
    /// The cgroup at `dir`: a directory with a `cgroup.procs` file.
    pub fn at(dir: &Path) -> Result<Self, TracerError> {
        let bad = |reason: &str| TracerError::BadCgroup {
            what: dir.display().to_string(),
            reason: reason.into(),
        };
        if !dir.is_dir() {
            return Err(bad("no such directory; give a cgroup directory such as \
                 /sys/fs/cgroup/system.slice/nginx.service or \
                 /sys/fs/cgroup/memory/docker/ID"));
        }
        if !dir.join("cgroup.procs").exists() {
            return Err(bad("not a cgroup directory (it has no cgroup.procs)"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The cgroup of the container `id` (a full id or a prefix of at least
    /// 12 characters, as `docker ps` shows it): the cgroup of a process
    /// whose cgroup path names it, in the memory hierarchy (v1) or the
    /// unified one (v2).
    pub fn of_container(id: &str) -> Result<Self, TracerError> {
        let bad = |reason: String| TracerError::BadCgroup {
            what: format!("container {id}"),
            reason,
        };
        if id.len() < 12 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad(
                "a container id has at least 12 letters and digits (docker ps, crictl ps)".into(),
            ));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = std::fs::read_dir("/proc")
            .map_err(|e| bad(format!("/proc: {e}")))?
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
            .find_map(|e| {
                let cgroups = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
                container_dir(&cgroups, &mounts, id)
            })
            .ok_or_else(|| {
                bad("no process runs in a cgroup naming it (is the container running, on this host?)"
                    .into())
            })?;
        Self::at(&dir)
    }

    /// Every process in the cgroup and its descendants (a pod's processes
    /// sit in its containers' cgroups).
    pub fn processes(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(d) = dirs.pop() {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if let Ok(entries) = std::fs::read_dir(&d) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Where its memory limit is read: the cgroup itself when it is a
    /// memory cgroup, else the memory cgroup of `member`.
    pub fn memory_source(&self, member: u32) -> memlimit::Source {
        if self.dir.join("memory.limit_in_bytes").exists() {
            return memlimit::Source::V1 {
                dir: self.dir.clone(),
            };
        }
        if self.dir.join("memory.max").exists() {
            let mount = self
                .dir
                .ancestors()
                .filter(|a| a.join("cgroup.controllers").exists())
                .last()
                .unwrap_or(&self.dir)
                .to_path_buf();
            return memlimit::Source::V2 {
                dir: self.dir.clone(),
                mount,
            };
        }
        memlimit::Source::of_pid(member)
    }

    /// How the cgroup is named in output: its directory.
    pub fn name(&self) -> String {
        self.dir.display().to_string()
    }
}

/// The directory of the cgroup, among a process's (`/proc/PID/cgroup`)
/// whose path names container `id`: in the v1 memory hierarchy if there is
/// one, else the v2 one.
fn container_dir(cgroups: &str, mountinfo: &str, id: &str) -> Option<PathBuf> {
    let (mut v1_memory, mut v2) = (None, None);
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4).unwrap_or("");
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let opts = r.nth(1).unwrap_or("");
        if fstype == "cgroup" && opts.split(',').any(|o| o == "memory") {
            v1_memory = Some(mount_point.to_string());
        } else if fstype == "cgroup2" {
            v2 = Some(mount_point.to_string());
        }
    }
    let mut found = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(hier), Some(controllers), Some(path)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !path.contains(id) {
            continue;
        }
        // The container's own cgroup: its path up to the component naming it.
        let upto: PathBuf = Path::new(path)
            .components()
            .scan(false, |done, c| {
                if *done {
                    return None;
                }
                *done = c.as_os_str().to_string_lossy().contains(id);
                Some(c)
            })
            .collect();
        let rel = upto.strip_prefix("/").unwrap_or(&upto).to_path_buf();
        if controllers.split(',').any(|c| c == "memory")
            && let Some(m) = &v1_memory
        {
            return Some(Path::new(m).join(rel));
        }
        if hier == "0"
            && controllers.is_empty()
            && let Some(m) = &v2
        {
            found = Some(Path::new(m).join(rel));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
35 25 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn a_container_id_names_its_cgroup() {
        let id = "4f1c2a9be3d05f6e";
        let cgroups = format!(
            "12:memory:/docker/{id}4f1c2a9be3d05f6e4f1c2a9be3d05f6e4f1c2a9be3d0/sub\n\
             0::/system.slice/docker-{id}.scope\n"
        );
        assert_eq!(
            container_dir(&cgroups, MOUNTS, id),
            Some(PathBuf::from(format!(
                "/sys/fs/cgroup/memory/docker/{id}4f1c2a9be3d05f6e4f1c2a9be3d05f6e4f1c2a9be3d0"
            )))
        );
        let v2_only = format!("0::/system.slice/docker-{id}.scope\n");
        assert_eq!(
            container_dir(&v2_only, MOUNTS, id),
            Some(PathBuf::from(format!(
                "/sys/fs/cgroup/unified/system.slice/docker-{id}.scope"
            )))
        );
        assert_eq!(container_dir("0::/user.slice\n", MOUNTS, id), None);
    }

    #[test]
    fn bad_cgroups_and_ids_are_refused() {
        assert!(Cgroup::at(Path::new("/nonexistent/cgroup")).is_err());
        assert!(Cgroup::at(Path::new("/proc")).is_err());
        assert!(Cgroup::of_container("abc").is_err());
        assert!(Cgroup::of_container("zzzzzzzzzzzzzzzzzzzz").is_err());
    }
}
