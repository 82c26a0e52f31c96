//! A frame-aware TCP proxy: it sees a classic stream (or a multi-tcp control stream) as whole
//! frames in both directions, so a test can swallow one message kind, leave out one page
//! frame, or kill a process at an exact point of the protocol.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fastmig_migration::protocol::{Complete, Message};

use super::{send_signal, wait_until, PATIENCE};

/// The wire kind of `msg`, read from the real encoder (byte 6 of the header), so the tests
/// follow the protocol instead of repeating its numbers.
pub fn kind_of(msg: &Message) -> u8 {
    fastmig_migration::protocol::encode(msg)[6]
}

/// Wire kinds the two-phase tests look for.
pub fn page_kind() -> u8 {
    kind_of(&Message::Page { gpa: 0, data: None })
}
pub fn complete_kind() -> u8 {
    kind_of(&Message::Complete(Complete {
        digest: 0,
        pages: 0,
        rounds: 0,
    }))
}
pub fn ready_kind() -> u8 {
    kind_of(&Message::Ready)
}
pub fn commit_kind() -> u8 {
    kind_of(&Message::Commit)
}
pub fn data_hello_kind() -> u8 {
    kind_of(&Message::DataHello {
        session: 0,
        stream: 0,
    })
}
pub fn failed_kind() -> u8 {
    kind_of(&Message::Failed {
        reason: String::new(),
    })
}

/// Which way a frame travels through a [`FrameProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Source to destination.
    ToDestination,
    /// Destination to source.
    ToSource,
}

/// What a [`FrameProxy`] does with one whole frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on unchanged.
    Forward,
    /// Leave it out. Every frame carries its own CRC and the classic stream has no frame
    /// counter, so the frames around it stay a valid stream: only the digest can notice.
    Drop,
}

/// One whole frame (16-byte header and payload) seen by a [`FrameProxy`].
pub struct Frame<'a> {
    pub bytes: &'a [u8],
}

impl Frame<'_> {
    pub fn kind(&self) -> u8 {
        self.bytes[6]
    }

    /// The guest-physical address of a `Page` frame that carries data (not a zero page).
    pub fn data_page_gpa(&self) -> Option<u64> {
        let zero = self.bytes[7] & 1 != 0;
        (self.kind() == page_kind() && !zero && self.bytes.len() >= 16 + 8)
            .then(|| u64::from_le_bytes(self.bytes[16..24].try_into().expect("8 bytes")))
    }
}

/// Decides, per frame, whether it goes on; may also act (kill a process) before answering.
pub type FrameRule = Arc<dyn Fn(Dir, &Frame) -> Verdict + Send + Sync>;

/// A TCP proxy that parses both directions of each connection into frames and applies a
/// [`FrameRule`] to each: the classic stream, or a multi-tcp control stream (a multi-tcp data
/// stream, known by its `DataHello`, is copied as bytes after that frame: its batches are
/// followed by unframed page data). shm and handover use Unix sockets.
pub struct FrameProxy {
    pub port: u16,
    /// Every frame seen: direction, kind, verdict; in order per direction.
    pub log: Arc<std::sync::Mutex<Vec<(Dir, u8, Verdict)>>>,
    sockets: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    handle: Option<JoinHandle<()>>,
}

impl FrameProxy {
    pub fn start(target_port: u16, rule: FrameRule) -> FrameProxy {
        FrameProxy::start_with(target_port, rule, DataStreams::default())
    }

    /// [`FrameProxy::start`], counting (and optionally slowing) multi-tcp data streams.
    pub fn start_with(target_port: u16, rule: FrameRule, data: DataStreams) -> FrameProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sockets = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log2, sockets2) = (log.clone(), sockets.clone());
        let handle = std::thread::spawn(move || {
            // Serve connections (multi-tcp opens data streams after the control stream) until
            // every one has ended; non-blocking accept so the loop can notice that.
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut relays: Vec<JoinHandle<()>> = Vec::new();
            while Instant::now() < deadline {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if !relays.is_empty() && relays.iter().all(|t| t.is_finished()) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                client.set_nonblocking(false).ok();
                let server =
                    TcpStream::connect(("127.0.0.1", target_port)).expect("connect to destination");
                for s in [&client, &server] {
                    s.set_nodelay(true).ok();
                    sockets2
                        .lock()
                        .expect("sockets")
                        .push(s.try_clone().expect("clone"));
                }
                let (from, to) = (
                    server.try_clone().expect("clone"),
                    client.try_clone().expect("clone"),
                );
                let (rule_b, log_b, data_b) = (rule.clone(), log2.clone(), data.clone());
                relays.push(std::thread::spawn(move || {
                    relay_frames(from, to, Dir::ToSource, rule_b, log_b, data_b)
                }));
                let (rule_f, log_f, data_f) = (rule.clone(), log2.clone(), data.clone());
                relays.push(std::thread::spawn(move || {
                    relay_frames(client, server, Dir::ToDestination, rule_f, log_f, data_f)
                }));
            }
            for t in relays {
                let _ = t.join();
            }
        });
        FrameProxy {
            port,
            log,
            sockets,
            handle: Some(handle),
        }
    }

    /// Kinds of the frames seen in `dir` with verdict `v`.
    pub fn kinds(&self, dir: Dir, v: Verdict) -> Vec<u8> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(d, _, vv)| *d == dir && *vv == v)
            .map(|(_, k, _)| *k)
            .collect()
    }
}

