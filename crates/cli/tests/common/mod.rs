//! Shared fixtures for the end-to-end tests: child `fastmig` processes, a byte-level
//! fault-injecting TCP proxy, and a frame-level one (`frames.rs`). These tests run real KVM guests and need /dev/kvm: they fail (never skip)
//! without it.

#![allow(dead_code)]

mod frames;
// Not every test file uses the frame proxy (same reason as `dead_code` above).
#[allow(unused_imports)]
pub use frames::*;

use std::io::{Read, Write};

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fastmig")
}

/// Fails loudly when KVM is missing: these tests must not pass vacuously.
pub fn require_kvm() {
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "this test needs a usable /dev/kvm (CI has one)"
    );
}

/// Fails loudly unless this is root with `/dev/kvm` and `ip netns`: what a testbed (network
/// namespaces, a bridge, `tc`) needs. `what` names the tests, for the message.
pub fn require_root_kvm_netns(what: &str) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(root, "{what} need root (network namespaces, a bridge, tc)");
    require_kvm();
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(netns, "{what} need `ip netns` (iproute2)");
}

/// Runs `fastmig args...` to completion.
pub fn fastmig(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn fastmig")
}

/// One control-socket command through the typed client ([`fastmig_host::ControlClient`]),
/// answered with the `return` value, or the error (the VM's `{"class", "desc"}`, or a
/// `{"connect"|"io": ...}` object) as JSON.
pub fn api(path: &Path, execute: &str, args: Value) -> Result<Value, Value> {
    use fastmig_host::{ClientError, Command, ControlClient};
    let command = Command::from_parts(execute, Some(args))
        .map_err(|e| json!({"class": format!("{:?}", e.class), "desc": e.desc}))?;
    let client = ControlClient::connect(path, Duration::ZERO)
        .map_err(|e| json!({"connect": e.to_string()}))?;
    client.execute(&command).map_err(|e| match e {
        ClientError::Refused(e) => json!({"class": format!("{:?}", e.class), "desc": e.desc}),
        other => json!({"io": other.to_string()}),
    })
}

/// Generous deadline for anything a loaded 2-core machine should finish "soon".
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out ({timeout:?}) waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `fastmig` process with a control socket, killed on drop.
pub struct Proc {
    pub child: Child,
    pub api: PathBuf,
    /// Where its stderr goes.
    pub log_path: PathBuf,
}

