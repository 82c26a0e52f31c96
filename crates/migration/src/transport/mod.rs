//! The transport abstraction: how page data travels, for every phase including stop-and-copy.
//!
//! Control frames (handshake, state, completion, acks) always travel on the control stream
//! owned by the engine. A transport decides how *pages* move:
//!
//! | transport   | page path                                                                 |
//! |-------------|---------------------------------------------------------------------------|
//! | `classic`   | one frame per page on the control stream (copy, header, checksum)         |
//! | `multi-tcp` | N extra TCP streams, batch descriptors of runs, `sendmsg`/`readv` zero-copy |
//! | `shm`       | source maps the destination's memfd and copies pages into it (Unix socket) |
//! | `handover`  | no page moves: the destination adopts the source's memfd (VMM upgrade)    |
//! | `rdma`      | RDMA WRITEs into the destination's registered memory (feature `rdma`)     |
//!
//! This module is the one registry: [`TransportKind`] says which transports exist, and its
//! `source`, `destination`, `refusal` and `adopts_memory` are the only places that match on
//! it. A transport is one file holding its two halves ([`SourceTransport`],
//! [`DestTransport`]); see README.md, "How to add a transport". See PROTOCOL.md for the
//! frames each transport uses.

use crate::error::wire;
use crate::protocol::ProtocolError;
use crate::vm::PAGE_SIZE;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use std::time::Duration;

use crate::conn::{Conn, Endpoint, Listener};
use crate::digest::PageHashes;
use crate::error::MigrationError;
use crate::guestmem::MemoryView;
use crate::protocol::Message;
use crate::util::{CancelToken, TokenBucket};
use crate::vm::{MemoryRegion, VmLayout};

pub(crate) mod classic;
pub(crate) mod handover;
pub(crate) mod multi_tcp;
pub mod rdma;
pub(crate) mod shm;

/// Which transport to use (chosen by the source, announced in `Hello`).
///
/// In JSON (control API, summaries) it is tagged by `kind`: `{"kind": "classic"}`,
/// `{"kind": "multi-tcp", "streams": 4}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TransportKind {
    /// One TCP stream, one header per page. The baseline.
    Classic,
    /// `streams` parallel TCP data streams with batch descriptors and scatter-gather I/O.
    MultiTcp {
        /// Number of data streams (at least 1).
        streams: u32,
    },
    /// One-sided remote write into the destination's memfd, same host, `unix:` endpoint.
    Shm,
    /// Hand the memfd itself to the destination process; nothing is copied. `unix:` endpoint;
    /// the destination must be able to build a VM on it ([`crate::IncomingVm`]).
    Handover,
    /// One-sided RDMA WRITEs into the destination's registered memory (InfiniBand, RoCE),
    /// `host:port` endpoint. Needs the cargo feature `rdma` and an RDMA device on both ends.
    Rdma {
        /// Most MiB of guest memory each side keeps registered (pinned) at once; 0 (the
        /// default): all of it, registered at setup (the source's at its first WRITEs).
        #[serde(default)]
        pin_budget_mib: u32,
        /// Queue pairs (rdma_cm connections) the source spreads its WRITEs over, in
        /// [`RDMA_QPS`]; default [`RDMA_DEFAULT_QPS`].
        #[serde(default = "rdma_default_qps")]
        qps: u32,
    },
}

/// How many queue pairs an rdma migration may open.
pub const RDMA_QPS: RangeInclusive<u32> = 1..=16;
/// Queue pairs of `rdma` when not given. More than one lets the NIC (or Soft-RoCE's per-QP
/// work contexts) process WRITEs in parallel: a NIC's message rate per QP, not its bandwidth,
/// bounds scattered single-page WRITEs (PROTOCOL.md, "Sequence: rdma").
pub const RDMA_DEFAULT_QPS: u32 = 2;

fn rdma_default_qps() -> u32 {
    RDMA_DEFAULT_QPS
}

impl TransportKind {
    /// Name used on the wire and in summaries.
    pub fn name(&self) -> &'static str {
        match self {
            TransportKind::Classic => "classic",
            TransportKind::MultiTcp { .. } => "multi-tcp",
            TransportKind::Shm => "shm",
            TransportKind::Handover => "handover",
            TransportKind::Rdma { .. } => "rdma",
        }
    }

    /// True when pages travel on streams other than the control stream.
    pub fn uses_data_streams(&self) -> bool {
        matches!(self, TransportKind::MultiTcp { .. })
    }

    /// Multi-tcp with one stream per available core.
    pub fn multi_tcp_default() -> Self {
        let n = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2);
        TransportKind::MultiTcp { streams: n }
    }
}

