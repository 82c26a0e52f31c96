//! The versioned wire protocol: frames, messages, encoding and a decoder that never panics.
//!
//! Every frame is a 16-byte little-endian header followed by `len` payload bytes:
//!
//! ```text
//! 0      4        6      7       8        12       16
//! | magic | version | kind | flags | len    | crc32  | payload (len bytes) ...
//! ```
//!
//! `crc32` covers header bytes 0..12 and the payload. `len` is capped at [`MAX_PAYLOAD`].
//! Control messages carry JSON payloads; page frames and batch descriptors are binary.
//! A [`Message::Batch`] descriptor is followed on the stream by the raw bytes of its non-zero
//! pages (not covered by the frame checksum; see PROTOCOL.md for why and what covers them).
//!
//! Version rule ([`PROTOCOL_VERSION`], [`MIN_PROTOCOL_VERSION`], [`FRAME_VERSION`]): the header
//! layout and the `Hello`, `HelloReply` and `Failed` payloads are frozen (fields may only be
//! added) and decoded whatever the version, so a peer of another version can always be told
//! why it is refused. The source offers a range of versions in `Hello`, the destination picks
//! the highest both speak (Cloud Hypervisor style: N-1..=N) and says it in `HelloReply`.
//! Every other frame must carry [`FRAME_VERSION`] in its header.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

use crate::transport::TransportKind;
use crate::vm::{VmLayout, PAGE_SIZE};

/// Frame magic, "FMIG" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FMIG");
/// Newest protocol version spoken by this build. Bump on any change to the wire; a change that
/// only adds (a field old peers ignore, a behaviour they need not know) keeps the previous
/// version in the window ([`MIN_PROTOCOL_VERSION`]), a breaking one raises the window and
/// [`FRAME_VERSION`]. History: 1, first; 2, `RoundEnd` carries the data-stream byte count and
/// the destination answers `RoundAck`; 3, `Hello.max_version` (version negotiation), additive.
pub const PROTOCOL_VERSION: u16 = 3;
/// Oldest protocol version this build still speaks, as source and as destination.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Version written in, and required of, the header of every frame but the frozen ones: the
/// protocol version in which a frame format last changed. Version 3 changed only the `Hello`
/// payload, additively, so every frame still says 2 and a version-2 peer reads it.
pub const FRAME_VERSION: u16 = 2;
/// Header size in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted, in bytes (64 MiB: device state of a large VM fits; a corrupt
/// length cannot make us allocate gigabytes).
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Largest number of pages in one batch run.
pub const MAX_RUN_PAGES: u32 = 1024;

/// Errors of framing and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The first four bytes were not [`MAGIC`].
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    /// A frame of another protocol version.
    #[error("protocol version mismatch: peer speaks {got}, we speak {want}")]
    BadVersion {
        /// Version in the frame.
        got: u16,
        /// Our version.
        want: u16,
    },
    /// `len` larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the {max}-byte cap")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// CRC mismatch.
    #[error("frame checksum mismatch (kind {kind}): corrupted stream")]
    BadChecksum {
        /// Kind byte of the damaged frame.
        kind: u8,
    },
    /// Input ended inside a frame.
    #[error("truncated frame: stream ended inside a frame")]
    Truncated,
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Payload did not parse.
    #[error("malformed {kind} payload: {reason}")]
    Malformed {
        /// Message name.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The underlying stream failed.
    #[error("stream I/O")]
    Io(#[source] io::Error),
}

/// First message of a migration, source to destination, on the control stream.
///
/// On the wire (JSON, frozen since version 1, fields only added) the transport keeps its
/// version-1 spelling, `"transport": "multi-tcp", "data_streams": 4`, so that every version
/// can read it; [`TransportKind`] is the only thing that writes or reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "HelloWire", try_from = "HelloWire")]
pub struct Hello {
    /// Oldest protocol version the source speaks (a version-2 destination requires it to be
    /// exactly 2).
    pub version: u16,
    /// Newest protocol version the source speaks (absent before version 3: then `version`).
    pub max_version: u16,
    /// The VM's layout.
    pub layout: VmLayout,
    /// The transport, with its parameters (multi-tcp: number of extra data streams).
    pub transport: TransportKind,
    /// Random id tying data streams to this control stream.
    pub session: u64,
}

/// [`Hello`] as it is spelled on the wire.
#[derive(Serialize, Deserialize)]
struct HelloWire {
    version: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_version: Option<u16>,
    layout: VmLayout,
    transport: String,
    data_streams: u32,
    session: u64,
}

impl From<Hello> for HelloWire {
    fn from(h: Hello) -> Self {
        let (transport, data_streams) = h.transport.wire_name();
        HelloWire {
            version: h.version,
            // A single-version Hello is spelled exactly as a version-2 source spelled it.
            max_version: (h.max_version != h.version).then_some(h.max_version),
            layout: h.layout,
            transport: transport.into(),
            data_streams,
            session: h.session,
        }
    }
}

impl TryFrom<HelloWire> for Hello {
    type Error = crate::transport::BadTransport;
    fn try_from(w: HelloWire) -> Result<Self, Self::Error> {
        Ok(Hello {
            version: w.version,
            max_version: w.max_version.unwrap_or(w.version),
            layout: w.layout,
            transport: TransportKind::from_wire_name(&w.transport, w.data_streams)?,
            session: w.session,
        })
    }
}

/// Destination's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Destination's protocol version.
    pub version: u16,
    /// True if the destination accepts the migration.
    pub accepted: bool,
    /// Why not, when refused.
    pub reason: Option<String>,
}

