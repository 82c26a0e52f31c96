//! Shared helpers for the migration integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigrateOptions, MigrationError,
    MigrationSummary, ReceiveOptions, ReceiveSummary,
};

pub const MIB: u64 = 1 << 20;

pub fn loopback() -> Listener {
    let ep: Endpoint = "127.0.0.1:0".parse().expect("endpoint");
    Listener::bind(&ep).expect("bind")
}

type Outcome = (
    Result<MigrationSummary, MigrationError>,
    Result<ReceiveSummary, MigrationError>,
);

/// Receives one migration into `dst` (and no other VM).
pub fn receive_into(
    dst: &SoftVm,
    l: &Listener,
    ropts: &ReceiveOptions,
) -> Result<ReceiveSummary, MigrationError> {
    receive(l, ropts, IncomingVm::Only(dst)).map(|(_, s)| s)
}

/// Runs a destination on `dst` in a thread and migrates `src` to it over loopback TCP.
pub fn pair(src: &SoftVm, dst: &SoftVm, opts: &MigrateOptions, ropts: &ReceiveOptions) -> Outcome {
    pair_on(&loopback(), src, dst, opts, ropts)
}

/// Like [`pair`] on a given listener (TCP or Unix).
pub fn pair_on(
    l: &Listener,
    src: &SoftVm,
    dst: &SoftVm,
    opts: &MigrateOptions,
    ropts: &ReceiveOptions,
) -> Outcome {
    let ep = l.endpoint().expect("endpoint");
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(dst, l, ropts));
        let r = migrate(src, &ep, opts);
        (r, h.join().expect("receiver thread"))
    })
}

/// Asserts the source survived a failed migration: running, dirty log off, guest writing.
pub fn assert_source_intact(src: &SoftVm) {
    assert!(
        src.is_running(),
        "source VM must run again after a failed migration"
    );
    assert!(
        !src.is_dirty_logging(),
        "dirty log must be stopped after a failed migration"
    );
}

/// A TCP proxy to `target` that flips the byte at `offset` of the source-to-destination
/// direction of the `conn_index`-th accepted connection (0-based). Returns its endpoint.
pub fn corrupting_proxy(target: Endpoint, conn_index: usize, offset: u64) -> Endpoint {
    let l = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
    let addr = l.local_addr().expect("addr");
    let Endpoint::Tcp(target) = target else {
        panic!("tcp only")
    };
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for inbound in l.incoming() {
            let Ok(inbound) = inbound else { return };
            let Ok(outbound) = TcpStream::connect(target) else {
                return;
            };
            let k = count.fetch_add(1, Ordering::SeqCst);
            let (i2, o2) = (
                inbound.try_clone().expect("clone"),
                outbound.try_clone().expect("clone"),
            );
            let corrupt = (k == conn_index).then_some(offset);
            std::thread::spawn(move || pump(inbound, outbound, corrupt));
            std::thread::spawn(move || pump(o2, i2, None));
        }
    });
    Endpoint::Tcp(addr)
}

fn pump(mut from: TcpStream, mut to: TcpStream, corrupt: Option<u64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(off) = corrupt {
            if off >= pos && off < pos + n as u64 {
                buf[(off - pos) as usize] ^= 0x5A;
            }
        }
        pos += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// What a [`frame_proxy`] filter does with one frame: pass it on (possibly rewritten) or drop it.
pub type FrameFilter = Box<dyn FnMut(Vec<u8>) -> Option<Vec<u8>> + Send>;

/// A TCP proxy to `target` for one connection that reads both directions frame by frame and
/// passes each frame through a filter (`to_dst`: source to destination, `to_src`: back).
/// Only for streams made of whole frames (the classic transport's control stream).
pub fn frame_proxy(target: Endpoint, to_dst: FrameFilter, to_src: FrameFilter) -> Endpoint {
    let l = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
    let addr = l.local_addr().expect("addr");
    let Endpoint::Tcp(target) = target else {
        panic!("tcp only")
    };
    std::thread::spawn(move || {
        let Ok((inbound, _)) = l.accept() else { return };
        let Ok(outbound) = TcpStream::connect(target) else {
            return;
        };
        let (i2, o2) = (
            inbound.try_clone().expect("clone"),
            outbound.try_clone().expect("clone"),
        );
        std::thread::spawn(move || pump_frames(o2, i2, to_src));
        pump_frames(inbound, outbound, to_dst);
    });
    Endpoint::Tcp(addr)
}

fn pump_frames(mut from: TcpStream, mut to: TcpStream, mut filter: FrameFilter) {
    use fastmig_migration::protocol::HEADER_LEN;
    loop {
        let mut header = [0u8; HEADER_LEN];
        if from.read_exact(&mut header).is_err() {
            break;
        }
        // Payload length: header bytes 8..12, little-endian (PROTOCOL.md, "Frames").
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let mut frame = header.to_vec();
        frame.resize(HEADER_LEN + len, 0);
        if from.read_exact(&mut frame[HEADER_LEN..]).is_err() {
            break;
        }
        if let Some(out) = filter(frame) {
            if to.write_all(&out).is_err() {
                break;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// A [`frame_proxy`] that drops the `nth` (0-based) page frame carrying data, source to
/// destination. Every frame that passes is untouched, so the stream stays valid: only the
/// digest can notice.
pub fn frame_dropping_proxy(target: Endpoint, nth: usize) -> Endpoint {
    use fastmig_migration::protocol::{decode, Message};
    let mut seen = 0;
    let drop_nth = move |frame: Vec<u8>| {
        if let Ok((Message::Page { data: Some(_), .. }, _)) = decode(&frame) {
            seen += 1;
            if seen == nth + 1 {
                return None;
            }
        }
        Some(frame)
    };
    frame_proxy(target, Box::new(drop_nth), Box::new(Some))
}

/// The in-round progress ticks of the full pass over `pages` pages (some sent, some left),
/// asserted to exist and to count down.
pub fn in_round_ticks(
    seen: &[fastmig_migration::Progress],
    pages: u64,
) -> Vec<&fastmig_migration::Progress> {
    let partial: Vec<&fastmig_migration::Progress> = seen
        .iter()
        .filter(|p| {
            p.phase == fastmig_migration::Phase::PreCopy
                && p.round == 0
                && p.remaining_pages > 0
                && p.remaining_pages < pages
        })
        .collect();
    assert!(
        !partial.is_empty(),
        "no in-round progress among {} reports",
        seen.len()
    );
    assert!(partial
        .windows(2)
        .all(|w| w[0].remaining_pages >= w[1].remaining_pages));
    partial
}
