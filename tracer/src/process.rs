//! Target process control: the child `tracer run` starts and holds before
//! exec, watching a process for its exit (pidfd), our own child's exit stop
//! (ptrace), and reaping. On `nix` where it covers the call; raw `libc` for
//! what it lacks (pidfd_open, PTRACE_LISTEN) and in the forked child, which
//! may only make async-signal-safe calls.

use std::{
    ffi::CString,
    os::fd::{AsFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use nix::{
    fcntl::OFlag,
    sys::{
        ptrace,
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork, pipe2, read, write},
};
use tokio::io::unix::AsyncFd;

use crate::{error::TracerError, target::Maps};

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

/// Kills `pid` with SIGKILL (never leave a held child behind).
pub fn kill_now(pid: u32) {
    let _ = kill(pid_of(pid), Signal::SIGKILL);
}

/// Waits for our child `pid` and returns (exit code, signal).
pub fn reap(pid: u32) -> (Option<i32>, Option<i32>) {
    loop {
        return match waitpid(pid_of(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
            Ok(WaitStatus::Signaled(_, sig, _)) => (None, Some(sig as i32)),
            Err(nix::errno::Errno::EINTR) => continue,
            _ => (None, None),
        };
    }
}

/// What runs at a watched child's exit stop, with its maps.
pub type ExitHook = Box<dyn FnOnce(&Maps) + Send>;

/// Watches a child we started with ptrace(PTRACE_SEIZE, PTRACE_O_TRACEEXIT |
/// PTRACE_O_TRACEEXEC).
///
/// At the exit stop the child's address space still exists, so its maps can
/// be read: a short-lived command's stacks are then symbolized in the final
/// report although it exited before the first interval.
///
/// After its exec, the child is also stopped once at its entry point (a
/// breakpoint on the ELF entry, put back before it runs): by then the loader
/// has mapped every library, and no code of the program has run. Its maps
/// are handed over ([`Self::at_entry`]) and it waits until the session
/// resumes it ([`Self::resume`]), so the DWARF unwinder knows every mapping
/// before the first allocation of `main`.
///
/// Signals are passed through unchanged; nothing else is traced. ptrace
/// requests must come from the thread that seized, hence the dedicated
/// thread.
pub struct ExitWatcher {
    maps: mpsc::Receiver<Maps>,
    entry: mpsc::Receiver<Maps>,
    resume: mpsc::Sender<()>,
    status: mpsc::Receiver<(Option<i32>, Option<i32>)>,
    pid: u32,
    seized: bool,
}

impl ExitWatcher {
    /// Seizes `pid`; `on_exit` runs at its exit stop with its maps, while
    /// its memory is still readable.
    pub fn start(pid: u32, mut on_exit: Option<ExitHook>) -> Self {
        let (maps_tx, maps) = mpsc::channel();
        let (entry_tx, entry) = mpsc::channel();
        let (resume, resume_rx) = mpsc::channel::<()>();
        let (status_tx, status) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            let p = pid_of(pid);
            let options = ptrace::Options::PTRACE_O_TRACEEXIT | ptrace::Options::PTRACE_O_TRACEEXEC;
            // The entry breakpoint: its address and the word it replaced.
            let mut breakpoint: Option<(u64, libc::c_long)> = None;
            let mut execs = 0;
            if let Err(e) = ptrace::seize(p, options) {
                let _ = ready_tx.send(false);
                log::warn!(
                    "cannot watch pid {pid} for its exit ({e}); stacks first seen after the last \
                     interval may stay unsymbolized"
                );
                return;
            }
            let _ = ready_tx.send(true);
            loop {
                let st = match waitpid(p, Some(WaitPidFlag::__WALL)) {
                    Ok(st) => st,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break,
                };
                match st {
                    WaitStatus::Exited(_, code) => {
                        let _ = status_tx.send((Some(code), None));
                        break;
                    }
                    WaitStatus::Signaled(_, sig, _) => {
                        let _ = status_tx.send((None, Some(sig as i32)));
                        break;
                    }
                    WaitStatus::PtraceEvent(_, _, event) if event == libc::PTRACE_EVENT_EXIT => {
                        if let Ok(m) = Maps::read(pid) {
                            if let Some(hook) = on_exit.take() {
                                hook(&m);
                            }
                            let _ = maps_tx.send(m);
                        }
                        let _ = ptrace::cont(p, None);
                    }
                    WaitStatus::PtraceEvent(_, _, event) if event == libc::PTRACE_EVENT_EXEC => {
                        execs += 1;
                        // The command's own exec only (not a later one of its).
                        if execs == 1 {
                            breakpoint = set_entry_breakpoint(p, pid);
                            if breakpoint.is_none() {
                                log::debug!("pid {pid}: no entry stop; its maps are polled");
                            }
                        }
                        let _ = ptrace::cont(p, None);
                    }
                    WaitStatus::Stopped(_, Signal::SIGTRAP)
                        if breakpoint.is_some_and(|(addr, _)| at_breakpoint(p, addr)) =>
                    {
                        let (addr, word) = breakpoint.take().expect("checked");
                        if clear_breakpoint(p, addr, word).is_err() {
                            // Cannot happen while the child is stopped; if it
                            // does, it must not run the int3.
                            log::error!("pid {pid}: could not remove the entry breakpoint");
                            let _ = kill(p, Signal::SIGKILL);
                            continue;
                        }
                        if let Ok(m) = Maps::read(pid) {
                            let _ = entry_tx.send(m);
                            // Bounded: a session that never answers must not
                            // hold the program forever.
                            let _ = resume_rx.recv_timeout(Duration::from_secs(10));
                        }
                        // The trap was ours: not delivered.
                        let _ = ptrace::cont(p, None);
                    }
                    WaitStatus::PtraceEvent(_, sig, event) if event == libc::PTRACE_EVENT_STOP => {
                        // Group-stop (SIGSTOP, SIGTSTP…): stay stopped like an
                        // untraced process would, without blocking SIGCONT.
                        // nix has no PTRACE_LISTEN.
                        if matches!(
                            sig,
                            Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
                        ) {
                            unsafe {
                                libc::ptrace(libc::PTRACE_LISTEN, p.as_raw(), 0usize, 0usize)
                            };
                        } else {
                            let _ = ptrace::cont(p, None);
                        }
                    }
                    // Signal-delivery stop: deliver the signal unchanged.
                    WaitStatus::Stopped(_, sig) => {
                        let _ = ptrace::cont(p, sig);
                    }
                    WaitStatus::PtraceEvent(..) => {
                        let _ = ptrace::cont(p, None);
                    }
                    _ => {}
                }
            }
        });
        let seized = ready.recv().unwrap_or(false);
        Self {
            maps,
            entry,
            resume,
            status,
            pid,
            seized,
        }
    }

    /// The child's maps at its entry point, once it is stopped there (all
    /// its libraries mapped, none of its code run); None if it did not get
    /// there within `timeout` (exec failed, not seized). Call
    /// [`Self::resume`] after.
    pub fn at_entry(&self, timeout: Duration) -> Option<Maps> {
        if !self.seized {
            return None;
        }
        self.entry.recv_timeout(timeout).ok()
    }

    /// Lets the child run on from its entry point.
    pub fn resume(&self) {
        let _ = self.resume.send(());
    }

    /// The child's maps read at its exit stop, if any.
    pub fn maps_at_exit(&self) -> Option<Maps> {
        self.maps.try_iter().last()
    }

    /// Exit code or signal of the child (reaped by the watcher).
    pub fn status(&self) -> (Option<i32>, Option<i32>) {
        if !self.seized {
            return reap(self.pid);
        }
        self.status
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or((None, None))
    }
}

/// The ELF entry point of stopped process `pid` (AT_ENTRY of its auxv).
fn entry_point(pid: u32) -> Option<u64> {
    const AT_ENTRY: u64 = 9;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).ok()?;
    auxv.chunks_exact(16).find_map(|kv| {
        let key = u64::from_ne_bytes(kv[..8].try_into().ok()?);
        let value = u64::from_ne_bytes(kv[8..].try_into().ok()?);
        (key == AT_ENTRY).then_some(value)
    })
}

