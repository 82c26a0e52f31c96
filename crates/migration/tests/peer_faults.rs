//! A source against scripted destinations that answer wrongly but well-formed: a version
//! outside the source's window accepted anyway, an acknowledgement of another round. The
//! source refuses to go on and keeps the VM running (tests written for mutants that survived
//! `failures.rs`; see TESTING.md, "Mutation testing").

mod common;

use std::time::Duration;

use common::{assert_source_intact, loopback, MIB};
use fastmig_migration::protocol::{
    self, encode_with_version, read_message, write_message, HelloReply, Message,
};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{migrate, Conn, Endpoint, MigrateOptions, MigrationError};

fn quick_opts() -> MigrateOptions {
    MigrateOptions {
        io_timeout: Duration::from_millis(500),
        ack_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    }
}

fn running_source() -> SoftVm {
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(1.0);
    src
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

/// A destination outside the source's window that says yes anyway (it would misread our
/// frames): the source refuses it, names both versions, and keeps the VM.
#[test]
fn source_refuses_a_destination_that_accepts_at_a_version_outside_its_window() {
    for version in [
        protocol::MIN_PROTOCOL_VERSION - 1,
        protocol::PROTOCOL_VERSION + 1,
    ] {
        let src = running_source();
        let l = loopback();
        let ep = l.endpoint().expect("ep");
        let h = std::thread::spawn(move || {
            let mut c = l.accept(Some(Duration::from_secs(5))).expect("accept");
            let _ = read_message(&mut c);
            let reply = HelloReply {
                version,
                accepted: true,
                reason: None,
            };
            let bytes = encode_with_version(&Message::HelloReply(reply), version);
            std::io::Write::write_all(&mut c, &bytes).expect("reply");
            // Whatever the source sends next must not be a migration.
            let next = read_message(&mut c);
            assert!(
                !matches!(next, Ok(Message::Page { .. } | Message::Batch(_))),
                "{next:?}"
            );
        });
        let err = migrate(&src, &ep, &quick_opts()).expect_err("refused");
        h.join().expect("join");
        match err {
            MigrationError::PeerRefused { reason } => assert!(
                reason.contains("version mismatch")
                    && reason.contains(&format!("destination speaks {version}")),
                "{reason}"
            ),
            other => panic!("expected PeerRefused, got {other:?}"),
        }
        assert_source_intact(&src);
        assert_eq!(src.resume_count(), 0, "never paused, so never resumed");
    }
}

/// A destination that acknowledges another round than the one the source ended (a confused or
/// lagging peer): the source does not take it for this round's acknowledgement.
#[test]
fn an_acknowledgement_of_another_round_fails_the_migration() {
    let src = running_source();
    let (ep, h) = fake_destination(|c| loop {
        match read_message(c) {
            Ok(Message::RoundEnd { round, .. }) => {
                let _ = write_message(c, &Message::RoundAck { round: round + 1 });
            }
            Ok(_) => {}
            Err(_) => break,
        }
    });
    let err = migrate(&src, &ep, &quick_opts()).expect_err("wrong round acknowledged");
    h.join().expect("join");
    assert!(
        matches!(
            err,
            MigrationError::Unexpected {
                phase: "round ack",
                ..
            }
        ),
        "{err:?}"
    );
    assert_source_intact(&src);
}