/// How many data streams a multi-tcp migration may open (flags, `Hello`).
pub const DATA_STREAMS: RangeInclusive<u32> = 1..=64;

impl TransportKind {
    /// The `Hello` spelling (frozen since protocol version 1): name and data-stream count.
    pub(crate) fn wire_name(&self) -> (&'static str, u32) {
        match self {
            TransportKind::MultiTcp { streams } => (self.name(), *streams),
            _ => (self.name(), 0),
        }
    }

    /// Reads the `Hello` spelling back. The stream count is checked by the destination, which
    /// can then refuse with a reason.
    pub(crate) fn from_wire_name(name: &str, data_streams: u32) -> Result<Self, BadTransport> {
        Ok(match name.parse()? {
            TransportKind::MultiTcp { .. } => TransportKind::MultiTcp {
                streams: data_streams,
            },
            other => other,
        })
    }
}

/// What building a source half needs.
pub(crate) struct SourceSetup<'a> {
    /// The control stream, handshake done.
    pub control: &'a Conn,
    /// Where the destination listens (for extra streams).
    pub dest: &'a Endpoint,
    /// The VM's layout.
    pub layout: &'a VmLayout,
    /// Session id from `Hello`.
    pub session: u64,
    /// Timeouts of `MigrateOptions`.
    pub connect_timeout: Duration,
    /// Timeouts of `MigrateOptions`.
    pub io_timeout: Duration,
}

/// What building a destination half needs.
pub(crate) struct DestSetup<'a> {
    /// The control stream, handshake done.
    pub control: &'a mut Conn,
    /// The listener (for extra streams).
    pub listener: &'a Listener,
    /// Session id from `Hello`.
    pub session: u64,
    /// The destination VM's memory.
    pub memory: &'a [MemoryRegion],
    /// Where received pages go.
    pub ctx: &'a RecvCtx,
    /// How long to wait for extra streams.
    pub accept_timeout: Duration,
    /// Socket timeout.
    pub io_timeout: Duration,
}

impl TransportKind {
    /// The kind as the source announces it (a multi-tcp migration has at least one stream).
    pub(crate) fn normalized(self) -> Self {
        match self {
            TransportKind::MultiTcp { streams } => TransportKind::MultiTcp {
                streams: streams.max(1),
            },
            other => other,
        }
    }

    /// Builds the source half, after the handshake.
    pub(crate) fn source(
        self,
        s: &SourceSetup<'_>,
    ) -> Result<Box<dyn SourceTransport>, MigrationError> {
        Ok(match self {
            TransportKind::Classic => Box::new(classic::ClassicSource::new(s.control)?),
            TransportKind::MultiTcp { streams } => Box::new(multi_tcp::MultiTcpSource::connect(
                s.dest,
                streams,
                s.session,
                s.connect_timeout,
                s.io_timeout,
            )?),
            TransportKind::Shm => Box::new(shm::ShmSource::open(s.control, s.layout)?),
            TransportKind::Handover => Box::new(handover::HandoverSource),
            TransportKind::Rdma {
                pin_budget_mib,
                qps,
            } => rdma::source(s, pin_budget_mib, qps)?,
        })
    }

    /// True when the destination's VM is built on the source's own memory, received during
    /// the transport's setup, instead of having memory of its own.
    pub(crate) fn adopts_memory(self) -> bool {
        matches!(self, TransportKind::Handover)
    }

    /// Destination, before accepting: why this transport cannot run over `control` into
    /// `memory` (`None` when the memory will be adopted), if it cannot.
    pub(crate) fn refusal(self, control: &Conn, memory: Option<&[MemoryRegion]>) -> Option<String> {
        let unix = control.as_unix().is_some();
        let memfd = memory.is_none_or(|m| m.iter().all(|r| r.fd.is_some()));
        match self {
            TransportKind::Classic => None,
            TransportKind::MultiTcp { streams } => (!DATA_STREAMS.contains(&streams))
                .then(|| format!("bad data stream count {streams}")),
            TransportKind::Shm if !unix => Some("shm needs a unix: endpoint".into()),
            TransportKind::Shm if !memfd => Some("shm needs memfd-backed guest memory".into()),
            TransportKind::Shm => None,
            TransportKind::Handover if !unix => Some("handover needs a unix: endpoint".into()),
            TransportKind::Handover => None,
            TransportKind::Rdma { .. } => rdma::refusal(control),
        }
    }

