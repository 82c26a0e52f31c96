//! Deadlines on the monotonic clock for blocking socket steps, and bounded best-effort sends
//! for abort paths.
//!
//! A socket timeout (`SO_RCVTIMEO`) bounds one system call and restarts on every call, so a
//! peer trickling a byte now and then keeps a frame read alive forever. [`Until`] instead
//! fixes one instant and gives every call only the time left before it.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::protocol::{encode, read_message, Message, ProtocolError};

/// Reads and writes on `conn`, all calls together ending by `at`. The socket timeouts are
/// shared with every clone of the socket (the classic transport writes pages on one), so on
/// drop they go back to `within`, the caller's per-step budget, never to a last sliver.
pub(crate) struct Until<'a> {
    conn: &'a mut Conn,
    at: Instant,
    within: Duration,
}

impl<'a> Until<'a> {
    /// I/O on `conn` that must be over `within` from now.
    pub(crate) fn new(conn: &'a mut Conn, within: Duration) -> Self {
        Self {
            conn,
            at: Instant::now() + within,
            within,
        }
    }

    /// Time left, or a `TimedOut` error once the deadline has passed.
    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        // A zero socket timeout would mean "block forever".
        Ok(left.max(Duration::from_millis(1)))
    }
}

impl Drop for Until<'_> {
    fn drop(&mut self) {
        let _ = self
            .conn
            .set_timeouts(Some(self.within.max(Duration::from_millis(1))));
    }
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.conn.set_timeouts(Some(left))?;
        self.conn.read(buf)
    }
}

impl Write for Until<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.conn.set_timeouts(Some(left))?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer whose every `write_all` of one buffer is due within `within` of its first call
/// ([`std::io::BufWriter`] hands over one buffer per flush, in as many calls as the kernel
/// needs): progress is a whole buffer taken, not a few bytes.
///
/// `within` must be the socket's write timeout when the `Paced` is made
/// ([`Conn::write_timeout`]): the first call of a buffer then runs under exactly that
/// timeout and needs no system call; only the tail of a buffer the kernel took in part gets
/// a shorter timeout (what is left of its deadline), restored on drop.
pub(crate) struct Paced<'a> {
    conn: &'a mut Conn,
    within: Option<Duration>,
    /// Deadline of the buffer being written, set by its first call.
    due: Option<Instant>,
    /// Bytes of that buffer still expected.
    left: usize,
    /// The socket's write timeout as we last set it.
    timeout: Option<Duration>,
}

impl<'a> Paced<'a> {
    /// Paces writes on `conn` (`within`: its write timeout; `None` keeps the socket's own
    /// per-call behaviour).
    pub(crate) fn new(conn: &'a mut Conn, within: Option<Duration>) -> Self {
        Self {
            conn,
            within,
            due: None,
            left: 0,
            timeout: within,
        }
    }
}

impl Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(within) = self.within else {
            return self.conn.write(buf);
        };
        // A call that is not the tail of the previous buffer starts a new one, due `within`
        // from now: the socket's own timeout is that already.
        let timeout = if self.left == 0 || buf.len() != self.left {
            self.due = Some(Instant::now() + within);
            self.left = buf.len();
            within
        } else {
            let due = self.due.unwrap_or_else(Instant::now);
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
            }
            // A zero socket timeout would mean "block forever".
            left.max(Duration::from_millis(1))
        };
        if self.timeout != Some(timeout) {
            self.conn.set_write_timeout(Some(timeout))?;
            self.timeout = Some(timeout);
        }
        let r = self.conn.write(buf);
        if let Ok(n) = r {
            self.left -= n.min(self.left);
        }
        r
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Paced<'_> {
    fn drop(&mut self) {
        if self.timeout != self.within {
            let _ = self.conn.set_write_timeout(self.within);
        }
    }
}

/// Watches that the peer keeps reading what we send on a Unix stream socket where our own
/// writes never block for long (shm: the pages go through shared memory, only small
/// `Written` frames use the socket). A stopped peer reads nothing: after `timeout` of a
/// growing unread backlog the send fails, instead of copying on until the round ends.
#[derive(Debug)]
pub(crate) struct PeerReads {
    timeout: Option<Duration>,
    unread: usize,
    since: Instant,
}

