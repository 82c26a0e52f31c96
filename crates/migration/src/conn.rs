//! Endpoints, listeners and connected streams (TCP or Unix), with timeouts.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::error::MigrationError;
use crate::sockpath::SocketPath;

/// Where a destination listens: `host:port` (TCP) or `unix:/path` (Unix socket, needed by the
/// `shm` and `handover` transports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP address.
    Tcp(SocketAddr),
    /// Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Error parsing an [`Endpoint`].
#[derive(Debug, thiserror::Error)]
#[error("bad endpoint {0:?}: expected host:port or unix:/path")]
pub struct BadEndpoint(pub String);

impl std::str::FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(BadEndpoint(s.into()));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        s.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(Endpoint::Tcp)
            .ok_or_else(|| BadEndpoint(s.into()))
    }
}

/// A connected stream.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `ep`, giving up after `timeout`.
    pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Conn, MigrationError> {
        let r = match ep {
            Endpoint::Tcp(a) => TcpStream::connect_timeout(a, timeout).map(|s| {
                // Latency matters for the small control frames.
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            Endpoint::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
        };
        r.map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                MigrationError::Timeout { phase: "connect" }
            }
            _ => MigrationError::Connect {
                endpoint: ep.to_string(),
                source: e,
            },
        })
    }

    /// Like [`Conn::connect`], but a destination that is not listening yet (connection
    /// refused, or no socket file at a `unix:` path) is tried again every 50 ms until
    /// `timeout` has passed: a destination started a moment ago may still be preparing its
    /// memory (pre-faulting) before it listens, and a script that starts it in the background
    /// and then migrates must not fail on that race. Other errors fail at once.
    pub fn connect_retrying(ep: &Endpoint, timeout: Duration) -> Result<Conn, MigrationError> {
        const RETRY: Duration = Duration::from_millis(50);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match Conn::connect(ep, left.max(Duration::from_millis(1))) {
                Err(MigrationError::Connect { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) && left > RETRY =>
                {
                    std::thread::sleep(RETRY);
                }
                r => return r,
            }
        }
    }

    /// Sets both read and write timeouts (`None`: block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Sets the write timeout only (`None`: block forever); the read timeout is left alone.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// The socket's write timeout (`None`: none set, or unreadable).
    pub fn write_timeout(&self) -> Option<Duration> {
        match self {
            Conn::Tcp(s) => s.write_timeout(),
            Conn::Unix(s) => s.write_timeout(),
        }
        .ok()
        .flatten()
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down, waking any thread blocked on the socket.
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// The Unix stream, if this is one (fd passing needs it).
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Conn::Unix(s) => Some(s),
            Conn::Tcp(_) => None,
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bound listening socket for the destination.
#[derive(Debug)]
pub enum Listener {
    /// TCP listener.
    Tcp(TcpListener),
    /// Unix listener; it holds the path's lock, and removes the socket and the lock on drop.
    Unix(UnixListener, SocketPath),
}

impl Listener {
    /// The listening socket, for a caller that polls it beside other descriptors.
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }

    /// Binds `ep` (TCP port 0 picks a free port; see [`Listener::endpoint`]).
    ///
    /// A `unix:` path is taken only if it is free or holds a stale socket nobody answers on:
    /// a user's file or a live listener's socket is refused and left alone (see `sockpath`).
    pub fn bind(ep: &Endpoint) -> Result<Listener, MigrationError> {
        let err = |e| MigrationError::Listen {
            endpoint: ep.to_string(),
            source: e,
        };
        match ep {
            Endpoint::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp).map_err(err),
            Endpoint::Unix(p) => crate::sockpath::bind(p)
                .map(|(l, held)| Listener::Unix(l, held))
                .map_err(err),
        }
    }

    /// The endpoint a source should connect to.
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Listener::Unix(_, p) => Ok(Endpoint::Unix(p.path().to_path_buf())),
        }
    }

    /// Accepts one connection, waiting at most `timeout` (`None`: forever).
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Conn, MigrationError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(MigrationError::Timeout { phase: "accept" });
                    }
                    left.clamp(Duration::from_millis(1), Duration::from_secs(1))
                }
                None => Duration::from_secs(1),
            };
            let fd = self.as_fd();
            let mut pfd = [PollFd::new(&fd, PollFlags::IN)];
            let timeout = Timespec::try_from(wait).ok();
            match poll(&mut pfd, timeout.as_ref()) {
                Ok(n) if n > 0 => break,
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.listen_error(e.into())),
            }
        }
        let r = match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
        };
        r.map_err(|e| self.listen_error(e))
    }

    fn listen_error(&self, source: io::Error) -> MigrationError {
        MigrationError::Listen {
            endpoint: self
                .endpoint()
                .map(|e| e.to_string())
                .unwrap_or_else(|_| "listener".into()),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_tcp_port_is_a_listen_error_not_a_connect_error() {
        let first = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
        let at = first.endpoint().expect("endpoint");
        let e = Listener::bind(&at).expect_err("port in use");
        let text = crate::error::chain_text(&e);
        assert!(text.starts_with("listening on 127.0.0.1:"), "{text}");
        assert!(!text.contains("connecting"), "{text}");
        assert!(matches!(e, MigrationError::Listen { .. }), "{e:?}");
    }

    #[test]
    fn a_destination_that_starts_listening_late_is_reached() {
        let dir = std::env::temp_dir().join(format!("fastmig-late-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let at = Endpoint::Unix(dir.join("late.sock"));
        let binder = at.clone();
        // Nobody listens for the first 300 ms: the path does not even exist.
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let l = Listener::bind(&binder).expect("bind");
            l.accept(Some(Duration::from_secs(5))).expect("accept");
        });
        let c = Conn::connect_retrying(&at, Duration::from_secs(5));
        assert!(c.is_ok(), "{:?}", c.err());
        h.join().expect("listener thread");
        // Refused until the deadline: the error is the refusal, not a hang.
        let t0 = std::time::Instant::now();
        let e = Conn::connect_retrying(
            &"127.0.0.1:1".parse().expect("ep"),
            Duration::from_millis(300),
        )
        .expect_err("nobody listens on port 1");
        assert!(matches!(e, MigrationError::Connect { .. }), "{e:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