    /// Builds the destination half, after the handshake (and, for a transport that adopts
    /// memory, after the VM was built on it).
    pub(crate) fn destination(
        self,
        d: DestSetup<'_>,
    ) -> Result<Box<dyn DestTransport>, MigrationError> {
        Ok(match self {
            TransportKind::Classic => Box::<classic::ClassicDest>::default(),
            TransportKind::MultiTcp { streams } => Box::new(multi_tcp::MultiTcpDest::accept(
                d.listener,
                streams,
                d.session,
                d.accept_timeout,
                d.io_timeout,
                d.ctx,
            )?),
            TransportKind::Shm => Box::new(shm::ShmDest::offer(d.control, d.memory)?),
            TransportKind::Handover => Box::new(handover::HandoverDest::built(d.control)?),
            TransportKind::Rdma { .. } => rdma::destination(d)?,
        })
    }
}

/// Error parsing a [`TransportKind`].
#[derive(Debug, thiserror::Error)]
#[error("unknown transport {0:?}: expected classic, multi-tcp, multi-tcp:N, shm, handover, rdma, rdma:PIN_MIB or rdma:qps=N,pin=MIB")]
pub struct BadTransport(pub String);

impl FromStr for TransportKind {
    type Err = BadTransport;
    /// `classic`, `multi-tcp` (one stream per core), `multi-tcp:N`, `shm`, `handover`, `rdma`
    /// (all memory registered, [`RDMA_DEFAULT_QPS`] queue pairs), `rdma:PIN_MIB` (at most
    /// that many MiB registered at once) or `rdma:qps=N,pin=MIB` (either or both, once each).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let default = TransportKind::multi_tcp_default();
        let rdma = TransportKind::Rdma {
            pin_budget_mib: 0,
            qps: RDMA_DEFAULT_QPS,
        };
        let plain = [
            TransportKind::Classic,
            default,
            TransportKind::Shm,
            TransportKind::Handover,
            rdma,
        ];
        if let Some(opts) = s.strip_prefix("rdma:") {
            return parse_rdma(opts).ok_or_else(|| BadTransport(s.into()));
        }
        match plain.into_iter().find(|k| k.name() == s) {
            Some(k) => Ok(k),
            None => s
                .strip_prefix(default.name())
                .and_then(|n| n.strip_prefix(':'))
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| DATA_STREAMS.contains(n))
                .map(|streams| TransportKind::MultiTcp { streams })
                .ok_or_else(|| BadTransport(s.into())),
        }
    }
}

/// The options of `rdma:...`: `PIN_MIB`, or `qps=N` and/or `pin=MIB` separated by commas.
fn parse_rdma(opts: &str) -> Option<TransportKind> {
    let (mut pin, mut qps) = (None, None);
    if let Ok(mib) = opts.parse::<u32>() {
        pin = Some(mib);
    } else {
        for part in opts.split(',') {
            let (key, value) = part.split_once('=')?;
            let value = value.parse::<u32>().ok()?;
            let slot = match key {
                "pin" => &mut pin,
                "qps" => &mut qps,
                _ => return None,
            };
            if slot.replace(value).is_some() {
                return None; // given twice
            }
        }
    }
    let qps = qps.unwrap_or(RDMA_DEFAULT_QPS);
    let pin_budget_mib = pin.unwrap_or(0);
    // A budget of 0 would mean "all": say so by leaving it out.
    (pin != Some(0) && RDMA_QPS.contains(&qps)).then_some(TransportKind::Rdma {
        pin_budget_mib,
        qps,
    })
}

/// What a sending call needs besides the pages.
#[derive(Debug, Clone, Copy)]
pub struct SendCtx<'a> {
    /// Source page-hash table, updated for every page sent.
    pub hashes: &'a PageHashes,
    /// Bandwidth cap shared by all streams, if any.
    pub bucket: Option<&'a TokenBucket>,
    /// Checked between batches.
    pub cancel: &'a CancelToken,
    /// Pages handled so far in this call, bumped per batch (read by the progress ticker).
    pub done_pages: &'a AtomicU64,
}

