//! A multi-tcp destination facing a scripted source that misbehaves on its data streams:
//! a stream cut inside page data is blamed, as "truncated", even when the control stream
//! fails afterwards; a failed destination closes its data streams; a round is acknowledged
//! only once every batch of it arrived; and `verify_memory` re-checks multi-tcp memory.
//! Written for the mutants of `transport/multi_tcp.rs` that the other tests let live
//! (TESTING.md, "transport/multi_tcp.rs").

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{loopback, receive_into, MIB};
use fastmig_migration::protocol::{
    self, read_message, write_message, Complete, Hello, Message, ProtocolError, Run,
};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{
    hash_page_bytes, Endpoint, Listener, MigratableVm, MigrationError, PageHashes, ReceiveOptions,
    ReceiveSummary, TransportKind, PAGE_SIZE,
};

const SESSION: u64 = 77;

fn ropts() -> ReceiveOptions {
    ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(5)),
        io_timeout: Duration::from_secs(2),
        commit_timeout: Duration::from_millis(400),
        verify_memory: false,
    }
}

/// A hand-driven multi-tcp source: control stream and data streams, handshake done.
struct Script {
    control: TcpStream,
    data: Vec<TcpStream>,
    hashes: PageHashes,
    pages: u64,
    /// Bytes written on all data streams (what a `RoundEnd` announces).
    data_bytes: u64,
}

impl Script {
    fn connect(dst: &SoftVm, l: &Listener, streams: u32) -> Self {
        let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
            panic!("tcp listener")
        };
        let mut control = TcpStream::connect(addr).expect("connect");
        let hello = Hello {
            version: protocol::MIN_PROTOCOL_VERSION,
            max_version: protocol::PROTOCOL_VERSION,
            layout: dst.layout(),
            transport: TransportKind::MultiTcp { streams },
            session: SESSION,
        };
        write_message(&mut control, &Message::Hello(hello)).expect("hello");
        match read_message(&mut control).expect("reply") {
            Message::HelloReply(r) if r.accepted => {}
            other => panic!("refused: {other:?}"),
        }
        let data = (0..streams)
            .map(|stream| {
                let mut c = TcpStream::connect(addr).expect("data connect");
                let hello = Message::DataHello {
                    session: SESSION,
                    stream,
                };
                write_message(&mut c, &hello).expect("data hello");
                c
            })
            .collect();
        Self {
            control,
            data,
            hashes: PageHashes::new(dst.layout().pages() as usize),
            pages: dst.layout().pages(),
            data_bytes: 0,
        }
    }

    /// One batch of one run: pages `first..first + fills.len()` (gpa = page × 4096, one
    /// region at 0), page `i` all `fills[i]` (0: a zero page, sent as a bit). Returns the
    /// descriptor frame followed by the data pages' bytes, and records the pages' hashes.
    fn batch(&self, first: usize, fills: &[u8]) -> Vec<u8> {
        let mut zero = vec![0u8; fills.len().div_ceil(8)];
        for (i, &f) in fills.iter().enumerate() {
            if f == 0 {
                zero[i / 8] |= 1 << (i % 8);
            }
        }
        let mut out = Vec::new();
        protocol::encode_batch(
            &mut out,
            &[Run {
                gpa: (first * PAGE_SIZE) as u64,
                pages: fills.len() as u32,
                zero,
            }],
        );
        for (i, &f) in fills.iter().enumerate() {
            let page = [f; PAGE_SIZE];
            self.hashes.set(first + i, hash_page_bytes(&page));
            if f != 0 {
                out.extend_from_slice(&page);
            }
        }
        out
    }

    /// Writes `bytes` on data stream `stream`.
    fn send(&mut self, stream: usize, bytes: &[u8]) {
        self.data[stream].write_all(bytes).expect("data");
        self.data_bytes += bytes.len() as u64;
    }

    /// Writes the first `keep` bytes of `bytes` on data stream `stream`, then closes it.
    fn send_cut(&mut self, stream: usize, bytes: &[u8], keep: usize) {
        self.data[stream].write_all(&bytes[..keep]).expect("data");
        self.data[stream]
            .shutdown(Shutdown::Both)
            .expect("close data stream");
    }

    fn round_end(&mut self, round: u32) {
        let end = Message::RoundEnd {
            round,
            data_bytes: self.data_bytes,
        };
        write_message(&mut self.control, &end).expect("round end");
    }

    /// The next control frame from the destination, waiting at most `within`.
    fn answer(&mut self, within: Duration) -> Result<Message, ProtocolError> {
        self.control
            .set_read_timeout(Some(within))
            .expect("read timeout");
        read_message(&mut self.control)
    }

    /// `EndOfData` on every data stream, then `State` and `Complete` with the digest of the
    /// pages sent.
    fn complete(&mut self, rounds: u32) {
        for d in &mut self.data {
            write_message(d, &Message::EndOfData).expect("end of data");
        }
        let complete = Complete {
            digest: self.hashes.digest(),
            pages: self.pages,
            rounds,
        };
        write_message(&mut self.control, &Message::State(b"s".to_vec())).expect("state");
        write_message(&mut self.control, &Message::Complete(complete)).expect("complete");
    }
}

