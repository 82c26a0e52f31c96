//! The compatibility window (PROTOCOL.md, "Version and compatibility rule"): this build speaks
//! protocol versions 2 and 3, so a version-2 peer on either side still migrates.

mod common;

use std::sync::{Arc, Mutex};

use common::{frame_proxy, loopback, receive_into, MIB};
use fastmig_migration::protocol::{
    decode, encode_with_version, read_message, write_message, HelloReply, Message, FRAME_VERSION,
    HEADER_LEN, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use fastmig_migration::test_utils::{ScriptedSource, SoftVm};
use fastmig_migration::{migrate, MigratableVm, MigrateOptions, ReceiveOptions};

#[test]
fn the_window_is_the_previous_version_and_this_one() {
    assert_eq!((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (2, 3));
    assert_eq!(FRAME_VERSION, 2, "version 3 changed no frame format");
}

#[test]
fn an_old_source_migrates_into_a_new_destination() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let ep = l.endpoint().expect("endpoint");
    let (r, version) = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &ReceiveOptions::default()));
        // A version-2 source: offers 2 only (its Hello has no max_version).
        let mut src = ScriptedSource::connect_speaking(&ep, &dst.layout(), 2..=2).expect("hello");
        for p in 0..8 {
            src.send_page(p, 0x42).expect("page");
        }
        assert!(matches!(
            src.end_round(),
            Ok(Message::RoundAck { round: 1 })
        ));
        assert!(matches!(src.complete(b"v2-state"), Ok(Message::Ready)));
        write_message(src.conn(), &Message::Commit).expect("commit");
        assert!(matches!(read_message(src.conn()), Ok(Message::Resumed(_))));
        (h.join().expect("receiver"), src.version())
    });
    assert_eq!(version, 2, "the destination speaks the source's version");
    let s = r.expect("receive");
    assert!(s.digest_match);
    assert_eq!(s.pages_received, 8);
    assert_eq!(dst.resume_count(), 1);
    assert_eq!(dst.restored_state().as_deref(), Some(&b"v2-state"[..]));
}

/// How a version-2 destination read `Hello` (its struct; it ignored unknown fields).
#[derive(serde::Deserialize)]
struct V2Hello {
    version: u16,
    transport: String,
    data_streams: u32,
}

#[test]
fn a_new_source_migrates_into_an_old_destination() {
    // The destination side is played by a proxy in front of a real destination that holds
    // the source to what a version-2 destination required: a Hello it can parse, whose
    // version is exactly 2, and frames whose header says exactly 2; and it answers as a
    // version-2 destination would (HelloReply version 2).
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (to_dst, to_src) = (Arc::clone(&seen), Arc::clone(&seen));
    let mut first = true;
    let check_source = move |frame: Vec<u8>| {
        let version = u16::from_le_bytes([frame[4], frame[5]]);
        let mut seen = to_dst.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut first) {
            match serde_json::from_slice::<V2Hello>(&frame[HEADER_LEN..]) {
                Ok(h) if h.version == 2 => {
                    seen.push(format!("hello {} {}", h.transport, h.data_streams))
                }
                Ok(h) => seen.push(format!("refused version {}", h.version)),
                Err(e) => seen.push(format!("unreadable hello: {e}")),
            }
        } else if version != 2 {
            seen.push(format!("frame version {version}"));
        }
        Some(frame)
    };
    let mut replied = false;
    let answer_as_v2 = move |frame: Vec<u8>| {
        if replied || !matches!(decode(&frame), Ok((Message::HelloReply(_), _))) {
            return Some(frame);
        }
        replied = true;
        to_src
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push("reply 2".into());
        let reply = HelloReply {
            version: 2,
            accepted: true,
            reason: None,
        };
        Some(encode_with_version(&Message::HelloReply(reply), 2))
    };
    let proxy = frame_proxy(
        l.endpoint().expect("endpoint"),
        Box::new(check_source),
        Box::new(answer_as_v2),
    );
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &ReceiveOptions::default()));
        (
            migrate(&src, &proxy, &MigrateOptions::default()),
            h.join().expect("receiver"),
        )
    });
    let s = r.expect("migration at version 2");
    d.expect("receive");
    assert!(s.digest_match);
    assert!(dst.is_running() && !src.is_running());
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen, ["hello classic 0", "reply 2"], "{seen:?}");
}
