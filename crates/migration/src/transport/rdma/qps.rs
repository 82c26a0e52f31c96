//! The source's queue pairs: Q rdma_cm connections on one protection domain and one
//! completion queue, per-QP sequence numbers and signalling, and the retiring of completions
//! (which sends each batch's `Written` frame once its WRITEs completed on its QP).
//!
//! Work requests are unsignalled except every [`SIGNAL_EVERY`]th and the last of each batch:
//! on an RC queue pair a completion means every earlier work request *of that QP* completed
//! too, so one completion retires a whole batch of its QP. Ordering holds per QP only: what
//! must follow WRITEs on other QPs (a `Map` that releases a chunk) waits for their
//! completions first ([`Qps::drain_writes`]).

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use rustix::net::RecvFlags;

use super::slots::{Slots, TAG_MASK, TAG_RECV};
use super::verbs::{Link, Wc};
use super::wire::{ConnectRequest, Msg};
use crate::conn::Conn;
use crate::error::{wire, MigrationError};
use crate::protocol::ProtocolError;

/// One signalled completion per this many WRITEs of a QP (besides each batch's last).
const SIGNAL_EVERY: u64 = 32;
/// Send queue depth (work requests in flight) per QP, receive queue depth.
pub(super) const SQ_DEPTH: u32 = 256;
pub(super) const RQ_DEPTH: u32 = 4;
const TX_SLOTS: usize = 2;
/// How often a wait for completions looks at the control stream.
const PEER_CHECK: Duration = Duration::from_millis(100);
/// A WRITE's work-request id: its QP in bits 56..62 (below the slot tags), its sequence
/// number on that QP below.
const QP_SHIFT: u32 = 56;
const SEQ_MASK: u64 = (1 << QP_SHIFT) - 1;

/// A fault injected by the lab (`lab::set_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None.
    None = 0,
    /// Move one of the source's queue pairs to the error state after this many WRITEs.
    QpError = 1,
    /// Use a wrong remote key for every WRITE on one queue pair after this many.
    BadRkey = 2,
    /// Connect with another session id than the one of `Hello` (as a stranger would).
    WrongSession = 3,
    /// After the announced queue pairs, try one more connection (as QP 0 again): it must be
    /// refused, and the migration goes on.
    ExtraQp = 4,
}

static FAULT: AtomicU8 = AtomicU8::new(0);
static FAULT_AFTER: AtomicU64 = AtomicU64::new(0);
static FAULT_QP: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static WRITE_BYTES: AtomicU64 = AtomicU64::new(0);
static COMPLETIONS: AtomicU64 = AtomicU64::new(0);
static EXTRA_REFUSED: AtomicU64 = AtomicU64::new(0);
pub(super) static MAPS: AtomicU64 = AtomicU64::new(0);

/// Injects `fault` into every later source half of this process, after `after` WRITEs (of
/// the process), on queue pair `qp` (`QpError`, `BadRkey`).
#[cfg(feature = "test-utils")]
pub fn set_fault(fault: Fault, after: u64, qp: usize) {
    FAULT_AFTER.store(after, Ordering::Relaxed);
    FAULT_QP.store(qp as u64, Ordering::Relaxed);
    FAULT.store(fault as u8, Ordering::Relaxed);
}

/// What the source halves of this process posted and polled so far.
#[cfg(feature = "test-utils")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// RDMA WRITE work requests posted.
    pub writes: u64,
    /// Bytes those WRITEs carried.
    pub write_bytes: u64,
    /// Completions polled (signalled WRITEs and SENDs, receives).
    pub completions: u64,
    /// Chunks the source asked the destination to register (`Map`, pin budget only).
    pub maps: u64,
    /// Connections beyond the announced queue pairs that the destination refused
    /// ([`Fault::ExtraQp`]).
    pub extra_refused: u64,
}

/// The process-wide counters.
#[cfg(feature = "test-utils")]
pub fn counters() -> Counters {
    Counters {
        writes: WRITES.load(Ordering::Relaxed),
        write_bytes: WRITE_BYTES.load(Ordering::Relaxed),
        completions: COMPLETIONS.load(Ordering::Relaxed),
        maps: MAPS.load(Ordering::Relaxed),
        extra_refused: EXTRA_REFUSED.load(Ordering::Relaxed),
    }
}

