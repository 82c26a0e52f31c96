//! Source half: connects through rdma_cm, registers its own guest memory, and posts RDMA
//! WRITEs of dirty runs straight into the destination's registered memory.
//!
//! Work requests are unsignalled except every [`SIGNAL_EVERY`]th and the last of each batch
//! of [`NOTIFY_PAGES`] pages: on an RC queue pair a completion means every earlier work
//! request completed too, so one completion retires a whole batch. A batch's `Written`
//! frame goes on the control stream only once its last WRITE completed, so the destination
//! hashes pages that have landed. Each `send_pages` call drains before it returns, which
//! keeps the engine's round barrier (`RoundEnd`/`RoundAck`) exact.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use rustix::net::RecvFlags;

use super::chunks::Chunks;
use super::slots::{Slots, TAG_MASK, TAG_RECV};
use super::verbs::{self, Link, Mr, Wc};
use super::wire::{ConnectRequest, Key, Msg};
use super::{setup_err, NO_DEVICE};
use crate::conn::{Conn, Endpoint};
use crate::digest::zero_page_hash;
use crate::error::{wire, MigrationError};
use crate::guestmem::MemoryView;
use crate::protocol::{encode, Message, ProtocolError};
use crate::transport::{page_runs, split_zero_spans, PageStats, SendCtx, SourceTransport};
use crate::vm::PAGE_SIZE;

/// Pages per `Written` notification (and token-bucket request).
const NOTIFY_PAGES: usize = 512;
/// Largest WRITE, in pages (1 MiB): big enough that per-request costs vanish, small enough
/// that several are in flight.
const MAX_WR_PAGES: usize = 256;
/// One signalled completion per this many WRITEs (besides each batch's last).
const SIGNAL_EVERY: u64 = 32;
/// Send queue depth (work requests in flight), receive queue depth.
const SQ_DEPTH: u32 = 256;
const RQ_DEPTH: u32 = 4;
const TX_SLOTS: usize = 2;
/// How often a wait for completions looks at the control stream.
const PEER_CHECK: Duration = Duration::from_millis(100);

/// A fault injected by the lab (`lab::set_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None.
    None = 0,
    /// Move the source's queue pair to the error state after this many WRITEs.
    QpError = 1,
    /// Use a wrong remote key for every WRITE after this many.
    BadRkey = 2,
    /// Connect with another session id than the one of `Hello` (as a stranger would).
    WrongSession = 3,
}

static FAULT: AtomicU8 = AtomicU8::new(0);
static FAULT_AFTER: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static WRITE_BYTES: AtomicU64 = AtomicU64::new(0);
static COMPLETIONS: AtomicU64 = AtomicU64::new(0);
static MAPS: AtomicU64 = AtomicU64::new(0);

/// Injects `fault` into every later source half of this process, after `after` WRITEs.
#[cfg(feature = "test-utils")]
pub fn set_fault(fault: Fault, after: u64) {
    FAULT_AFTER.store(after, Ordering::Relaxed);
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
}

/// The process-wide counters.
#[cfg(feature = "test-utils")]
pub fn counters() -> Counters {
    Counters {
        writes: WRITES.load(Ordering::Relaxed),
        write_bytes: WRITE_BYTES.load(Ordering::Relaxed),
        completions: COMPLETIONS.load(Ordering::Relaxed),
        maps: MAPS.load(Ordering::Relaxed),
    }
}

fn rdma_err(what: String) -> MigrationError {
    wire(
        "sending pages over rdma",
        ProtocolError::Io(std::io::Error::other(what)),
    )
}

/// A WRITE built but not yet posted (posting lags one request so the last of a batch can
/// be signalled).
#[derive(Clone, Copy)]
struct Wr {
    laddr: usize,
    len: u32,
    lkey: u32,
    raddr: u64,
    rkey: u32,
}

