//! Taking a Unix socket path for a listener without ever deleting what is not ours.
//!
//! A listener holds an exclusive `flock` on `PATH.lock` for its whole life. With that lock:
//! - a path that exists and is not a socket (a user's file, a directory) is refused, untouched;
//! - a socket on which something accepts connections (another program's live listener) is
//!   refused, untouched;
//! - only a socket that nobody answers on (left by a process that died) is replaced.
//!
//! Two fastmig listeners racing for one path: the second fails to take the lock and is
//! refused, so it never unlinks the first one's socket. The lock file is removed on drop;
//! whoever locks it checks afterwards that the path still names the inode it locked (else it
//! locked a file being removed, and tries again), the usual flock-and-unlink protocol.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// The held lock beside a socket path; removes the lock file (then unlocks) on drop.
#[derive(Debug)]
struct Lock {
    lock_path: PathBuf,
    _file: File,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// A bound Unix socket path and its lock; unlinks both on drop.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    // Dropped after `drop` below has removed the socket.
    _lock: Lock,
}

impl SocketPath {
    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        // Still under the lock: the socket is ours, nobody else can have replaced it.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn refused(kind: io::ErrorKind, why: String) -> io::Error {
    io::Error::new(kind, why)
}

/// `PATH.lock`, beside the socket.
fn lock_path_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Takes the lock beside `path`, or says who holds it.
fn lock(path: &Path) -> io::Result<Lock> {
    let lock_path = lock_path_of(path);
    for _ in 0..8 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // A symlink planted at the lock path must not make us create a file elsewhere.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)?;
        if !f.metadata()?.file_type().is_file() {
            return Err(refused(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a lock file", lock_path.display()),
            ));
        }
        match flock(f.as_fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(refused(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another listener holds {} (a live destination is using this path)",
                        lock_path.display()
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        // The holder we waited for may have removed the file before unlocking it: then our
        // lock is on an orphan inode and proves nothing.
        let ours = f.metadata()?;
        match std::fs::symlink_metadata(&lock_path) {
            Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {
                return Ok(Lock {
                    lock_path,
                    _file: f,
                })
            }
            _ => continue,
        }
    }
    Err(refused(
        io::ErrorKind::AddrInUse,
        format!("{} keeps changing under us", lock_path.display()),
    ))
}

/// Binds a listener at `path` following the rules in the module header.
pub(crate) fn bind(path: &Path) -> io::Result<(UnixListener, SocketPath)> {
    // Every early return below drops the lock, which removes the lock file again.
    let lock = lock(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(refused(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it".into(),
            ))
        }
        Ok(_) => {
            // A socket without our lock: maybe another program listens on it.
            if UnixStream::connect(path).is_ok() {
                return Err(refused(
                    io::ErrorKind::AddrInUse,
                    "a live listener answers on this socket; refusing to replace it".into(),
                ));
            }
            // Nobody answers and we hold the lock: a stale socket of a dead process.
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    Ok((
        listener,
        SocketPath {
            path: path.to_path_buf(),
            _lock: lock,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fastmig-sockpath-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn a_regular_file_is_refused_and_kept() {
        let d = dir();
        let p = d.join("x.txt");
        std::fs::write(&p, b"user data").expect("write");
        let e = bind(&p).expect_err("a regular file must be refused");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&p).expect("still there"), b"user data");
        assert!(!lock_path_of(&p).exists(), "lock file left behind");
    }

    #[test]
    fn a_second_listener_is_refused_and_the_first_keeps_its_socket() {
        let d = dir();
        let p = d.join("m.sock");
        let (first, held) = bind(&p).expect("first bind");
        let e = bind(&p).expect_err("second bind must fail");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        // The first listener still gets connections on its path.
        let _c = UnixStream::connect(&p).expect("connect to the first listener");
        first.accept().expect("the first listener accepts");
        drop(held);
        assert!(!p.exists() && !lock_path_of(&p).exists(), "left behind");
    }

    #[test]
    fn another_programs_live_socket_is_refused() {
        let d = dir();
        let p = d.join("live.sock");
        let other = UnixListener::bind(&p).expect("other program's listener");
        let e = bind(&p).expect_err("a live socket must be refused");
        assert!(e.to_string().contains("live listener"), "{e}");
        let _c = UnixStream::connect(&p).expect("the other listener still answers");
        drop(other);
    }

    #[test]
    fn a_stale_socket_is_taken_over() {
        let d = dir();
        let p = d.join("stale.sock");
        // std leaves the file behind when the listener goes: a dead process's socket.
        drop(UnixListener::bind(&p).expect("bind"));
        assert!(p.exists());
        let (l, _held) = bind(&p).expect("take over a stale socket");
        let _c = UnixStream::connect(&p).expect("connect");
        l.accept().expect("accept on the new listener");
    }

    #[test]
    fn a_symlinked_lock_path_is_not_followed() {
        let d = dir();
        let p = d.join("s.sock");
        let target = d.join("elsewhere");
        std::os::unix::fs::symlink(&target, lock_path_of(&p)).expect("symlink");
        assert!(bind(&p).is_err(), "followed a symlink at the lock path");
        assert!(!target.exists(), "created a file through the symlink");
    }
}
