//! Failure safety: every failed migration leaves the source VM running with its memory intact
//! and never resumes a partial destination.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use common::{assert_source_intact, corrupting_proxy, loopback, pair, receive_into, MIB};
use fastmig_migration::protocol::{
    self, encode, encode_page, encode_with_version, read_message, write_message, Hello, HelloReply,
    Message, ProtocolError,
};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    migrate, CancelToken, Conn, Endpoint, Listener, MigratableVm, MigrateOptions, MigrationError,
    Progress, ReceiveOptions, TransportKind, PAGE_SIZE,
};

fn quick_opts() -> MigrateOptions {
    MigrateOptions {
        io_timeout: Duration::from_millis(500),
        ack_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    }
}

/// For tests whose failure is not a timeout: timeouts a loaded machine never reaches, so
/// that a slow run cannot turn the failure under test into a timeout.
fn patient_opts() -> MigrateOptions {
    MigrateOptions {
        io_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(10),
        ..quick_opts()
    }
}

fn patient_ropts() -> ReceiveOptions {
    ReceiveOptions {
        io_timeout: Duration::from_secs(10),
        commit_timeout: Duration::from_secs(10),
        ..quick_ropts()
    }
}

fn quick_ropts() -> ReceiveOptions {
    ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(5)),
        io_timeout: Duration::from_millis(800),
        commit_timeout: Duration::from_millis(800),
        verify_memory: false,
    }
}

fn hello_for(vm: &SoftVm, version: u16) -> Message {
    Message::Hello(Hello {
        version,
        max_version: version,
        layout: vm.layout(),
        transport: TransportKind::Classic,
        session: 1,
    })
}

/// A fake destination: accepts, answers the handshake, then runs `then` on the stream.
fn fake_destination(
    then: impl FnOnce(&mut Conn) + Send + 'static,
) -> (Endpoint, std::thread::JoinHandle<()>) {
    let l = loopback();
    let ep = l.endpoint().expect("ep");
    let h = std::thread::spawn(move || {
        let mut c = l.accept(Some(Duration::from_secs(5))).expect("accept");
        let Ok(Message::Hello(_)) = read_message(&mut c) else {
            panic!("expected hello")
        };
        let reply = HelloReply {
            version: protocol::PROTOCOL_VERSION,
            accepted: true,
            reason: None,
        };
        write_message(&mut c, &Message::HelloReply(reply)).expect("reply");
        then(&mut c);
    });
    (ep, h)
}

fn running_source() -> SoftVm {
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(1.0);
    src
}

