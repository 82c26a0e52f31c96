//! A handover's summaries: nothing is copied, so no bandwidth is measured, and the CPU
//! figures are only the two calling threads' (the transport has no worker threads). Written
//! for the mutants of `transport/handover.rs` and `engine.rs`'s summary (TESTING.md).

mod common;

use std::time::{Duration, Instant};

use common::MIB;
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigrateOptions, ReceiveOptions, TransportKind,
};

fn unix_endpoint(tag: &str) -> Endpoint {
    Endpoint::Unix(std::env::temp_dir().join(format!(
        "fastmig-handover-{tag}-{}.sock",
        std::process::id()
    )))
}

#[test]
fn a_handover_reports_no_throughput_and_cpu_within_its_wall_time() {
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let l = Listener::bind(&unix_endpoint("figures")).expect("bind");
    let ep = l.endpoint().expect("endpoint");
    let opts = MigrateOptions {
        transport: TransportKind::Handover,
        ..Default::default()
    };
    let (r, d, wall) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let t0 = Instant::now();
            let d = receive(
                &l,
                &ReceiveOptions {
                    accept_timeout: Some(Duration::from_secs(10)),
                    ..Default::default()
                },
                IncomingVm::OnDemand(Box::new(SoftVm::incoming)),
            );
            (d, t0.elapsed())
        });
        let t0 = Instant::now();
        let r = migrate(&src, &ep, &opts);
        let src_wall = t0.elapsed();
        let (d, dst_wall) = h.join().expect("receiver");
        (r, d, [src_wall, dst_wall])
    });
    let s = r.expect("handover");
    let (dst, d) = d.expect("receive");
    assert!(dst.is_running() && !src.is_running());
    // No round, no page: nothing to measure a bandwidth on (0, not 0 / 0).
    assert_eq!((s.rounds, s.bytes_sent), (0, 0), "{s:?}");
    assert_eq!(s.throughput_mib_s, 0.0, "{s:?}");
    // One thread on each side did all the work: its CPU time fits in its wall time.
    for (side, cpu, wall) in [
        ("source", s.src_cpu_s, wall[0]),
        ("destination", d.dst_cpu_s, wall[1]),
    ] {
        assert!(
            cpu > 0.0 && cpu <= wall.as_secs_f64(),
            "{side}: CPU {cpu} s in {wall:?}"
        );
    }
    assert_eq!(
        s.dst_cpu_s, d.dst_cpu_s,
        "the source reports the destination's"
    );
}
