//! Destination half: accepts the source's rdma_cm connections (exactly the queue pairs its
//! connect requests announce, all of this session, on one PD and one CQ), registers guest
//! memory (whole, or chunk by chunk within the pin budget), sends the keys on QP 0, and
//! otherwise stays out of the data path. A service thread answers `Map` requests and watches
//! the completion queue; `Written` frames on the control stream name the pages that landed,
//! which this side hashes from its own memory for the digest (as `shm` does).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::debug;

use super::chunks::Chunks;
use super::setup_err;
use super::slots::{Slots, TAG_MASK, TAG_RECV};
use super::verbs::{self, Link, Mr, Wc};
use super::wire::{ConnectRequest, Key, Msg};
use crate::error::{wire, MigrationError};
use crate::guestmem::MemoryView;
use crate::protocol::{Message, ProtocolError};
use crate::transport::{DestSetup, DestTransport, PageStats, RecvCtx};
use crate::vm::PAGE_SIZE;

/// Chunk size under a pin budget: registering 16 MiB takes about a millisecond, so even
/// a small budget costs little per chunk, and a budget of a few chunks still fits.
const CHUNK_BYTES: u64 = 16 << 20;
const RX_SLOTS: u32 = 4;
const SQ_DEPTH: u32 = 8;
/// Completion queue entries: room for every queue pair the source may open (only QP 0 posts
/// work on this side, but the CQ is made before the count is known).
const CQ_DEPTH: u32 = *crate::transport::RDMA_QPS.end() * (SQ_DEPTH + RX_SLOTS);
/// How often the service thread looks at its stop flag.
const SLICE: Duration = Duration::from_millis(50);

fn link_err(what: String) -> MigrationError {
    wire(
        "receiving pages over rdma",
        ProtocolError::Io(std::io::Error::other(what)),
    )
}

/// What the service thread owns: everything registered, and the links.
struct Service {
    // Field order is drop order: registrations before the links that hold their PD.
    mrs: Vec<Option<Mr>>,
    slots: Slots,
    /// By queue pair index; QP 0 carries the messages.
    links: Vec<Link>,
    chunks: Chunks,
    mem: MemoryView,
    budget: usize,
    sends: u64,
}

pub(crate) struct RdmaDest {
    stats: PageStats,
    stop: Arc<AtomicBool>,
    service: Option<JoinHandle<(Result<(), MigrationError>, f64)>>,
    cpu_s: f64,
    io_timeout: Duration,
}