#[test]
fn destination_refuses_other_protocol_version() {
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let l = loopback();
    let ep = l.endpoint().expect("ep");
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &quick_ropts()));
        let Endpoint::Tcp(addr) = ep else {
            unreachable!()
        };
        let mut c = TcpStream::connect(addr).expect("connect");
        std::io::Write::write_all(&mut c, &encode_with_version(&hello_for(&dst, 99), 99))
            .expect("send");
        match read_message(&mut c).expect("reply") {
            Message::HelloReply(r) => {
                assert!(!r.accepted);
                let reason = r.reason.unwrap_or_default();
                assert!(
                    reason.contains("version mismatch") && reason.contains("99"),
                    "{reason}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = h.join().expect("join").expect_err("must refuse");
        assert!(
            matches!(err, MigrationError::Incompatible { .. }),
            "{err:?}"
        );
    });
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn source_reports_refusal_from_newer_destination() {
    let src = running_source();
    let l = loopback();
    let ep = l.endpoint().expect("ep");
    let h = std::thread::spawn(move || {
        let mut c = l.accept(Some(Duration::from_secs(5))).expect("accept");
        let _ = read_message(&mut c);
        let reply = HelloReply {
            version: 2,
            accepted: false,
            reason: Some("protocol version mismatch: we speak 2".into()),
        };
        let bytes = encode_with_version(&Message::HelloReply(reply), 2);
        std::io::Write::write_all(&mut c, &bytes).expect("reply");
    });
    let err = migrate(&src, &ep, &quick_opts()).expect_err("refused");
    h.join().expect("join");
    match err {
        MigrationError::PeerRefused { reason } => assert!(reason.contains("version"), "{reason}"),
        other => panic!("expected PeerRefused, got {other:?}"),
    }
    assert_source_intact(&src);
    assert_eq!(src.resume_count(), 0, "never paused, so never resumed");
}

#[test]
fn memory_size_mismatch_is_refused_and_source_keeps_running() {
    let src = running_source();
    src.start_writer(WriterConfig {
        pages_per_sec: 2000,
        pattern: WritePattern::Random { seed: 1 },
    });
    let dst = SoftVm::new_incoming(32 * MIB).expect("dst");
    let (r, d) = pair(&src, &dst, &quick_opts(), &quick_ropts());
    match r {
        Err(MigrationError::PeerRefused { reason }) => {
            assert!(reason.contains("memory size mismatch"), "{reason}")
        }
        other => panic!("expected PeerRefused, got {other:?}"),
    }
    assert!(
        matches!(d, Err(MigrationError::Incompatible { .. })),
        "{d:?}"
    );
    assert_source_intact(&src);
    let before = src.writes();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        src.writes() > before,
        "the guest keeps running on the source"
    );
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn cancel_after_first_round_rolls_back_both_sides() {
    let src = running_source();
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let opts = MigrateOptions {
        cancel,
        // Cancel from the progress callback once round 1 is done: deterministic.
        progress: Some(std::sync::Arc::new(move |p: &Progress| {
            if p.round >= 1 {
                c2.cancel();
            }
        })),
        ..quick_opts()
    };
    let (r, d) = pair(&src, &dst, &opts, &quick_ropts());
    assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
    match d {
        Err(MigrationError::PeerFailed { reason }) => {
            assert!(reason.contains("cancelled"), "{reason}")
        }
        other => panic!("destination should hear of the cancel, got {other:?}"),
    }
    assert_source_intact(&src);
    assert!(!dst.is_running());
}

#[test]
fn destination_that_never_answers_times_out() {
    let src = running_source();
    // Bound but never accepted: the kernel completes the TCP handshake, nobody answers.
    let l = loopback();
    let ep = l.endpoint().expect("ep");
    let err = migrate(&src, &ep, &quick_opts()).expect_err("must time out");
    assert!(
        matches!(err, MigrationError::Timeout { phase: "handshake" }),
        "{err:?}"
    );
    assert_source_intact(&src);
    drop(l);
}

#[test]
fn destination_gone_mid_transfer() {
    let src = running_source();
    let before = src.snapshot();
    let (ep, h) = fake_destination(|c| {
        let mut buf = vec![0u8; 200_000];
        let _ = c.read_exact(&mut buf);
        // Then vanish.
    });
    let err = migrate(&src, &ep, &quick_opts()).expect_err("destination vanished");
    h.join().expect("join");
    // Writing pages or reading the round's ack, whichever meets the closed stream first.
    assert!(
        matches!(
            err,
            MigrationError::Wire {
                phase: "sending pages" | "round ack",
                ..
            }
        ),
        "{err:?}"
    );
    assert_source_intact(&src);
    assert!(src.snapshot() == before, "source memory intact");
}

#[test]
fn destination_gone_after_pause_resumes_source() {
    let src = running_source();
    let (ep, h) = fake_destination(|c| {
        // Swallow everything up to Complete, then close without Ready.
        loop {
            match read_message(c) {
                Ok(Message::Complete(_)) | Err(_) => break,
                Ok(Message::RoundEnd { round, .. }) => {
                    let _ = write_message(c, &Message::RoundAck { round });
                }
                Ok(_) => {}
            }
        }
    });
    let err = migrate(&src, &ep, &patient_opts()).expect_err("no ready");
    h.join().expect("join");
    assert!(
        matches!(
            err,
            MigrationError::Wire {
                phase: "ready",
                source: ProtocolError::Truncated
            }
        ),
        "{err:?}"
    );
    assert_source_intact(&src);
    assert_eq!(
        src.resume_count(),
        1,
        "the engine paused the VM and must resume it"
    );
}

#[test]
fn destination_silent_after_complete_times_out_and_resumes_source() {
    let src = running_source();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ep, h) = fake_destination(move |c| {
        loop {
            match read_message(c) {
                Ok(Message::Complete(_)) | Err(_) => break,
                Ok(Message::RoundEnd { round, .. }) => {
                    let _ = write_message(c, &Message::RoundAck { round });
                }
                Ok(_) => {}
            }
        }
        let _ = rx.recv_timeout(Duration::from_secs(5)); // hold the socket open, say nothing
    });
    let err = migrate(&src, &ep, &quick_opts()).expect_err("no ready");
    let _ = tx.send(());
    h.join().expect("join");
    assert!(
        matches!(err, MigrationError::Timeout { phase: "ready" }),
        "{err:?}"
    );
    assert_source_intact(&src);
    assert_eq!(src.resume_count(), 1);
}

