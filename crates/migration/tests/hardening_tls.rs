//! Mutual TLS tunnels around classic and multi-tcp, without KVM.

#[path = "support/pki.rs"]
mod pki;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::tls::{client_config, server_config, DestTunnel, SourceTunnel, TlsFiles};
use fastmig_migration::{
    migrate, receive, IncomingVm, MigrateOptions, MigrationError, ReceiveOptions, TransportKind,
};
use pki::Ca;

const MEM: u64 = 8 << 20;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Migrates a SoftVm from `src_tls` to a destination using `dst_tls`; returns the source's
/// result and whether the destination ran the VM.
fn migrate_tls(
    src_tls: &TlsFiles,
    dst_tls: &TlsFiles,
    transport: TransportKind,
) -> (
    Result<fastmig_migration::MigrationSummary, MigrationError>,
    bool,
) {
    let public = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = public.local_addr().expect("addr");
    let (tunnel, inner) = DestTunnel::start(public, server_config(dst_tls).expect("server config"))
        .expect("dest tunnel");
    let src = SoftVm::new(MEM).expect("source");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(MEM).expect("destination");
    let ropts = ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(3)),
        io_timeout: Duration::from_secs(3),
        ..ReceiveOptions::default()
    };
    let out = SourceTunnel::start(addr, client_config(src_tls).expect("client config"))
        .expect("source tunnel");
    let opts = MigrateOptions {
        transport,
        io_timeout: Duration::from_secs(3),
        ..MigrateOptions::default()
    };
    let r = std::thread::scope(|s| {
        let incoming = s.spawn(|| receive(&inner, &ropts, IncomingVm::Only(&dst)).map(|(_, s)| s));
        let r = migrate(&src, out.endpoint(), &opts).map_err(|e| out.explain(e));
        let _ = incoming.join().expect("receiver");
        r
    });
    drop(tunnel);
    assert_ne!(
        src.is_running(),
        dst.is_running(),
        "the VM must run on exactly one side"
    );
    (r, dst.is_running())
}

#[test]
fn a_good_pair_migrates_over_tls_classic_and_multi_tcp() {
    let d = dir();
    let ca = Ca::new(d.path(), "cluster");
    let a = ca.leaf(d.path(), "a", false);
    let b = ca.leaf(d.path(), "b", false);
    for t in [
        TransportKind::Classic,
        TransportKind::MultiTcp { streams: 2 },
    ] {
        let (r, moved) = migrate_tls(&a, &b, t);
        let s = r.expect("migration over TLS");
        assert!(s.digest_match && moved, "{t:?}");
    }
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    let d = dir();
    let ca = Ca::new(d.path(), "cluster");
    let rogue = Ca::new(d.path(), "rogue");
    let good = ca.leaf(d.path(), "good", false);
    let mut bad = rogue.leaf(d.path(), "bad", false);
    // The rogue source trusts the cluster CA (it knows the destination), but its own
    // certificate is signed by another CA.
    bad.ca = good.ca.clone();
    let (r, moved) = migrate_tls(&bad, &good, TransportKind::Classic);
    let e = r.expect_err("refused");
    let text = e.to_string();
    assert!(text.contains("TLS") && text.contains("UnknownCA"), "{text}");
    assert!(!moved);
}

#[test]
fn an_expired_certificate_is_refused() {
    let d = dir();
    let ca = Ca::new(d.path(), "cluster");
    let good = ca.leaf(d.path(), "good", false);
    let old = ca.leaf(d.path(), "old", true);
    let (r, moved) = migrate_tls(&old, &good, TransportKind::MultiTcp { streams: 2 });
    let text = r.expect_err("refused").to_string();
    assert!(text.to_lowercase().contains("expired"), "{text}");
    assert!(!moved);
}
