//! `rdma` on a machine without RDMA hardware (this one, CI's): the flag parses, and a
//! migration over it fails cleanly with a reason a user can act on, never a crash. The
//! transport itself runs in the Soft-RoCE lab (`tests/rdma-lab/run.sh`).

mod common;

use common::{assert_source_intact, pair, MIB};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::transport::{RDMA_DEFAULT_QPS, RDMA_QPS};
use fastmig_migration::{MigrateOptions, MigrationError, ReceiveOptions, TransportKind};

fn rdma(pin_budget_mib: u32, qps: u32) -> TransportKind {
    TransportKind::Rdma {
        pin_budget_mib,
        qps,
    }
}

#[test]
fn rdma_names_parse_with_an_optional_pin_budget_and_queue_pairs() {
    let d = RDMA_DEFAULT_QPS;
    assert!(
        RDMA_QPS.contains(&d) && d > 1,
        "several queue pairs by default"
    );
    for (s, k) in [
        ("rdma", rdma(0, d)),
        ("rdma:64", rdma(64, d)),
        ("rdma:pin=64", rdma(64, d)),
        ("rdma:qps=4", rdma(0, 4)),
        ("rdma:qps=1", rdma(0, 1)),
        ("rdma:qps=4,pin=256", rdma(256, 4)),
        ("rdma:pin=256,qps=16", rdma(256, 16)),
    ] {
        assert_eq!(s.parse::<TransportKind>().ok(), Some(k), "{s}");
    }
    for bad in [
        "rdma:0",
        "rdma:",
        "rdma:x",
        "rdma:-1",
        "rdma4",
        "rdma:pin=0",
        "rdma:qps=0",
        "rdma:qps=17",
        "rdma:qps=2,qps=3",
        "rdma:qps=2,",
        "rdma:streams=2",
        "rdma:qps=x",
        "rdma:64,qps=2",
    ] {
        assert!(bad.parse::<TransportKind>().is_err(), "{bad}");
    }
    assert_eq!(rdma(8, 3).name(), "rdma");
    // JSON (control API): budget and queue pairs are optional, unknown fields are refused.
    let k: TransportKind = serde_json::from_str(r#"{"kind":"rdma"}"#).expect("json");
    assert_eq!(k, rdma(0, d));
    let k: TransportKind =
        serde_json::from_str(r#"{"kind":"rdma","pin_budget_mib":32}"#).expect("json");
    assert_eq!(k, rdma(32, d));
    let k: TransportKind = serde_json::from_str(r#"{"kind":"rdma","qps":4}"#).expect("json");
    assert_eq!(k, rdma(0, 4));
    for k in [rdma(0, d), rdma(32, 1), rdma(256, 16)] {
        let j = serde_json::to_string(&k).expect("serialises");
        assert_eq!(
            serde_json::from_str::<TransportKind>(&j).ok(),
            Some(k),
            "{j}"
        );
    }
    assert!(serde_json::from_str::<TransportKind>(r#"{"kind":"rdma","streams":2}"#).is_err());
}

/// What a migration over `rdma` must fail with on this build and machine, if it must fail.
fn expected_refusal() -> Option<&'static str> {
    #[cfg(feature = "rdma")]
    {
        use fastmig_migration::transport::rdma::{lab, NO_DEVICE};
        (lab::device_count() == 0).then_some(NO_DEVICE)
    }
    #[cfg(not(feature = "rdma"))]
    {
        Some(fastmig_migration::transport::rdma::NOT_BUILT)
    }
}

#[test]
fn rdma_without_device_or_support_is_refused_with_a_clear_reason() {
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    for budget in [0, 2] {
        let opts = MigrateOptions {
            transport: rdma(budget, RDMA_DEFAULT_QPS),
            ..Default::default()
        };
        let (r, d) = pair(&src, &dst, &opts, &ReceiveOptions::default());
        let Some(reason) = expected_refusal() else {
            // A machine with an RDMA device and the feature: the migration must work.
            let s = r.expect("migration over rdma");
            assert!(s.digest_match && d.expect("receive").digest_match);
            return;
        };
        match r {
            Err(MigrationError::PeerRefused { reason: got }) => {
                assert_eq!(got, reason, "budget {budget}")
            }
            other => panic!("expected a refusal naming {reason:?}, got {other:?}"),
        }
        assert!(
            matches!(d, Err(MigrationError::Incompatible { reason: ref got }) if got == reason),
            "destination side: {d:?}"
        );
        assert_source_intact(&src);
        assert!(!dst.is_running(), "the destination never resumes");
    }
}
