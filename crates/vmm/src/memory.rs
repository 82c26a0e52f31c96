//! Guest memory: one memfd mapped `MAP_SHARED` at GPA 0, so another process (a transport, or
//! the next VMM during a live upgrade) can map the same pages.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use rustix::fs::MemfdFlags;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::{VmmError, PAGE_SIZE};

/// One contiguous range of guest physical memory and where it lives on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// First guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the mapping in this process (valid while the `Vm` lives).
    pub host_addr: usize,
    /// The memfd backing the region (owned by the `Vm`; dup it to keep it).
    pub fd: RawFd,
    /// Offset of `guest_addr` in `fd`.
    pub fd_offset: u64,
}

/// A memfd-backed, shared mapping of the whole guest memory.
pub(crate) struct GuestMemory {
    fd: OwnedFd,
    ptr: *mut u8,
    size: u64,
}

// SAFETY: the mapping is plain shared memory that lives as long as `GuestMemory`; concurrent
// access from several threads is the same as a guest's vCPUs touching it, and every accessor
// bounds-checks and uses volatile-free byte copies on `&self`.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates a zero-filled memfd of `size` bytes and maps it.
    pub(crate) fn new(size: u64) -> Result<Self, VmmError> {
        let fd = rustix::fs::memfd_create(c"fastmig-guest", MemfdFlags::CLOEXEC)
            .map_err(VmmError::memory("memfd_create"))?;
        rustix::fs::ftruncate(&fd, size).map_err(VmmError::memory("ftruncate memfd"))?;
        Self::map(fd, size)
    }

    /// Adopts an existing memory fd (at least `size` bytes); its contents are left untouched.
    pub(crate) fn from_fd(fd: OwnedFd, size: u64) -> Result<Self, VmmError> {
        let st = rustix::fs::fstat(&fd).map_err(VmmError::memory("fstat memory fd"))?;
        let fd_size = u64::try_from(st.st_size).unwrap_or(0);
        if fd_size < size {
            return Err(VmmError::InvalidConfig(ConfigError::MemoryFdTooSmall {
                fd_size,
                mem_size: size,
            }));
        }
        Self::map(fd, size)
    }

    fn map(fd: OwnedFd, size: u64) -> Result<Self, VmmError> {
        // SAFETY: mapping a fresh range (addr = NULL, so nothing existing is replaced) of a
        // valid fd that is at least `size` bytes long; unmapped only in `Drop`.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                size as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                &fd,
                0,
            )
        }
        .map_err(VmmError::memory("mmap guest memory"))?;
        Ok(GuestMemory {
            fd,
            ptr: ptr.cast(),
            size,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn host_addr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), VmmError> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VmmError::OutOfRange { gpa, len }),
        }
    }

    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`.
    pub(crate) fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        self.check(gpa, buf.len())?;
        // SAFETY: the range is inside the mapping (checked above); guest vCPUs may write it
        // concurrently, which can only make the copied bytes stale, never invalid for `u8`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub(crate) fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), VmmError> {
        self.check(gpa, buf.len())?;
        // SAFETY: the range is inside the mapping (checked above) and `buf` is a separate
        // host allocation, so the two cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(gpa as usize), buf.len())
        };
        Ok(())
    }

    /// Faults in every page for writing, split over `threads` threads. The destination of a
    /// migration does this up front: a first-touch fault on a shmem page costs far more than
    /// the copy into it, and paying it during the stop-and-copy phase would lengthen downtime.
    pub(crate) fn prefault(&self, threads: usize) -> Result<(), VmmError> {
        let threads = threads.max(1) as u64;
        let pages = self.size / PAGE_SIZE as u64;
        let per = pages.div_ceil(threads);
        let base = self.ptr as usize;
        let results: Vec<Result<(), VmmError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let first = (t * per).min(pages);
                        let last = ((t + 1) * per).min(pages);
                        if first == last {
                            return Ok(());
                        }
                        let start = base + (first * PAGE_SIZE as u64) as usize;
                        let len = ((last - first) * PAGE_SIZE as u64) as usize;
                        // SAFETY: [start, start+len) lies inside the mapping owned by `self`,
                        // which outlives this scoped thread; MADV_POPULATE_WRITE only
                        // allocates pages and leaves their contents as they are.
                        let populated = unsafe {
                            rustix::mm::madvise(
                                start as *mut std::ffi::c_void,
                                len,
                                Advice::LinuxPopulateWrite,
                            )
                        };
                        if populated.is_ok() {
                            return Ok(());
                        }
                        // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch each page.
                        for p in 0..(last - first) {
                            let addr = (start + (p * PAGE_SIZE as u64) as usize) as *mut u8;
                            // SAFETY: `addr` is inside the mapping (see above); reading and
                            // writing back the same byte faults the page in for writing without
                            // changing its contents. Nothing runs the guest during prefault.
                            unsafe { addr.write_volatile(addr.read_volatile()) };
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or(Err(VmmError::ThreadPanicked { what: "prefault" }))
                })
                .collect()
        });
        results.into_iter().collect()
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` describe the mapping created in `map`, unmapped exactly once;
        // nothing uses it after this (the VM fd that referenced it is dropped before).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.cast(), self.size as usize) } {
            tracing::warn!("munmap guest memory: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_back_writes_and_rejects_out_of_range() {
        let mem = GuestMemory::new(64 << 10).expect("memfd");
        mem.write(4096, b"hello").expect("write");
        let mut buf = [0u8; 5];
        mem.read(4096, &mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        assert!(mem.read((64 << 10) - 2, &mut buf).is_err());
        assert!(mem.write(u64::MAX, b"x").is_err());
        mem.prefault(2).expect("prefault");
        mem.read(4096, &mut buf).expect("read");
        assert_eq!(&buf, b"hello", "prefault must not change contents");
    }

    /// Pages of `mem` that are resident, per mincore(2).
    fn resident_pages(mem: &GuestMemory) -> usize {
        let pages = (mem.size() / PAGE_SIZE as u64) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is exactly our mapping and `vec` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                mem.host_addr().cast(),
                mem.size() as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore failed");
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn prefault_makes_every_page_resident() {
        let mem = GuestMemory::new(8 << 20).expect("memfd");
        assert_eq!(resident_pages(&mem), 0, "a fresh memfd has no pages yet");
        mem.prefault(2).expect("prefault");
        assert_eq!(resident_pages(&mem), 2048);
    }

    #[test]
    fn an_adopted_fd_shows_the_same_pages() {
        let a = GuestMemory::new(64 << 10).expect("memfd");
        a.write(8192, &[7; 16]).expect("write");
        let owned = a.fd.try_clone().expect("dup");
        let b = GuestMemory::from_fd(owned, 64 << 10).expect("adopt");
        let mut buf = [0u8; 16];
        b.read(8192, &mut buf).expect("read");
        assert_eq!(buf, [7; 16]);
        assert!(GuestMemory::from_fd(a.fd.try_clone().expect("dup"), 1 << 20).is_err());
    }
}
