//! Hardening of the destination's endpoint: stray connections and unix socket paths.

use std::io::Write;
use std::time::Duration;

use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{
    migrate, receive, Conn, Endpoint, IncomingVm, Listener, MigrateOptions, MigrationError,
    ReceiveOptions, TransportKind,
};

const MEM: u64 = 4 << 20;

/// A destination that got a port scan, a client speaking garbage and a silent client still
/// takes the real source that comes next, and the VM moves with a matching digest.
fn strays_then_real_source(ep: &str, transport: TransportKind) {
    let listener = Listener::bind(&ep.parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().expect("endpoint");
    let src = SoftVm::new(MEM).expect("source");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(MEM).expect("destination");
    let ropts = ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(30)),
        io_timeout: Duration::from_secs(5),
        ..ReceiveOptions::default()
    };
    let summary = std::thread::scope(|s| {
        let incoming =
            s.spawn(|| receive(&listener, &ropts, IncomingVm::Only(&dst)).map(|(_, s)| s));
        let t = Duration::from_secs(5);
        drop(Conn::connect(&at, t).expect("port scan"));
        let mut garbage = Conn::connect(&at, t).expect("garbage");
        garbage
            .write_all(b"SSH-2.0-OpenSSH_9.6\r\n")
            .expect("write garbage");
        let _silent = Conn::connect(&at, t).expect("silent client");
        std::thread::sleep(Duration::from_millis(200));
        let opts = MigrateOptions {
            transport,
            ..MigrateOptions::default()
        };
        let summary = migrate(&src, &at, &opts).expect("the real source migrates");
        incoming.join().expect("receiver").expect("receive");
        summary
    });
    assert!(summary.digest_match);
    assert!(dst.is_running() && !src.is_running());
}

#[test]
fn stray_connections_do_not_stop_a_waiting_destination_classic() {
    strays_then_real_source("127.0.0.1:0", TransportKind::Classic);
}

#[test]
fn stray_connections_do_not_stop_a_waiting_destination_multi_tcp() {
    strays_then_real_source("127.0.0.1:0", TransportKind::MultiTcp { streams: 2 });
}

#[test]
fn stray_connections_do_not_stop_a_waiting_destination_shm() {
    let dir = tempfile_dir();
    let ep = format!("unix:{}", dir.join("m.sock").display());
    strays_then_real_source(&ep, TransportKind::Shm);
}

