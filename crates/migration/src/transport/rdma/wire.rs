//! The RDMA transport's own small messages: the connect request's private data and the
//! SEND/RECV messages on the queue pair (memory keys). Little-endian, each with a magic, a
//! version and a CRC-32, decoded with bounds checks (PROTOCOL.md, "RDMA").

use crate::protocol::ProtocolError;

/// Magic of the connect request's private data (`"FMRQ"`).
const REQ_MAGIC: u32 = u32::from_le_bytes(*b"FMRQ");
/// Magic of a queue-pair message (`"FMRM"`).
const MSG_MAGIC: u32 = u32::from_le_bytes(*b"FMRM");
/// Version of both formats. A change bumps it; a peer refuses any other version (the
/// transport is negotiated in `Hello`, so both peers of one migration speak the same).
/// 2: the connect request names its queue pair (index and count).
pub(crate) const RDMA_WIRE_VERSION: u16 = 2;
/// Size of a receive slot, and so the largest message.
pub(crate) const MSG_MAX: usize = 4096;

/// What the source says in its connect request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectRequest {
    /// The migration's session id (from `Hello`): a connection from anyone else is refused.
    pub session: u64,
    /// Most bytes of guest memory the destination may keep registered (0: all of it).
    pub pin_budget: u64,
    /// This connection's queue pair, `0 .. qp_count` (0 carries the SEND messages).
    pub qp_index: u8,
    /// How many connections (queue pairs) the source opens for this migration.
    pub qp_count: u8,
}

fn malformed(reason: String) -> ProtocolError {
    ProtocolError::Malformed {
        kind: "rdma",
        reason,
    }
}

impl ConnectRequest {
    /// 4 magic + 2 version + 1 qp index + 1 qp count + 8 session + 8 budget + 4 crc = 28
    /// bytes (rdma_cm leaves 56 in a connect request).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQ_MAGIC.to_le_bytes());
        b.extend_from_slice(&RDMA_WIRE_VERSION.to_le_bytes());
        b.push(self.qp_index);
        b.push(self.qp_count);
        b.extend_from_slice(&self.session.to_le_bytes());
        b.extend_from_slice(&self.pin_budget.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        // rdma_cm may pad the private data with zeros: read the first 28 bytes.
        let b = b
            .get(..28)
            .ok_or_else(|| malformed(format!("connect request of {} bytes", b.len())))?;
        let mut r = Reader(b);
        if r.u32()? != REQ_MAGIC {
            return Err(malformed("bad connect request magic".into()));
        }
        let version = r.u16()?;
        if version != RDMA_WIRE_VERSION {
            return Err(malformed(format!("connect request version {version}")));
        }
        let (qp_index, qp_count) = (r.u8()?, r.u8()?);
        let req = Self {
            session: r.u64()?,
            pin_budget: r.u64()?,
            qp_index,
            qp_count,
        };
        if r.u32()? != crc32fast::hash(&b[..24]) {
            return Err(malformed("connect request checksum".into()));
        }
        if qp_count == 0 || qp_index >= qp_count {
            return Err(malformed(format!(
                "connect request for queue pair {qp_index} of {qp_count}"
            )));
        }
        Ok(req)
    }
}

/// A destination chunk the source may write: host address and remote key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    /// Chunk index (see [`super::Chunks`]).
    pub chunk: u32,
    /// Start of the chunk in the destination's address space.
    pub addr: u64,
    /// Its remote key.
    pub rkey: u32,
}

/// A message on the queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg {
    /// D → S, once after the connection: how memory is chunked, how many chunks may be
    /// registered at once, which chunks are all-zero now, and the keys registered so far.
    Setup {
        /// Chunk size in bytes (a multiple of the page size; regions end chunks early).
        chunk_bytes: u64,
        /// Most chunks registered at once (`u32::MAX`: all).
        budget_chunks: u32,
        /// Bit `i`: chunk `i` is all-zero on the destination now.
        zero: Vec<bool>,
        /// Chunks already registered.
        keys: Vec<Key>,
    },
    /// S → D: register `chunk` (first deregistering `release`, if any).
    Map {
        /// Chunk wanted.
        chunk: u32,
        /// Chunk the source no longer writes, or `None`.
        release: Option<u32>,
    },
    /// D → S: the key of a chunk asked for with `Map`.
    Mapped(Key),
    /// S → D: the page path is done (every WRITE completed); tear down.
    Done,
}