impl Drop for FrameProxy {
    fn drop(&mut self) {
        // Unblock both relays whatever the peers do.
        for s in self.sockets.lock().expect("sockets").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Copies whole frames from `from` to `to`, asking `rule` about each; at EOF or on any error
/// half-closes `to`, so the peer sees the stream end.
fn relay_frames(
    from: TcpStream,
    mut to: TcpStream,
    dir: Dir,
    rule: FrameRule,
    log: Arc<std::sync::Mutex<Vec<(Dir, u8, Verdict)>>>,
    data: DataStreams,
) {
    let mut r = std::io::BufReader::with_capacity(256 << 10, from);
    let mut frame = Vec::new();
    loop {
        frame.resize(16, 0);
        if r.read_exact(&mut frame[..16]).is_err() {
            break;
        }
        let len = u32::from_le_bytes(frame[8..12].try_into().expect("4 bytes")) as usize;
        assert!(
            len <= 64 << 20,
            "{dir:?}: frame of {len} bytes: not a frame boundary"
        );
        frame.resize(16 + len, 0);
        if r.read_exact(&mut frame[16..]).is_err() {
            break;
        }
        let f = Frame { bytes: &frame };
        let verdict = rule(dir, &f);
        log.lock().expect("log").push((dir, f.kind(), verdict));
        if verdict == Verdict::Forward && to.write_all(&frame).is_err() {
            break;
        }
        if f.kind() == data_hello_kind() {
            // A multi-tcp data stream: batches are followed by unframed page bytes, so the
            // rest of it is copied as bytes, untouched.
            data.forwarded
                .fetch_add(frame.len() as u64, Ordering::SeqCst);
            copy_data(&mut r, &mut to, &data);
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// What a [`FrameProxy`] does with multi-tcp data streams (copied as bytes).
#[derive(Clone, Default)]
pub struct DataStreams {
    /// Bytes forwarded to the destination on all data streams, `DataHello` frames included;
    /// counted before each write, so never less than what the destination has received.
    pub forwarded: Arc<AtomicU64>,
    /// Pause after each chunk of up to 64 KiB (zero: none), so that the data streams lag
    /// behind the control stream.
    pub chunk_delay: Duration,
    /// Once this many bytes went through on a stream, read the rest of it and throw it away:
    /// the source's writes go on, the destination sees its data stream go silent.
    pub stall_after: Option<u64>,
}

fn copy_data(r: &mut impl Read, to: &mut TcpStream, data: &DataStreams) {
    let mut buf = vec![0u8; 64 << 10];
    let mut mine = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if data.stall_after.is_some_and(|at| mine >= at) {
            continue;
        }
        mine += n as u64;
        data.forwarded.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
        if !data.chunk_delay.is_zero() {
            std::thread::sleep(data.chunk_delay);
        }
    }
}

/// The JSON payload of a control frame (`RoundEnd`, `RoundAck`, ...).
pub fn json_payload(f: &Frame) -> serde_json::Value {
    serde_json::from_slice(&f.bytes[16..]).expect("a JSON payload")
}

pub fn round_end_kind() -> u8 {
    kind_of(&Message::RoundEnd {
        round: 0,
        data_bytes: 0,
    })
}
pub fn round_ack_kind() -> u8 {
    kind_of(&Message::RoundAck { round: 0 })
}

/// SIGKILLs process `pid` and waits until it is dead (a zombie or gone), so that nothing it
/// would do next can happen.
pub fn kill_and_wait_dead(pid: u32) {
    assert_eq!(send_signal(pid, 9), 0, "kill -9 {pid}");
    wait_until(&format!("process {pid} to die"), PATIENCE, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 3 (after the parenthesised name) is the state; Z = zombie, X = dead.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        matches!(state, None | Some("Z") | Some("X")).then_some(())
    });
}
