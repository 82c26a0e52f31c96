//! The control socket: newline-delimited JSON over a unix socket, in the spirit of QEMU's QMP.
//!
//! Request: `{"execute": "query-status", "arguments": {...}, "id": any}` (`arguments` and `id`
//! optional; `id` is echoed back). Reply, one line: `{"return": ...}` or
//! `{"error": {"class": "...", "desc": "..."}}`. Unlike QMP there is no greeting or
//! capabilities negotiation: a client may send commands at once.
//!
//! Commands: `query-status`, `query-vm`, `stop`, `cont`, `quit`, `verify-memory`, `migrate`,
//! `query-migrate`, `migrate-cancel` (see [`crate::host::Host::execute`]).
//! Error classes: `GenericError` (malformed request or failed command), `CommandNotFound`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::host::Host;
use anyhow::Context;
use serde_json::{json, Value};

/// Longest request line accepted; a longer line gets an error reply.
const MAX_LINE: u64 = 64 * 1024;
/// How much of an overlong line is skipped before giving up on the connection.
const MAX_SKIP: u64 = 16 << 20;

/// A running control-socket server. Dropping it does not stop it: call [`ApiServer::close`].
pub struct ApiServer {
    path: PathBuf,
    closed: Arc<AtomicBool>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket nobody listens on) and serves `host` on a
    /// background thread.
    pub fn start(host: Arc<Host>, path: &Path) -> anyhow::Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(crate::usage!(
                    "{} is in use by another running VM",
                    path.display()
                ));
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| crate::usage!("cannot listen on {}: {e}", path.display()))?;
        let closed = Arc::new(AtomicBool::new(false));
        let closed2 = Arc::clone(&closed);
        std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if closed2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            let host = Arc::clone(&host);
                            let spawned = std::thread::Builder::new()
                                .name("api-conn".into())
                                .spawn(move || serve_connection(&host, stream));
                            if let Err(e) = spawned {
                                tracing::warn!("control socket: cannot spawn a thread: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("control socket accept: {e}"),
                    }
                }
            })
            .context("spawning the control-socket thread")?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            closed,
        })
    }

    /// Stops accepting connections and removes the socket file.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_connection(host: &Arc<Host>, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(n) => n,
            Err(e) => {
                // Invalid UTF-8 and the like: answer once, then drop the connection, since we
                // cannot tell where the next request starts.
                let reply = error_reply(None, "GenericError", &format!("unreadable request: {e}"));
                let _ = writeln!(writer, "{reply}");
                return;
            }
        };
        if n == 0 {
            return;
        }
        let too_long = !line.ends_with('\n') && n as u64 == MAX_LINE;
        let reply = if too_long {
            // Skip the rest of the line, so the client can finish writing it and read the
            // reply; a line that never ends closes the connection.
            let mut rest = Vec::new();
            match (&mut reader).take(MAX_SKIP).read_until(b'\n', &mut rest) {
                Ok(_) if rest.ends_with(b"\n") => {}
                _ => return,
            }
            error_reply(None, "GenericError", "request line too long")
        } else if line.trim().is_empty() {
            continue;
        } else {
            handle_request(host, line.trim())
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

fn error_reply(id: Option<&Value>, class: &str, desc: &str) -> Value {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// Handles one request line and returns the reply object.
pub fn handle_request(host: &Arc<Host>, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error_reply(None, "GenericError", &format!("invalid JSON: {e}")),
    };
    let id = req.get("id");
    let Some(obj) = req.as_object() else {
        return error_reply(id, "GenericError", "a request must be a JSON object");
    };
    let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
        return error_reply(id, "GenericError", "missing string member \"execute\"");
    };
    let empty = serde_json::Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(args)) => args,
        Some(_) => return error_reply(id, "GenericError", "\"arguments\" must be an object"),
    };
    let mut reply = match host.execute(cmd, args) {
        Ok(v) => json!({ "return": v }),
        Err(e) => error_reply(None, e.class, &e.desc),
    };
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply
}

/// Sends one command to the socket at `path` and returns its `return` value; an `error`
/// reply becomes an error.
pub fn call(path: &Path, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to the control socket {}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .context("setting a socket timeout")?;
    let mut req = json!({ "execute": command });
    if let Some(args) = arguments {
        req["arguments"] = args;
    }
    let mut writer = stream.try_clone().context("cloning the socket")?;
    writeln!(writer, "{req}").context("sending the request")?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(16 << 20)
        .read_line(&mut line)
        .context("reading the reply")?;
    let reply: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("malformed reply {:?}", line.trim()))?;
    if let Some(err) = reply.get("error") {
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        anyhow::bail!("{desc}");
    }
    reply
        .get("return")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("reply without \"return\": {reply}"))
}
