//! The handshake, both sides: `Hello` (the source's offer: versions, layout, transport) and
//! `HelloReply` (the destination's answer: the version both will speak, or why not).
//!
//! ```text
//! source                                   destination
//!   | -- Hello(version..=max_version, ...) --> |  negotiate(): highest version both speak
//!   | <-- HelloReply(version, accepted) ------ |  or a refusal with a reason
//!   |  check the version is in our window     |
//! ```
//!
//! Version policy (Cloud Hypervisor style): a build speaks [`MIN_PROTOCOL_VERSION`] to
//! [`PROTOCOL_VERSION`]; see `protocol.rs` for what each version changed.

use std::time::Duration;

use crate::conn::Conn;
use crate::error::{wire, MigrationError};
use crate::protocol::{
    read_message, write_message, Hello, HelloReply, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::transport::TransportKind;
use crate::vm::VmLayout;

/// `a to b`, or `a` alone.
fn range_text(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo} to {hi}")
    }
}

/// The version to speak with a peer offering `lo..=hi`: the highest both speak, or why none.
pub(crate) fn negotiate(lo: u16, hi: u16) -> Result<u16, String> {
    let v = hi.min(PROTOCOL_VERSION);
    if lo > hi || v < lo.max(MIN_PROTOCOL_VERSION) {
        return Err(format!(
            "protocol version mismatch: source speaks {}, destination speaks {}",
            range_text(lo, hi),
            range_text(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
        ));
    }
    Ok(v)
}

/// Source: sends the offer and returns the version the destination chose.
pub(crate) fn offer(
    control: &mut Conn,
    layout: &VmLayout,
    transport: TransportKind,
    session: u64,
) -> Result<u16, MigrationError> {
    let hello = Hello {
        version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        layout: layout.clone(),
        transport,
        session,
    };
    write_message(control, &Message::Hello(hello)).map_err(|e| wire("handshake", e))?;
    match read_message(control).map_err(|e| wire("handshake", e))? {
        // A destination outside our window may say yes to frames it would then misread:
        // refuse it whatever it answered.
        Message::HelloReply(r)
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&r.version) =>
        {
            let why = r.reason.map(|w| format!(" ({w})")).unwrap_or_default();
            Err(MigrationError::PeerRefused {
                reason: format!(
                    "protocol version mismatch: destination speaks {}, source speaks {}{why}",
                    r.version,
                    range_text(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
                ),
            })
        }
        Message::HelloReply(r) if r.accepted => Ok(r.version),
        Message::HelloReply(r) => Err(MigrationError::PeerRefused {
            reason: r.reason.unwrap_or_else(|| "no reason given".into()),
        }),
        Message::Failed { reason } => Err(MigrationError::PeerRefused { reason }),
        other => Err(MigrationError::Unexpected {
            phase: "handshake",
            got: other.name().into(),
        }),
    }
}

/// Destination: the version to speak with a source whose `Hello` was already read (by the
/// accept loop), refusing a source with no version in common.
pub(crate) fn negotiate_hello(
    control: &mut Conn,
    io_timeout: Duration,
    hello: Hello,
) -> Result<(Hello, u16), MigrationError> {
    control
        .set_timeouts(Some(io_timeout))
        .map_err(|e| MigrationError::TransportSetup {
            reason: "setting control stream timeouts".into(),
            source: Some(e),
        })?;
    match negotiate(hello.version, hello.max_version) {
        Ok(v) => Ok((hello, v)),
        Err(reason) => Err(refuse(control, reason)),
    }
}

/// Destination: refuses the source with `reason` (best effort) and returns the error.
pub(crate) fn refuse(control: &mut Conn, reason: String) -> MigrationError {
    let reply = HelloReply {
        version: PROTOCOL_VERSION,
        accepted: false,
        reason: Some(reason.clone()),
    };
    let _ = write_message(control, &Message::HelloReply(reply));
    MigrationError::Incompatible { reason }
}

/// Destination: accepts the source, to speak `version`.
pub(crate) fn accept(control: &mut Conn, version: u16) -> Result<(), MigrationError> {
    let reply = HelloReply {
        version,
        accepted: true,
        reason: None,
    };
    write_message(control, &Message::HelloReply(reply)).map_err(|e| wire("handshake", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_common_version_wins() {
        // A source of this build.
        assert_eq!(
            negotiate(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            Ok(PROTOCOL_VERSION)
        );
        // An older source (version 2 only): spoken at 2.
        assert_eq!(negotiate(2, 2), Ok(2));
        // A newer source that still speaks our version: ours.
        assert_eq!(
            negotiate(PROTOCOL_VERSION, PROTOCOL_VERSION + 1),
            Ok(PROTOCOL_VERSION)
        );
    }

    #[test]
    fn no_common_version_is_refused_with_both_ranges() {
        for (lo, hi) in [
            (1, 1),
            (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2),
            (99, 99),
        ] {
            let why = negotiate(lo, hi).expect_err("no common version");
            assert!(why.contains("version mismatch"), "{why}");
            assert!(why.contains(&lo.to_string()), "{why}");
            assert!(
                why.contains(&format!("{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")),
                "{why}"
            );
        }
        assert!(negotiate(3, 2).is_err(), "an empty offer");
    }
}
