//! Writes a seed corpus from real sessions: runs SoftVm migrations (classic, multi-tcp)
//! through a recording relay and stores what the source sent on its control stream (the
//! handshake target's seeds) and each frame of it on its own (the wire decoder's seeds).
//!
//!   cargo run --manifest-path fuzz/Cargo.toml --bin capture_seeds -- fuzz/corpus

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastmig_migration::protocol::decode;
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigrateOptions, ReceiveOptions, TransportKind,
};

/// Relays every connection to `target`, recording the first connection's client bytes.
fn recording_relay(target: Endpoint) -> (Endpoint, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let ep = Endpoint::Tcp(l.local_addr().expect("addr"));
    let rec = Arc::new(Mutex::new(Vec::new()));
    let first = Arc::clone(&rec);
    let Endpoint::Tcp(to) = target else {
        panic!("tcp only")
    };
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(mut client) = c else { break };
            let mut server = TcpStream::connect(to).expect("connect target");
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let rec = (i == 0).then(|| Arc::clone(&first));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 || server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if let Some(r) = &rec {
                        r.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (ep, rec)
}

fn session(transport: TransportKind) -> Vec<u8> {
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("ep")).expect("bind");
    let (relay, rec) = recording_relay(listener.endpoint().expect("endpoint"));
    // Small and sparse: a seed should be a few hundred KiB at most.
    let src = SoftVm::new(256 << 10).expect("source");
    src.fill(0.1);
    let dst = SoftVm::new_incoming(256 << 10).expect("destination");
    let ropts = ReceiveOptions::default();
    std::thread::scope(|s| {
        let incoming =
            s.spawn(|| receive(&listener, &ropts, IncomingVm::Only(&dst)).map(|(_, s)| s));
        let opts = MigrateOptions {
            transport,
            ..MigrateOptions::default()
        };
        migrate(&src, &relay, &opts).expect("migration");
        incoming.join().expect("receiver").expect("receive");
    });
    std::thread::sleep(Duration::from_millis(100));
    let bytes = rec.lock().expect("lock").clone();
    bytes
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let out = Path::new(&out);
    for dir in ["handshake", "wire_decoder"] {
        std::fs::create_dir_all(out.join(dir)).expect("corpus dir");
    }
    for (name, t) in [
        ("classic", TransportKind::Classic),
        ("multi-tcp", TransportKind::MultiTcp { streams: 2 }),
    ] {
        let bytes = session(t);
        std::fs::write(
            out.join("handshake").join(format!("seed-{name}-session")),
            &bytes,
        )
        .expect("write");
        // One file per distinct frame kind: the decoder's seeds.
        let mut at = 0;
        let mut seen = std::collections::HashSet::new();
        while let Ok((msg, n)) = decode(&bytes[at..]) {
            if seen.insert(msg.name()) {
                let f = out
                    .join("wire_decoder")
                    .join(format!("seed-{name}-{}", msg.name()));
                std::fs::write(f, &bytes[at..at + n]).expect("write");
            }
            at += n;
        }
        println!("{name}: {} bytes, frame kinds {seen:?}", bytes.len());
    }
}