/// Counters of one sending or receiving call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Pages whose bytes were transferred.
    pub pages: u64,
    /// Pages found all-zero and sent as a flag only.
    pub zero_pages: u64,
    /// Bytes put on (or taken off) the wire, headers included.
    pub bytes: u64,
}

impl PageStats {
    pub(crate) fn add(&mut self, o: PageStats) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.bytes += o.bytes;
    }
}

/// Source half of a transport.
pub trait SourceTransport: Send {
    /// True when pages are copied in pre-copy rounds (with a dirty log) and a stop-and-copy
    /// round (the default); false when the memory changes hands instead (then only
    /// `before_pause` runs).
    fn precopy(&self) -> bool {
        true
    }
    /// Runs just before the VM is paused (after pre-copy, if any). Handover passes the
    /// memory here; copying transports do nothing (the default).
    fn before_pause(
        &mut self,
        _control: &mut Conn,
        _memory: &[MemoryRegion],
    ) -> Result<(), MigrationError> {
        Ok(())
    }
    /// Sends `pages` (ascending page indices) as they are in memory now, recording their
    /// hashes in `ctx.hashes`. Returns once every byte is handed to the kernel.
    fn send_pages(
        &mut self,
        mem: &MemoryView,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError>;
    /// Called once after the last page: closes data streams so the destination knows all
    /// page data arrived.
    fn finish(&mut self) -> Result<(), MigrationError>;
    /// CPU seconds spent by the transport's own worker threads so far.
    fn worker_cpu_s(&self) -> f64;
    /// Since when the destination has shown no progress, for transports whose sends do not
    /// wait for it (shm copies into its memory): the engine's next wait on the destination
    /// counts its deadline from there. `None`: the last send itself was progress.
    fn peer_quiet_since(&self) -> Option<std::time::Instant> {
        None
    }
}

/// What receiving needs: the destination's memory and its hash table.
#[derive(Debug, Clone)]
pub struct RecvCtx {
    /// Destination guest memory.
    pub mem: MemoryView,
    /// Destination page-hash table.
    pub hashes: Arc<PageHashes>,
}

/// Destination half of a transport.
pub trait DestTransport: Send {
    /// True when pages are copied into the destination's memory (so its page-hash table
    /// describes that memory and `verify_memory` can re-check it); false for adopted memory.
    fn copies_pages(&self) -> bool;
    /// Offered every frame of the control stream; consumes page frames (returning `None`)
    /// and hands any other message back.
    fn on_control(
        &mut self,
        msg: Message,
        ctx: &RecvCtx,
    ) -> Result<Option<Message>, MigrationError>;
    /// Called on `Complete`: waits until every page of every stream has landed.
    fn finish(&mut self) -> Result<PageStats, MigrationError>;
    /// CPU seconds spent by the transport's own worker threads.
    fn worker_cpu_s(&self) -> f64;
    /// Called while the control stream is idle: returns a counter that grows while page
    /// data arrives on other streams (liveness), or the error of a worker that failed.
    fn check(&mut self) -> Result<u64, MigrationError>;
    /// The migration failed: stop every worker, and return the error of a worker that had
    /// already failed on its own (the likely root cause), if any.
    fn abort(&mut self) -> Option<MigrationError>;
}

/// Splits `pages` (ascending page indices) into runs of consecutive pages that lie in one
/// region (so contiguous in memory on both sides), at most `max` pages each: `(first, count)`.
pub(crate) fn page_runs<'a>(
    mem: &'a MemoryView,
    pages: &'a [usize],
    max: usize,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let mut j = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(j)?;
        let mut k = j + 1;
        while k < pages.len()
            && k - j < max
            && pages[k] == pages[k - 1] + 1
            && mem.same_region(pages[k - 1], pages[k])
        {
            k += 1;
        }
        let run = (first, k - j);
        j = k;
        Some(run)
    })
}

/// The zero test for the pages of one run, `first .. first + count`, asked page by page in
/// order: a page is zero only if its first word is, and first words are read 64 pages at a
/// time ([`MemoryView::zero_candidates`]); only those pages are then read in full. Checking
/// page after page waits for each page's first line from memory in turn, which cost a full
/// pass more CPU than its copy.
pub(crate) struct ZeroTest<'a> {
    mem: &'a MemoryView,
    first: usize,
    count: usize,
    /// First page of the block `mask` describes (`usize::MAX`: none yet).
    block: usize,
    mask: u64,
}

