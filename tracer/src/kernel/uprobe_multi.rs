//! Uprobes in batches: one `uprobe_multi` link (Linux 6.6+) per program and
//! file instead of one perf event per probe.
//!
//! Detaching a perf-event uprobe waits for an RCU grace period of its own,
//! ~100 ms; a target with 40 probes kept paying for them for seconds after
//! Ctrl-C. A multi link unregisters all its probes and then waits once.
//!
//! Uprobe sessions (Linux 6.13+) are multi links too: one probe runs a
//! program at a function's entry and, only if that run returned 0, again at
//! the function's return. Sampling needs exactly that. A classic uretprobe
//! traps at every return, whether or not the call was sampled; a session
//! skips the return trap of every call sampling leaves out, the dearest part
//! of such a call.
//!
//! aya 0.14 can neither load a program for these links (it needs the
//! expected attach type `BPF_TRACE_UPROBE_MULTI` or `..._SESSION`) nor
//! create them, so this module does both with bpf(2): the program comes
//! from the same object aya loaded, relocated against the maps aya created,
//! so both sides share every map.

use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use aya::{Ebpf, maps::Map};

use super::KernelError;
use tracer_common::Program;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` of Linux 6.6+ and 6.13+ (newer than aya's
/// bindings).
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_TRACE_UPROBE_SESSION: u32 = 57;
/// `link_create.uprobe_multi.flags`: run at the function's return.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// How a [`MultiProgram`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultiKind {
    /// At the probed instruction (a uprobe).
    Entry,
    /// At the probed function's return (a uretprobe).
    Return,
    /// At entry, and at return when the entry run returned 0.
    Session,
}

impl MultiKind {
    fn attach_type(self) -> u32 {
        match self {
            Self::Entry | Self::Return => BPF_TRACE_UPROBE_MULTI,
            Self::Session => BPF_TRACE_UPROBE_SESSION,
        }
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to the fields we set.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    _attach_btf_id: u32,
}

/// `union bpf_attr` for BPF_BTF_LOAD.
#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE of a uprobe_multi link.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of its size;
    // the kernel zero-extends the rest.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Run time (ns) and run count of program `fd`, as the kernel counts them
/// while run-time statistics are on (`BPF_ENABLE_STATS`).
pub fn run_stats(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    // SAFETY: plain data, all zeroes valid.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: `attr` points at `info`, of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((info.run_time_ns, info.run_cnt))
}

/// The file descriptor behind an aya map, for the kinds the tracer uses.
fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::StackTraceMap(d)
        | Map::RingBuf(d)
        | Map::PerfEventArray(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// A program loaded for `uprobe_multi` links.
pub struct MultiProgram {
    fd: OwnedFd,
    kind: MultiKind,
}

impl MultiProgram {
    /// Loads `program` of `object` to run as `kind`, its maps those aya
    /// created in `ebpf` (call before any map is taken out of it). An error
    /// says why (e.g. EINVAL: a kernel before 6.6, or 6.13 for sessions).
    pub fn load(
        object: &[u8],
        program: Program,
        kind: MultiKind,
        ebpf: &Ebpf,
    ) -> Result<Self, KernelError> {
        let name = program.name();
        let mut obj = aya_obj::Object::parse(object).map_err(KernelError::Object)?;
        // The verifier wants the program's BTF and function info for
        // callbacks (bpf_loop): load the object's BTF as aya does.
        let btf = match aya::features().btf() {
            Some(features) => obj
                .fixup_and_sanitize_btf(features)
                .ok()
                .flatten()
                .map(|btf| btf.to_bytes()),
            None => None,
        };
        let btf_fd = match &btf {
            Some(bytes) => {
                let mut attr = BtfLoadAttr {
                    btf: bytes.as_ptr() as u64,
                    btf_size: bytes.len() as u32,
                    ..Default::default()
                };
                Some(
                    bpf(BPF_BTF_LOAD, &mut attr).map_err(|source| KernelError::Syscall {
                        program: "BTF",
                        source,
                    })?,
                )
            }
            None => None,
        };
        let defs = obj.maps.clone();
        let maps: Vec<(String, RawFd, aya_obj::Map)> = ebpf
            .maps()
            .filter_map(|(n, m)| Some((n.to_string(), map_fd(m)?, defs.get(n)?.clone())))
            .collect();
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        obj.relocate_maps(
            maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
            &text_sections,
        )
        .map_err(KernelError::Relocate)?;
        obj.relocate_calls(&text_sections)
            .map_err(KernelError::Relocate)?;
        let prog = obj
            .programs
            .get(name)
            .ok_or(KernelError::MissingProgram(name))?;
        let function = &obj.functions[&prog.function_key()];
        let insns = &function.instructions;
        let func_info = function.func_info.func_info_bytes();
        let line_info = function.line_info.line_info_bytes();
        let license = CString::new(obj.license.as_bytes()).map_err(|_| KernelError::License)?;
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: kind.attach_type(),
            ..Default::default()
        };
        if let Some(fd) = &btf_fd {
            attr.prog_btf_fd = fd.as_raw_fd() as u32;
            if function.func_info_rec_size > 0 {
                attr.func_info_rec_size = function.func_info_rec_size as u32;
                attr.func_info = func_info.as_ptr() as u64;
                attr.func_info_cnt = function.func_info.len() as u32;
            }
            if function.line_info_rec_size > 0 {
                attr.line_info_rec_size = function.line_info_rec_size as u32;
                attr.line_info = line_info.as_ptr() as u64;
                attr.line_info_cnt = function.line_info.len() as u32;
            }
        }
        match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => Self { fd, kind }.probed(),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                // The verifier refused: load again for its log.
                let mut log = vec![0u8; 1 << 20];
                attr.log_level = 1;
                attr.log_size = log.len() as u32;
                attr.log_buf = log.as_mut_ptr() as u64;
                let _ = bpf(BPF_PROG_LOAD, &mut attr);
                let text = String::from_utf8_lossy(&log);
                let tail: Vec<&str> = text.trim_end_matches('\0').lines().rev().take(8).collect();
                Err(KernelError::Verifier {
                    program: name,
                    log: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
                    source: e,
                })
            }
            Err(source) => Err(KernelError::Syscall {
                program: name,
                source,
            }),
        }
    }

    /// Whether the kernel can link the program: kernels that predate the
    /// link type may still load a program that names it as its expected
    /// attach type (Linux 6.1 does, then refuses every link with EINVAL).
    /// As libbpf probes it: a link on "/", not a regular file, fails with
    /// EBADF where the link type exists.
    fn probed(self) -> Result<Self, KernelError> {
        match self.attach(Path::new("/"), &[0], &[0], 0) {
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(self),
            // Created after all: nothing to doubt (closed at once).
            Ok(_) => Ok(self),
            Err(e) => Err(KernelError::LinkUnsupported(
                match self.kind {
                    MultiKind::Session => "uprobe session",
                    MultiKind::Entry | MultiKind::Return => "uprobe_multi",
                },
                e,
            )),
        }
    }

    /// How the program runs.
    pub fn kind(&self) -> MultiKind {
        self.kind
    }

    /// See [`run_stats`].
    pub fn run_stats(&self) -> std::io::Result<(u64, u64)> {
        run_stats(self.fd.as_fd())
    }

    /// Attaches the program to `offsets` of `path` (file offsets), each with
    /// its cookie, in process `pid` only. The link lives as long as the fd.
    pub fn attach(
        &self,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        pid: u32,
    ) -> std::io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            attach_type: self.kind.attach_type(),
            path: c_path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cookies: cookies.as_ptr() as u64,
            cnt: offsets.len().min(cookies.len()) as u32,
            multi_flags: if self.kind == MultiKind::Return {
                BPF_F_UPROBE_MULTI_RETURN
            } else {
                0
            },
            pid,
            ..Default::default()
        };
        bpf(BPF_LINK_CREATE, &mut attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        // Offsets of union bpf_attr's fields in include/uapi/linux/bpf.h.
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, path), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, cookies), 40);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, cnt), 48);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, pid), 56);
    }
}
