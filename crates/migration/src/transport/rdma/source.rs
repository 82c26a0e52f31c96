//! Source half: connects its queue pairs through rdma_cm (`qps.rs`), registers its own
//! guest memory (in the destination's chunks, on first use; under a pin budget only the
//! chunks the destination has registered too), and posts RDMA WRITEs of dirty runs
//! straight into the destination's registered memory.
//!
//! Batches of [`NOTIFY_PAGES`] pages go to the queue pairs in turn, all of a batch's WRITEs
//! on one QP. A batch's `Written` frame goes on the control stream only once its last WRITE
//! completed on its QP, so the destination hashes pages that have landed. Each `send_pages`
//! call drains every QP before it returns, which keeps the engine's round barrier
//! (`RoundEnd`/`RoundAck`) exact.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::chunks::Chunks;
use super::qps::{self, rdma_err, Fault, Qps, Wr};
use super::verbs::{self, Mr};
use super::wire::{ConnectRequest, Key, Msg};
use super::{setup_err, NO_DEVICE};
use crate::conn::Endpoint;
use crate::digest::zero_page_hash;
use crate::error::MigrationError;
use crate::guestmem::MemoryView;
use crate::protocol::{encode, Message};
use crate::transport::{page_runs, split_zero_spans, PageStats, SendCtx, SourceTransport};
use crate::vm::PAGE_SIZE;

/// Pages per `Written` notification (and token-bucket request), and per batch of one QP.
const NOTIFY_PAGES: usize = 512;
/// Largest WRITE, in pages (1 MiB): big enough that per-request costs vanish, small enough
/// that several are in flight.
const MAX_WR_PAGES: usize = 256;

pub(crate) struct RdmaSource {
    // Field order is drop order: registrations before the links that hold their PD.
    /// Our own registrations (local read), by chunk: made on first use; under a pin budget
    /// released with the destination's, so at most `budget_chunks` at once.
    own: Vec<Option<Mr>>,
    qps: Qps,
    chunks: Chunks,
    /// The destination's key of each chunk, while registered.
    keys: Vec<Option<Key>>,
    /// Chunks registered on the destination, least recently used first.
    lru: VecDeque<u32>,
    budget_chunks: usize,
    /// Chunks that were all-zero on the destination at setup (first-pass zero skip).
    dest_zero: Vec<bool>,
    first_pass_done: bool,
    io_timeout: Duration,
}

