//! Throughput of each transport: SoftVm to SoftVm over loopback, idle guest (or a writer).
//!
//! ```sh
//! CARGO_TARGET_DIR=target-mig cargo bench -p fastmig-migration --features test-utils \
//!     --bench throughput -- [MiB] [fill-fraction] [writer-pages-per-s]
//! ```
//! Prints one JSON summary line per transport (source summary plus destination figures).

use std::time::Duration;

use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigrateOptions, ReceiveOptions, TransportKind,
};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mib: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(256);
    let fill: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let rate: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0);
    let transports = [
        ("classic", TransportKind::Classic),
        ("multi-tcp:1", TransportKind::MultiTcp { streams: 1 }),
        ("multi-tcp:2", TransportKind::MultiTcp { streams: 2 }),
        ("multi-tcp:4", TransportKind::MultiTcp { streams: 4 }),
        ("shm", TransportKind::Shm),
        ("handover", TransportKind::Handover),
    ];
    for (label, transport) in transports {
        let src = match SoftVm::new(mib << 20) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("softvm: {e}");
                std::process::exit(1);
            }
        };
        src.fill(fill);
        if rate > 0 {
            src.start_writer(WriterConfig {
                pages_per_sec: rate,
                pattern: WritePattern::Random { seed: 1 },
            });
        }
        let dst = match SoftVm::new_incoming(mib << 20) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("softvm: {e}");
                std::process::exit(1);
            }
        };
        let ep: Endpoint = match transport {
            TransportKind::Shm | TransportKind::Handover => Endpoint::Unix(
                std::env::temp_dir().join(format!("fastmig-bench-{}.sock", std::process::id())),
            ),
            _ => "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
        };
        let l = Listener::bind(&ep).unwrap_or_else(|e| panic!("{e}"));
        let ep = l.endpoint().unwrap_or_else(|e| panic!("{e}"));
        let opts = MigrateOptions {
            transport,
            downtime_limit: Duration::from_millis(300),
            ..Default::default()
        };
        let (s, d) = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let o = ReceiveOptions::default();
                if transport == TransportKind::Handover {
                    let adopt = IncomingVm::OnDemand(Box::new(SoftVm::incoming));
                    receive(&l, &o, adopt).map(|(_vm, d)| d)
                } else {
                    receive(&l, &o, IncomingVm::Only(&dst)).map(|(_vm, d)| d)
                }
            });
            let s = migrate(&src, &ep, &opts);
            (s, h.join())
        });
        match (s, d) {
            (Ok(s), Ok(Ok(d))) => println!(
                "{{\"label\":\"{label}\",\"mib\":{mib},\"fill\":{fill},\"writer_pages_s\":{rate},\"total_ms\":{:.1},\"downtime_ms\":{:.1},\"setup_ms\":{:.2},\"rounds\":{},\"throughput_mib_s\":{:.1},\"bytes_sent\":{},\"zero_pages\":{},\"src_cpu_s\":{:.3},\"dst_cpu_s\":{:.3},\"digest_match\":{},\"dst_setup_ms\":{:.2},\"dst_pages\":{}}}",
                s.total_ms, s.downtime_ms, s.setup_ms, s.rounds, s.throughput_mib_s, s.bytes_sent,
                s.zero_pages_skipped, s.src_cpu_s, s.dst_cpu_s, s.digest_match, d.setup_ms, d.pages_received
            ),
            (s, d) => eprintln!("{label}: failed: source {s:?} destination {d:?}"),
        }
    }
}