impl RdmaDest {
    pub(crate) fn accept(d: DestSetup<'_>) -> Result<Self, MigrationError> {
        let local: SocketAddr = match &*d.control {
            crate::conn::Conn::Tcp(s) => {
                s.local_addr().map_err(|e| MigrationError::TransportSetup {
                    reason: "control stream address".into(),
                    source: Some(e),
                })?
            }
            crate::conn::Conn::Unix(_) => return Err(setup_err("rdma needs a host:port endpoint")),
        };
        // The control stream's own address and port, in rdma_cm's port space (separate from
        // the kernel's TCP ports on InfiniBand and RoCE): the source knows it already.
        let listener =
            verbs::Listener::bind(local).map_err(|e| MigrationError::TransportSetup {
                reason: format!("rdma_cm listen on {local}"),
                source: Some(e),
            })?;
        let (links, slots, req) = accept_all(&listener, &d)?;
        // No more connections: a request beyond the announced count is refused.
        drop(listener);
        let mem = d.ctx.mem.clone();
        let total = mem.pages() as u64 * PAGE_SIZE as u64;
        let (chunk_bytes, budget) = if req.pin_budget == 0 || req.pin_budget >= total {
            (0, usize::MAX)
        } else {
            let c = CHUNK_BYTES.min(req.pin_budget / PAGE_SIZE as u64 * PAGE_SIZE as u64);
            if c == 0 {
                return Err(setup_err(format!(
                    "rdma pin budget of {} bytes is below one page",
                    req.pin_budget
                )));
            }
            (c, (req.pin_budget / c) as usize)
        };
        let chunks = Chunks::new(&mem.layout(), chunk_bytes)
            .ok_or_else(|| setup_err("rdma: chunking the memory"))?;
        let started = Instant::now();
        // Which chunks are zero now: the source may skip its zero pages there in its first
        // pass. One read of this memory at setup (early exit on a dirty chunk).
        let zero: Vec<bool> = (0..chunks.len()).map(|i| chunks.is_zero(&mem, i)).collect();
        let mut svc = Service {
            mrs: (0..chunks.len()).map(|_| None).collect(),
            slots,
            links,
            chunks,
            mem,
            budget,
            sends: 0,
        };
        let mut keys = Vec::new();
        if chunk_bytes == 0 {
            for i in 0..svc.chunks.len() {
                keys.push(svc.register(i)?);
            }
        }
        debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            chunks = svc.chunks.len(),
            "rdma destination memory scanned and registered"
        );
        svc.send(&Msg::Setup {
            chunk_bytes,
            budget_chunks: u32::try_from(budget).unwrap_or(u32::MAX),
            zero,
            keys,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let service = std::thread::Builder::new()
            .name("rdma-dest".into())
            .spawn(move || {
                let c0 = crate::util::thread_cpu_time();
                let r = svc.run(&s2);
                drop(svc); // deregisters and tears down here, on every path
                (r, crate::util::thread_cpu_time() - c0)
            })
            .map_err(|e| MigrationError::TransportSetup {
                reason: "starting the rdma service thread".into(),
                source: Some(e),
            })?;
        Ok(Self {
            stats: PageStats::default(),
            stop,
            service: Some(service),
            cpu_s: 0.0,
            io_timeout: d.io_timeout,
        })
    }

    /// Stops (when `stop`) and joins the service thread; its result.
    fn join(&mut self, stop: bool) -> Option<Result<(), MigrationError>> {
        if stop {
            self.stop.store(true, Ordering::Relaxed);
        }
        let h = self.service.take()?;
        match h.join() {
            Ok((r, cpu)) => {
                self.cpu_s += cpu;
                Some(r)
            }
            Err(_) => Some(Err(MigrationError::Internal {
                what: "the rdma service thread panicked".into(),
            })),
        }
    }
}

/// Accepts the source's connections: as many as its requests announce, each checked before
/// it is accepted ([`check_request`]), QP 0 with its receives posted. Returns the links by
/// index, QP 0's message slots and the first request.
fn accept_all(
    listener: &verbs::Listener,
    d: &DestSetup<'_>,
) -> Result<(Vec<Link>, Slots, ConnectRequest), MigrationError> {
    let setup = |what: String| {
        move |e| MigrationError::TransportSetup {
            reason: what,
            source: Some(e),
        }
    };
    let until = Instant::now() + d.accept_timeout;
    let mut links: Vec<Option<Link>> = Vec::new();
    let mut first: Option<ConnectRequest> = None;
    let mut slots = None;
    while first.is_none_or(|f| links.iter().flatten().count() < usize::from(f.qp_count)) {
        let share = links.iter().flatten().next();
        let left = until.saturating_duration_since(Instant::now());
        let link = listener
            .request(left, (SQ_DEPTH, RX_SLOTS), (share, CQ_DEPTH))
            .map_err(setup("waiting for the source's rdma_cm connection".into()))?;
        // Checked before accepting: a stranger's request is rejected, never connected.
        let req = ConnectRequest::decode(&link.peer_data())
            .map_err(|e| wire("rdma connect request", e))?;
        let seen: Vec<bool> = links.iter().map(Option::is_some).collect();
        let i = check_request(&req, d.session, first.as_ref(), &seen).map_err(setup_err)?;
        let f = *first.get_or_insert(req);
        links.resize_with(usize::from(f.qp_count), || None);
        if i == 0 {
            // Declared after the links: dropped (deregistered) before them on every path.
            let s = Slots::new(&link, RX_SLOTS as usize, 1)
                .and_then(|s| s.post_all(&link).map(|()| s))
                .map_err(setup("posting RDMA receives".into()))?;
            slots = Some(s);
        }
        if let Err(e) = link.accept(d.io_timeout) {
            drop(slots.take()); // deregistered before the link holding the PD goes
            return Err(setup(format!(
                "accepting the source's rdma_cm connection {i}"
            ))(e));
        }
        links[i] = Some(link);
    }
    let (Some(req), Some(slots)) = (first, slots) else {
        return Err(setup_err("rdma: no queue pair 0"));
    };
    Ok((links.into_iter().flatten().collect(), slots, req))
}

/// Checks a connect request against this migration: its session, the count and budget of
/// the first request (`first`), and the queue pairs accepted so far (`seen`, by index).
/// Returns its queue pair index.
fn check_request(
    req: &ConnectRequest,
    session: u64,
    first: Option<&ConnectRequest>,
    seen: &[bool],
) -> Result<usize, String> {
    if req.session != session {
        return Err(format!(
            "rdma connection from session {:#x}, expected {session:#x}",
            req.session
        ));
    }
    let max = *crate::transport::RDMA_QPS.end();
    if u32::from(req.qp_count) > max {
        return Err(format!(
            "rdma: {} queue pairs asked for, at most {max}",
            req.qp_count
        ));
    }
    if let Some(f) = first {
        if (req.qp_count, req.pin_budget) != (f.qp_count, f.pin_budget) {
            return Err(format!(
                "rdma connection for {} queue pairs (budget {}), the first said {} ({})",
                req.qp_count, req.pin_budget, f.qp_count, f.pin_budget
            ));
        }
    }
    let i = usize::from(req.qp_index);
    if seen.get(i).copied().unwrap_or(false) {
        return Err(format!("rdma queue pair {i} connected twice"));
    }
    Ok(i)
}

impl Service {
    fn register(&mut self, i: usize) -> Result<Key, MigrationError> {
        let c = self
            .chunks
            .get(i)
            .ok_or_else(|| link_err(format!("unknown chunk {i}")))?;
        let addr = self
            .mem
            .run_addr(c.first, c.pages)
            .ok_or_else(|| link_err(format!("chunk {i} outside memory")))?;
        // SAFETY: the range is the destination VM's live mapping (MemoryView invariant); the
        // VM outlives the migration and the registration is dropped when the service ends.
        // On the PD every queue pair shares: the key is valid on each.
        let mr =
            unsafe { self.links[0].register(addr, c.pages * PAGE_SIZE, true) }.map_err(|e| {
                MigrationError::TransportSetup {
                    reason: format!("registering guest memory chunk {i}"),
                    source: Some(e),
                }
            })?;
        let key = Key {
            chunk: i as u32,
            addr: addr as u64,
            rkey: mr.rkey(),
        };
        self.mrs[i] = Some(mr);
        Ok(key)
    }

