//! Shared fixtures for the end-to-end tests: child `fastmig` processes and a fault-injecting
//! TCP proxy. These tests run real KVM guests and need /dev/kvm: they fail (never skip)
//! without it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Runs `fastmig args...` to completion.
pub fn fastmig(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn fastmig")
}

/// One control-socket command, answered with the `return` value or the `error` object.
pub fn api(path: &Path, execute: &str, args: Value) -> Result<Value, Value> {
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(path).map_err(|e| json!({"connect": e.to_string()}))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let msg = json!({"execute": execute, "arguments": args}).to_string() + "\n";
    s.write_all(msg.as_bytes())
        .map_err(|e| json!({"write": e.to_string()}))?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => buf.push(byte[0]),
            Err(e) => return Err(json!({"read": e.to_string()})),
        }
    }
    let v: Value = serde_json::from_slice(&buf).map_err(|e| json!({"parse": e.to_string()}))?;
    if let Some(r) = v.get("return") {
        Ok(r.clone())
    } else {
        Err(v.get("error").cloned().unwrap_or(v))
    }
}

/// A `fastmig` process with a control socket, killed on drop.
pub struct Proc {
    pub child: Child,
    pub api: PathBuf,
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

    pub fn status(&self) -> Value {
        api(&self.api, "query-status", json!({})).expect("query-status")
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
}

/// A one-connection TCP proxy from `listen` to `target` that injects a [`Fault`].
pub struct FaultProxy {
    pub port: u16,
    pub forwarded: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(target_port: u16, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let forwarded = Arc::new(AtomicU64::new(0));
        let fwd = forwarded.clone();
        let handle = std::thread::spawn(move || {
            // Serve connections until one carries the fault; extra streams (multi-tcp)
            // are forwarded each on its own thread.
            listener
                .set_nonblocking(false)
                .expect("blocking listener");
            let mut threads = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            listener.set_nonblocking(true).ok();
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).ok();
                        let server = TcpStream::connect(("127.0.0.1", target_port))
                            .expect("connect to destination");
                        let fwd = fwd.clone();
                        threads.push(std::thread::spawn(move || pump(client, server, fault, fwd)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if !threads.is_empty() && threads.iter().all(|t: &JoinHandle<()>| t.is_finished()) {
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

fn pump(client: TcpStream, server: TcpStream, fault: Fault, fwd: Arc<AtomicU64>) {
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
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        match fault {
            Fault::CorruptAt(at) if at >= offset && at < offset + n as u64 => {
                chunk[(at - offset) as usize] ^= 0x10;
            }
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