const KIND_SETUP: u8 = 1;
const KIND_MAP: u8 = 2;
const KIND_MAPPED: u8 = 3;
const KIND_DONE: u8 = 4;
const HEADER: usize = 16;

impl Msg {
    /// Header: 4 magic, 2 version, 1 kind, 1 reserved, 4 payload length, 4 crc of header
    /// bytes 0..12 and the payload. Fails when the message does not fit a receive slot.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut p = Vec::new();
        let kind = match self {
            Msg::Setup {
                chunk_bytes,
                budget_chunks,
                zero,
                keys,
            } => {
                p.extend_from_slice(&chunk_bytes.to_le_bytes());
                p.extend_from_slice(&budget_chunks.to_le_bytes());
                p.extend_from_slice(&(zero.len() as u32).to_le_bytes());
                let mut bits = vec![0u8; zero.len().div_ceil(8)];
                for (i, z) in zero.iter().enumerate() {
                    if *z {
                        bits[i / 8] |= 1 << (i % 8);
                    }
                }
                p.extend_from_slice(&bits);
                p.extend_from_slice(&(keys.len() as u32).to_le_bytes());
                for k in keys {
                    put_key(&mut p, k);
                }
                KIND_SETUP
            }
            Msg::Map { chunk, release } => {
                p.extend_from_slice(&chunk.to_le_bytes());
                p.extend_from_slice(&release.unwrap_or(u32::MAX).to_le_bytes());
                KIND_MAP
            }
            Msg::Mapped(k) => {
                put_key(&mut p, k);
                KIND_MAPPED
            }
            Msg::Done => KIND_DONE,
        };
        if HEADER + p.len() > MSG_MAX {
            return Err(malformed(format!(
                "message of {} bytes exceeds the {MSG_MAX}-byte receive slot",
                HEADER + p.len()
            )));
        }
        let mut b = Vec::with_capacity(HEADER + p.len());
        b.extend_from_slice(&MSG_MAGIC.to_le_bytes());
        b.extend_from_slice(&RDMA_WIRE_VERSION.to_le_bytes());
        b.push(kind);
        b.push(0);
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b);
        h.update(&p);
        b.extend_from_slice(&h.finalize().to_le_bytes());
        b.extend_from_slice(&p);
        Ok(b)
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader(b);
        let magic = r.u32()?;
        if magic != MSG_MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = r.u16()?;
        if version != RDMA_WIRE_VERSION {
            return Err(malformed(format!("message version {version}")));
        }
        let kind = r.u8()?;
        r.u8()?;
        let len = r.u32()? as usize;
        let crc = r.u32()?;
        let payload = r.take(len)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..12]);
        h.update(payload);
        if h.finalize() != crc {
            return Err(ProtocolError::BadChecksum { kind });
        }
        let mut r = Reader(payload);
        let msg = match kind {
            KIND_SETUP => {
                let chunk_bytes = r.u64()?;
                let budget_chunks = r.u32()?;
                let n = r.u32()? as usize;
                let bits = r.take(n.div_ceil(8))?;
                let zero = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
                let k = r.u32()? as usize;
                let keys = (0..k).map(|_| get_key(&mut r)).collect::<Result<_, _>>()?;
                Msg::Setup {
                    chunk_bytes,
                    budget_chunks,
                    zero,
                    keys,
                }
            }
            KIND_MAP => {
                let chunk = r.u32()?;
                let release = Some(r.u32()?).filter(|&c| c != u32::MAX);
                Msg::Map { chunk, release }
            }
            KIND_MAPPED => Msg::Mapped(get_key(&mut r)?),
            KIND_DONE => Msg::Done,
            k => return Err(malformed(format!("unknown message kind {k}"))),
        };
        if !r.0.is_empty() {
            return Err(malformed(format!("{} trailing bytes", r.0.len())));
        }
        Ok(msg)
    }
}

