//! The destination admits a multi-tcp data stream only if its `DataHello` names this
//! migration's session and a stream number announced and not yet taken (written for the
//! mutants of `MultiTcpDest::accept`'s guard, see TESTING.md).

mod common;

use std::time::Duration;

use common::{loopback, receive_into, MIB};
use fastmig_migration::protocol::{
    read_message, write_message, Hello, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{Conn, MigratableVm, MigrationError, ReceiveOptions, TransportKind};

const SESSION: u64 = 41;

/// Announces a two-stream multi-tcp migration, then opens data streams introduced as
/// `(session, stream)`, and returns what the destination made of it.
fn introduce(streams: &[(u64, u32)]) -> Result<(), MigrationError> {
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let l = loopback();
    let ep = l.endpoint().expect("ep");
    let ropts = ReceiveOptions {
        io_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &ropts));
        let mut control = Conn::connect(&ep, Duration::from_secs(5)).expect("connect");
        let hello = Hello {
            version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            layout: dst.layout(),
            transport: TransportKind::MultiTcp { streams: 2 },
            session: SESSION,
        };
        write_message(&mut control, &Message::Hello(hello)).expect("hello");
        match read_message(&mut control).expect("reply") {
            Message::HelloReply(r) if r.accepted => {}
            other => panic!("refused: {other:?}"),
        }
        let mut data = Vec::new();
        for &(session, stream) in streams {
            let mut c = Conn::connect(&ep, Duration::from_secs(5)).expect("data connect");
            write_message(&mut c, &Message::DataHello { session, stream }).expect("data hello");
            data.push(c);
        }
        let r = h.join().expect("receiver thread").map(|_| ());
        drop((control, data));
        r
    })
}

fn assert_refused(streams: &[(u64, u32)]) {
    match introduce(streams) {
        Err(MigrationError::TransportSetup { reason, .. }) => assert!(
            reason.contains("bad data stream introduction"),
            "{streams:?}: {reason}"
        ),
        other => panic!("{streams:?}: expected a refused data stream, got {other:?}"),
    }
}

#[test]
fn a_data_stream_of_another_session_is_refused() {
    assert_refused(&[(SESSION + 1, 0)]);
}

#[test]
fn a_stream_number_beyond_the_announced_streams_is_refused() {
    assert_refused(&[(SESSION, 2)]);
}

#[test]
fn a_stream_number_taken_twice_is_refused() {
    assert_refused(&[(SESSION, 0), (SESSION, 0)]);
}
