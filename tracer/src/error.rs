//! Errors of the library, each a sentence a user can act on.

use std::path::PathBuf;

/// Everything that can stop the tracer before or while it attaches.
///
/// Display strings are complete sentences: what is wrong, then what to do.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("no process with pid {0} exists; check the pid (e.g. with `pgrep -a NAME`)")]
    NoSuchProcess(u32),

    #[error(
        "pid {0} is a kernel thread, which has no user-space allocator to trace; pick a user process"
    )]
    KernelThread(u32),

    #[error(
        "pid {0} is a zombie (it exited and its parent has not reaped it); there is nothing left to trace"
    )]
    Zombie(u32),

    #[error(
        "not permitted to trace pid {pid} ({reason}); run the tracer as root (`sudo tracer ...`) \
         or as the process's owner with CAP_SYS_PTRACE"
    )]
    NotPermitted { pid: u32, reason: String },

    #[error(
        "the tracer lacks the privileges to load eBPF programs (missing {missing}); run it as \
         root (`sudo tracer ...`) or grant CAP_BPF and CAP_PERFMON"
    )]
    MissingCapabilities { missing: String },

    #[error(
        "this kernel does not expose BTF type information ({0} is missing); use a kernel built \
         with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(PathBuf),

    #[error(
        "this kernel does not support uprobes ({0} is missing); use a kernel built with \
         CONFIG_UPROBE_EVENTS=y"
    )]
    NoUprobes(PathBuf),

    #[error(
        "Linux {release} is older than {minimum}, the oldest kernel tracer supports (its eBPF \
         programs need bpf_loop, ring buffers and uprobe attach cookies, and {minimum} is the \
         oldest kernel its test suite boots); upgrade the kernel (Debian 12's stock 6.1 works)"
    )]
    KernelTooOld {
        release: String,
        minimum: &'static str,
    },

    #[error(
        "cannot read the binary {path}: {reason}; check that the file exists and is a valid ELF object"
    )]
    UnreadableBinary { path: PathBuf, reason: String },

    #[error(
        "found no allocator in pid {0}: neither its executable nor any library it maps \
         defines malloc; is it statically linked with a stripped symbol table?"
    )]
    NoAllocator(u32),

    #[error("{what}: {reason}")]
    BadCgroup { what: String, reason: String },

    #[error("cgroup {0} has no process to trace (none, or none with an allocator)")]
    EmptyCgroup(String),

    #[error("cannot start `{command}`: {reason}")]
    Spawn { command: String, reason: String },

    #[error("failed to load the eBPF programs into the kernel: {0}")]
    Load(String),

    #[error(
        "the eBPF maps need {} of kernel memory and the tracer itself about 32 MiB, but the \
         tracer's own memory cgroup {} has {} left of its {} limit; {hint}",
        crate::sink::human_bytes(*.need as f64),
        .cgroup.display(),
        crate::sink::human_bytes(*.free as f64),
        crate::sink::human_bytes(*.limit as f64)
    )]
    MapsDoNotFit {
        need: u64,
        free: u64,
        limit: u64,
        cgroup: std::path::PathBuf,
        hint: &'static str,
    },

    #[error(
        "this tracer was built without the eBPF object: run `cargo xtask build` (which builds \
         the kernel side first) and use the binary it makes"
    )]
    NoEbpfObject,

    #[error("failed to attach a uprobe to {function} in {path}: {reason}")]
    Attach {
        function: String,
        path: PathBuf,
        reason: String,
    },

    #[error("failed to read the kernel map {map}: {reason}")]
    MapRead { map: &'static str, reason: String },

    #[error("failed to write the kernel map {map}: {reason}")]
    MapWrite { map: &'static str, reason: String },

    #[error("{path}: {reason}")]
    Recording { path: PathBuf, reason: String },

    #[error(
        "cannot serve metrics on {addr}: {reason}; pick a free address, e.g. \
         --prometheus 127.0.0.1:9464"
    )]
    Listen { addr: String, reason: String },

    #[error("cannot parse /proc/{pid}/maps; is pid {pid} still running?")]
    BadMaps {
        pid: u32,
        #[source]
        source: procfs::ProcError,
    },

    /// Writing the stream or the table failed (a full disk, a closed pipe).
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),

    #[error("cannot write {path}")]
    Export {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot watch for signals")]
    Signals(#[source] std::io::Error),
}

impl TracerError {
    /// Process exit code for this error, documented in the README:
    /// 3 for a bad target or recording, 4 for a missing privilege or kernel feature,
    /// 1 for everything else (2 is clap's usage error).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NoSuchProcess(_)
            | Self::KernelThread(_)
            | Self::Zombie(_)
            | Self::UnreadableBinary { .. }
            | Self::NoAllocator(_)
            | Self::BadCgroup { .. }
            | Self::EmptyCgroup(_)
            | Self::Spawn { .. }
            | Self::BadMaps { .. }
            | Self::Recording { .. } => 3,
            Self::NotPermitted { .. }
            | Self::MissingCapabilities { .. }
            | Self::NoBtf(_)
            | Self::NoUprobes(_)
            | Self::KernelTooOld { .. } => 4,
            Self::Load(_)
            | Self::MapsDoNotFit { .. }
            | Self::NoEbpfObject
            | Self::Attach { .. }
            | Self::MapRead { .. }
            | Self::MapWrite { .. }
            | Self::Listen { .. }
            | Self::Output(_)
            | Self::Export { .. }
            | Self::Signals(_) => 1,
        }
    }
}

/// An error and its causes on one line (`a: b: c`), as `{:#}` of anyhow
/// prints them, for messages that carry an error inside the library.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_kept_and_shown_in_order() {
        let e = TracerError::Export {
            path: "/x/p.pb.gz".into(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full"),
        };
        assert_eq!(chain(&e), "cannot write /x/p.pb.gz: disk full");
        assert_eq!(e.exit_code(), 1);
        let io = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let e: TracerError = io.into();
        let src = std::error::Error::source(&e).unwrap();
        assert_eq!(
            src.downcast_ref::<std::io::Error>().unwrap().kind(),
            std::io::ErrorKind::BrokenPipe
        );
    }
}