pub(crate) struct RdmaSource {
    // Field order is drop order: registrations before the link that owns their PD.
    mrs: Vec<Mr>,
    slots: Slots,
    link: Link,
    control: Conn,
    chunks: Chunks,
    /// The destination's key of each chunk, while registered.
    keys: Vec<Option<Key>>,
    /// Chunks registered on the destination, least recently used first.
    lru: VecDeque<u32>,
    budget_chunks: usize,
    /// Chunks that were all-zero on the destination at setup (first-pass zero skip).
    dest_zero: Vec<bool>,
    first_pass_done: bool,
    /// Work requests posted so far (sequence numbers), and how many are known complete.
    posted: u64,
    completed: u64,
    since_signal: u64,
    pending: Option<Wr>,
    /// Batches waiting for their last WRITE: (its sequence number, `Written` frame).
    batches: VecDeque<(u64, Vec<u8>)>,
    inbox: VecDeque<Msg>,
    io_timeout: Duration,
    fault: (Fault, u64),
    /// Our regions as (first page, pages), in the order of `mrs`.
    own: Vec<(usize, usize)>,
}

impl RdmaSource {
    pub(crate) fn connect(
        s: &crate::transport::SourceSetup<'_>,
        pin_budget_mib: u32,
    ) -> Result<Self, MigrationError> {
        if verbs::device_count() == 0 {
            return Err(setup_err(NO_DEVICE));
        }
        let Endpoint::Tcp(addr) = s.dest else {
            return Err(setup_err("rdma needs a host:port endpoint"));
        };
        let fault = match FAULT.load(Ordering::Relaxed) {
            1 => Fault::QpError,
            2 => Fault::BadRkey,
            3 => Fault::WrongSession,
            _ => Fault::None,
        };
        let req = ConnectRequest {
            session: s.session ^ u64::from(fault == Fault::WrongSession),
            pin_budget: u64::from(pin_budget_mib) << 20,
        };
        let link = connect_retrying(*addr, s.connect_timeout, &req.encode())?;
        let slots = Slots::new(&link, RQ_DEPTH as usize, TX_SLOTS).map_err(|e| {
            MigrationError::TransportSetup {
                reason: "registering message buffers".into(),
                source: Some(e),
            }
        })?;
        slots
            .post_all(&link)
            .map_err(|e| MigrationError::TransportSetup {
                reason: "posting RDMA receives".into(),
                source: Some(e),
            })?;
        let control = s
            .control
            .try_clone()
            .map_err(|e| MigrationError::TransportSetup {
                reason: "cloning the control stream".into(),
                source: Some(e),
            })?;
        let mut me = Self {
            mrs: Vec::new(),
            slots,
            link,
            control,
            chunks: Chunks::new(&[], 0).ok_or_else(|| setup_err("chunks"))?,
            keys: Vec::new(),
            lru: VecDeque::new(),
            budget_chunks: 0,
            dest_zero: Vec::new(),
            first_pass_done: false,
            posted: 0,
            completed: 0,
            since_signal: 0,
            pending: None,
            batches: VecDeque::new(),
            inbox: VecDeque::new(),
            io_timeout: s.io_timeout,
            fault: (fault, FAULT_AFTER.load(Ordering::Relaxed)),
            own: Vec::new(),
        };
        // The destination registers and scans its memory before it answers: allow for it.
        let Msg::Setup {
            chunk_bytes,
            budget_chunks,
            zero,
            keys,
        } = me.next_msg(s.io_timeout.max(Duration::from_secs(30)))?
        else {
            return Err(setup_err("rdma: expected Setup from the destination"));
        };
        me.finish_setup(s, chunk_bytes, budget_chunks, zero, keys)?;
        Ok(me)
    }

    fn finish_setup(
        &mut self,
        s: &crate::transport::SourceSetup<'_>,
        chunk_bytes: u64,
        budget_chunks: u32,
        zero: Vec<bool>,
        keys: Vec<Key>,
    ) -> Result<(), MigrationError> {
        // Our own layout, as the destination cut it (layouts are equal: checked in Hello).
        self.chunks = Chunks::new(&s.layout.regions, chunk_bytes)
            .ok_or_else(|| setup_err(format!("rdma: bad chunk size {chunk_bytes}")))?;
        let n = self.chunks.len();
        if zero.len() != n || budget_chunks == 0 {
            return Err(setup_err("rdma: Setup does not match the layout"));
        }
        self.dest_zero = zero;
        self.budget_chunks = (budget_chunks as usize).min(n);
        self.keys = vec![None; n];
        for k in keys {
            self.learn(k)?;
        }
        Ok(())
    }

