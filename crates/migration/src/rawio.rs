//! Scatter-gather socket I/O straight from/into guest memory (`sendmsg`/`readv` on iovecs).
//!
//! The iovecs point into guest memory (from [`crate::guestmem::MemoryView::run_addr`]) or
//! into buffers owned by the caller; the kernel copies, we never form Rust slices over guest
//! memory.

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

/// Most iovecs passed to one system call (Linux `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

fn advance(iovs: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while n > 0 && *start < iovs.len() {
        let cur = &mut iovs[*start];
        if n >= cur.iov_len {
            n -= cur.iov_len;
            *start += 1;
        } else {
            cur.iov_base = (cur.iov_base as usize + n) as *mut libc::c_void;
            cur.iov_len -= n;
            n = 0;
        }
    }
    while *start < iovs.len() && iovs[*start].iov_len == 0 {
        *start += 1;
    }
}

/// Waits until `fd` can take more bytes, at most until `deadline`.
fn wait_writable(fd: RawFd, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no data before the deadline",
            ));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd on our stack, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Writes every byte described by `iovs` to socket `fd` (no SIGPIPE on a closed peer), the
/// whole of it due by `deadline` (`None`: only the socket's own timeout, per call). A per-call socket timeout restarts whenever the kernel takes a few bytes; a peer
/// that is stopped but whose kernel still trims its receive queue would hold us for ever.
///
/// # Safety
/// Every iovec must describe readable memory that stays mapped for the duration of the call.
pub unsafe fn send_all_until(
    fd: RawFd,
    iovs: &mut [libc::iovec],
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut start = 0;
    advance(iovs, &mut start, 0);
    let flags = match deadline {
        Some(_) => libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        None => libc::MSG_NOSIGNAL,
    };
    while start < iovs.len() {
        let n = (iovs.len() - start).min(MAX_IOV);
        // SAFETY: an all-zero msghdr is valid (null name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs[start..].as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: `msg` points at `n` iovecs that the caller guarantees readable; MSG_NOSIGNAL
        // turns a vanished peer into EPIPE instead of killing the process.
        let r = unsafe { libc::sendmsg(fd, &msg, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match (e.kind(), deadline) {
                (io::ErrorKind::Interrupted, _) => continue,
                // Wait only when the socket is full (not before every send: a poll per
                // batch is a system call the common case does not need); every wait checks
                // the deadline, so a peer that takes a byte now and then still ends by it.
                (io::ErrorKind::WouldBlock, Some(d)) => {
                    wait_writable(fd, d)?;
                    continue;
                }
                _ => return Err(e),
            }
        }
        advance(iovs, &mut start, r as usize);
    }
    Ok(())
}

/// Fills every byte described by `iovs` from socket `fd`; a peer that closes first yields
/// `UnexpectedEof`.
///
/// # Safety
/// Every iovec must describe writable memory that stays mapped for the duration of the call
/// and that nothing else reads or writes meanwhile (the destination VM is not running).
pub unsafe fn recv_all(fd: RawFd, iovs: &mut [libc::iovec]) -> io::Result<()> {
    let mut start = 0;
    advance(iovs, &mut start, 0);
    while start < iovs.len() {
        let n = (iovs.len() - start).min(MAX_IOV);
        // SAFETY: the caller guarantees the `n` iovecs describe writable, mapped memory.
        let r = unsafe { libc::readv(fd, iovs[start..].as_ptr(), n as libc::c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed inside page data",
            ));
        }
        advance(iovs, &mut start, r as usize);
    }
    Ok(())
}

/// An iovec over a caller-owned byte slice.
pub fn iovec_of(buf: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_send_to_a_peer_that_never_reads_ends_at_its_deadline() {
        let (a, _silent) = UnixStream::pair().expect("socketpair");
        let big = vec![1u8; 32 << 20];
        let mut iovs = [iovec_of(&big)];
        let start = Instant::now();
        // SAFETY: the iovec covers `big`, alive for the call.
        let r = unsafe {
            send_all_until(
                a.as_raw_fd(),
                &mut iovs,
                Some(start + std::time::Duration::from_millis(200)),
            )
        };
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::TimedOut));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn scatter_gather_round_trip_with_partial_transfers() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let src: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (x, y) = src.split_at(123_457);
        let mut d1 = vec![0u8; 1000];
        let mut d2 = vec![0u8; 299_000];
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut iovs = [iovec_of(x), iovec_of(&[]), iovec_of(y)];
                // SAFETY: the iovecs cover `src`, which outlives the scope.
                unsafe { send_all_until(a.as_raw_fd(), &mut iovs, None) }
            });
            let mut iovs = [
                libc::iovec {
                    iov_base: d1.as_mut_ptr().cast(),
                    iov_len: d1.len(),
                },
                libc::iovec {
                    iov_base: d2.as_mut_ptr().cast(),
                    iov_len: d2.len(),
                },
            ];
            // SAFETY: the iovecs cover our two buffers.
            unsafe { recv_all(b.as_raw_fd(), &mut iovs) }.expect("recv");
            writer.join().expect("join").expect("send");
        });
        d1.extend_from_slice(&d2);
        assert_eq!(d1, src.as_slice().to_vec());
    }
}