#[test]
fn dirty_log_sync_failure_rolls_back() {
    let src = running_source();
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    src.fail_next_sync();
    let (r, d) = pair(&src, &dst, &quick_opts(), &quick_ropts());
    assert!(matches!(r, Err(MigrationError::DirtyLogSync(_))), "{r:?}");
    assert!(d.is_err());
    assert_source_intact(&src);
    assert!(!dst.is_running());
}

/// A fake source: handshake with `dst`'s layout, then `then` writes whatever it likes.
fn fake_source_into(
    dst: &SoftVm,
    then: impl FnOnce(&mut TcpStream),
) -> Result<fastmig_migration::ReceiveSummary, MigrationError> {
    let l = loopback();
    let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
        unreachable!()
    };
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(dst, &l, &quick_ropts()));
        let mut c = TcpStream::connect(addr).expect("connect");
        write_message(&mut c, &hello_for(dst, protocol::PROTOCOL_VERSION)).expect("hello");
        let Ok(Message::HelloReply(r)) = read_message(&mut c) else {
            panic!("no reply")
        };
        assert!(r.accepted);
        then(&mut c);
        drop(c);
        h.join().expect("join")
    })
}

fn page_frame(gpa: u64, fill: u8) -> Vec<u8> {
    let mut f = Vec::new();
    encode_page(&mut f, gpa, Some(&[fill; PAGE_SIZE]));
    f
}