    fn learn(&mut self, k: Key) -> Result<(), MigrationError> {
        let slot = self
            .keys
            .get_mut(k.chunk as usize)
            .ok_or_else(|| rdma_err(format!("key for unknown chunk {}", k.chunk)))?;
        *slot = Some(k);
        self.lru.retain(|&c| c != k.chunk);
        self.lru.push_back(k.chunk);
        if self.lru.len() > self.budget_chunks {
            return Err(rdma_err(
                "destination registered more than the budget".into(),
            ));
        }
        Ok(())
    }

    /// Registers our own guest memory (local read: the NIC reads it for the WRITEs).
    fn register_own(&mut self, mem: &MemoryView) -> Result<(), MigrationError> {
        if !self.mrs.is_empty() {
            return Ok(());
        }
        let mut first = 0;
        for r in mem.layout() {
            let pages = (r.size / PAGE_SIZE as u64) as usize;
            let addr = mem
                .run_addr(first, pages)
                .ok_or_else(|| setup_err("rdma: region outside memory"))?;
            // SAFETY: `addr .. + size` is the VM's live mapping (MemoryView invariant); the
            // VM outlives this transport (the engine borrows it for the whole migration) and
            // the registration is dropped with the transport.
            let mr = unsafe { self.link.register(addr, r.size as usize, false) }.map_err(|e| {
                MigrationError::TransportSetup {
                    reason: "registering the source's guest memory".into(),
                    source: Some(e),
                }
            })?;
            self.mrs.push(mr);
            self.own.push((first, pages));
            first += pages;
        }
        Ok(())
    }