    fn send(&mut self, m: &Msg) -> Result<(), MigrationError> {
        // One send slot: the source sends one request at a time and waits for the answer,
        // so the previous send has left the slot (it was received) before the next request.
        self.slots.send(&self.links[0], 0, m, self.sends)?;
        self.sends += 1;
        Ok(())
    }

    /// Serves the source until it says `Done`, `stop` is set, or the link fails.
    fn run(&mut self, stop: &AtomicBool) -> Result<(), MigrationError> {
        let mut wcs = [Wc::default(); 16];
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // The CQ every queue pair shares: a failure on any of them ends the service.
            let n = self.links[0]
                .poll(&mut wcs, SLICE)
                .map_err(|e| link_err(format!("polling completions: {e}")))?;
            for wc in &wcs[..n] {
                if let Some(why) = wc.failure() {
                    return Err(link_err(format!("queue pair failed: {why}")));
                }
                if wc.wr_id & TAG_RECV == 0 {
                    continue; // our send completed
                }
                let slot = (wc.wr_id & !TAG_MASK) as usize;
                match self.slots.take_rx(&self.links[0], slot, wc.byte_len)? {
                    Msg::Map { chunk, release } => {
                        if let Some(slot) = release.and_then(|r| self.mrs.get_mut(r as usize)) {
                            // Every WRITE into it was placed before this message arrived.
                            *slot = None; // deregisters
                        }
                        if self.mrs.iter().filter(|m| m.is_some()).count() >= self.budget {
                            return Err(link_err(format!(
                                "source asked for chunk {chunk} beyond the pin budget"
                            )));
                        }
                        let key = self.register(chunk as usize)?;
                        self.send(&Msg::Mapped(key))?;
                    }
                    Msg::Done => return Ok(()),
                    other => return Err(link_err(format!("unexpected {other:?}"))),
                }
            }
        }
    }
}