/// Puts an int3 on the entry point of stopped tracee `p`; the address and
/// the word it replaced.
fn set_entry_breakpoint(p: Pid, pid: u32) -> Option<(u64, libc::c_long)> {
    let addr = entry_point(pid)?;
    let word = ptrace::read(p, addr as ptrace::AddressType).ok()?;
    let trapped = (word & !0xff) | 0xcc;
    ptrace::write(p, addr as ptrace::AddressType, trapped).ok()?;
    Some((addr, word))
}

/// Whether stopped tracee `p` just executed the int3 at `addr`.
fn at_breakpoint(p: Pid, addr: u64) -> bool {
    ptrace::getregs(p).is_ok_and(|r| r.rip == addr + 1)
}

/// Puts the original word back and the pc on it.
fn clear_breakpoint(p: Pid, addr: u64, word: libc::c_long) -> nix::Result<()> {
    ptrace::write(p, addr as ptrace::AddressType, word)?;
    let mut regs = ptrace::getregs(p)?;
    regs.rip = addr;
    ptrace::setregs(p, regs)
}

/// A pidfd: becomes readable when the process exits (also when it is not our
/// child, and before it is reaped).
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: u32) -> Result<Self, TracerError> {
        // nix has no pidfd_open.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => TracerError::NoSuchProcess(pid),
                _ => TracerError::NotPermitted {
                    pid,
                    reason: format!("pidfd_open: {e}"),
                },
            });
        }
        // SAFETY: a fresh fd returned by pidfd_open, owned by nothing else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Completes when the process has exited.
    pub async fn exited(self) {
        // SAFETY: the OwnedFd is a valid pidfd, moved into the AsyncFd, which
        // closes it on drop; nothing else closes or replaces it.
        match unsafe { AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE) } {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(e) => {
                log::warn!("cannot watch the target for exit: {e}");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Looks a command up like execvp does.
pub fn find_executable(command: &str) -> Result<PathBuf, TracerError> {
    let spawn_err = |reason: &str| TracerError::Spawn {
        command: command.into(),
        reason: reason.into(),
    };
    if command.is_empty() {
        return Err(spawn_err("no command given after `--`"));
    }
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.contains('/') {
        let p = PathBuf::from(command);
        return if is_exec(&p) {
            Ok(std::fs::canonicalize(&p).unwrap_or(p))
        } else {
            Err(spawn_err("no such executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(command))
        .find(|p| is_exec(p))
        .ok_or_else(|| spawn_err("not found in PATH"))
}

/// A forked child that waits, before exec, until the tracer releases it.
pub struct HeldChild {
    pub pid: u32,
    go: Option<OwnedFd>,
    exec_err: OwnedFd,
    command: String,
}

impl HeldChild {
    pub fn fork(exe: &Path, argv: &[String]) -> Result<Self, TracerError> {
        let command = argv.first().cloned().unwrap_or_default();
        let spawn_err = |reason: String| TracerError::Spawn {
            command: command.clone(),
            reason,
        };
        // Everything the child needs is prepared before fork: after it, the
        // child may only make async-signal-safe calls (no allocation).
        let path = CString::new(exe.as_os_str().as_encoded_bytes())
            .map_err(|_| spawn_err("path contains a NUL byte".into()))?;
        let args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| spawn_err("an argument contains a NUL byte".into()))?;
        let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        arg_ptrs.push(std::ptr::null());
        let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.to_string()))?;
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.to_string()))?;
        // SAFETY: the child only reads a pipe, execs and writes a pipe, all
        // async-signal-safe, with memory prepared before the fork.
        match unsafe { fork() }.map_err(|e| spawn_err(e.to_string()))? {
            ForkResult::Child => unsafe {
                let mut b = [0u8];
                if read(go_r.as_fd(), &mut b) != Ok(1) {
                    libc::_exit(127);
                }
                // nix's execv allocates its argument array: not after fork.
                libc::execv(path.as_ptr(), arg_ptrs.as_ptr());
                let errno = *libc::__errno_location();
                let _ = write(err_w.as_fd(), &errno.to_ne_bytes());
                libc::_exit(127);
            },
            ForkResult::Parent { child } => {
                drop(go_r);
                drop(err_w);
                Ok(Self {
                    pid: child.as_raw() as u32,
                    go: Some(go_w),
                    exec_err: err_r,
                    command,
                })
            }
        }
    }

    /// Lets the child exec, and reports an exec failure.
    pub fn release(mut self) -> Result<(), TracerError> {
        if let Some(go) = self.go.take() {
            let _ = write(go.as_fd(), &[1u8]);
        }
        // The error pipe is close-on-exec: EOF means exec succeeded.
        let mut errno = [0u8; 4];
        if read(self.exec_err.as_fd(), &mut errno) == Ok(4) {
            reap(self.pid);
            return Err(TracerError::Spawn {
                command: self.command.clone(),
                reason: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)).to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_commands_like_execvp() {
        assert!(find_executable("sh").unwrap().is_absolute());
        assert!(matches!(
            find_executable("no-such-command-xyz"),
            Err(TracerError::Spawn { .. })
        ));
        assert!(matches!(
            find_executable("/etc/passwd"),
            Err(TracerError::Spawn { .. })
        ));
        assert!(matches!(
            find_executable(""),
            Err(TracerError::Spawn { .. })
        ));
    }

    #[test]
    fn a_held_child_runs_only_when_released_and_exec_errors_come_back() {
        let sh = find_executable("sh").unwrap();
        let child = HeldChild::fork(&sh, &["sh".into(), "-c".into(), "exit 7".into()]).unwrap();
        let pid = child.pid;
        child.release().unwrap();
        assert_eq!(reap(pid), (Some(7), None));
        let bad = HeldChild::fork(Path::new("/nonexistent"), &["x".into()]).unwrap();
        assert!(matches!(bad.release(), Err(TracerError::Spawn { .. })));
    }
}
