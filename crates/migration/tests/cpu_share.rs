//! The CPU figures account for the threads that did the work: the source's `src_cpu_s` and the
//! destination's `dst_cpu_s` together are nearly all the CPU the process used while migrating
//! (both sides run in this process), so a sender thread whose CPU dropped out of
//! `src_cpu_s` shows. Alone in its file: the process CPU time must not include other tests.

mod common;

use common::{loopback, pair_on, MIB};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{Endpoint, Listener, MigrateOptions, ReceiveOptions, TransportKind};

fn process_cpu_s() -> f64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[test]
fn source_and_destination_cpu_add_up_to_what_the_process_used() {
    for kind in [
        TransportKind::Classic,
        TransportKind::MultiTcp { streams: 2 },
        TransportKind::Shm,
    ] {
        let src = SoftVm::new(64 * MIB).expect("src");
        src.fill(1.0);
        let dst = SoftVm::new_incoming(64 * MIB).expect("dst");
        let opts = MigrateOptions {
            transport: kind,
            ..Default::default()
        };
        // shm: about 8 % of the process CPU goes outside both sides' measurement (measured
        // 91-92 % accounted for), so a looser floor.
        let floor = if kind == TransportKind::Shm { 0.7 } else { 0.9 };
        // shm needs both sides on one host: a Unix socket.
        let l = if kind == TransportKind::Shm {
            let p = std::env::temp_dir().join(format!("fastmig-cpu-{}.sock", std::process::id()));
            Listener::bind(&Endpoint::Unix(p)).expect("bind")
        } else {
            loopback()
        };
        let before = process_cpu_s();
        let (r, d) = pair_on(&l, &src, &dst, &opts, &ReceiveOptions::default());
        let used = process_cpu_s() - before;
        let s = r.expect("migration");
        d.expect("receive");
        let reported = s.src_cpu_s + s.dst_cpu_s;
        eprintln!(
            "{kind:?}: src {:.4} s + dst {:.4} s = {reported:.4} s of {used:.4} s",
            s.src_cpu_s, s.dst_cpu_s
        );
        // Not counted: thread start-up and the few instructions around each side's own
        // measurement; the sending workers alone are a fifth of the total or more.
        assert!(
            reported >= floor * used,
            "{kind:?}: src {} s + dst {} s of {used} s used by the process",
            s.src_cpu_s,
            s.dst_cpu_s
        );
        assert!(
            reported <= used * 1.001 + 1e-3,
            "{kind:?}: {reported} s reported, {used} s used"
        );
    }
}
