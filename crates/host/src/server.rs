//! The control socket server: newline-delimited JSON over a unix socket, one request line in,
//! one reply line out, in the spirit of QEMU's QMP (no greeting, no capabilities handshake).
//!
//! Taking the socket path is safe against other users of the path:
//! - a path that exists and is not a socket is refused, never replaced;
//! - the path is taken under an exclusive `flock` on `PATH.lock` beside it, held for the
//!   server's life (the file is removed on close), so two processes cannot both decide the
//!   path is free; a socket that exists but on which nothing answers (left by a killed
//!   process) is replaced, a socket that answers is refused;
//! - on close, the socket file is removed only if it is still the one this server bound.
//!
//! Limits, so that no client can make the process grow without bound:
//! - a request line is at most [`MAX_LINE`] bytes: a longer one is discarded as it arrives
//!   (never held in memory) and answered with an error once its newline comes, and the
//!   session goes on; a line still without a newline after [`MAX_SKIP`] bytes gets the error
//!   and the connection is closed;
//! - at most [`MAX_CLIENTS`] connections are served at once, one thread each; one more gets
//!   an error reply (`too many control connections`) and is closed at once;
//! - a connection idle for [`IDLE_TIMEOUT`] is closed, and a client that does not read its
//!   replies for [`WRITE_TIMEOUT`] is dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::command::{CommandError, Reply, Request};
use crate::error::HostError;
use crate::process::Handler;

/// Longest request line, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Bytes of an overlong line discarded before the connection is closed.
pub const MAX_SKIP: u64 = 16 << 20;
/// Connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// A connection silent this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not take its reply within this time is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running control-socket server. [`ApiServer::close`] (or dropping it) stops accepting
/// and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file we bound.
    bound: (u64, u64),
    closed: Arc<AtomicBool>,
    /// Held for the server's life: the `flock` on `PATH.lock`.
    _lock: File,
}

/// The lock file guarding `path`: `PATH.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Opens and locks `PATH.lock`. The owner removes the file when it closes (while still
/// holding the lock), so a lock taken on a file that has since been unlinked or replaced is
/// worthless: it is retried until the locked file is the one at the path.
fn take_lock(path: &Path) -> Result<File, HostError> {
    let sock_err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source: std::io::Error| HostError::Socket { path, what, source }
    };
    let lock_at = lock_path(path);
    loop {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_at)
            .map_err(sock_err("opening its lock file"))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(HostError::SocketInUse(path.to_path_buf()))
            }
            Err(e) => return Err(sock_err("locking its lock file")(e.into())),
        }
        let held = lock
            .metadata()
            .map_err(sock_err("inspecting its lock file"))?;
        match std::fs::metadata(&lock_at) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Ok(lock),
            // Unlinked (or replaced) by its previous owner between our open and our lock.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(sock_err("inspecting its lock file")(e)),
        }
    }
}

/// Takes `path` for a new listener (see the module doc for the rules).
fn bind(path: &Path) -> Result<(UnixListener, File), HostError> {
    // Checked before touching anything beside it: a regular file stays as it was.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(HostError::NotASocket(path.to_path_buf()));
        }
    }
    let lock = take_lock(path)?;
    match bind_locked(path) {
        Ok(listener) => Ok((listener, lock)),
        Err(e) => {
            // We hold the lock: removing its file is as safe here as on close.
            let _ = std::fs::remove_file(lock_path(path));
            Err(e)
        }
    }
}

/// The part of [`bind`] done under the lock.
fn bind_locked(path: &Path) -> Result<UnixListener, HostError> {
    let sock_err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source: std::io::Error| HostError::Socket { path, what, source }
    };
    // Under the lock: nobody else can be deciding the same thing now.
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(HostError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(HostError::SocketInUse(path.to_path_buf()));
            }
            tracing::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(sock_err("removing a stale socket"))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("inspecting the path")(e)),
    }
    UnixListener::bind(path).map_err(sock_err("binding"))
}