impl DestTransport for RdmaDest {
    fn copies_pages(&self) -> bool {
        true
    }

    fn on_control(
        &mut self,
        msg: Message,
        ctx: &RecvCtx,
    ) -> Result<Option<Message>, MigrationError> {
        super::super::record_written(msg, ctx, &mut self.stats)
    }

    fn finish(&mut self) -> Result<PageStats, MigrationError> {
        // The source sent `Done` before `Complete`, on the other channel: wait for it.
        let until = Instant::now() + self.io_timeout;
        while self.service.as_ref().is_some_and(|h| !h.is_finished()) {
            if Instant::now() >= until {
                self.join(true);
                return Err(MigrationError::Timeout {
                    phase: "rdma teardown",
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match self.join(false) {
            Some(Err(e)) => Err(e),
            _ => Ok(self.stats),
        }
    }

    fn worker_cpu_s(&self) -> f64 {
        self.cpu_s
    }

    fn check(&mut self) -> Result<u64, MigrationError> {
        if self.service.as_ref().is_some_and(|h| h.is_finished()) {
            // It ends on a failure, or on the source's `Done` (sent just before `Complete`;
            // a source that sends it early is caught by the digest).
            if let Some(Err(e)) = self.join(false) {
                return Err(e);
            }
        }
        Ok(self.stats.pages)
    }

    fn abort(&mut self) -> Option<MigrationError> {
        match self.join(true) {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }
}

impl Drop for RdmaDest {
    fn drop(&mut self) {
        self.join(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(session: u64, qp_index: u8, qp_count: u8, pin_budget: u64) -> ConnectRequest {
        ConnectRequest {
            session,
            pin_budget,
            qp_index,
            qp_count,
        }
    }

    #[test]
    fn exactly_the_announced_queue_pairs_of_the_session_are_accepted() {
        let first = req(7, 0, 3, 0);
        assert_eq!(check_request(&first, 7, None, &[]), Ok(0));
        let seen = [true, false, false];
        assert_eq!(
            check_request(&req(7, 2, 3, 0), 7, Some(&first), &seen),
            Ok(2)
        );
        assert_eq!(
            check_request(&req(7, 1, 3, 0), 7, Some(&first), &[true, false, true]),
            Ok(1)
        );
        // Another session, the same index twice, another count or budget, too many QPs.
        let e = check_request(&req(8, 1, 3, 0), 7, Some(&first), &seen).unwrap_err();
        assert!(e.contains("session"), "{e}");
        let e = check_request(&req(7, 0, 3, 0), 7, Some(&first), &seen).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(check_request(&req(7, 1, 2, 0), 7, Some(&first), &seen).is_err());
        assert!(check_request(&req(7, 1, 3, 1 << 20), 7, Some(&first), &seen).is_err());
        assert!(check_request(&req(7, 0, 17, 0), 7, None, &[]).is_err());
        // A queue pair other than 0 may come first (QP 0 is still required before Setup).
        assert_eq!(check_request(&req(7, 1, 2, 0), 7, None, &[]), Ok(1));
    }
}