/// Completion: sent after the last page and the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// Digest of the source's page-hash table as of the pause.
    pub digest: u64,
    /// Pages in the VM.
    pub pages: u64,
    /// Pre-copy rounds done (including the final stop-and-copy round).
    pub rounds: u32,
}

/// Destination's final report, after it resumed the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    /// CPU seconds the destination spent on the migration (all its threads).
    pub dst_cpu_s: f64,
    /// Destination setup time (accept, handshake, memory preparation), ms.
    pub dst_setup_ms: f64,
    /// The destination compared its digest with `Complete.digest` and found them equal (it
    /// refuses to resume on a mismatch, so a `Resumed` with `false` means a broken peer).
    pub digest_match: bool,
}

/// One run of contiguous pages in a batch descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages (1..=[`MAX_RUN_PAGES`]).
    pub pages: u32,
    /// Bit i set: page i is all zeros and its bytes are not sent. `pages.div_ceil(8)` bytes.
    pub zero: Vec<u8>,
}

impl Run {
    /// True if page `i` of the run is a zero page.
    pub fn is_zero(&self, i: usize) -> bool {
        self.zero
            .get(i / 8)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Number of pages whose bytes follow the descriptor.
    pub fn data_pages(&self) -> usize {
        (0..self.pages as usize)
            .filter(|&i| !self.is_zero(i))
            .count()
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Source opens the session.
    Hello(Hello),
    /// Destination accepts or refuses.
    HelloReply(HelloReply),
    /// First frame on each extra data stream (multi-tcp).
    DataHello {
        /// Session id from [`Hello`].
        session: u64,
        /// Stream index, 0-based.
        stream: u32,
    },
    /// Classic: one page with its own header. `data` is `None` for a zero page.
    Page {
        /// Guest-physical address.
        gpa: u64,
        /// The page's bytes, [`PAGE_SIZE`] long, or `None` for a zero page.
        data: Option<Vec<u8>>,
    },
    /// Multi-tcp: a batch descriptor; the runs' non-zero page bytes follow on the stream.
    Batch(Vec<Run>),
    /// Shm: pages the source has written straight into the destination's memory.
    Written(Vec<(u64, u32)>),
    /// End of a pre-copy round. The destination answers [`Message::RoundAck`] once every
    /// page sent before it has landed in its memory.
    RoundEnd {
        /// Round number, 1-based.
        round: u32,
        /// Bytes written so far on the data streams (multi-tcp; 0 for transports that carry
        /// pages on the control stream, where order already says everything has arrived).
        data_bytes: u64,
    },
    /// Destination: every page of the round (and before) is in guest memory. Lets the source
    /// measure end-to-end bandwidth, and keeps a backlog of in-flight pages out of downtime.
    RoundAck {
        /// The round acknowledged.
        round: u32,
    },
    /// No more page data on this stream.
    EndOfData,
    /// Device and vCPU state, opaque.
    State(Vec<u8>),
    /// All pages and the state were sent.
    Complete(Complete),
    /// Destination verified the digest and restored the state; waiting for `Commit`.
    Ready,
    /// Source gives up the VM: the destination may resume it now.
    Commit,
    /// Destination resumed the VM.
    Resumed(Resumed),
    /// Either side failed; the other must not go on.
    Failed {
        /// Why.
        reason: String,
    },
    /// Memory descriptors (`shm`: destination to source; `handover`: source to destination),
    /// one per region, travelling as `SCM_RIGHTS` with this frame.
    MemoryFds(Vec<FdRegion>),
}

/// Where one region lives inside the memory descriptor passed with [`Message::MemoryFds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region inside its descriptor.
    pub fd_offset: u64,
}

impl Message {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::HelloReply(_) => "hello-reply",
            Message::DataHello { .. } => "data-hello",
            Message::Page { .. } => "page",
            Message::Batch(_) => "batch",
            Message::Written(_) => "written",
            Message::RoundEnd { .. } => "round-end",
            Message::RoundAck { .. } => "round-ack",
            Message::EndOfData => "end-of-data",
            Message::State(_) => "state",
            Message::Complete(_) => "complete",
            Message::Ready => "ready",
            Message::Commit => "commit",
            Message::Resumed(_) => "resumed",
            Message::Failed { .. } => "failed",
            Message::MemoryFds(_) => "memory-fds",
        }
    }
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_REPLY: u8 = 2;
    pub const DATA_HELLO: u8 = 3;
    pub const PAGE: u8 = 4;
    pub const BATCH: u8 = 5;
    pub const WRITTEN: u8 = 6;
    pub const ROUND_END: u8 = 7;
    pub const END_OF_DATA: u8 = 8;
    pub const STATE: u8 = 9;
    pub const COMPLETE: u8 = 10;
    pub const READY: u8 = 11;
    pub const COMMIT: u8 = 12;
    pub const RESUMED: u8 = 13;
    pub const FAILED: u8 = 14;
    pub const MEMORY_FDS: u8 = 15;
    pub const ROUND_ACK: u8 = 16;
}