impl ApiServer {
    /// Takes the socket at `path` and serves `handler` on a background thread.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> Result<Self, HostError> {
        let (listener, lock) = bind(path)?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| HostError::Socket {
            path: path.to_path_buf(),
            what: "inspecting the bound socket",
            source,
        })?;
        let closed = Arc::new(AtomicBool::new(false));
        let closed2 = Arc::clone(&closed);
        std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(&listener, &handler, &closed2))
            .map_err(|source| HostError::Io {
                what: "spawning the control-socket thread",
                source,
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            bound: (meta.dev(), meta.ino()),
            closed,
            _lock: lock,
        })
    }

    /// Stops accepting connections and removes the socket file (if it is still ours).
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.bound {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        // Still holding the lock: a process that opened this file meanwhile sees it is no
        // longer at the path once it gets the lock, and retries (see `take_lock`).
        let _ = std::fs::remove_file(lock_path(&self.path));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Decrements the live-connection count when a connection thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &UnixListener, handler: &Arc<dyn Handler>, closed: &AtomicBool) {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if closed.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            let slot = Slot(Arc::clone(&live));
            // Refuse at once; a short write bound so a full socket cannot stall the loop.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let reply = Reply::error(
                None,
                CommandError::generic(format!(
                    "too many control connections ({MAX_CLIENTS} open); try again later"
                )),
            );
            let _ = writeln!(stream, "{}", reply.to_line());
            drop(slot);
            continue;
        }
        let slot = Slot(Arc::clone(&live));
        let handler = Arc::clone(handler);
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(&*handler, stream);
            });
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot spawn a thread: {e}");
        }
    }
}

/// What reading one request line gave.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A complete line (newline stripped) in the buffer.
    Text,
    /// A line over [`MAX_LINE`], discarded up to and including its newline.
    TooLong,
    /// Over [`MAX_SKIP`] bytes without a newline: give up on the connection.
    Endless,
    /// The peer closed.
    Eof,
}

/// Reads one line into `buf` (cleared first), holding at most `MAX_LINE + 1` bytes of it.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Text);
    }
    if buf.len() <= MAX_LINE {
        // The peer closed after a last line without a newline.
        return Ok(Line::Text);
    }
    // Overlong: drop what we hold and discard the rest as it arrives.
    buf.clear();
    buf.shrink_to(MAX_LINE + 1);
    let mut skipped = n as u64;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Line::Eof);
        }
        if let Some(i) = chunk.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return Ok(Line::TooLong);
        }
        let len = chunk.len();
        reader.consume(len);
        skipped += len as u64;
        if skipped > MAX_SKIP {
            return Ok(Line::Endless);
        }
    }
}

fn serve_connection(handler: &dyn Handler, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        let (reply, last) = match read_line(&mut reader, &mut buf) {
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::TooLong) => (too_long(), false),
            Ok(Line::Endless) => (too_long(), true),
            Ok(Line::Text) => match std::str::from_utf8(&buf) {
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => (handle_line(handler, line.trim()), false),
                Err(e) => (
                    Reply::error(
                        None,
                        CommandError::generic(format!("unreadable request: {e}")),
                    ),
                    false,
                ),
            },
        };
        if writeln!(writer, "{}", reply.to_line()).is_err() || last {
            return;
        }
    }
}

fn too_long() -> Reply {
    Reply::error(
        None,
        CommandError::generic(format!("request line longer than {MAX_LINE} bytes")),
    )
}

/// Handles one request line and returns the reply.
pub fn handle_line(handler: &dyn Handler, line: &str) -> Reply {
    let req = match Request::parse(line) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    match handler.execute(req.command) {
        Ok(ret) => match serde_json::to_value(&ret) {
            Ok(value) => Reply::Return { value, id: req.id },
            Err(e) => Reply::error(
                req.id,
                CommandError::generic(format!("unencodable reply: {e}")),
            ),
        },
        Err(e) => Reply::error(req.id, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlong_line_is_discarded_without_being_held() {
        let mut input = vec![b'x'; 4 << 20];
        input.extend_from_slice(b"\n{\"execute\":\"stop\"}\n");
        // A small buffer, as a socket delivers a long line in pieces.
        let mut r = BufReader::with_capacity(8192, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), Line::TooLong);
        assert!(
            buf.capacity() <= 2 * MAX_LINE + 2,
            "held {}",
            buf.capacity()
        );
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), Line::Text);
        assert_eq!(buf, b"{\"execute\":\"stop\"}");
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), Line::Eof);
    }

    #[test]
    fn a_line_without_end_is_abandoned_after_max_skip() {
        let input = vec![b'x'; MAX_SKIP as usize + 2 * MAX_LINE];
        let mut r = BufReader::with_capacity(8192, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), Line::Endless);
    }

    #[test]
    fn a_line_of_exactly_max_line_is_accepted() {
        let mut input = vec![b' '; MAX_LINE];
        input.push(b'\n');
        let mut r = BufReader::new(&input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), Line::Text);
        assert_eq!(buf.len(), MAX_LINE);
    }
}