/// Runs `receive` into `dst` while `script` plays the source; returns what `receive` gave.
fn scripted(
    dst: &SoftVm,
    opts: &ReceiveOptions,
    streams: u32,
    script: impl FnOnce(&mut Script) + Send,
) -> Result<ReceiveSummary, MigrationError> {
    let l = loopback();
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(dst, &l, opts));
        let mut src = Script::connect(dst, &l, streams);
        script(&mut src);
        let r = h.join().expect("receiver thread");
        drop(src);
        r
    })
}

fn assert_truncated_data_stream(r: &Result<ReceiveSummary, MigrationError>) {
    assert!(
        matches!(
            r,
            Err(MigrationError::Wire {
                phase: "receiving pages",
                source: ProtocolError::Truncated
            })
        ),
        "the cut data stream must be the reported cause: {r:?}"
    );
}

#[test]
fn a_data_stream_cut_inside_page_data_is_blamed_as_truncated() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = scripted(&dst, &ropts(), 2, |src| {
        // Stream 1 stays open and silent; stream 0 ends 100 bytes into its second page.
        let b = src.batch(0, &[1, 2]);
        let keep = b.len() - PAGE_SIZE + 100;
        src.send_cut(0, &b, keep);
        // The control stream stays open and silent too: only the data stream can tell.
        match src.answer(Duration::from_secs(5)) {
            Ok(Message::Failed { reason }) => assert!(
                reason.contains("receiving pages") && reason.contains("truncated"),
                "{reason}"
            ),
            other => panic!("expected Failed naming the truncated stream, got {other:?}"),
        }
    });
    assert_truncated_data_stream(&r);
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn a_cut_data_stream_is_the_root_cause_of_a_later_control_stream_error() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    // Room for the pauses below inside one control read.
    let opts = ReceiveOptions {
        io_timeout: Duration::from_secs(5),
        ..ropts()
    };
    let r = scripted(&dst, &opts, 1, |src| {
        // The destination starts reading a control frame and blocks inside it...
        let garbage = [0xEEu8; protocol::HEADER_LEN];
        src.control.write_all(&garbage[..5]).expect("control");
        std::thread::sleep(Duration::from_millis(200));
        // ... while the data stream is cut inside page data ...
        let b = src.batch(3, &[9]);
        let keep = b.len() - 1000;
        src.send_cut(0, &b, keep);
        // (time for its receiver thread to see the cut, even on a loaded machine)
        std::thread::sleep(Duration::from_secs(1));
        // ... and only then does the control frame end, as garbage (a bad magic). The data
        // stream failed first: it is the cause reported, not the garbage.
        src.control.write_all(&garbage[5..]).expect("control");
        match src.answer(Duration::from_secs(5)) {
            Ok(Message::Failed { reason }) => assert!(reason.contains("truncated"), "{reason}"),
            other => panic!("expected Failed naming the truncated stream, got {other:?}"),
        }
    });
    assert_truncated_data_stream(&r);
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn a_failed_destination_closes_its_data_streams() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let mut data = Vec::new();
    let r = scripted(&dst, &ropts(), 2, |src| {
        // Data on one stream, fully received (acknowledged) before the source gives up:
        // nothing is left unread that would make the close a reset.
        let b = src.batch(0, &[5, 0, 6]);
        src.send(0, &b);
        src.round_end(1);
        let ack = src.answer(Duration::from_secs(5));
        assert!(matches!(ack, Ok(Message::RoundAck { round: 1 })), "{ack:?}");
        write_message(
            &mut src.control,
            &Message::Failed {
                reason: "scripted".into(),
            },
        )
        .expect("failed");
        data = std::mem::take(&mut src.data);
    });
    assert!(
        matches!(r, Err(MigrationError::PeerFailed { ref reason }) if reason == "scripted"),
        "{r:?}"
    );
    // The source keeps its data streams open: the destination's receivers must have closed
    // theirs (a receiver left blocked on its socket would keep it open).
    for (i, d) in data.iter_mut().enumerate() {
        d.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut buf = [0u8; 64];
        let n = d.read(&mut buf);
        assert!(
            matches!(n, Ok(0)),
            "data stream {i} still open on the destination: {n:?}"
        );
    }
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn a_round_is_acknowledged_only_once_every_batch_of_it_arrived() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = scripted(&dst, &ropts(), 1, |src| {
        // A batch of one data page (16 + 17 + 4096 bytes), then a batch of one zero page
        // (16 + 17 bytes): announced together, the second sent only after a pause.
        let first = src.batch(0, &[0x33]);
        let second = src.batch(1, &[0]);
        src.send(0, &first);
        src.data_bytes += second.len() as u64;
        src.round_end(1);
        let early = src.answer(Duration::from_millis(400));
        assert!(
            matches!(early, Err(ProtocolError::Io(ref e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "acknowledged a round with {} of its {} data bytes missing: {early:?}",
            second.len(),
            src.data_bytes
        );
        src.data[0].write_all(&second).expect("second batch");
        let ack = src.answer(Duration::from_secs(5));
        assert!(matches!(ack, Ok(Message::RoundAck { round: 1 })), "{ack:?}");
        assert_eq!(dst.snapshot()[..PAGE_SIZE], [0x33; PAGE_SIZE]);
        let end = Message::Failed {
            reason: "scripted".into(),
        };
        write_message(&mut src.control, &end).expect("failed");
    });
    assert!(matches!(r, Err(MigrationError::PeerFailed { .. })), "{r:?}");
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn verify_memory_rechecks_memory_received_over_multi_tcp() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let opts = ReceiveOptions {
        verify_memory: true,
        ..ropts()
    };
    let r = scripted(&dst, &opts, 1, |src| {
        let b = src.batch(0, &[7; 16]);
        src.send(0, &b);
        src.round_end(1);
        let ack = src.answer(Duration::from_secs(5));
        assert!(matches!(ack, Ok(Message::RoundAck { round: 1 })), "{ack:?}");
        // Behind the receiver's back, two pages in 1024 are stamped: page 0 (received as all
        // 7s) and page 512 (never sent, so recorded as zero).
        dst.fill(2.0 / 1024.0);
        src.complete(1);
        match src.answer(Duration::from_secs(5)) {
            Ok(Message::Failed { reason }) => assert!(reason.contains("page 0"), "{reason}"),
            other => panic!("expected Failed naming page 0, got {other:?}"),
        }
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::VerifyMismatch {
                page: 0,
                mismatched: 2
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
    assert!(dst.restored_state().is_none(), "verified before restoring");
}
