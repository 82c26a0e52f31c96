//! `shm`: one-sided remote write between two processes on one host (RDMA-write semantics).
//!
//! The destination passes its memfd(s) over the Unix control socket (`SCM_RIGHTS`); the
//! source maps them and copies dirty pages straight into the destination's guest memory.
//! Only small `Written` frames cross the socket, telling the destination which pages changed
//! so it can keep its page-hash table (hashing its own memory) for the digest.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{DestTransport, PageStats, RecvCtx, SendCtx, SourceTransport};
use crate::conn::Conn;
use crate::error::{wire, MigrationError};
use crate::fdpass::{recv_frame_with_fds, send_frame_with_fds};
use crate::guestmem::GuestMemory;
use crate::protocol::{encode, FdRegion, Message, ProtocolError};
use crate::vm::{MemoryRegion, VmLayout, PAGE_SIZE};

/// Pages copied between two `Written` notifications (and token-bucket requests).
const NOTIFY_PAGES: usize = 512;

fn setup_err(reason: impl Into<String>) -> MigrationError {
    MigrationError::TransportSetup {
        reason: reason.into(),
        source: None,
    }
}

/// The destination's memory, mapped into the source process.
pub(crate) struct ShmSource {
    control: Conn,
    remote: GuestMemory,
    maps: Vec<(usize, usize)>,
}

impl ShmSource {
    /// Receives the destination's memory descriptors and maps them.
    pub(crate) fn open(control: &Conn, layout: &VmLayout) -> Result<Self, MigrationError> {
        let sock = control
            .as_unix()
            .ok_or_else(|| setup_err("shm needs a unix: endpoint"))?;
        let (msg, fds) = recv_frame_with_fds(sock)
            .map_err(|e| wire("shm setup", e, MigrationError::Handshake))?;
        let Message::MemoryFds(regions) = msg else {
            return Err(MigrationError::Unexpected {
                phase: "shm setup",
                got: msg.name().into(),
            });
        };
        if regions.len() != fds.len() || regions.len() != layout.regions.len() {
            return Err(setup_err(
                "descriptor count does not match the memory layout",
            ));
        }
        let mut me = Self {
            control: clone(control)?,
            remote: GuestMemory::new(&[]).map_err(MigrationError::Memory)?,
            maps: Vec::new(),
        };
        let mut mrs = Vec::new();
        for ((r, fd), l) in regions.iter().zip(&fds).zip(&layout.regions) {
            if r.gpa != l.gpa || r.size != l.size {
                return Err(setup_err("destination regions differ from the layout"));
            }
            let addr = map_shared(fd, r.size as usize, r.fd_offset)?;
            me.maps.push((addr, r.size as usize));
            mrs.push(MemoryRegion {
                gpa: r.gpa,
                size: r.size,
                host_addr: addr,
                fd: None,
                fd_offset: 0,
            });
        }
        me.remote = GuestMemory::new(&mrs)?;
        Ok(me)
    }
}

fn clone(c: &Conn) -> Result<Conn, MigrationError> {
    c.try_clone().map_err(|e| MigrationError::TransportSetup {
        reason: "cloning the control stream".into(),
        source: Some(e),
    })
}

fn map_shared(fd: &OwnedFd, len: usize, offset: u64) -> Result<usize, MigrationError> {
    // Touching a mapping past the end of the file raises SIGBUS and would kill the source
    // (and its VM): check the peer's memfd really is that large.
    // SAFETY: an all-zero stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a valid descriptor and `st` a writable stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(MigrationError::TransportSetup {
            reason: "fstat on the destination's memory".into(),
            source: Some(std::io::Error::last_os_error()),
        });
    }
    if (st.st_size as u64) < offset.saturating_add(len as u64) {
        return Err(setup_err(format!(
            "destination memfd has {} bytes, region needs {} at offset {offset}",
            st.st_size, len
        )));
    }
    // SAFETY: a fresh MAP_SHARED mapping chosen by the kernel (null hint) cannot overlap any
    // Rust object; `fd` is a valid descriptor for the call's duration.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MigrationError::TransportSetup {
            reason: "mapping the destination's memory".into(),
            source: Some(std::io::Error::last_os_error()),
        });
    }
    Ok(p as usize)
}

