//! Scatter-gather socket I/O straight from/into guest memory (`sendmsg`/`readv` on iovecs).
//!
//! The iovecs point into guest memory (from [`crate::guestmem::GuestMemory::run_addr`]) or
//! into buffers owned by the caller; the kernel copies, we never form Rust slices over guest
//! memory.

use std::io;
use std::os::fd::RawFd;

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

/// Writes every byte described by `iovs` to socket `fd` (no SIGPIPE on a closed peer).
///
/// # Safety
/// Every iovec must describe readable memory that stays mapped for the duration of the call.
pub unsafe fn send_all(fd: RawFd, iovs: &mut [libc::iovec]) -> io::Result<()> {
    let mut start = 0;
    advance(iovs, &mut start, 0);
    while start < iovs.len() {
        let n = (iovs.len() - start).min(MAX_IOV);
        // SAFETY: an all-zero msghdr is valid (null name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs[start..].as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: `msg` points at `n` iovecs that the caller guarantees readable; MSG_NOSIGNAL
        // turns a vanished peer into EPIPE instead of killing the process.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        advance(iovs, &mut start, r as usize);
    }
    Ok(())
}

/// `SO_ZEROCOPY` (asm-generic/socket.h; not exported by the libc crate).
const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (linux/errqueue.h): a zero-copy completion notification.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all (always on loopback).
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Counters of `MSG_ZEROCOPY` sends on one socket.
///
/// With `MSG_ZEROCOPY` the kernel pins the user pages and reads them when it transmits,
/// after `sendmsg` returned; each successful call gets a sequence number and its completion
/// arrives later on the socket's error queue. Until then the pages must stay mapped, and
/// whatever they hold at transmit time is what goes out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZeroCopyStats {
    /// `sendmsg` calls made with `MSG_ZEROCOPY` (each gets one completion).
    pub sends: u64,
    /// Completions received so far.
    pub completed: u64,
    /// Completions for which the kernel fell back to copying.
    pub copied: u64,
}

