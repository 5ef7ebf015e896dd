//! The target's memory as the readers of its Go runtime see it: the
//! goroutine list ([`super::census`]), the timer heaps ([`super::timers`])
//! and the memory profile ([`super::runtime`]) read through
//! [`TargetMemory`], so that a buffer can stand in for a process. Everything
//! they read is the target's to forge (or to tear mid-update): tests and
//! fuzzing drive them over made-up memory.

use std::io;

/// Memory of another address space, read at its addresses.
pub trait TargetMemory {
    /// Fills every buffer with the bytes at its address: an error unless
    /// every byte of every part came.
    fn read_exact(&self, parts: &mut [(u64, &mut [u8])]) -> io::Result<()>;

    /// `len` bytes at `addr`.
    fn read_vec(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.read_exact(&mut [(addr, &mut b[..])])?;
        Ok(b)
    }

    /// The little-endian word at `addr`.
    fn read_u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut [(addr, &mut b[..])])?;
        Ok(u64::from_le_bytes(b))
    }
}

/// A live process's memory, read with `process_vm_readv` (every part in
/// one call: a batch of goroutines costs one system call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMemory(pub u32);

impl TargetMemory for ProcessMemory {
    fn read_exact(&self, parts: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        let want: usize = parts.iter().map(|(_, b)| b.len()).sum();
        let local: Vec<libc::iovec> = parts
            .iter_mut()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let remote: Vec<libc::iovec> = parts
            .iter()
            .map(|(a, b)| libc::iovec {
                iov_base: *a as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the local iovecs point into live buffers of their lengths;
        // the remote ones are only read by the kernel, in the other process.
        let n = unsafe {
            libc::process_vm_readv(
                self.0 as libc::pid_t,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != want {
            return Err(io::Error::other("short read"));
        }
        Ok(())
    }
}

/// `/proc/PID/mem`, opened: one positioned read per part.
impl TargetMemory for std::fs::File {
    fn read_exact(&self, parts: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        for (addr, b) in parts.iter_mut() {
            self.read_exact_at(b, *addr)?;
        }
        Ok(())
    }
}

/// Memory made of byte buffers placed at addresses, standing in for a
/// process in tests and fuzzing. A read must fall inside one buffer, as a
/// read of a process must fall inside its mappings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BufferMemory {
    regions: Vec<(u64, Vec<u8>)>,
}

impl BufferMemory {
    /// No memory at all: every read fails.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` at `addr`.
    pub fn with(mut self, addr: u64, bytes: Vec<u8>) -> Self {
        self.regions.push((addr, bytes));
        self
    }

    /// The buffers and their addresses.
    pub fn regions(&self) -> &[(u64, Vec<u8>)] {
        &self.regions
    }

    fn slice(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.regions.iter().find_map(|(base, bytes)| {
            let start = usize::try_from(addr.checked_sub(*base)?).ok()?;
            bytes.get(start..start.checked_add(len)?)
        })
    }
}

impl TargetMemory for BufferMemory {
    fn read_exact(&self, parts: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (addr, b) in parts.iter_mut() {
            let src = self
                .slice(*addr, b.len())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
            b.copy_from_slice(src);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_read_like_mappings() {
        let mem = BufferMemory::new()
            .with(0x1000, (0u8..16).collect())
            .with(u64::MAX - 3, vec![9; 4]);
        assert_eq!(mem.read_vec(0x1004, 4).unwrap(), [4, 5, 6, 7]);
        assert_eq!(
            mem.read_u64(0x1008).unwrap(),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15])
        );
        assert!(mem.read_vec(0x100c, 8).is_err(), "past the end");
        assert!(mem.read_vec(0xfff, 2).is_err(), "before the start");
        assert_eq!(mem.read_vec(u64::MAX - 3, 4).unwrap(), [9; 4]);
        assert!(mem.read_vec(u64::MAX - 1, 4).is_err(), "wraps around");
        let mut a = [0u8; 2];
        let mut b = [0u8; 2];
        assert!(
            mem.read_exact(&mut [(0x1000, &mut a[..]), (0x5000, &mut b[..])])
                .is_err(),
            "one part unreadable fails the read"
        );
    }

    #[test]
    fn this_process_reads_itself() {
        let x = 0x1122_3344_5566_7788u64;
        let mem = ProcessMemory(std::process::id());
        assert_eq!(mem.read_u64(std::ptr::addr_of!(x) as u64).unwrap(), x);
        assert!(mem.read_u64(8).is_err(), "the zero page");
    }
}