impl<'a> ZeroTest<'a> {
    pub(crate) fn new(mem: &'a MemoryView, first: usize, count: usize) -> Self {
        Self {
            mem,
            first,
            count,
            block: usize::MAX,
            mask: 0,
        }
    }

    /// Whether page `p` (inside the run) is all zero now.
    pub(crate) fn is_zero(&mut self, p: usize) -> bool {
        let block = self.first + p.saturating_sub(self.first) / 64 * 64;
        if block != self.block {
            let n = (self.first + self.count).saturating_sub(block).min(64);
            // Out of range: every page is a candidate and `is_zero_page` says no.
            self.mask = self.mem.zero_candidates(block, n).unwrap_or(u64::MAX);
            self.block = block;
        }
        (self.mask >> ((p - block) % 64)) & 1 == 1 && self.mem.is_zero_page(p)
    }
}

/// Walks pages `first .. first + count` in order: `zero(p)` for every page `is_zero` picks,
/// `data(start, len)` for every maximal span of the others (once the span is complete).
pub(crate) fn split_zero_spans<E>(
    first: usize,
    count: usize,
    mut is_zero: impl FnMut(usize) -> bool,
    mut zero: impl FnMut(usize),
    mut data: impl FnMut(usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let mut span = None;
    for p in first..first + count {
        if is_zero(p) {
            zero(p);
            if let Some(s) = span.take() {
                data(s, p - s)?;
            }
        } else {
            span.get_or_insert(p);
        }
    }
    match span {
        Some(s) => data(s, first + count - s),
        None => Ok(()),
    }
}

/// The destination's side of a one-sided transport (`shm`, `rdma`), as its `on_control`: for
/// a `Written` frame, records the hash of every page it names, read in place from its
/// memory, and counts the pages in `stats`; any other message is handed back. A run outside
/// memory is a malformed frame.
pub(crate) fn record_written(
    msg: Message,
    ctx: &RecvCtx,
    stats: &mut PageStats,
) -> Result<Option<Message>, MigrationError> {
    let Message::Written(runs) = msg else {
        return Ok(Some(msg));
    };
    for (gpa, n) in runs {
        let first = ctx
            .mem
            .gpa_to_page(gpa)
            .filter(|&p| ctx.mem.run_addr(p, n as usize).is_some())
            .ok_or_else(|| {
                wire(
                    "receiving pages",
                    ProtocolError::Malformed {
                        kind: "written",
                        reason: format!("run {gpa:#x}+{n} outside memory"),
                    },
                )
            })?;
        for p in first..first + n as usize {
            // SAFETY: `run_addr` checked the run lies in our guest memory. Nothing writes
            // page `p` now: our VM is paused until Commit, and the source writes a page of a
            // round once, before naming it here, and starts no next round before our
            // RoundAck, which comes after this frame. Hashing in place (no copy first) saves
            // the destination a fifth of its CPU. A source breaking that order could only
            // make this hash wrong, and the digest comparison would say so.
            let h = unsafe { ctx.mem.hash_page_unshared(p) };
            ctx.hashes.set(p, h.unwrap_or(0));
        }
        stats.pages += u64::from(n);
        stats.bytes += u64::from(n) * PAGE_SIZE as u64;
    }
    Ok(None)
}

/// What a sending worker thread returns: its stats (or error) and its CPU seconds.
pub(crate) type SendWorkerResult = (Result<PageStats, MigrationError>, f64);

/// Runs one sending worker's job, timing its CPU; a failure cancels `stop` so that its
/// sibling workers give up early.
pub(crate) fn run_worker(
    stop: &CancelToken,
    job: impl FnOnce() -> Result<PageStats, MigrationError>,
) -> SendWorkerResult {
    let c0 = crate::util::thread_cpu_time();
    let r = job();
    if r.is_err() {
        stop.cancel();
    }
    (r, crate::util::thread_cpu_time() - c0)
}

/// Joins a sending worker; a panic becomes an error naming `what`.
pub(crate) fn join_worker(
    h: std::thread::ScopedJoinHandle<'_, SendWorkerResult>,
    what: &str,
) -> SendWorkerResult {
    h.join().unwrap_or_else(|_| {
        (
            Err(MigrationError::Internal {
                what: format!("{what} panicked"),
            }),
            0.0,
        )
    })
}

/// Sums the workers' stats and CPU (into `cpu_s`) and returns the root cause of a failure:
/// a real error rather than the `Cancelled` it induced in the other workers.
pub(crate) fn merge_worker_results(
    results: Vec<SendWorkerResult>,
    cancel: &CancelToken,
    cpu_s: &mut f64,
) -> Result<PageStats, MigrationError> {
    let mut stats = PageStats::default();
    let mut first_err = None;
    for (r, cpu) in results {
        *cpu_s += cpu;
        match r {
            Ok(s) => stats.add(s),
            Err(MigrationError::Cancelled) if !cancel.is_cancelled() => {
                first_err.get_or_insert(MigrationError::Cancelled);
            }
            Err(e) => {
                if matches!(first_err, None | Some(MigrationError::Cancelled)) {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

#[cfg(test)]
mod worker_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::PAGE_SIZE;

    #[test]
    fn runs_break_at_gaps_regions_and_the_cap() {
        // Two regions of 4 pages each (pages 0-3 and 4-7), backed by one buffer.
        let mut buf = vec![0u8; 8 * PAGE_SIZE + PAGE_SIZE];
        let base = buf.as_mut_ptr() as usize;
        let base = base.next_multiple_of(PAGE_SIZE);
        let region = |i: u64| MemoryRegion {
            gpa: i * (1 << 20),
            size: 4 * PAGE_SIZE as u64,
            host_addr: base + (i as usize) * 4 * PAGE_SIZE,
            fd: None,
            fd_offset: 0,
        };
        let mem = MemoryView::new(&[region(0), region(1)]).expect("memory");
        let pages = [0, 1, 2, 3, 4, 5, 7];
        let runs: Vec<_> = page_runs(&mem, &pages, 100).collect();
        assert_eq!(runs, [(0, 4), (4, 2), (7, 1)]);
        let capped: Vec<_> = page_runs(&mem, &pages, 3).collect();
        assert_eq!(capped, [(0, 3), (3, 1), (4, 2), (7, 1)]);
        assert_eq!(page_runs(&mem, &[], 3).count(), 0);
        drop(buf);
    }

    #[test]
    fn zero_pages_split_data_spans() {
        let zeros = [11, 12, 15];
        let (mut z, mut d) = (Vec::new(), Vec::new());
        let r: Result<(), ()> = split_zero_spans(
            10,
            8,
            |p| zeros.contains(&p),
            |p| z.push(p),
            |s, n| {
                d.push((s, n));
                Ok(())
            },
        );
        assert!(r.is_ok());
        // 10 | 11 12 zero | 13 14 | 15 zero | 16 17
        assert_eq!(z, [11, 12, 15]);
        assert_eq!(d, [(10, 1), (13, 2), (16, 2)]);
        // An error from `data` stops the walk.
        let mut calls = 0;
        let r = split_zero_spans(
            0,
            8,
            |p| p == 3,
            |_| {},
            |_, _| {
                calls += 1;
                Err("stop")
            },
        );
        assert_eq!((r, calls), (Err("stop"), 1));
    }

    #[test]
    fn the_zero_test_agrees_with_a_full_check_of_every_page() {
        // 200 pages (blocks of 64, the last short), a run starting at page 5 of a region
        // that starts at page 0. Patterns: zero, non-zero only in the first word, non-zero
        // only in the last byte (a candidate that the full check rejects).
        let pages = 200;
        let mut buf = vec![0u8; (pages + 1) * PAGE_SIZE];
        let base = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let mem = MemoryView::new(&[MemoryRegion {
            gpa: 0,
            size: (pages * PAGE_SIZE) as u64,
            host_addr: base,
            fd: None,
            fd_offset: 0,
        }])
        .expect("memory");
        for p in 0..pages {
            let mut page = [0u8; PAGE_SIZE];
            match p % 3 {
                0 => {}
                1 => page[0] = 1,
                _ => page[PAGE_SIZE - 1] = 1,
            }
            assert!(mem.write_page(p, &page));
        }
        let (first, count) = (5, pages - 5);
        let mut test = ZeroTest::new(&mem, first, count);
        for p in first..first + count {
            assert_eq!(test.is_zero(p), p % 3 == 0, "page {p}");
        }
        // Pages are asked in order by `split_zero_spans`, but any order must still agree.
        let mut test = ZeroTest::new(&mem, first, count);
        for p in (first..first + count).rev() {
            assert_eq!(test.is_zero(p), p % 3 == 0, "page {p}, backwards");
        }
        drop(buf);
    }
}