#[test]
fn destination_rejects_connection_closed_mid_transfer() {
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let r = fake_source_into(&dst, |c| {
        for p in 0..10u64 {
            std::io::Write::write_all(c, &page_frame(p * PAGE_SIZE as u64, 3)).expect("page");
        }
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::Wire {
                phase: "receiving pages",
                source: ProtocolError::Truncated
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
    assert!(dst.restored_state().is_none());
}

#[test]
fn destination_rejects_truncated_frame() {
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let r = fake_source_into(&dst, |c| {
        let f = page_frame(0, 9);
        std::io::Write::write_all(c, &f[..f.len() / 2]).expect("half a page");
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::Wire {
                phase: "receiving pages",
                source: ProtocolError::Truncated
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn destination_rejects_corrupted_page_frame() {
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let r = fake_source_into(&dst, |c| {
        let mut f = page_frame(4096, 1);
        f[100] ^= 0x01;
        std::io::Write::write_all(c, &f).expect("page");
        std::thread::sleep(Duration::from_millis(50));
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::Wire {
                phase: "receiving pages",
                source: ProtocolError::BadChecksum { .. }
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn destination_rejects_complete_with_wrong_digest() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = fake_source_into(&dst, |c| {
        std::io::Write::write_all(c, &page_frame(0, 1)).expect("page");
        write_message(c, &Message::State(b"s".to_vec())).expect("state");
        let complete = protocol::Complete {
            digest: 12345,
            pages: 1024,
            rounds: 1,
        };
        write_message(c, &Message::Complete(complete)).expect("complete");
        let reply = read_message(c).expect("reply");
        assert!(
            matches!(reply, Message::Failed { ref reason } if reason.contains("digest")),
            "{reply:?}"
        );
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::Digest {
                source_digest: 12345,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
    assert!(
        dst.restored_state().is_none(),
        "state is restored only after the digest matched"
    );
}

#[test]
fn silent_source_times_out_on_destination() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = fake_source_into(&dst, |_| std::thread::sleep(Duration::from_millis(1500)));
    assert!(
        matches!(
            r,
            Err(MigrationError::Timeout {
                phase: "receiving pages"
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn corrupted_byte_in_classic_stream_fails_both_sides_safely() {
    let src = running_source();
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let l = loopback();
    // Byte 500 000 of the control stream lies inside some page frame of round 1.
    let proxy = corrupting_proxy(l.endpoint().expect("ep"), 0, 500_000);
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &quick_ropts()));
        (
            migrate(&src, &proxy, &quick_opts()),
            h.join().expect("join"),
        )
    });
    assert!(
        matches!(
            d,
            Err(MigrationError::Wire {
                phase: "receiving pages",
                source: ProtocolError::BadChecksum { .. }
            })
        ),
        "{d:?}"
    );
    assert!(r.is_err(), "{r:?}");
    assert_source_intact(&src);
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn corrupted_byte_in_multi_tcp_page_data_caught_by_digest() {
    let src = running_source(); // no writer: the damaged page is never re-sent
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let l = loopback();
    // Connection 1 is the first data stream; byte 100 000 is inside page data of batch 1.
    let proxy = corrupting_proxy(l.endpoint().expect("ep"), 1, 100_000);
    let opts = MigrateOptions {
        transport: TransportKind::MultiTcp { streams: 2 },
        ..patient_opts()
    };
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &patient_ropts()));
        (migrate(&src, &proxy, &opts), h.join().expect("join"))
    });
    assert!(matches!(d, Err(MigrationError::Digest { .. })), "{d:?}");
    match r {
        Err(MigrationError::PeerFailed { reason }) => {
            assert!(reason.contains("digest"), "{reason}")
        }
        other => panic!("expected PeerFailed(digest), got {other:?}"),
    }
    assert_source_intact(&src);
    assert_eq!(
        src.resume_count(),
        1,
        "paused for stop-and-copy, resumed after the failure"
    );
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn listener_unix_endpoint_parses_and_binds() {
    let path = std::env::temp_dir().join(format!("fastmig-test-{}.sock", std::process::id()));
    let ep: Endpoint = format!("unix:{}", path.display()).parse().expect("parse");
    let l = Listener::bind(&ep).expect("bind");
    assert_eq!(l.endpoint().expect("ep"), ep);
    drop(l);
    assert!(!path.exists(), "socket file removed on drop");
    assert!("nonsense".parse::<Endpoint>().is_err());
    let _ = encode(&Message::Ready);
}

#[test]
fn silent_multi_tcp_source_times_out_and_stops_receivers() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
        unreachable!()
    };
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &quick_ropts()));
        let mut c = TcpStream::connect(addr).expect("connect");
        let hello = Message::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            max_version: protocol::PROTOCOL_VERSION,
            layout: dst.layout(),
            transport: TransportKind::MultiTcp { streams: 1 },
            session: 42,
        });
        write_message(&mut c, &hello).expect("hello");
        let Ok(Message::HelloReply(rep)) = read_message(&mut c) else {
            panic!("no reply")
        };
        assert!(rep.accepted);
        let mut data = TcpStream::connect(addr).expect("data connect");
        write_message(
            &mut data,
            &Message::DataHello {
                session: 42,
                stream: 0,
            },
        )
        .expect("data hello");
        // Then say nothing on either stream, keeping both open.
        let r = h.join().expect("join");
        drop((c, data));
        r
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::Timeout {
                phase: "receiving pages"
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
}

/// A scripted multi-tcp source with one data stream, handshake done: (control, data).
fn multi_tcp_source_into(dst: &SoftVm, addr: std::net::SocketAddr) -> (TcpStream, TcpStream) {
    let mut c = TcpStream::connect(addr).expect("connect");
    let hello = Message::Hello(Hello {
        version: protocol::PROTOCOL_VERSION,
        max_version: protocol::PROTOCOL_VERSION,
        layout: dst.layout(),
        transport: TransportKind::MultiTcp { streams: 1 },
        session: 43,
    });
    write_message(&mut c, &hello).expect("hello");
    let Ok(Message::HelloReply(rep)) = read_message(&mut c) else {
        panic!("no reply")
    };
    assert!(rep.accepted);
    let mut data = TcpStream::connect(addr).expect("data connect");
    let data_hello = Message::DataHello {
        session: 43,
        stream: 0,
    };
    write_message(&mut data, &data_hello).expect("data hello");
    (c, data)
}

#[test]
fn round_ack_waits_until_the_rounds_data_has_landed() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
        unreachable!()
    };
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &quick_ropts()));
        let (mut c, mut data) = multi_tcp_source_into(&dst, addr);
        // One run of one page at gpa 0, its bytes after the descriptor.
        let mut batch = Vec::new();
        protocol::encode_batch(
            &mut batch,
            &[protocol::Run {
                gpa: 0,
                pages: 1,
                zero: vec![0],
            }],
        );
        let data_bytes = (batch.len() + PAGE_SIZE) as u64;
        // The round's end is announced before its data is sent: no ack may come yet.
        write_message(
            &mut c,
            &Message::RoundEnd {
                round: 1,
                data_bytes,
            },
        )
        .expect("round end");
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let early = read_message(&mut c);
        assert!(
            matches!(early, Err(ProtocolError::Io(ref e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "acknowledged a round whose data had not arrived: {early:?}"
        );
        std::io::Write::write_all(&mut data, &batch).expect("batch");
        std::io::Write::write_all(&mut data, &[0x77; PAGE_SIZE]).expect("page");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let ack = read_message(&mut c).expect("ack");
        assert_eq!(ack, Message::RoundAck { round: 1 });
        // The ack promises the page is in guest memory.
        assert_eq!(dst.snapshot()[..PAGE_SIZE], [0x77; PAGE_SIZE]);
        drop((c, data));
        let _ = h.join();
    });
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn round_data_that_never_arrives_times_out() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
        unreachable!()
    };
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &quick_ropts()));
        let (mut c, data) = multi_tcp_source_into(&dst, addr);
        let end = Message::RoundEnd {
            round: 1,
            data_bytes: 4096,
        };
        write_message(&mut c, &end).expect("round end");
        // ... and the data never comes, on a stream that stays open.
        let r = h.join().expect("join");
        drop((c, data));
        r
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::Timeout {
                phase: "receiving pages"
            })
        ),
        "{r:?}"
    );
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn setup_time_is_in_milliseconds_and_lasts_until_the_streams_are_up() {
    // The source opens its data stream 100 ms after the destination accepted it; the
    // destination's setup ends only once that stream is up, so it lasts at least that long
    // (the receiver is certainly running: it has answered the Hello).
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
        unreachable!()
    };
    let pause = Duration::from_millis(100);
    let started = std::time::Instant::now();
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &quick_ropts()));
        let mut c = TcpStream::connect(addr).expect("connect");
        let hello = Message::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            max_version: protocol::PROTOCOL_VERSION,
            layout: dst.layout(),
            transport: TransportKind::MultiTcp { streams: 1 },
            session: 44,
        });
        write_message(&mut c, &hello).expect("hello");
        assert!(matches!(read_message(&mut c), Ok(Message::HelloReply(r)) if r.accepted));
        std::thread::sleep(pause);
        let mut data = TcpStream::connect(addr).expect("data connect");
        let data_hello = Message::DataHello {
            session: 44,
            stream: 0,
        };
        write_message(&mut data, &data_hello).expect("data hello");
        write_message(&mut data, &Message::EndOfData).expect("end of data");
        // No page sent: the digest of an all-zero table.
        let pages = dst.layout().pages();
        let complete = protocol::Complete {
            digest: fastmig_migration::PageHashes::new(pages as usize).digest(),
            pages,
            rounds: 1,
        };
        write_message(&mut c, &Message::State(b"s".to_vec())).expect("state");
        write_message(&mut c, &Message::Complete(complete)).expect("complete");
        assert!(matches!(read_message(&mut c), Ok(Message::Ready)));
        write_message(&mut c, &Message::Commit).expect("commit");
        let _ = read_message(&mut c);
        drop(data);
        h.join().expect("receiver")
    });
    let s = r.expect("receive");
    assert!(s.setup_ms >= pause.as_secs_f64() * 1e3, "{s:?}");
    assert!(s.setup_ms <= s.total_ms, "{s:?}");
    // Both are within what this test saw from before the connection to the end.
    assert!(s.total_ms <= started.elapsed().as_secs_f64() * 1e3, "{s:?}");
}