fn put_key(p: &mut Vec<u8>, k: &Key) {
    p.extend_from_slice(&k.chunk.to_le_bytes());
    p.extend_from_slice(&k.addr.to_le_bytes());
    p.extend_from_slice(&k.rkey.to_le_bytes());
}

fn get_key(r: &mut Reader<'_>) -> Result<Key, ProtocolError> {
    Ok(Key {
        chunk: r.u32()?,
        addr: r.u64()?,
        rkey: r.u32()?,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Msg {
        Msg::Setup {
            chunk_bytes: 16 << 20,
            budget_chunks: 3,
            zero: vec![true, false, false, true, true, false, true, false, true],
            keys: vec![Key {
                chunk: 2,
                addr: 0x7f00_0000_0000,
                rkey: 0x1234,
            }],
        }
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            setup(),
            Msg::Map {
                chunk: 7,
                release: Some(2),
            },
            Msg::Map {
                chunk: 0,
                release: None,
            },
            Msg::Mapped(Key {
                chunk: 7,
                addr: 1 << 40,
                rkey: 99,
            }),
            Msg::Done,
        ] {
            let b = m.encode().expect("fits");
            assert_eq!(Msg::decode(&b).expect("decodes"), m);
        }
        for (qp_index, qp_count) in [(0, 1), (1, 2), (15, 16)] {
            let r = ConnectRequest {
                session: 0xdead_beef_0102_0304,
                pin_budget: 64 << 20,
                qp_index,
                qp_count,
            };
            let mut b = r.encode();
            assert_eq!(b.len(), 28);
            b.extend_from_slice(&[0; 20]); // rdma_cm's padding
            assert_eq!(ConnectRequest::decode(&b).expect("decodes"), r);
        }
    }

    #[test]
    fn bad_magic_version_checksum_and_truncation_are_refused() {
        let good = setup().encode().expect("fits");
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(Msg::decode(&b), Err(ProtocolError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 9;
        assert!(matches!(
            Msg::decode(&b),
            Err(ProtocolError::Malformed { .. })
        ));
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        assert!(matches!(
            Msg::decode(&b),
            Err(ProtocolError::BadChecksum { .. })
        ));
        for n in 0..good.len() {
            assert!(Msg::decode(&good[..n]).is_err(), "truncated at {n}");
        }
        let req = ConnectRequest {
            session: 1,
            pin_budget: 0,
            qp_index: 1,
            qp_count: 2,
        }
        .encode();
        for at in 0..req.len() {
            let mut b = req.clone();
            b[at] ^= 0x10;
            assert!(ConnectRequest::decode(&b).is_err(), "flipped byte {at}");
        }
        assert!(ConnectRequest::decode(&req[..27]).is_err());
        // Version 1 (one queue pair, no index or count) is refused by name.
        let mut v1 = req.clone();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let crc = crc32fast::hash(&v1[..24]);
        v1[24..].copy_from_slice(&crc.to_le_bytes());
        assert!(
            matches!(ConnectRequest::decode(&v1), Err(ProtocolError::Malformed { reason, .. }) if reason.contains("version 1"))
        );
        // A queue pair index outside the count, or a count of 0, with a valid checksum.
        for (i, n) in [(2u8, 2u8), (0, 0), (5, 1)] {
            let mut b = req.clone();
            b[6] = i;
            b[7] = n;
            let crc = crc32fast::hash(&b[..24]);
            b[24..].copy_from_slice(&crc.to_le_bytes());
            assert!(ConnectRequest::decode(&b).is_err(), "queue pair {i} of {n}");
        }
    }

    #[test]
    fn a_message_larger_than_a_receive_slot_is_refused_when_encoded() {
        let m = Msg::Setup {
            chunk_bytes: 4096,
            budget_chunks: u32::MAX,
            zero: vec![],
            keys: vec![
                Key {
                    chunk: 0,
                    addr: 0,
                    rkey: 0
                };
                MSG_MAX / 16
            ],
        };
        assert!(m.encode().is_err());
    }
}