    /// Waits for the next message on the queue pair, handling completions meanwhile.
    fn next_msg(&mut self, timeout: Duration) -> Result<Msg, MigrationError> {
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

    /// Polls completions (waiting up to `timeout` for the first), retiring WRITEs and
    /// sending the `Written` frames of completed batches. Returns how many it saw.
    fn poll(&mut self, timeout: Duration) -> Result<usize, MigrationError> {
        let mut wcs = [Wc::default(); 32];
        let n = self
            .link
            .poll(&mut wcs, timeout)
            .map_err(|e| rdma_err(format!("polling completions: {e}")))?;
        COMPLETIONS.fetch_add(n as u64, Ordering::Relaxed);
        for wc in &wcs[..n] {
            if wc.status != 0 {
                return Err(rdma_err(format!(
                    "work request failed: {} (vendor error {:#x})",
                    verbs::status_text(wc.status),
                    wc.vendor_err
                )));
            }
            let seq = wc.wr_id & !TAG_MASK;
            if wc.wr_id & TAG_RECV != 0 {
                let m = self.slots.take_rx(&self.link, seq as usize, wc.byte_len)?;
                self.inbox.push_back(m);
            } else {
                // A WRITE or a SEND: it and everything posted before it are complete.
                self.completed = self.completed.max(seq + 1);
            }
        }
        while self
            .batches
            .front()
            .is_some_and(|(last, _)| *last < self.completed)
        {
            if let Some((_, f)) = self.batches.pop_front() {
                self.control
                    .write_all(&f)
                    .map_err(|e| wire("sending pages", ProtocolError::Io(e)))?;
            }
        }
        Ok(n)
    }

    /// Makes room for one more work request in the send queue.
    fn room(&mut self) -> Result<(), MigrationError> {
        while self.posted - self.completed >= u64::from(SQ_DEPTH) - 1 {
            if self.wait(self.io_timeout)? == 0 {
                return Err(MigrationError::Timeout {
                    phase: "rdma completions",
                });
            }
        }
        Ok(())
    }

    /// Posts `wr`; `signal` forces a completion. Returns its sequence number.
    fn post(&mut self, wr: Wr, signal: bool) -> Result<u64, MigrationError> {
        self.room()?;
        let seq = self.posted;
        self.since_signal += 1;
        let signal = signal || self.since_signal >= SIGNAL_EVERY;
        if signal {
            self.since_signal = 0;
        }
        let mut rkey = wr.rkey;
        if self.fault.0 != Fault::None && WRITES.load(Ordering::Relaxed) >= self.fault.1 {
            match self.fault.0 {
                Fault::QpError => {
                    self.fault.0 = Fault::None;
                    let _ = self.link.to_error();
                }
                Fault::BadRkey => rkey ^= 0x00ff_ff00,
                Fault::None | Fault::WrongSession => {}
            }
        }
        self.link
            .post_write(wr.laddr, wr.len, wr.lkey, wr.raddr, rkey, seq, signal)
            .map_err(|e| rdma_err(format!("posting an RDMA write: {e}")))?;
        self.posted += 1;
        WRITES.fetch_add(1, Ordering::Relaxed);
        WRITE_BYTES.fetch_add(u64::from(wr.len), Ordering::Relaxed);
        Ok(seq)
    }

    /// Queues `wr`, posting the previously queued one (unsignalled unless due).
    fn queue(&mut self, wr: Wr) -> Result<(), MigrationError> {
        if let Some(prev) = self.pending.replace(wr) {
            self.post(prev, false)?;
        }
        Ok(())
    }

    /// Posts the queued WRITE, signalled; returns its sequence number.
    fn flush(&mut self) -> Result<Option<u64>, MigrationError> {
        match self.pending.take() {
            Some(wr) => self.post(wr, true).map(Some),
            None => Ok(None),
        }
    }

    /// Makes sure the destination has `chunk` registered, releasing the least recently used
    /// chunk first when the budget is full.
    fn ensure_mapped(&mut self, chunk: usize) -> Result<Key, MigrationError> {
        if let Some(k) = self.keys[chunk] {
            if self.lru.back() != Some(&(chunk as u32)) {
                self.lru.retain(|&c| c != chunk as u32);
                self.lru.push_back(chunk as u32);
            }
            return Ok(k);
        }
        let release = if self.lru.len() >= self.budget_chunks {
            self.lru.pop_front()
        } else {
            None
        };
        if let Some(r) = release {
            self.keys[r as usize] = None;
        }
        // WRITEs into `release` were posted before this SEND: RC ordering places them
        // before the destination sees it, so it may deregister at once.
        self.flush()?;
        self.room()?;
        let seq = self.posted;
        let msg = Msg::Map {
            chunk: chunk as u32,
            release,
        };
        self.slots.send(&self.link, 0, &msg, seq)?;
        MAPS.fetch_add(1, Ordering::Relaxed);
        self.posted += 1;
        self.since_signal = 0;
        let reply = self.next_msg(self.io_timeout)?;
        match reply {
            Msg::Mapped(k) if k.chunk as usize == chunk => {
                self.learn(k)?;
                // Slot 0 is free again once that SEND completed; the reply implies it did.
                Ok(k)
            }
            other => Err(rdma_err(format!("expected Mapped({chunk}), got {other:?}"))),
        }
    }

    /// Waits until every posted work request completed (and its batch was announced).
    fn drain(&mut self) -> Result<(), MigrationError> {
        self.flush()?;
        while self.completed < self.posted || !self.batches.is_empty() {
            if self.wait(self.io_timeout)? == 0 {
                return Err(MigrationError::Timeout {
                    phase: "rdma completions",
                });
            }
        }
        Ok(())
    }

    /// Pages `first .. first + count` of one chunk: WRITEs for the data spans, hashes.
    fn send_span(
        &mut self,
        mem: &MemoryView,
        chunk: usize,
        (first, count): (usize, usize),
        written: &mut Vec<(u64, u32)>,
        stats: &mut PageStats,
        ctx: &SendCtx<'_>,
    ) -> Result<(), MigrationError> {
        let skip_zero = !self.first_pass_done && self.dest_zero[chunk];
        let c = self
            .chunks
            .get(chunk)
            .ok_or_else(|| rdma_err("chunk".into()))?;
        let mut zeros = 0;
        let mut spans = Vec::new();
        split_zero_spans(
            first,
            count,
            |p| skip_zero && mem.is_zero_page(p),
            |p| {
                ctx.hashes.set(p, zero_page_hash());
                zeros += 1;
            },
            |s, n| {
                spans.push((s, n));
                Ok::<_, MigrationError>(())
            },
        )?;
        stats.zero_pages += zeros;
        for (s, n) in spans {
            let key = self.ensure_mapped(chunk)?;
            let region = self.region_of(s)?;
            for at in (s..s + n).step_by(MAX_WR_PAGES) {
                let len = (s + n - at).min(MAX_WR_PAGES);
                let laddr = mem
                    .run_addr(at, len)
                    .ok_or_else(|| rdma_err(format!("run {at}+{len} outside memory")))?;
                let wr = Wr {
                    laddr,
                    len: (len * PAGE_SIZE) as u32,
                    lkey: self.mrs[region].lkey(),
                    raddr: key.addr + ((at - c.first) * PAGE_SIZE) as u64,
                    rkey: key.rkey,
                };
                self.queue(wr)?;
                for p in at..at + len {
                    ctx.hashes.set(p, mem.hash_page(p).unwrap_or(0));
                }
            }
            let gpa = mem
                .page_gpa(s)
                .ok_or_else(|| rdma_err(format!("page {s} outside memory")))?;
            match written.last_mut() {
                Some((g, k)) if *g + u64::from(*k) * PAGE_SIZE as u64 == gpa => *k += n as u32,
                _ => written.push((gpa, n as u32)),
            }
            stats.pages += n as u64;
            stats.bytes += (n * PAGE_SIZE) as u64;
        }
        Ok(())
    }

    fn region_of(&self, page: usize) -> Result<usize, MigrationError> {
        self.own
            .iter()
            .position(|&(first, pages)| page >= first && page < first + pages)
            .ok_or_else(|| rdma_err(format!("page {page} outside memory")))
    }
}

fn connect_retrying(
    addr: SocketAddr,
    timeout: Duration,
    data: &[u8],
) -> Result<Link, MigrationError> {
    // The destination starts listening once it has accepted our Hello: until then a
    // connect is rejected. Retry, as `Conn::connect_retrying` does for TCP.
    let until = Instant::now() + timeout;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match Link::connect(
            addr,
            left.max(Duration::from_millis(100)),
            data,
            (SQ_DEPTH, RQ_DEPTH),
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

impl SourceTransport for RdmaSource {
    fn send_pages(
        &mut self,
        mem: &MemoryView,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        self.register_own(mem)?;
        let mut stats = PageStats::default();
        for batch in pages.chunks(NOTIFY_PAGES) {
            if ctx.cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if let Some(b) = ctx.bucket {
                if !b.take(batch.len() * PAGE_SIZE, ctx.cancel) {
                    return Err(MigrationError::Cancelled);
                }
            }
            let mut written = Vec::new();
            for (first, count) in page_runs(mem, batch, usize::MAX) {
                // Split the run where chunks end.
                let mut p = first;
                while p < first + count {
                    let chunk = self
                        .chunks
                        .of(p)
                        .ok_or_else(|| rdma_err(format!("page {p} outside memory")))?;
                    let c = self
                        .chunks
                        .get(chunk)
                        .ok_or_else(|| rdma_err("chunk".into()))?;
                    let n = (c.first + c.pages - p).min(first + count - p);
                    self.send_span(mem, chunk, (p, n), &mut written, &mut stats, ctx)?;
                    p += n;
                }
            }
            if let Some(last) = self.flush()? {
                let f = encode(&Message::Written(written));
                stats.bytes += f.len() as u64;
                self.batches.push_back((last, f));
            }
            // Retire what already completed without waiting.
            self.poll(Duration::ZERO)?;
            ctx.done_pages
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        self.drain()?;
        self.first_pass_done = true;
        Ok(stats)
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        self.drain()?;
        // Tell the destination the page path is done, so that it tears down without taking
        // the disconnect for a failure.
        self.room()?;
        let seq = self.posted;
        self.slots.send(&self.link, 1, &Msg::Done, seq)?;
        self.posted += 1;
        self.drain()
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }
}
