//! Destination half: accepts the source's rdma_cm connection, registers guest memory (whole,
//! or chunk by chunk within the pin budget), sends the keys, and otherwise stays out of the
//! data path. A service thread answers `Map` requests and watches the queue pair; `Written`
//! frames on the control stream name the pages that landed, which this side hashes from its
//! own memory for the digest (as `shm` does).

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
/// How often the service thread looks at its stop flag.
const SLICE: Duration = Duration::from_millis(50);

fn link_err(what: String) -> MigrationError {
    wire(
        "receiving pages over rdma",
        ProtocolError::Io(std::io::Error::other(what)),
    )
}

/// What the service thread owns: everything registered, and the link.
struct Service {
    // Field order is drop order: registrations before the link that owns their PD.
    mrs: Vec<Option<Mr>>,
    slots: Slots,
    link: Link,
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
        let setup = |what: &'static str| {
            move |e| MigrationError::TransportSetup {
                reason: what.into(),
                source: Some(e),
            }
        };
        let link = listener
            .request(d.accept_timeout, (SQ_DEPTH, RX_SLOTS))
            .map_err(setup("waiting for the source's rdma_cm connection"))?;
        drop(listener);
        // Checked before accepting: a stranger's request is rejected, never connected.
        let req = ConnectRequest::decode(&link.peer_data())
            .map_err(|e| wire("rdma connect request", e))?;
        if req.session != d.session {
            return Err(setup_err(format!(
                "rdma connection from session {:#x}, expected {:#x}",
                req.session, d.session
            )));
        }
        // Declared after `link`: dropped (deregistered) before it on every path.
        let slots = Slots::new(&link, RX_SLOTS as usize, 1)
            .and_then(|s| s.post_all(&link).map(|()| s))
            .map_err(setup("posting RDMA receives"))?;
        link.accept(d.io_timeout)
            .map_err(setup("accepting the source's rdma_cm connection"))?;
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
            link,
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
        let mr = unsafe { self.link.register(addr, c.pages * PAGE_SIZE, true) }.map_err(|e| {
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
        self.slots.send(&self.link, 0, m, self.sends)?;
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
            let n = self
                .link
                .poll(&mut wcs, SLICE)
                .map_err(|e| link_err(format!("polling completions: {e}")))?;
            for wc in &wcs[..n] {
                if wc.status != 0 {
                    return Err(link_err(format!(
                        "queue pair failed: {} (vendor error {:#x})",
                        verbs::status_text(wc.status),
                        wc.vendor_err
                    )));
                }
                if wc.wr_id & TAG_RECV == 0 {
                    continue; // our send completed
                }
                let slot = (wc.wr_id & !TAG_MASK) as usize;
                match self.slots.take_rx(&self.link, slot, wc.byte_len)? {
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
