//! The destination's wait for a source: accept connections until one completes the
//! handshake, refusing (and logging) every stray one.
//!
//! ```text
//! listener ─ accept ─┬─ handshake thread: first frame within the hello deadline ─ Hello? ─► winner
//!                    ├─ port scan (closes)       → logged, dropped, keep waiting
//!                    ├─ garbage / wrong magic    → logged, dropped, keep waiting
//!                    └─ silent                   → logged at its deadline, dropped
//! ```
//!
//! Each connection gets its own thread for its first frame, so a silent stray cannot hold the
//! real source back; at most [`MAX_PENDING`] wait at once (more are closed at once, logged).
//! A `Hello` of another protocol version is a real source: it is handed on, to be refused
//! with a reason.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use tracing::warn;

use crate::conn::{Conn, Listener};
use crate::deadline::read_message_within;
use crate::error::MigrationError;
use crate::protocol::{Hello, Message};

/// Connections waiting for their first frame at once; more are closed unread.
pub(crate) const MAX_PENDING: usize = 16;

/// Longest single wait of the accept loop; it also wakes at once on a new connection or a
/// finished handshake.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// A connection, when it was accepted, and its first frame (or why it is not a `Hello`).
type Outcome = (Conn, Instant, Result<Hello, String>);

/// Accepts on `listener` until a peer sends a `Hello` (within `hello_timeout` of connecting),
/// or `accept_timeout` (`None`: forever) passes. Returns that connection, when it was
/// accepted (the source's arrival, from which setup is timed) and its `Hello`.
///
/// The loop polls the listener and a wake socket together: a handshake thread that finishes
/// writes one byte to the wake socket, so a real source is handed on at once, not at the
/// next tick (setup time is part of a migration's cost).
pub(crate) fn accept_source(
    listener: &Listener,
    accept_timeout: Option<Duration>,
    hello_timeout: Duration,
) -> Result<(Conn, Instant, Hello), MigrationError> {
    let deadline = accept_timeout.map(|t| Instant::now() + t);
    let (tx, rx) = mpsc::channel::<Outcome>();
    let setup = |e: std::io::Error| MigrationError::TransportSetup {
        reason: "the accept loop's wake socket".into(),
        source: Some(e),
    };
    let (mut wake_rx, wake_tx) = UnixStream::pair().map_err(setup)?;
    wake_rx.set_nonblocking(true).map_err(setup)?;
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        while let Ok((conn, arrived, r)) = rx.try_recv() {
            match r {
                Ok(hello) => return Ok((conn, arrived, hello)),
                Err(why) => {
                    warn!(%why, "refused a connection that did not complete the handshake; still waiting for a source")
                }
            }
        }
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(MigrationError::Timeout { phase: "accept" });
                }
                left.min(MAX_WAIT)
            }
            None => MAX_WAIT,
        };
        let (listen_ready, woken) = {
            let listen_fd = listener.as_fd();
            let mut fds = [
                PollFd::new(&listen_fd, PollFlags::IN),
                PollFd::new(&wake_rx, PollFlags::IN),
            ];
            let timeout = Timespec::try_from(wait).ok();
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) => (!fds[0].revents().is_empty(), !fds[1].revents().is_empty()),
                Err(rustix::io::Errno::INTR) => (false, false),
                Err(e) => return Err(setup(e.into())),
            }
        };
        if woken {
            // Drain the wake bytes; the outcomes are in the channel.
            let mut buf = [0u8; 64];
            while matches!(wake_rx.read(&mut buf), Ok(n) if n > 0) {}
        }
        if !listen_ready {
            continue;
        }
        let conn = match listener.accept(Some(Duration::from_millis(1))) {
            Ok(c) => c,
            Err(MigrationError::Timeout { .. }) => continue,
            Err(e) => return Err(e),
        };
        if pending.load(Ordering::SeqCst) >= MAX_PENDING {
            warn!(
                max = MAX_PENDING,
                "too many connections waiting for a handshake: closed a new one unread"
            );
            continue;
        }
        let arrived = Instant::now();
        pending.fetch_add(1, Ordering::SeqCst);
        let (tx, pending) = (tx.clone(), Arc::clone(&pending));
        let mut wake = wake_tx.try_clone().map_err(setup)?;
        std::thread::spawn(move || {
            let mut conn = conn;
            let r = first_hello(&mut conn, hello_timeout);
            pending.fetch_sub(1, Ordering::SeqCst);
            // After a winner the receiver is gone: this connection just closes.
            if tx.send((conn, arrived, r)).is_ok() {
                let _ = wake.write_all(&[1]);
            }
        });
    }
}

/// The first frame of a new connection, which must be a `Hello`.
fn first_hello(conn: &mut Conn, within: Duration) -> Result<Hello, String> {
    match read_message_within(conn, within) {
        Ok(Message::Hello(h)) => Ok(h),
        Ok(other) => Err(format!("first frame was {}, not Hello", other.name())),
        Err(e) => Err(match e {
            crate::protocol::ProtocolError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                format!("no Hello within {within:?}")
            }
            e => crate::error::chain_text(&e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Endpoint;
    use crate::protocol::{encode, PROTOCOL_VERSION};
    use crate::vm::VmLayout;
    use std::io::Write;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            layout: VmLayout {
                regions: vec![],
                vcpus: 1,
                features: 0,
            },
            transport: crate::TransportKind::Classic,
            session: 7,
        }
    }

    #[test]
    fn strays_are_refused_and_the_real_source_still_gets_in() {
        let l = Listener::bind(&"127.0.0.1:0".parse::<Endpoint>().expect("ep")).expect("bind");
        let at = l.endpoint().expect("endpoint");
        let t = Duration::from_secs(5);
        // A port scan (connect, close), a client speaking garbage, a silent one that holds
        // its connection open, a frame of the right format that is not a Hello.
        let scan = Conn::connect(&at, t).expect("scan");
        drop(scan);
        let mut garbage = Conn::connect(&at, t).expect("garbage");
        garbage
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write garbage");
        let _silent = Conn::connect(&at, t).expect("silent");
        let mut wrong = Conn::connect(&at, t).expect("wrong first frame");
        wrong
            .write_all(&encode(&Message::Commit))
            .expect("write commit");
        let mut source = Conn::connect(&at, t).expect("source");
        source
            .write_all(&encode(&Message::Hello(hello())))
            .expect("write hello");
        let (_, _, got) = accept_source(&l, Some(Duration::from_secs(20)), Duration::from_secs(10))
            .expect("the real source is accepted");
        assert_eq!(got, hello());
    }

    #[test]
    fn only_strays_end_in_a_timeout_at_the_accept_deadline() {
        let l = Listener::bind(&"127.0.0.1:0".parse::<Endpoint>().expect("ep")).expect("bind");
        let at = l.endpoint().expect("endpoint");
        let mut garbage = Conn::connect(&at, Duration::from_secs(5)).expect("garbage");
        garbage.write_all(&[0u8; 64]).expect("write");
        let r = accept_source(
            &l,
            Some(Duration::from_millis(500)),
            Duration::from_millis(100),
        );
        assert!(
            matches!(r, Err(MigrationError::Timeout { phase: "accept" })),
            "{r:?}"
        );
    }
}