#[test]
fn a_destination_with_only_strays_gives_up_at_its_accept_deadline() {
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().expect("endpoint");
    let dst = SoftVm::new_incoming(MEM).expect("destination");
    let ropts = ReceiveOptions {
        accept_timeout: Some(Duration::from_millis(800)),
        io_timeout: Duration::from_millis(200),
        ..ReceiveOptions::default()
    };
    let mut garbage = Conn::connect(&at, Duration::from_secs(5)).expect("garbage");
    garbage.write_all(&[0xff; 100]).expect("write");
    let r = receive(&listener, &ropts, IncomingVm::Only(&dst)).map(|(_, s)| s);
    assert!(
        matches!(r, Err(MigrationError::Timeout { phase: "accept" })),
        "{r:?}"
    );
    assert!(!dst.is_running());
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fastmig-hardening-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn a_unix_listener_refuses_a_users_file_and_a_live_listeners_socket() {
    let d = tempfile_dir();
    let file = d.join("notes.txt");
    std::fs::write(&file, b"keep me").expect("write");
    let e = Listener::bind(&Endpoint::Unix(file.clone())).expect_err("a regular file");
    assert!(
        matches!(e, MigrationError::Listen { .. }),
        "bind error should be a listen error: {e:?}"
    );
    assert_eq!(std::fs::read(&file).expect("file kept"), b"keep me");

    let sock = Endpoint::Unix(d.join("m.sock"));
    let first = Listener::bind(&sock).expect("first listener");
    let e = Listener::bind(&sock).expect_err("second listener on the same path");
    assert!(e.to_string().contains("listening on"), "{e}");
    // The first listener still owns the path: a source reaches it.
    let _c = Conn::connect(&sock, Duration::from_secs(2)).expect("connect");
    first
        .accept(Some(Duration::from_secs(2)))
        .expect("the first listener still accepts");
}

/// A fake destination that takes the whole migration (acking rounds) and then, at `Ready`,
/// behaves as a destination stopped by SIGSTOP: `ready` false: stops before sending `Ready`;
/// true: sends `Ready`, reads `Commit`, and stops for `stall` before acknowledging.
fn stalling_destination(ready: bool, stall: Duration) -> (Endpoint, std::thread::JoinHandle<bool>) {
    use fastmig_migration::protocol::{read_message, write_message, HelloReply, Message};
    let l = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let ep = l.endpoint().expect("endpoint");
    let h = std::thread::spawn(move || {
        let mut c = l.accept(Some(Duration::from_secs(10))).expect("accept");
        c.set_timeouts(Some(Duration::from_secs(30)))
            .expect("timeouts");
        let Ok(Message::Hello(_)) = read_message(&mut c) else {
            panic!("expected Hello")
        };
        let reply = HelloReply {
            version: fastmig_migration::protocol::PROTOCOL_VERSION,
            accepted: true,
            reason: None,
        };
        write_message(&mut c, &Message::HelloReply(reply)).expect("reply");
        loop {
            match read_message(&mut c).expect("frame") {
                Message::RoundEnd { round, .. } => {
                    write_message(&mut c, &Message::RoundAck { round }).expect("ack")
                }
                Message::Complete(_) => break,
                _ => {}
            }
        }
        if !ready {
            std::thread::sleep(stall);
            return false;
        }
        write_message(&mut c, &Message::Ready).expect("ready");
        let committed = matches!(read_message(&mut c), Ok(Message::Commit));
        std::thread::sleep(stall);
        committed
    });
    (ep, h)
}

fn quick_source_opts() -> MigrateOptions {
    MigrateOptions {
        io_timeout: Duration::from_secs(1),
        ack_timeout: Duration::from_secs(1),
        ..MigrateOptions::default()
    }
}

#[test]
fn a_destination_stalled_before_ready_fails_the_source_within_its_timeout() {
    let src = SoftVm::new(MEM).expect("source");
    src.fill(0.5);
    let (ep, dst) = stalling_destination(false, Duration::from_secs(4));
    let start = std::time::Instant::now();
    let r = migrate(&src, &ep, &quick_source_opts());
    let took = start.elapsed();
    assert!(
        matches!(r, Err(MigrationError::Timeout { phase: "ready" })),
        "{r:?}"
    );
    // Timeout plus one second: the abort (Failed to a silent peer) is bounded too.
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(500),
        "{took:?}"
    );
    assert!(src.is_running(), "the VM must run on the source again");
    assert!(!dst.join().expect("fake destination"));
}

/// After `Commit` the source has given the VM up: a destination that stalls then leaves the
/// source in doubt, paused, never running — the destination will run the VM when it goes on
/// (it holds `Commit`), so resuming here could run it twice.
#[test]
fn a_destination_stalled_after_commit_leaves_the_source_paused_in_doubt() {
    let src = SoftVm::new(MEM).expect("source");
    src.fill(0.5);
    let (ep, dst) = stalling_destination(true, Duration::from_secs(3));
    let start = std::time::Instant::now();
    let r = migrate(&src, &ep, &quick_source_opts());
    let took = start.elapsed();
    assert!(matches!(r, Err(MigrationError::InDoubt(_))), "{r:?}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(500),
        "{took:?}"
    );
    assert!(
        !src.is_running(),
        "the source resumed a VM it committed away"
    );
    assert!(
        dst.join().expect("fake destination"),
        "Commit never reached the destination"
    );
}
