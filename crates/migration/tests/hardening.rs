//! Hardening of the destination's endpoint: stray connections and unix socket paths.

use std::io::Write;
use std::time::Duration;

use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{
    migrate, receive, Conn, Endpoint, Listener, MigrateOptions, MigrationError, ReceiveOptions,
    TransportKind,
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
        let incoming = s.spawn(|| receive(&dst, &listener, &ropts));
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
    let r = receive(&dst, &listener, &ropts);
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
