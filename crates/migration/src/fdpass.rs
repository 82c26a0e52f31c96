//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`), attached to a protocol frame.
//!
//! The descriptors ride on the first byte of the frame: the receiver reads the 16-byte frame
//! header with `recvmsg` (collecting the descriptors) and the payload with plain reads.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use crate::error::{wire, MigrationError};
use crate::protocol::{
    decode_header, decode_payload, encode, FdRegion, Message, ProtocolError, HEADER_LEN,
};
use crate::vm::{MemoryRegion, VmLayout};

/// Most descriptors accepted in one frame (one per memory region).
pub(crate) const MAX_FDS: usize = 16;

/// Retries `f` while it fails with `EINTR`.
fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Sends `frame` (an encoded protocol frame) with `fds` attached.
pub(crate) fn send_frame_with_fds(
    sock: &UnixStream,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "1..=16 fds and a non-empty frame",
        )
    };
    if fds.is_empty() || fds.len() > MAX_FDS || frame.is_empty() {
        return Err(invalid());
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(invalid());
    }
    let sent = retry(|| {
        sendmsg(
            sock,
            &[IoSlice::new(frame)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
    })?;
    // The fds went with the first chunk; the rest of the frame is plain data.
    let mut s = sock;
    s.write_all(&frame[sent..])
}

/// Reads one frame, collecting descriptors attached to it (closed again on any error).
pub(crate) fn recv_frame_with_fds(
    sock: &UnixStream,
) -> Result<(Message, Vec<OwnedFd>), ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = retry(|| {
        recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut head)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
    })
    .map_err(ProtocolError::Io)?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(ProtocolError::Malformed {
            kind: "memory-fds",
            reason: "too many descriptors".into(),
        });
    }
    let got = got.bytes;
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
    let fds: Vec<BorrowedFd<'_>> = regions
        .iter()
        .map(|r| {
            // SAFETY: `MigratableVm::memory` hands out descriptors that stay open while the
            // VM lives, and the VM outlives this call (the caller borrows it).
            r.fd.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
        })
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
    use std::os::fd::AsFd;

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
            send_frame_with_fds(&a, &frame, &[f.as_fd(), f.as_fd()]).expect("send");
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

    #[test]
    fn a_memory_offer_must_match_the_layout_region_for_region() {
        use crate::vm::RegionLayout;
        use std::os::fd::AsRawFd;
        let memfd = rustix::fs::memfd_create("fdpass-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd");
        rustix::fs::ftruncate(&memfd, 8192).expect("size");
        let offer = [MemoryRegion {
            gpa: 0,
            size: 8192,
            host_addr: 0,
            fd: Some(memfd.as_raw_fd()),
            fd_offset: 0,
        }];
        let layout = |regions: &[(u64, u64)]| VmLayout {
            regions: regions
                .iter()
                .map(|&(gpa, size)| RegionLayout { gpa, size })
                .collect(),
            vcpus: 1,
            features: 0,
        };
        let exchange = |expected: VmLayout| {
            let (a, b) = UnixStream::pair().expect("pair");
            send_memory(&a, &offer).expect("send");
            recv_memory(&b, &expected, "test")
        };
        let got = exchange(layout(&[(0, 8192)])).expect("the announced layout");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.gpa, got[0].0.size), (0, 8192));
        // Another address, another size, or another number of regions: refused.
        for other in [
            layout(&[(4096, 8192)]),
            layout(&[(0, 4096)]),
            layout(&[(0, 8192), (1 << 20, 4096)]),
        ] {
            assert!(
                matches!(
                    exchange(other.clone()),
                    Err(MigrationError::TransportSetup { .. })
                ),
                "{other:?}"
            );
        }
    }
}