/// The fault set for source halves built from now on, and its WRITE count and QP.
pub(super) fn fault() -> (Fault, u64, usize) {
    let f = match FAULT.load(Ordering::Relaxed) {
        1 => Fault::QpError,
        2 => Fault::BadRkey,
        3 => Fault::WrongSession,
        4 => Fault::ExtraQp,
        _ => Fault::None,
    };
    (
        f,
        FAULT_AFTER.load(Ordering::Relaxed),
        FAULT_QP.load(Ordering::Relaxed) as usize,
    )
}

pub(super) fn rdma_err(what: String) -> MigrationError {
    wire(
        "sending pages over rdma",
        ProtocolError::Io(std::io::Error::other(what)),
    )
}

fn setup(reason: &str, e: std::io::Error) -> MigrationError {
    MigrationError::TransportSetup {
        reason: reason.into(),
        source: Some(e),
    }
}

/// A WRITE built but not yet posted (posting lags one request per QP so the last of a batch
/// can be signalled).
#[derive(Clone, Copy)]
pub(super) struct Wr {
    pub laddr: usize,
    pub len: u32,
    pub lkey: u32,
    pub raddr: u64,
    pub rkey: u32,
}

/// One queue pair and its counts.
struct Qp {
    link: Link,
    /// Work requests posted (sequence numbers), and how many are known complete.
    posted: u64,
    completed: u64,
    since_signal: u64,
    pending: Option<Wr>,
    /// Batches waiting for their last WRITE: (its sequence number, `Written` frame).
    batches: VecDeque<(u64, Vec<u8>)>,
}

pub(super) struct Qps {
    // Field order is drop order: the message buffers' registration before the links (PD).
    slots: Slots,
    qps: Vec<Qp>,
    control: Conn,
    inbox: VecDeque<Msg>,
    io_timeout: Duration,
    fault: (Fault, u64, usize),
    /// The QP of the next batch (round robin).
    next: usize,
}