const FLAG_ZERO_PAGE: u8 = 1;

#[derive(Serialize, Deserialize)]
struct DataHelloJson {
    session: u64,
    stream: u32,
}
#[derive(Serialize, Deserialize)]
struct RoundJson {
    round: u32,
    #[serde(default)]
    data_bytes: u64,
}
#[derive(Serialize, Deserialize)]
struct FailedJson {
    reason: String,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Writes a frame header for `payload` into `out` (cleared first) followed by the payload.
fn frame(out: &mut Vec<u8>, version: u16, kind: u8, flags: u8, payload: &[u8]) {
    out.clear();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..12]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes a page frame (classic transport) into `out`, reusing its allocation.
pub fn encode_page(out: &mut Vec<u8>, gpa: u64, data: Option<&[u8; PAGE_SIZE]>) {
    let mut payload = [0u8; 8 + PAGE_SIZE];
    payload[..8].copy_from_slice(&gpa.to_le_bytes());
    match data {
        Some(d) => {
            payload[8..].copy_from_slice(d);
            frame(out, FRAME_VERSION, kind::PAGE, 0, &payload);
        }
        None => frame(
            out,
            FRAME_VERSION,
            kind::PAGE,
            FLAG_ZERO_PAGE,
            &payload[..8],
        ),
    }
}

/// Encodes `msg` with an explicit version (tests use this to play an incompatible peer).
pub fn encode_with_version(msg: &Message, version: u16) -> Vec<u8> {
    let mut out = Vec::new();
    match msg {
        Message::Hello(h) => frame(&mut out, version, kind::HELLO, 0, &json(h)),
        Message::HelloReply(h) => frame(&mut out, version, kind::HELLO_REPLY, 0, &json(h)),
        Message::DataHello { session, stream } => frame(
            &mut out,
            version,
            kind::DATA_HELLO,
            0,
            &json(&DataHelloJson {
                session: *session,
                stream: *stream,
            }),
        ),
        Message::Page { gpa, data } => {
            let mut p = gpa.to_le_bytes().to_vec();
            let flags = match data {
                Some(d) => {
                    p.extend_from_slice(d);
                    0
                }
                None => FLAG_ZERO_PAGE,
            };
            frame(&mut out, version, kind::PAGE, flags, &p);
        }
        Message::Batch(runs) => frame(&mut out, version, kind::BATCH, 0, &encode_runs(runs)),
        Message::Written(runs) => {
            let mut p = (runs.len() as u32).to_le_bytes().to_vec();
            for (gpa, n) in runs {
                p.extend_from_slice(&gpa.to_le_bytes());
                p.extend_from_slice(&n.to_le_bytes());
            }
            frame(&mut out, version, kind::WRITTEN, 0, &p);
        }
        Message::RoundEnd { round, data_bytes } => frame(
            &mut out,
            version,
            kind::ROUND_END,
            0,
            &json(&RoundJson {
                round: *round,
                data_bytes: *data_bytes,
            }),
        ),
        Message::RoundAck { round } => frame(
            &mut out,
            version,
            kind::ROUND_ACK,
            0,
            &json(&RoundJson {
                round: *round,
                data_bytes: 0,
            }),
        ),
        Message::EndOfData => frame(&mut out, version, kind::END_OF_DATA, 0, &[]),
        Message::State(s) => frame(&mut out, version, kind::STATE, 0, s),
        Message::Complete(c) => frame(&mut out, version, kind::COMPLETE, 0, &json(c)),
        Message::Ready => frame(&mut out, version, kind::READY, 0, &[]),
        Message::Commit => frame(&mut out, version, kind::COMMIT, 0, &[]),
        Message::Resumed(r) => frame(&mut out, version, kind::RESUMED, 0, &json(r)),
        Message::Failed { reason } => frame(
            &mut out,
            version,
            kind::FAILED,
            0,
            &json(&FailedJson {
                reason: reason.clone(),
            }),
        ),
        Message::MemoryFds(r) => frame(&mut out, version, kind::MEMORY_FDS, 0, &json(r)),
    }
    out
}

/// Encodes `msg` with [`FRAME_VERSION`] in its header.
pub fn encode(msg: &Message) -> Vec<u8> {
    encode_with_version(msg, FRAME_VERSION)
}

/// Binary batch descriptor: `u32 n`, then per run `u64 gpa, u32 pages, zero bitmap`.
pub fn encode_runs(runs: &[Run]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + runs.len() * 16);
    p.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for r in runs {
        p.extend_from_slice(&r.gpa.to_le_bytes());
        p.extend_from_slice(&r.pages.to_le_bytes());
        let n = (r.pages as usize).div_ceil(8);
        let mut z = r.zero.clone();
        z.resize(n, 0);
        p.extend_from_slice(&z);
    }
    p
}