impl Drop for ShmSource {
    fn drop(&mut self) {
        for &(addr, len) in &self.maps {
            // SAFETY: unmapping a mapping this struct created; `remote` (which points into it)
            // dies with the struct and no copy is in flight (`send_pages` borrows `self`).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

impl SourceTransport for ShmSource {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn send_pages(
        &mut self,
        mem: &GuestMemory,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        let mut stats = PageStats::default();
        for chunk in pages.chunks(NOTIFY_PAGES) {
            if ctx.cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if let Some(b) = ctx.bucket {
                if !b.take(chunk.len() * PAGE_SIZE, ctx.cancel) {
                    return Err(MigrationError::Cancelled);
                }
            }
            let mut runs: Vec<(u64, u32)> = Vec::new();
            for &p in chunk {
                let (Some(from), Some(to)) = (mem.run_addr(p, 1), self.remote.run_addr(p, 1))
                else {
                    return Err(MigrationError::Unexpected {
                        phase: "sending pages",
                        got: format!("page {p} outside memory"),
                    });
                };
                // SAFETY: both addresses are bounds-checked pages of live mappings (ours per the
                // GuestMemory invariant, the destination's mapped in `open`); they are distinct
                // mappings. The destination VM is paused until Commit, so nothing else writes
                // `to`; the guest may write `from`, which only makes the page dirty again.
                unsafe {
                    std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, PAGE_SIZE)
                };
                // Hash what landed, read back from the destination's memory.
                ctx.hashes.set(p, self.remote.hash_page(p).unwrap_or(0));
                let gpa = self.remote.page_gpa(p).unwrap_or(0);
                match runs.last_mut() {
                    Some((g, n))
                        if *g + *n as u64 * PAGE_SIZE as u64 == gpa
                            && p > 0
                            && self.remote.same_region(p - 1, p) =>
                    {
                        *n += 1
                    }
                    _ => runs.push((gpa, 1)),
                }
                stats.pages += 1;
            }
            let f = encode(&Message::Written(runs));
            self.control.write_all(&f).map_err(|e| {
                wire(
                    "sending pages",
                    ProtocolError::Io(e),
                    MigrationError::SendPages,
                )
            })?;
            stats.bytes += (chunk.len() * PAGE_SIZE + f.len()) as u64;
            ctx.done_pages
                .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(stats)
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }
}

/// Destination side: offers its memory, then tracks `Written` notifications.
pub(crate) struct ShmDest {
    stats: PageStats,
}

impl ShmDest {
    /// Sends the memory descriptors of `regions` to the source.
    pub(crate) fn offer(control: &Conn, regions: &[MemoryRegion]) -> Result<Self, MigrationError> {
        let sock = control
            .as_unix()
            .ok_or_else(|| setup_err("shm needs a unix: endpoint"))?;
        let fds: Option<Vec<i32>> = regions.iter().map(|r| r.fd).collect();
        let fds = fds.ok_or_else(|| setup_err("shm needs memfd-backed guest memory"))?;
        let desc = regions
            .iter()
            .map(|r| FdRegion {
                gpa: r.gpa,
                size: r.size,
                fd_offset: r.fd_offset,
            })
            .collect();
        send_frame_with_fds(sock, &encode(&Message::MemoryFds(desc)), &fds).map_err(|e| {
            MigrationError::TransportSetup {
                reason: "passing memory descriptors".into(),
                source: Some(e),
            }
        })?;
        Ok(Self {
            stats: PageStats::default(),
        })
    }
}

impl DestTransport for ShmDest {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn on_control(
        &mut self,
        msg: Message,
        ctx: &RecvCtx,
    ) -> Result<Option<Message>, MigrationError> {
        let Message::Written(runs) = msg else {
            return Ok(Some(msg));
        };
        for (gpa, n) in runs {
            let first = ctx
                .mem
                .gpa_to_page(gpa)
                .filter(|&p| ctx.mem.run_addr(p, n as usize).is_some())
                .ok_or_else(|| {
                    MigrationError::ReceivePages(ProtocolError::Malformed {
                        kind: "written",
                        reason: format!("run {gpa:#x}+{n} outside memory"),
                    })
                })?;
            for p in first..first + n as usize {
                ctx.hashes.set(p, ctx.mem.hash_page(p).unwrap_or(0));
            }
            self.stats.pages += n as u64;
            self.stats.bytes += n as u64 * PAGE_SIZE as u64;
        }
        Ok(None)
    }

    fn finish(&mut self) -> Result<PageStats, MigrationError> {
        Ok(self.stats)
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }

    fn check(&mut self) -> Result<u64, MigrationError> {
        // Pages travel on the control stream itself: nothing else to watch.
        Ok(0)
    }

    fn abort(&mut self) -> Option<MigrationError> {
        None
    }
}