impl Qps {
    /// Opens `req.qp_count` connections to `addr` (QP 0 first: it carries the messages),
    /// sharing one PD and one CQ, and posts QP 0's receives.
    pub(super) fn connect(
        addr: SocketAddr,
        req: ConnectRequest,
        connect_timeout: Duration,
        control: &Conn,
        io_timeout: Duration,
        fault: (Fault, u64, usize),
    ) -> Result<Self, MigrationError> {
        let n = usize::from(req.qp_count);
        let cq_depth = n as u32 * (SQ_DEPTH + RQ_DEPTH);
        let until = Instant::now() + connect_timeout;
        let mut links: Vec<Link> = Vec::with_capacity(n);
        for i in 0..n {
            let r = ConnectRequest {
                qp_index: i as u8,
                ..req
            };
            let l = connect_retrying(addr, until, &r.encode(), (links.first(), cq_depth))?;
            links.push(l);
        }
        if fault.0 == Fault::ExtraQp {
            let extra = ConnectRequest { qp_index: 0, ..req }.encode();
            let share = (links.first(), cq_depth);
            let depths = (SQ_DEPTH, RQ_DEPTH);
            if Link::connect(addr, Duration::from_secs(2), &extra, depths, share).is_ok() {
                return Err(rdma_err(
                    "the destination accepted a queue pair beyond the announced count".into(),
                ));
            }
            EXTRA_REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        let slots = Slots::new(&links[0], RQ_DEPTH as usize, TX_SLOTS)
            .map_err(|e| setup("registering message buffers", e))?;
        slots
            .post_all(&links[0])
            .map_err(|e| setup("posting RDMA receives", e))?;
        let control = control
            .try_clone()
            .map_err(|e| setup("cloning the control stream", e))?;
        Ok(Self {
            slots,
            qps: links
                .into_iter()
                .map(|link| Qp {
                    link,
                    posted: 0,
                    completed: 0,
                    since_signal: 0,
                    pending: None,
                    batches: VecDeque::new(),
                })
                .collect(),
            control,
            inbox: VecDeque::new(),
            io_timeout,
            fault,
            next: 0,
        })
    }

    /// The link registrations are made through (its PD is every QP's).
    pub(super) fn link(&self) -> &Link {
        &self.qps[0].link
    }

    /// The QP of the next batch.
    pub(super) fn next_qp(&mut self) -> usize {
        let q = self.next;
        self.next = (q + 1) % self.qps.len();
        q
    }

    /// Waits for the next message on QP 0, handling completions meanwhile.
    pub(super) fn next_msg(&mut self, timeout: Duration) -> Result<Msg, MigrationError> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(m);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::Timeout {
                    phase: "rdma message",
                });
            }
            self.wait(left)?;
        }
    }

    /// Like [`Self::poll`], but also fails once the destination hangs up or speaks on the
    /// control stream: during a transfer it does so only when it failed (its `RoundAck`
    /// comes after our `RoundEnd`, which follows the transfer). A dead peer is seen within
    /// [`PEER_CHECK`] instead of after the queue pair's retries or `io_timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<usize, MigrationError> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(0);
            }
            let n = self.poll(left.min(PEER_CHECK))?;
            if n > 0 {
                return Ok(n);
            }
            if self.peer_spoke() {
                return Err(rdma_err(
                    "the destination closed the control stream or reported a failure".into(),
                ));
            }
        }
    }

    /// Waits up to `io_timeout` for some completion; a timeout is an error.
    fn wait_some(&mut self) -> Result<(), MigrationError> {
        if self.wait(self.io_timeout)? == 0 {
            return Err(MigrationError::Timeout {
                phase: "rdma completions",
            });
        }
        Ok(())
    }

    fn peer_spoke(&self) -> bool {
        let Conn::Tcp(s) = &self.control else {
            return false;
        };
        let mut b = [0u8; 1];
        !matches!(
            rustix::net::recv(s, &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT),
            Err(rustix::io::Errno::AGAIN)
        )
    }

    /// Polls the shared CQ (waiting up to `timeout` for the first completion), retiring
    /// WRITEs and sending the `Written` frames of completed batches. Returns how many it saw.
    pub(super) fn poll(&mut self, timeout: Duration) -> Result<usize, MigrationError> {
        let mut wcs = [Wc::default(); 32];
        let n = self.qps[0]
            .link
            .poll(&mut wcs, timeout)
            .map_err(|e| rdma_err(format!("polling completions: {e}")))?;
        COMPLETIONS.fetch_add(n as u64, Ordering::Relaxed);
        for wc in &wcs[..n] {
            if let Some(why) = wc.failure() {
                return Err(rdma_err(format!("work request failed: {why}")));
            }
            let id = wc.wr_id & !TAG_MASK;
            if wc.wr_id & TAG_RECV != 0 {
                let m = self
                    .slots
                    .take_rx(&self.qps[0].link, id as usize, wc.byte_len)?;
                self.inbox.push_back(m);
            } else {
                // A WRITE or a SEND: it and everything posted before it on its QP are done.
                let q = (id >> QP_SHIFT) as usize;
                let qp = self
                    .qps
                    .get_mut(q)
                    .ok_or_else(|| rdma_err(format!("completion for queue pair {q}")))?;
                qp.completed = qp.completed.max((id & SEQ_MASK) + 1);
            }
        }
        for qp in &mut self.qps {
            while qp
                .batches
                .front()
                .is_some_and(|(last, _)| *last < qp.completed)
            {
                let Some((_, f)) = qp.batches.pop_front() else {
                    break;
                };
                self.control
                    .write_all(&f)
                    .map_err(|e| wire("sending pages", ProtocolError::Io(e)))?;
            }
        }
        Ok(n)
    }

    /// Makes room for one more work request in QP `q`'s send queue.
    fn room(&mut self, q: usize) -> Result<(), MigrationError> {
        while self.qps[q].posted - self.qps[q].completed >= u64::from(SQ_DEPTH) - 1 {
            self.wait_some()?;
        }
        Ok(())
    }

    /// Posts `wr` on QP `q`; `signal` forces a completion. Returns its sequence number.
    fn post(&mut self, q: usize, wr: Wr, signal: bool) -> Result<u64, MigrationError> {
        self.room(q)?;
        let (fault, after, fault_qp) = self.fault;
        let qp = &mut self.qps[q];
        let seq = qp.posted;
        qp.since_signal += 1;
        let signal = signal || qp.since_signal >= SIGNAL_EVERY;
        if signal {
            qp.since_signal = 0;
        }
        let mut rkey = wr.rkey;
        if fault != Fault::None && q == fault_qp && WRITES.load(Ordering::Relaxed) >= after {
            match fault {
                Fault::QpError => {
                    self.fault.0 = Fault::None;
                    let _ = qp.link.to_error();
                }
                Fault::BadRkey => rkey ^= 0x00ff_ff00,
                Fault::None | Fault::WrongSession | Fault::ExtraQp => {}
            }
        }
        let id = (q as u64) << QP_SHIFT | seq;
        qp.link
            .post_write(wr.laddr, wr.len, wr.lkey, wr.raddr, rkey, id, signal)
            .map_err(|e| rdma_err(format!("posting an RDMA write on queue pair {q}: {e}")))?;
        qp.posted += 1;
        WRITES.fetch_add(1, Ordering::Relaxed);
        WRITE_BYTES.fetch_add(u64::from(wr.len), Ordering::Relaxed);
        Ok(seq)
    }

    /// Queues `wr` on QP `q`, posting its previously queued one (unsignalled unless due).
    pub(super) fn queue(&mut self, q: usize, wr: Wr) -> Result<(), MigrationError> {
        if let Some(prev) = self.qps[q].pending.replace(wr) {
            self.post(q, prev, false)?;
        }
        Ok(())
    }

    /// Posts QP `q`'s queued WRITE, signalled; returns its sequence number.
    fn flush(&mut self, q: usize) -> Result<Option<u64>, MigrationError> {
        match self.qps[q].pending.take() {
            Some(wr) => self.post(q, wr, true).map(Some),
            None => Ok(None),
        }
    }

    /// Ends a batch on QP `q`: posts its last WRITE signalled and keeps `frame` (made by
    /// `frame`) to send once that WRITE completed. Returns the frame's size, 0 when the
    /// batch wrote nothing.
    pub(super) fn end_batch(
        &mut self,
        q: usize,
        frame: impl FnOnce() -> Vec<u8>,
    ) -> Result<usize, MigrationError> {
        let Some(last) = self.flush(q)? else {
            return Ok(0);
        };
        let f = frame();
        let len = f.len();
        self.qps[q].batches.push_back((last, f));
        Ok(len)
    }

    /// Posts every QP's queued WRITE.
    fn flush_all(&mut self) -> Result<(), MigrationError> {
        (0..self.qps.len()).try_for_each(|q| self.flush(q).map(drop))
    }

    /// Posts every queued WRITE and waits until every work request on every QP completed
    /// (their batches may still wait to be announced): then no WRITE reads or writes a
    /// chunk any more, and a SEND follows every WRITE posted so far, on every QP.
    pub(super) fn drain_writes(&mut self) -> Result<(), MigrationError> {
        self.flush_all()?;
        while self.qps.iter().any(|qp| qp.completed < qp.posted) {
            self.wait_some()?;
        }
        Ok(())
    }

    /// Waits until every posted work request on every QP completed (and its batch was
    /// announced).
    pub(super) fn drain(&mut self) -> Result<(), MigrationError> {
        self.flush_all()?;
        while self
            .qps
            .iter()
            .any(|qp| qp.completed < qp.posted || !qp.batches.is_empty())
        {
            self.wait_some()?;
        }
        Ok(())
    }

    /// Sends `msg` on QP 0 from send slot `slot` (0: `Map`, 1: `Done`; each is reused only
    /// after its previous SEND completed: a `Map`'s answer implies it, `Done` is the last).
    pub(super) fn send(&mut self, slot: usize, msg: &Msg) -> Result<(), MigrationError> {
        self.flush(0)?;
        self.room(0)?;
        let qp = &mut self.qps[0];
        self.slots.send(&qp.link, slot, msg, qp.posted)?;
        qp.posted += 1;
        qp.since_signal = 0;
        Ok(())
    }
}

/// Connects one link, sharing the PD and CQ of `share.0` if given. The destination starts
/// listening once it has accepted our Hello: until then a connect is rejected. Retry until
/// `until`, as `Conn::connect_retrying` does for TCP.
fn connect_retrying(
    addr: SocketAddr,
    until: Instant,
    data: &[u8],
    share: (Option<&Link>, u32),
) -> Result<Link, MigrationError> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match Link::connect(
            addr,
            left.max(Duration::from_millis(100)),
            data,
            (SQ_DEPTH, RQ_DEPTH),
            share,
        ) {
            Ok(l) => return Ok(l),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(MigrationError::TransportSetup {
                    reason: format!("rdma_cm connect to {addr}"),
                    source: Some(e),
                })
            }
        }
    }
}