impl Proc {
    /// Spawns `fastmig args...` (stderr to a file in `dir`) and waits for its socket.
    pub fn spawn(dir: &Path, name: &str, args: &[&str], api_path: &Path) -> Proc {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
        let child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fastmig");
        let mut p = Proc {
            child,
            api: api_path.to_path_buf(),
            log_path: dir.join(format!("{name}.log")),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "{name} exited early ({st}): {}",
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
                );
            }
            if api_path.exists() && api(api_path, "query-status", json!({})).is_ok() {
                return p;
            }
            assert!(Instant::now() < deadline, "{name} never opened its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `fastmig run --mem MEM --workload WORKLOAD --api DIR/NAME.sock`, waited until running.
    pub fn run(dir: &Path, name: &str, mem: &str, workload: &str) -> Proc {
        Proc::run_with(dir, name, mem, workload, &[])
    }

    /// [`Proc::run`] with extra arguments (e.g. `--prefill`).
    pub fn run_with(dir: &Path, name: &str, mem: &str, workload: &str, extra: &[&str]) -> Proc {
        let sock = dir.join(format!("{name}.sock"));
        let mut args = vec![
            "run",
            "--mem",
            mem,
            "--workload",
            workload,
            "--api",
            path_str(&sock),
        ];
        args.extend_from_slice(extra);
        let p = Proc::spawn(dir, name, &args, &sock);
        p.wait_status("running", PATIENCE);
        p
    }

    /// `fastmig incoming --listen LISTEN --mem MEM --api DIR/NAME.sock [extra...]`, waited
    /// until it listens (its control socket opens before the listener binds).
    pub fn incoming(dir: &Path, name: &str, listen: &str, mem: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["--mem", mem];
        args.extend_from_slice(extra);
        Proc::incoming_with(dir, name, listen, &args)
    }

    /// `fastmig incoming --listen LISTEN --api DIR/NAME.sock [args...]` (no `--mem` unless
    /// given: the VM is then built from the source's layout), waited until it listens.
    pub fn incoming_with(dir: &Path, name: &str, listen: &str, extra: &[&str]) -> Proc {
        let sock = dir.join(format!("{name}.sock"));
        let mut args = vec!["incoming", "--listen", listen, "--api", path_str(&sock)];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(dir, name, &args, &sock);
        wait_until(&format!("{name} to listen on {listen}"), PATIENCE, || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("{name} exited early ({st}): {}", p.log());
            }
            p.log()
                .contains("waiting for an incoming migration")
                .then_some(())
        });
        p
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        api(&self.api, "query-status", json!({})).expect("query-status")
    }

    /// `query-status`, or `None` when the socket does not answer (process gone).
    pub fn try_status(&self) -> Option<Value> {
        api(&self.api, "query-status", json!({})).ok()
    }

    /// Waits until `query-status` says `status`; returns that reply.
    pub fn wait_status(&self, status: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                if st["status"] == status {
                    return st;
                }
                last = st;
            }
            assert!(
                Instant::now() < deadline,
                "status never became {status}; last {last}; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the guest's progress counter exceeds `than` (the VM really runs).
    pub fn wait_progress_above(&self, than: u64) -> u64 {
        wait_until(
            &format!("progress above {than} ({})", self.api.display()),
            PATIENCE,
            || self.progress_opt().filter(|&p| p > than),
        )
    }

    fn progress_opt(&self) -> Option<u64> {
        self.try_status()?["progress"].as_u64()
    }

    /// `verify-memory`, asserting it checked pages and found no error.
    pub fn assert_memory_intact(&self) -> Value {
        let r = api(&self.api, "verify-memory", json!({}))
            .unwrap_or_else(|e| panic!("verify-memory failed: {e}"));
        assert_eq!(r["errors"].as_u64(), Some(0), "verify-memory: {r}");
        assert!(
            r["pages_checked"].as_u64().is_some_and(|n| n > 0),
            "verify-memory checked nothing: {r}"
        );
        r
    }

    /// After a failed migration: the source is `running` again, its guest makes progress,
    /// and every page it can check is intact.
    pub fn assert_still_runs_here(&self) {
        let st = self.wait_status("running", PATIENCE);
        assert_eq!(st["migrating"], false, "{st}");
        let p = st["progress"].as_u64().expect("progress");
        self.wait_progress_above(p);
        self.assert_memory_intact();
    }

    pub fn progress(&self) -> u64 {
        self.status()["progress"].as_u64().expect("progress")
    }

    /// Waits until the process has exited, returning its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A path as `&str` (temp paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh temp dir for one test's sockets and logs.
pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fastmig-e2e")
        .tempdir()
        .expect("temp dir")
}

/// A `fastmig migrate` (or other short-lived) client running in the background, with its
/// stdout and stderr captured in files (pipes could fill up and block it).
pub struct Client {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

/// What a finished [`Client`] printed.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Client {
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Client {
        let out = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        let child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn fastmig");
        Client { child, out, err }
    }

