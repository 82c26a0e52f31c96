//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`), attached to a protocol frame.
//!
//! The descriptors ride on the first byte of the frame: the receiver reads the 16-byte frame
//! header with `recvmsg` (collecting the descriptors) and the payload with plain reads.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{wire, MigrationError};
use crate::protocol::{
    decode_header, decode_payload, encode, FdRegion, Message, ProtocolError, HEADER_LEN,
};
use crate::vm::{MemoryRegion, VmLayout};

/// Most descriptors accepted in one frame (one per memory region).
pub(crate) const MAX_FDS: usize = 16;

/// Sends `frame` (an encoded protocol frame) with `fds` attached.
pub(crate) fn send_frame_with_fds(
    sock: &UnixStream,
    frame: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    if fds.is_empty() || fds.len() > MAX_FDS || frame.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "1..=16 fds and a non-empty frame",
        ));
    }
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of `space` bytes, enough for one cmsghdr carrying
    // `payload` bytes (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA points
    // inside `cbuf`; the fds are copied byte-wise (no alignment assumption).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), payload);
    }
    let sent = loop {
        // SAFETY: `msg` describes `frame` (alive) and the control buffer built above.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // The fds went with the first chunk; the rest of the frame is plain data.
    let mut s = sock;
    s.write_all(&frame[sent..])
}

/// Reads one frame, collecting descriptors attached to it (closed again on any error).
pub(crate) fn recv_frame_with_fds(
    sock: &UnixStream,
) -> Result<(Message, Vec<OwnedFd>), ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let got = loop {
        // SAFETY: `msg` describes `head` and `cbuf`, both alive and writable.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(ProtocolError::Io(e));
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `cbuf` with well-formed cmsghdrs;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay inside that length; every SCM_RIGHTS descriptor is a
    // fresh descriptor now owned by this process, so wrapping it in OwnedFd is sound.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ProtocolError::Malformed {
            kind: "memory-fds",
            reason: "too many descriptors".into(),
        });
    }
    if got == 0 {
        return Err(ProtocolError::Truncated);
    }
    let mut s = sock;
    let rest = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    };
    s.read_exact(&mut head[got..]).map_err(rest)?;
    let h = decode_header(&head)?;
    let mut p = vec![0u8; h.len];
    s.read_exact(&mut p).map_err(rest)?;
    Ok((decode_payload(&h, &head, &p)?, fds))
}

/// Offers the memory behind `regions` on `sock`: a `MemoryFds` frame with one descriptor per
/// region (`shm`: the destination's memory; `handover`: the source's).
pub(crate) fn send_memory(
    sock: &UnixStream,
    regions: &[MemoryRegion],
) -> Result<(), MigrationError> {
    let fds: Vec<RawFd> = regions
        .iter()
        .map(|r| r.fd)
        .collect::<Option<_>>()
        .ok_or_else(|| setup_err("needs memfd-backed guest memory", None))?;
    let desc = regions
        .iter()
        .map(|r| FdRegion {
            gpa: r.gpa,
            size: r.size,
            fd_offset: r.fd_offset,
        })
        .collect();
    send_frame_with_fds(sock, &encode(&Message::MemoryFds(desc)), &fds)
        .map_err(|e| setup_err("passing memory descriptors", Some(e)))
}

/// Receives a `MemoryFds` offer and checks it region for region (address and size) against
/// `layout`.
pub(crate) fn recv_memory(
    sock: &UnixStream,
    layout: &VmLayout,
    phase: &'static str,
) -> Result<Vec<(FdRegion, OwnedFd)>, MigrationError> {
    let (msg, fds) = recv_frame_with_fds(sock).map_err(|e| wire(phase, e))?;
    let Message::MemoryFds(desc) = msg else {
        return Err(MigrationError::Unexpected {
            phase,
            got: msg.name().into(),
        });
    };
    let matches_layout = desc.len() == fds.len()
        && desc.len() == layout.regions.len()
        && desc
            .iter()
            .zip(&layout.regions)
            .all(|(d, l)| d.gpa == l.gpa && d.size == l.size);
    if !matches_layout {
        return Err(setup_err(
            "memory descriptors do not match the memory layout",
            None,
        ));
    }
    Ok(desc.into_iter().zip(fds).collect())
}

fn setup_err(reason: &str, source: Option<io::Error>) -> MigrationError {
    MigrationError::TransportSetup {
        reason: reason.into(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn fds_travel_with_a_frame() {
        let (a, b) = UnixStream::pair().expect("pair");
        // A real file, to check the received descriptor points at the same object.
        let path = std::env::temp_dir().join(format!("fastmig-fd-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("file");
        f.write_all(b"hello").expect("write");
        let frame = encode(&Message::State(vec![9; 100_000]));
        let t = std::thread::spawn(move || {
            send_frame_with_fds(&a, &frame, &[f.as_raw_fd(), f.as_raw_fd()]).expect("send");
            f
        });
        let (m, fds) = recv_frame_with_fds(&b).expect("recv");
        let _f = t.join().expect("join");
        assert_eq!(m, Message::State(vec![9; 100_000]));
        assert_eq!(fds.len(), 2);
        let mut g = std::fs::File::from(fds.into_iter().next().expect("fd"));
        g.rewind().expect("seek");
        let mut s = String::new();
        g.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello");
        let _ = std::fs::remove_file(&path);
    }
}