impl PeerReads {
    /// `timeout`: `None` disables the watch.
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            unread: 0,
            since: Instant::now(),
        }
    }

    /// Called after each write of `n` bytes on `conn`: progress is an empty backlog, or one
    /// that grew by less than we added (the peer took something; the kernel counts a
    /// message's whole buffer, more than its `n` bytes, so a peer that reads nothing always
    /// shows a growth of at least `n`).
    pub(crate) fn after_write(&mut self, conn: &Conn, n: usize) -> io::Result<()> {
        let Some(timeout) = self.timeout else {
            return Ok(());
        };
        let unread = unread_bytes(conn)?;
        if unread == 0 || unread < self.unread + n {
            self.since = Instant::now();
        } else if self.since.elapsed() > timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer has read nothing for {timeout:?}"),
            ));
        }
        self.unread = unread;
        Ok(())
    }

    /// When the peer last showed progress, if it still has a backlog (else `None`).
    pub(crate) fn quiet_since(&self) -> Option<Instant> {
        (self.timeout.is_some() && self.unread > 0).then_some(self.since)
    }
}

/// Bytes sent on `conn` that the peer has not read yet (`SIOCOUTQ`; for a Unix socket the
/// kernel frees them only when the peer reads, so this is the peer's backlog).
fn unread_bytes(conn: &Conn) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int to the pointer, which is ours and valid.
    let rc = unsafe { libc::ioctl(conn.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Reads one message, the whole frame due within `within`.
pub(crate) fn read_message_within(
    conn: &mut Conn,
    within: Duration,
) -> Result<Message, ProtocolError> {
    read_message(&mut Until::new(conn, within))
}

/// How long an abort path may spend telling the peer why (or hearing why).
pub(crate) const ABORT_BOUND: Duration = Duration::from_millis(300);

/// Best-effort send of `msg` for an abort path: never blocks longer than [`ABORT_BOUND`] in
/// total, whatever the peer does (a stopped peer with a full receive buffer costs the bound,
/// not a socket timeout per call). Returns whether the whole frame went out.
pub(crate) fn send_bounded(conn: &mut Conn, msg: &Message) -> bool {
    Until::new(conn, ABORT_BOUND)
        .write_all(&encode(msg))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Endpoint, Listener};

    fn pair() -> (Conn, Conn) {
        let l = Listener::bind(&"127.0.0.1:0".parse::<Endpoint>().expect("ep")).expect("bind");
        let at = l.endpoint().expect("endpoint");
        let c = Conn::connect(&at, Duration::from_secs(5)).expect("connect");
        let s = l.accept(Some(Duration::from_secs(5))).expect("accept");
        (c, s)
    }

    #[test]
    fn a_trickling_peer_cannot_stretch_a_frame_read_past_the_deadline() {
        let (mut reader, mut writer) = pair();
        // A valid header announcing 64 bytes of payload, then one byte every 50 ms: each
        // byte would restart a per-call socket timeout of 200 ms, for ~3 s in all.
        let frame = encode(&Message::Failed {
            reason: "x".repeat(50),
        });
        let t = std::thread::spawn(move || {
            for b in frame {
                if writer.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let r = read_message_within(&mut reader, Duration::from_millis(200));
        let took = start.elapsed();
        assert!(
            matches!(&r, Err(ProtocolError::Io(e)) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)),
            "{r:?}"
        );
        assert!(took < Duration::from_secs(1), "read lasted {took:?}");
        reader.shutdown();
        let _ = t.join();
    }

    #[test]
    fn a_bounded_send_to_a_peer_that_never_reads_returns() {
        let (mut sender, _silent) = pair();
        // Fill the socket buffers first: the peer never reads.
        let big = Message::State(vec![7u8; 32 << 20]);
        let sent = send_bounded(&mut sender, &big);
        assert!(
            !sent,
            "32 MiB fit in the socket buffers of a peer that never reads"
        );
        // Whether the kernel still finds room for it or not, the abort frame costs the bound
        // at most.
        let start = Instant::now();
        send_bounded(
            &mut sender,
            &Message::Failed {
                reason: "bye".into(),
            },
        );
        assert!(start.elapsed() < ABORT_BOUND + Duration::from_millis(500));
    }
}