    /// Waits (up to `timeout`, else panics) for the client to exit.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let st = wait_until("the client to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        });
        Finished {
            code: st.code(),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    /// Sends a signal (e.g. `libc::SIGINT`) to the client.
    pub fn signal(&self, sig: i32) {
        let rc = send_signal(self.child.id(), sig);
        assert_eq!(rc, 0, "kill({}, {sig})", self.child.id());
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill(2)` through the `kill` utility, so the tests need no `unsafe`.
pub fn send_signal(pid: u32, sig: i32) -> i32 {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    st.code().unwrap_or(-1)
}

impl Finished {
    /// The command failed at runtime (exit 1) with exactly one stderr line that contains
    /// every one of `needles` (case-insensitive).
    pub fn assert_failed_with(&self, needles: &[&str]) -> &str {
        self.assert_one_line_exit(1, needles)
    }

    /// Exit code `code` and exactly one stderr line containing every one of `needles`.
    pub fn assert_one_line_exit(&self, code: i32, needles: &[&str]) -> &str {
        assert_eq!(self.code, Some(code), "exit code; {self:?}");
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "want one stderr line, got {:?}",
            self.stderr
        );
        let lower = lines[0].to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr {:?} should mention {n:?}",
                lines[0]
            );
        }
        lines[0]
    }
}

/// Runs `fastmig migrate --api SRC --to TO [extra...]` to completion (bounded by `PATIENCE`).
pub fn migrate(dir: &Path, src: &Proc, to: &str, extra: &[&str]) -> Finished {
    migrate_spawn(dir, src, to, extra).finish(PATIENCE)
}

/// Starts `fastmig migrate --api SRC --to TO [extra...]` in the background.
pub fn migrate_spawn(dir: &Path, src: &Proc, to: &str, extra: &[&str]) -> Client {
    let mut args = vec!["migrate", "--api", path_str(&src.api), "--to", to];
    args.extend_from_slice(extra);
    Client::spawn(dir, "migrate", &args)
}

/// Waits until the source reports an active migration that has sent at least `bytes`.
pub fn wait_bytes_sent(src: &Proc, bytes: u64) {
    wait_until(
        &format!("the source to send {bytes} bytes"),
        PATIENCE,
        || {
            let m = api(&src.api, "query-migrate", json!({})).ok()?;
            if m["status"] != "active" {
                assert!(
                    m["status"] == "none",
                    "migration ended before {bytes} bytes: {m}"
                );
                return None;
            }
            (m["progress"]["bytes_sent"].as_u64()? >= bytes).then_some(())
        },
    );
}

/// After a failed migration, the destination must never have run the VM: its process exits
/// non-zero (within `PATIENCE`), and while it was alive it never said `running`.
pub fn assert_destination_never_resumed(dst: &mut Proc) {
    let code = wait_until("the destination to exit", PATIENCE, || {
        if let Some(st) = dst.try_status() {
            assert_ne!(
                st["status"],
                "running",
                "destination resumed: {}",
                dst.log()
            );
        }
        dst.child.try_wait().ok().flatten()
    });
    assert_ne!(code.code(), Some(0), "destination exit; log: {}", dst.log());
    assert!(
        !dst.log().contains("VM running"),
        "destination says it runs the VM: {}",
        dst.log()
    );
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// What the proxy does to the source-to-destination byte stream.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Flip one bit of the byte at this offset.
    CorruptAt(u64),
    /// Close both directions after this many bytes.
    TruncateAt(u64),
    /// Flip one bit in the middle of the data of the n-th (0-based) non-zero classic `Page`
    /// frame, found by following the frame headers of the stream (classic transport only:
    /// batches have unframed data behind them).
    CorruptPageData(u64),
}

/// Follows frame boundaries of a classic stream to find the n-th non-zero page's data.
struct FrameWalker {
    /// Stream offset where the next frame header starts.
    next_frame: u64,
    header: Vec<u8>,
    /// Non-zero page frames seen.
    pages: u64,
}

impl FrameWalker {
    /// Feeds `chunk` (at stream offset `offset`); returns the stream offset of the byte to
    /// corrupt once the target frame's header has been seen.
    fn feed(&mut self, offset: u64, chunk: &[u8], target: u64) -> Option<u64> {
        let mut hit = None;
        let end = offset + chunk.len() as u64;
        let mut at = offset;
        while at < end {
            if at < self.next_frame {
                at = self.next_frame;
                continue;
            }
            // Collect the 16-byte header, possibly across chunks.
            let need = 16 - self.header.len();
            let take = need.min((end - at) as usize);
            let from = (at - offset) as usize;
            self.header.extend_from_slice(&chunk[from..from + take]);
            at += take as u64;
            if self.header.len() < 16 {
                break;
            }
            let kind = self.header[6];
            let flags = self.header[7];
            let len = u32::from_le_bytes(self.header[8..12].try_into().expect("4 bytes")) as u64;
            self.header.clear();
            let payload_start = at;
            self.next_frame = payload_start + len;
            if kind == 4 && flags & 1 == 0 && len == 8 + 4096 {
                if self.pages == target && hit.is_none() {
                    // Skip the gpa, land in the middle of the page bytes.
                    hit = Some(payload_start + 8 + 2048);
                }
                self.pages += 1;
            }
        }
        hit
    }
}

/// A one-connection TCP proxy from `listen` to `target` that injects a [`Fault`].
pub struct FaultProxy {
    pub port: u16,
    pub forwarded: Arc<AtomicU64>,
    /// Set once the corrupting fault has actually flipped a bit.
    pub corrupted: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(target_port: u16, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let forwarded = Arc::new(AtomicU64::new(0));
        let fwd = forwarded.clone();
        let corrupted = Arc::new(AtomicBool::new(false));
        let flipped = corrupted.clone();
        let handle = std::thread::spawn(move || {
            // Serve connections until one carries the fault; extra streams (multi-tcp)
            // are forwarded each on its own thread.
            let mut threads = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            // Non-blocking accept, so the loop can notice when every stream is done.
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).ok();
                        let server = TcpStream::connect(("127.0.0.1", target_port))
                            .expect("connect to destination");
                        let fwd = fwd.clone();
                        let flipped = flipped.clone();
                        threads.push(std::thread::spawn(move || {
                            pump(client, server, fault, fwd, flipped)
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if !threads.is_empty()
                            && threads.iter().all(|t: &JoinHandle<()>| t.is_finished())
                        {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            for t in threads {
                let _ = t.join();
            }
        });
        FaultProxy {
            port,
            forwarded,
            corrupted,
            handle: Some(handle),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn pump(
    client: TcpStream,
    server: TcpStream,
    fault: Fault,
    fwd: Arc<AtomicU64>,
    fwd_corrupted: Arc<AtomicBool>,
) {
    // Destination -> source: plain copy.
    let mut back_src = server.try_clone().expect("clone");
    let mut back_dst = client.try_clone().expect("clone");
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_src, &mut back_dst);
        let _ = back_dst.shutdown(Shutdown::Write);
    });
    let mut from = client;
    let mut to = server;
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    let mut walker = FrameWalker {
        next_frame: 0,
        header: Vec::new(),
        pages: 0,
    };
    let mut corrupt_at: Option<u64> = match fault {
        Fault::CorruptAt(at) => Some(at),
        _ => None,
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if let Fault::CorruptPageData(target) = fault {
            if let Some(at) = walker.feed(offset, chunk, target) {
                corrupt_at = Some(at);
            }
        }
        if let Some(at) = corrupt_at {
            if at >= offset && at < offset + n as u64 {
                chunk[(at - offset) as usize] ^= 0x10;
                fwd_corrupted.store(true, Ordering::Relaxed);
            }
        }
        match fault {
            Fault::TruncateAt(at) if offset + n as u64 >= at => {
                let keep = (at - offset.min(at)) as usize;
                let _ = to.write_all(&chunk[..keep]);
                fwd.fetch_add(keep as u64, Ordering::Relaxed);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                let _ = back.join();
                return;
            }
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        offset += n as u64;
        fwd.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = back.join();
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The one memfd backing this process's guest memory, opened read-write through
    /// `/proc/PID/fd` (another open of the same file, so writes land in guest memory).
    pub fn open_guest_memfd(&self) -> std::fs::File {
        let dir = format!("/proc/{}/fd", self.pid());
        let memfds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("list /proc/PID/fd")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                std::fs::read_link(p)
                    .map(|t| t.to_string_lossy().starts_with("/memfd:fastmig-guest"))
                    .unwrap_or(false)
            })
            .collect();
        assert_eq!(memfds.len(), 1, "want one guest memfd in {dir}: {memfds:?}");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&memfds[0])
            .expect("open the guest memfd")
    }

    /// `verify-memory`, returned whatever it found.
    pub fn verify_memory(&self) -> Value {
        api(&self.api, "verify-memory", json!({}))
            .unwrap_or_else(|e| panic!("verify-memory failed: {e}"))
    }
}
