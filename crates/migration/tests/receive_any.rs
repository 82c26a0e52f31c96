//! The one destination entry point, `receive`: the source's `Hello` picks the path
//! (a prepared VM, a VM built during setup, or a handover onto the source's memory).

mod common;

use std::time::Duration;

use common::{assert_source_intact, loopback, MIB};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigratableVm, MigrateOptions, MigrationError,
    ReceiveOptions, TransportKind, VmError,
};

fn writing_source(bytes: u64) -> SoftVm {
    let src = SoftVm::new(bytes).expect("src");
    src.fill(0.5);
    src.start_writer(WriterConfig {
        pages_per_sec: 3000,
        pattern: WritePattern::Random { seed: 9 },
    });
    std::thread::sleep(Duration::from_millis(20));
    src
}

#[test]
fn a_vm_built_during_setup_gets_the_sources_size_and_memory() {
    let src = writing_source(8 * MIB);
    let l = loopback();
    let ep = l.endpoint().expect("endpoint");
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            receive(
                &l,
                &ReceiveOptions::default(),
                IncomingVm::OnDemand(Box::new(|layout, regions| {
                    assert!(regions.is_none(), "not a handover");
                    SoftVm::new_incoming(layout.memory_bytes())
                })),
            )
        });
        (
            migrate(&src, &ep, &MigrateOptions::default()),
            h.join().expect("join"),
        )
    });
    let s = r.expect("migration");
    let (dst, d) = d.expect("receive");
    src.stop_writer();
    assert!(s.digest_match);
    assert_eq!(d.transport, "classic");
    assert_eq!(dst.layout(), src.layout());
    assert!(src.snapshot() == dst.snapshot(), "memory as of the pause");
    assert!(dst.is_running() && !src.is_running());
}

#[test]
fn a_handover_drops_the_prepared_vm_and_adopts_the_sources_memory() {
    let src = writing_source(8 * MIB);
    let ep = Endpoint::Unix(
        std::env::temp_dir().join(format!("fastmig-any-handover-{}.sock", std::process::id())),
    );
    let l = Listener::bind(&ep).expect("bind");
    let prepared = SoftVm::new_incoming(8 * MIB).expect("prepared");
    let opts = MigrateOptions {
        transport: TransportKind::Handover,
        ..Default::default()
    };
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            receive(
                &l,
                &ReceiveOptions::default(),
                IncomingVm::Prepared(
                    prepared,
                    Box::new(|layout, regions| {
                        let regions = regions.ok_or_else(|| VmError::msg("expected a handover"))?;
                        SoftVm::adopt(layout, regions)
                    }),
                ),
            )
        });
        (migrate(&src, &ep, &opts), h.join().expect("join"))
    });
    let s = r.expect("handover");
    let (dst, _) = d.expect("receive");
    src.stop_writer();
    assert_eq!((s.transport.as_str(), s.bytes_sent), ("handover", 0));
    assert!(src.snapshot() == dst.snapshot());
    assert!(dst.is_running() && !src.is_running());
}

#[test]
fn a_vm_that_cannot_be_built_refuses_the_source_which_keeps_running() {
    let src = writing_source(4 * MIB);
    let l = loopback();
    let ep = l.endpoint().expect("endpoint");
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            receive::<SoftVm>(
                &l,
                &ReceiveOptions::default(),
                IncomingVm::OnDemand(Box::new(|_, _| Err(VmError::msg("no memory for 4 MiB")))),
            )
        });
        (
            migrate(&src, &ep, &MigrateOptions::default()),
            h.join().expect("join"),
        )
    });
    match r {
        Err(MigrationError::PeerRefused { reason }) => {
            assert!(reason.contains("no memory for 4 MiB"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(d.is_err());
    src.stop_writer();
    assert_source_intact(&src);
}