/// Encodes a batch descriptor frame into `out` (reusing its allocation).
pub fn encode_batch(out: &mut Vec<u8>, runs: &[Run]) {
    frame(out, FRAME_VERSION, kind::BATCH, 0, &encode_runs(runs));
}

/// Parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Version field.
    pub version: u16,
    /// Kind byte.
    pub kind: u8,
    /// Flags byte.
    pub flags: u8,
    /// Payload length (already checked against [`MAX_PAYLOAD`]).
    pub len: usize,
    /// Checksum field.
    pub crc: u32,
}

/// Parses and checks the fixed header (magic and size cap; version is checked after the
/// checksum in [`decode_payload`], so that a refused peer can still be read).
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok(Header {
        version: u16::from_le_bytes([b[4], b[5]]),
        kind: b[6],
        flags: b[7],
        len,
        crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
    })
}

fn malformed(kind: &'static str, reason: impl ToString) -> ProtocolError {
    ProtocolError::Malformed {
        kind,
        reason: reason.to_string(),
    }
}

fn from_json<'a, T: Deserialize<'a>>(kind: &'static str, p: &'a [u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(p).map_err(|e| malformed(kind, e))
}

fn le_u32(p: &[u8], at: usize) -> Option<u32> {
    p.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le_u64(p: &[u8], at: usize) -> Option<u64> {
    let s = p.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn decode_runs(p: &[u8]) -> Result<Vec<Run>, ProtocolError> {
    let n = le_u32(p, 0).ok_or_else(|| malformed("batch", "missing run count"))? as usize;
    // Each run takes at least 13 bytes: bound n before allocating.
    if n > p.len() / 13 {
        return Err(malformed(
            "batch",
            format!("{n} runs cannot fit in {} bytes", p.len()),
        ));
    }
    let mut runs = Vec::with_capacity(n);
    let mut at = 4;
    for _ in 0..n {
        let gpa = le_u64(p, at).ok_or_else(|| malformed("batch", "truncated run"))?;
        let pages = le_u32(p, at + 8).ok_or_else(|| malformed("batch", "truncated run"))?;
        if pages == 0 || pages > MAX_RUN_PAGES || gpa % PAGE_SIZE as u64 != 0 {
            return Err(malformed(
                "batch",
                format!("bad run gpa {gpa:#x} pages {pages}"),
            ));
        }
        at += 12;
        let zb = (pages as usize).div_ceil(8);
        let zero = p
            .get(at..at + zb)
            .ok_or_else(|| malformed("batch", "truncated zero bitmap"))?;
        at += zb;
        runs.push(Run {
            gpa,
            pages,
            zero: zero.to_vec(),
        });
    }
    if at != p.len() {
        return Err(malformed("batch", "trailing bytes"));
    }
    Ok(runs)
}

/// Checks the checksum and version of a frame and decodes its payload.
pub fn decode_payload(
    h: &Header,
    head: &[u8; HEADER_LEN],
    p: &[u8],
) -> Result<Message, ProtocolError> {
    let mut c = crc32fast::Hasher::new();
    c.update(&head[..12]);
    c.update(p);
    if c.finalize() != h.crc {
        return Err(ProtocolError::BadChecksum { kind: h.kind });
    }
    let frozen = matches!(h.kind, kind::HELLO | kind::HELLO_REPLY | kind::FAILED);
    if !frozen && h.version != FRAME_VERSION {
        return Err(ProtocolError::BadVersion {
            got: h.version,
            want: FRAME_VERSION,
        });
    }
    let empty = |name: &'static str, m: Message| {
        if p.is_empty() {
            Ok(m)
        } else {
            Err(malformed(name, "unexpected payload"))
        }
    };
    match h.kind {
        kind::HELLO => Ok(Message::Hello(from_json("hello", p)?)),
        kind::HELLO_REPLY => Ok(Message::HelloReply(from_json("hello-reply", p)?)),
        kind::DATA_HELLO => {
            let d: DataHelloJson = from_json("data-hello", p)?;
            Ok(Message::DataHello {
                session: d.session,
                stream: d.stream,
            })
        }
        kind::PAGE => {
            let gpa = le_u64(p, 0).ok_or_else(|| malformed("page", "missing gpa"))?;
            if gpa % PAGE_SIZE as u64 != 0 {
                return Err(malformed("page", format!("unaligned gpa {gpa:#x}")));
            }
            if h.flags & FLAG_ZERO_PAGE != 0 {
                if p.len() != 8 {
                    return Err(malformed("page", "zero page with data"));
                }
                Ok(Message::Page { gpa, data: None })
            } else if p.len() == 8 + PAGE_SIZE {
                Ok(Message::Page {
                    gpa,
                    data: Some(p[8..].to_vec()),
                })
            } else {
                Err(malformed(
                    "page",
                    format!("length {} is not 8 + page size", p.len()),
                ))
            }
        }
        kind::BATCH => Ok(Message::Batch(decode_runs(p)?)),
        kind::WRITTEN => {
            let n = le_u32(p, 0).ok_or_else(|| malformed("written", "missing count"))? as usize;
            if p.len() != 4 + n.saturating_mul(12) {
                return Err(malformed("written", "length does not match run count"));
            }
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let at = 4 + i * 12;
                let gpa = le_u64(p, at).ok_or_else(|| malformed("written", "truncated"))?;
                let pages = le_u32(p, at + 8).ok_or_else(|| malformed("written", "truncated"))?;
                v.push((gpa, pages));
            }
            Ok(Message::Written(v))
        }
        kind::ROUND_END => {
            let r: RoundJson = from_json("round-end", p)?;
            Ok(Message::RoundEnd {
                round: r.round,
                data_bytes: r.data_bytes,
            })
        }
        kind::ROUND_ACK => {
            let r: RoundJson = from_json("round-ack", p)?;
            Ok(Message::RoundAck { round: r.round })
        }
        kind::END_OF_DATA => empty("end-of-data", Message::EndOfData),
        kind::STATE => Ok(Message::State(p.to_vec())),
        kind::COMPLETE => Ok(Message::Complete(from_json("complete", p)?)),
        kind::READY => empty("ready", Message::Ready),
        kind::COMMIT => empty("commit", Message::Commit),
        kind::RESUMED => Ok(Message::Resumed(from_json("resumed", p)?)),
        kind::FAILED => {
            let f: FailedJson = from_json("failed", p)?;
            Ok(Message::Failed { reason: f.reason })
        }
        kind::MEMORY_FDS => Ok(Message::MemoryFds(from_json("memory-fds", p)?)),
        other => Err(ProtocolError::UnknownKind(other)),
    }
}

/// Decodes one frame from the start of `buf`; returns the message and the bytes consumed.
/// Never panics, whatever `buf` holds.
pub fn decode(buf: &[u8]) -> Result<(Message, usize), ProtocolError> {
    let head: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(ProtocolError::Truncated)?;
    let h = decode_header(head)?;
    let p = buf
        .get(HEADER_LEN..HEADER_LEN + h.len)
        .ok_or(ProtocolError::Truncated)?;
    Ok((decode_payload(&h, head, p)?, HEADER_LEN + h.len))
}

fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })
}

/// Reads one frame from a stream.
pub fn read_message(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    read_exact_or_truncated(r, &mut head)?;
    let h = decode_header(&head)?;
    let mut p = vec![0u8; h.len];
    read_exact_or_truncated(r, &mut p)?;
    decode_payload(&h, &head, &p)
}

/// Writes one frame to a stream.
pub fn write_message(w: &mut impl Write, msg: &Message) -> Result<(), ProtocolError> {
    w.write_all(&encode(msg)).map_err(ProtocolError::Io)
}

#[cfg(test)]
mod tests;
