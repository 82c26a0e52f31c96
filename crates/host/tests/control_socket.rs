//! The control socket's path rules and limits, with a scripted handler instead of a VM (no
//! KVM needed), driven through the typed client and raw connections.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fastmig_host::command::{Empty, Return, RunStatus, StatusInfo};
use fastmig_host::server::{lock_path, MAX_CLIENTS, MAX_LINE};
use fastmig_host::{
    ApiServer, ClientError, Command, CommandError, ControlClient, ErrorClass, Handler, HostError,
};
use serde_json::Value;

/// Answers `query-status` with a counter of calls, `stop` with `{}`, the rest with an error.
#[derive(Default)]
struct Scripted {
    calls: AtomicU64,
}

impl Handler for Scripted {
    fn execute(&self, command: Command) -> Result<Return, CommandError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        match command {
            Command::QueryStatus => Ok(Return::Status(StatusInfo {
                status: RunStatus::Running,
                progress: n,
                dirty_rate_pps: 0.0,
                working_set_pages: None,
                pages_written: None,
                heartbeats: None,
                migrating: false,
                listening: None,
                error: None,
            })),
            Command::Stop => Ok(Return::Empty(Empty {})),
            other => Err(CommandError::generic(format!(
                "{} is not scripted",
                other.name()
            ))),
        }
    }
}

fn serve(path: &Path) -> ApiServer {
    ApiServer::start(path, Arc::new(Scripted::default())).expect("server starts")
}

fn raw(path: &Path) -> (BufReader<UnixStream>, UnixStream) {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    (BufReader::new(s.try_clone().expect("clone")), s)
}

fn reply(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn the_typed_client_gets_typed_replies_and_typed_refusals() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("vm.sock");
    let _server = serve(&path);
    let client = ControlClient::connect(&path, Duration::ZERO).expect("connect");
    let a = client.query_status().expect("status");
    let b = client.query_status().expect("status");
    assert_eq!(a.status, RunStatus::Running);
    assert!(b.progress > a.progress);
    client.stop().expect("stop");
    match client.cont() {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.class, ErrorClass::GenericError);
            assert!(e.desc.contains("cont"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_client_waits_a_bounded_time_for_a_socket_about_to_appear() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("late.sock");
    // Nothing there: a short wait ends with a message naming the path.
    let err = ControlClient::connect(&path, Duration::from_millis(100)).expect_err("nobody");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("late.sock"), "{err}");
    // A server that appears during the wait is found.
    let p2 = path.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        serve(&p2)
    });
    let client = ControlClient::connect(&path, Duration::from_secs(20)).expect("waited");
    assert_eq!(
        client.query_status().expect("status").status,
        RunStatus::Running
    );
    drop(late.join().expect("server thread"));
}

#[test]
fn a_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").expect("write");
    let err = ApiServer::start(&file, Arc::new(Scripted::default()))
        .err()
        .expect("refused");
    assert!(matches!(err, HostError::NotASocket(_)), "{err:?}");
    assert!(err.is_usage());
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "keep me"
    );
    let sub = dir.path().join("a-dir");
    std::fs::create_dir(&sub).expect("mkdir");
    assert!(matches!(
        ApiServer::start(&sub, Arc::new(Scripted::default())),
        Err(HostError::NotASocket(_))
    ));
    assert!(sub.is_dir());
}

#[test]
fn a_live_socket_is_never_taken_over() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("busy.sock");
    let _first = serve(&path);
    let err = ApiServer::start(&path, Arc::new(Scripted::default()))
        .err()
        .expect("refused");
    assert!(matches!(err, HostError::SocketInUse(_)), "{err:?}");
    // A foreign listener that answers is not replaced either.
    let other = dir.path().join("foreign.sock");
    let _foreign = UnixListener::bind(&other).expect("bind");
    assert!(matches!(
        ApiServer::start(&other, Arc::new(Scripted::default())),
        Err(HostError::SocketInUse(_))
    ));
    assert!(
        !lock_path(&other).exists(),
        "a refused attempt leaves no lock file"
    );
    let client = ControlClient::connect(&path, Duration::ZERO).expect("first still serves");
    client.query_status().expect("status");
}

#[test]
fn a_path_locked_by_another_process_is_in_use_even_before_its_socket_exists() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("racing.sock");
    // Another process is between taking the lock and binding: it owns the path.
    let lock = std::fs::File::create(lock_path(&path)).expect("lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    assert!(matches!(
        ApiServer::start(&path, Arc::new(Scripted::default())),
        Err(HostError::SocketInUse(_))
    ));
    assert!(!path.exists(), "nothing was bound");
    drop(lock);
    let _server = serve(&path);
}

#[test]
fn a_stale_socket_is_replaced_and_removed_on_close() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("stale.sock");
    // A socket left by a killed process: the file exists, nobody listens.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let server = serve(&path);
    ControlClient::connect(&path, Duration::ZERO)
        .expect("connect")
        .query_status()
        .expect("served");
    assert!(lock_path(&path).exists(), "held while serving");
    server.close();
    assert!(!path.exists(), "removed on close");
    assert!(!lock_path(&path).exists(), "its lock file too");
    // And the path can be taken again at once.
    let _again = serve(&path);
}

#[test]
fn an_overlong_line_gets_an_error_and_the_session_goes_on() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("long.sock");
    let _server = serve(&path);
    let (mut r, mut w) = raw(&path);
    let writer = std::thread::spawn(move || {
        w.write_all(&vec![b'x'; 8 * MAX_LINE]).expect("write");
        w.write_all(b"\n{\"execute\":\"query-status\",\"id\":2}\n")
            .expect("write");
        w
    });
    let first = reply(&mut r);
    assert!(
        first["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("longer than")),
        "{first}"
    );
    let second = reply(&mut r);
    assert_eq!(second["id"], 2);
    assert_eq!(second["return"]["status"], "running");
    drop(writer.join().expect("writer"));
}

#[test]
fn clients_past_the_cap_are_refused_and_served_again_once_others_leave() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("cap.sock");
    let _server = serve(&path);
    // MAX_CLIENTS idle connections, each made to prove it is being served.
    let mut held = Vec::new();
    for _ in 0..MAX_CLIENTS {
        let (mut r, mut w) = raw(&path);
        writeln!(w, r#"{{"execute":"query-status"}}"#).expect("send");
        assert!(reply(&mut r).get("return").is_some());
        held.push((r, w));
    }
    let (mut r, _w) = raw(&path);
    let refused = reply(&mut r);
    assert!(
        refused["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("too many")),
        "{refused}"
    );
    let mut rest = String::new();
    assert_eq!(
        r.read_line(&mut rest).expect("eof"),
        0,
        "closed after the refusal"
    );
    held.pop();
    // The freed slot is released when its thread sees the close: wait for it, bounded.
    let client = ControlClient::connect(&path, Duration::ZERO).expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.query_status() {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "never served again: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