impl RdmaSource {
    pub(crate) fn connect(
        s: &crate::transport::SourceSetup<'_>,
        pin_budget_mib: u32,
        qp_count: u32,
    ) -> Result<Self, MigrationError> {
        if verbs::device_count() == 0 {
            return Err(setup_err(NO_DEVICE));
        }
        let Endpoint::Tcp(addr) = s.dest else {
            return Err(setup_err("rdma needs a host:port endpoint"));
        };
        let qp_count = u8::try_from(qp_count)
            .ok()
            .filter(|&n| crate::transport::RDMA_QPS.contains(&u32::from(n)))
            .ok_or_else(|| {
                setup_err(format!(
                    "rdma: {qp_count} queue pairs, expected {:?}",
                    crate::transport::RDMA_QPS
                ))
            })?;
        let fault = qps::fault();
        let req = ConnectRequest {
            session: s.session ^ u64::from(fault.0 == Fault::WrongSession),
            pin_budget: u64::from(pin_budget_mib) << 20,
            qp_index: 0,
            qp_count,
        };
        let qps = Qps::connect(
            *addr,
            req,
            s.connect_timeout,
            s.control,
            s.io_timeout,
            fault,
        )?;
        let mut me = Self {
            own: Vec::new(),
            qps,
            chunks: Chunks::new(&[], 0).ok_or_else(|| setup_err("chunks"))?,
            keys: Vec::new(),
            lru: VecDeque::new(),
            budget_chunks: 0,
            dest_zero: Vec::new(),
            first_pass_done: false,
            io_timeout: s.io_timeout,
        };
        // The destination registers and scans its memory before it answers: allow for it.
        let Msg::Setup {
            chunk_bytes,
            budget_chunks,
            zero,
            keys,
        } = me.qps.next_msg(s.io_timeout.max(Duration::from_secs(30)))?
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
        self.own = (0..n).map(|_| None).collect();
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

    /// The local key of our own `chunk`, registering it first if needed (local read: the
    /// NIC reads it for the WRITEs). Without a budget a chunk is a whole region.
    fn own_lkey(&mut self, mem: &MemoryView, chunk: usize) -> Result<u32, MigrationError> {
        if let Some(mr) = &self.own[chunk] {
            return Ok(mr.lkey());
        }
        let c = self
            .chunks
            .get(chunk)
            .ok_or_else(|| rdma_err(format!("unknown chunk {chunk}")))?;
        let addr = mem
            .run_addr(c.first, c.pages)
            .ok_or_else(|| setup_err("rdma: chunk outside memory"))?;
        // SAFETY: `addr .. + pages` is the VM's live mapping (MemoryView invariant); the VM
        // outlives this transport (the engine borrows it for the whole migration) and the
        // registration is dropped with the transport or when the chunk is released, after
        // every WRITE from it completed. Registered on the PD every QP shares.
        let mr =
            unsafe { self.qps.link().register(addr, c.pages * PAGE_SIZE, false) }.map_err(|e| {
                MigrationError::TransportSetup {
                    reason: format!("registering the source's guest memory (chunk {chunk})"),
                    source: Some(e),
                }
            })?;
        let lkey = mr.lkey();
        self.own[chunk] = Some(mr);
        Ok(lkey)
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
            // WRITEs into `release` may be in flight on any QP, and RC orders a SEND only
            // after the WRITEs of its own QP; our own registration of the chunk may be read
            // by any of them. So: wait until every WRITE completed, then drop ours, and send
            // `Map`: the destination may deregister at once.
            self.qps.drain_writes()?;
            self.own[r as usize] = None;
        }
        self.qps.send(
            0,
            &Msg::Map {
                chunk: chunk as u32,
                release,
            },
        )?;
        qps::MAPS.fetch_add(1, Ordering::Relaxed);
        let reply = self.qps.next_msg(self.io_timeout)?;
        match reply {
            Msg::Mapped(k) if k.chunk as usize == chunk => {
                self.learn(k)?;
                // Slot 0 is free again once that SEND completed; the reply implies it did.
                Ok(k)
            }
            other => Err(rdma_err(format!("expected Mapped({chunk}), got {other:?}"))),
        }
    }

    /// Pages `first .. first + count` of one chunk: WRITEs on QP `q` for the data spans,
    /// hashes.
    // The span's place (QP, chunk, pages) and the batch's accumulators, one argument each.
    #[allow(clippy::too_many_arguments)]
    fn send_span(
        &mut self,
        mem: &MemoryView,
        q: usize,
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
            let lkey = self.own_lkey(mem, chunk)?;
            for at in (s..s + n).step_by(MAX_WR_PAGES) {
                let len = (s + n - at).min(MAX_WR_PAGES);
                let laddr = mem
                    .run_addr(at, len)
                    .ok_or_else(|| rdma_err(format!("run {at}+{len} outside memory")))?;
                let wr = Wr {
                    laddr,
                    len: (len * PAGE_SIZE) as u32,
                    lkey,
                    raddr: key.addr + ((at - c.first) * PAGE_SIZE) as u64,
                    rkey: key.rkey,
                };
                self.qps.queue(q, wr)?;
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
}

impl SourceTransport for RdmaSource {
    fn send_pages(
        &mut self,
        mem: &MemoryView,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
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
            let q = self.qps.next_qp();
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
                    self.send_span(mem, q, chunk, (p, n), &mut written, &mut stats, ctx)?;
                    p += n;
                }
            }
            let frame = self
                .qps
                .end_batch(q, || encode(&Message::Written(written)))?;
            stats.bytes += frame as u64;
            // Retire what already completed without waiting.
            self.qps.poll(Duration::ZERO)?;
            ctx.done_pages
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        self.qps.drain()?;
        self.first_pass_done = true;
        Ok(stats)
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        self.qps.drain()?;
        // Tell the destination the page path is done, so that it tears down without taking
        // the disconnect for a failure.
        self.qps.send(1, &Msg::Done)?;
        self.qps.drain()
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }
}