/// Turns `SO_ZEROCOPY` on for socket `fd` (needed before any `MSG_ZEROCOPY` send).
pub fn enable_zero_copy(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live c_int and its size is passed along; `fd` is the caller's socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Like [`send_all`] with `MSG_ZEROCOPY`: returns once every byte is queued, *not* once the
/// kernel has read it; call [`zero_copy_wait`] before the memory may be unmapped or reused.
///
/// # Safety
/// Every iovec must describe readable memory that stays mapped until [`zero_copy_wait`] has
/// seen every completion. Its bytes may be read by the kernel at any time until then.
pub unsafe fn send_all_zero_copy(
    fd: RawFd,
    iovs: &mut [libc::iovec],
    zc: &mut ZeroCopyStats,
) -> io::Result<()> {
    let mut start = 0;
    let mut flags = libc::MSG_NOSIGNAL | libc::MSG_ZEROCOPY;
    advance(iovs, &mut start, 0);
    while start < iovs.len() {
        let n = (iovs.len() - start).min(MAX_IOV);
        // SAFETY: an all-zero msghdr is valid (null name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs[start..].as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: as in `send_all`; the caller keeps the memory mapped until completion.
        let r = unsafe { libc::sendmsg(fd, &msg, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Completions are charged to the socket's option memory: when it is full the
                // send fails with ENOBUFS until they are read. With none outstanding, the
                // limit is something else: send this piece the ordinary way.
                Some(libc::ENOBUFS) if zc.completed < zc.sends => {
                    zero_copy_reap(fd, zc, true)?;
                    continue;
                }
                Some(libc::ENOBUFS) if flags & libc::MSG_ZEROCOPY != 0 => {
                    flags = libc::MSG_NOSIGNAL;
                    continue;
                }
                _ => return Err(e),
            }
        }
        if flags & libc::MSG_ZEROCOPY != 0 {
            zc.sends += 1;
        }
        flags = libc::MSG_NOSIGNAL | libc::MSG_ZEROCOPY;
        advance(iovs, &mut start, r as usize);
        zero_copy_reap(fd, zc, false)?;
    }
    Ok(())
}

/// Reads pending completions from the error queue of `fd`; if `block`, waits (up to the
/// socket's 10 s budget) until at least one arrives or none is outstanding.
fn zero_copy_reap(fd: RawFd, zc: &mut ZeroCopyStats, block: bool) -> io::Result<()> {
    let mut waited = false;
    loop {
        let mut control = [0u64; 16];
        // SAFETY: an all-zero msghdr is valid; we attach our own control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` describes no data iovec and a writable control buffer we own.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if block && !waited && zc.completed < zc.sends => {
                    // An error-queue entry raises POLLERR (always reported, no event needed).
                    let mut pfd = libc::pollfd {
                        fd,
                        events: 0,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd on our stack.
                    let pr = unsafe { libc::poll(&mut pfd, 1, 10_000) };
                    if pr == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no MSG_ZEROCOPY completion within 10 s",
                        ));
                    }
                    waited = true;
                    continue;
                }
                Some(libc::EAGAIN) => return Ok(()),
                _ => return Err(e),
            }
        }
        // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk our own control buffer
        // within the length the kernel reported.
        let mut cm = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cm.is_null() {
            // SAFETY: `cm` points at a complete cmsghdr inside `control` (CMSG_NXTHDR checks).
            let (level, kind) = unsafe { ((*cm).cmsg_level, (*cm).cmsg_type) };
            let is_err = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
            if is_err {
                // SAFETY: an IP(V6)_RECVERR message carries a sock_extended_err; the data may
                // be unaligned for it, hence read_unaligned.
                let ee: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast()) };
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                    // Sends ee_info ..= ee_data completed (32-bit sequence numbers).
                    let n = u64::from(ee.ee_data.wrapping_sub(ee.ee_info)) + 1;
                    zc.completed += n;
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        zc.copied += n;
                    }
                } else if ee.ee_errno != 0 {
                    return Err(io::Error::from_raw_os_error(ee.ee_errno as i32));
                }
            }
            // SAFETY: as above.
            cm = unsafe { libc::CMSG_NXTHDR(&msg, cm) };
        }
        if block {
            waited = false;
            if zc.completed >= zc.sends {
                return Ok(());
            }
        }
    }
}

/// Waits until every `MSG_ZEROCOPY` send on `fd` has completed (the kernel no longer
/// reads the memory).
pub fn zero_copy_wait(fd: RawFd, zc: &mut ZeroCopyStats) -> io::Result<()> {
    while zc.completed < zc.sends {
        zero_copy_reap(fd, zc, true)?;
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
                unsafe { send_all(a.as_raw_fd(), &mut iovs) }
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

    #[test]
    fn zero_copy_send_delivers_and_every_send_completes() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut rx, _) = l.accept().expect("accept");
        enable_zero_copy(tx.as_raw_fd()).expect("SO_ZEROCOPY");
        let src: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).map(|_| got)
        });
        let mut zc = ZeroCopyStats::default();
        for piece in src.chunks(1 << 20) {
            let mut iovs = [iovec_of(piece)];
            // SAFETY: `src` outlives the wait below.
            unsafe { send_all_zero_copy(tx.as_raw_fd(), &mut iovs, &mut zc) }.expect("send");
        }
        zero_copy_wait(tx.as_raw_fd(), &mut zc).expect("completions");
        assert!(zc.sends >= 8, "one send or more per piece: {zc:?}");
        assert_eq!(zc.completed, zc.sends);
        // Loopback: the kernel copies when it queues to the local receiver.
        assert!(zc.copied <= zc.completed);
        drop(tx);
        let got = reader.join().expect("reader").expect("read");
        assert!(got == src, "bytes arrive intact");
    }
}
