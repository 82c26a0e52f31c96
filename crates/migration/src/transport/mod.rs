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
//!
//! See PROTOCOL.md for the frames each transport uses.

use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::digest::PageHashes;
use crate::error::MigrationError;
use crate::guestmem::GuestMemory;
use crate::protocol::Message;
use crate::util::{CancelToken, TokenBucket};

pub(crate) mod classic;
pub(crate) mod multi_tcp;
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
    /// the destination uses [`crate::receive_handover`].
    Handover,
}

impl TransportKind {
    /// Name used on the wire and in summaries.
    pub fn name(&self) -> &'static str {
        match self {
            TransportKind::Classic => "classic",
            TransportKind::MultiTcp { .. } => "multi-tcp",
            TransportKind::Shm => "shm",
            TransportKind::Handover => "handover",
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

/// Error parsing a [`TransportKind`].
#[derive(Debug, thiserror::Error)]
#[error("unknown transport {0:?}: expected classic, multi-tcp, multi-tcp:N, shm or handover")]
pub struct BadTransport(pub String);

impl FromStr for TransportKind {
    type Err = BadTransport;
    /// `classic`, `multi-tcp` (one stream per core), `multi-tcp:N`, `shm` or `handover`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(TransportKind::Classic),
            "shm" => Ok(TransportKind::Shm),
            "handover" => Ok(TransportKind::Handover),
            "multi-tcp" => Ok(TransportKind::multi_tcp_default()),
            _ => s
                .strip_prefix("multi-tcp:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=64).contains(n))
                .map(|streams| TransportKind::MultiTcp { streams })
                .ok_or_else(|| BadTransport(s.into())),
        }
    }
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
    /// Name for summaries.
    fn name(&self) -> &'static str;
    /// Sends `pages` (ascending page indices) as they are in memory now, recording their
    /// hashes in `ctx.hashes`. Returns once every byte is handed to the kernel.
    fn send_pages(
        &mut self,
        mem: &GuestMemory,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError>;
    /// Called once after the last page: closes data streams so the destination knows all
    /// page data arrived.
    fn finish(&mut self) -> Result<(), MigrationError>;
    /// CPU seconds spent by the transport's own worker threads so far.
    fn worker_cpu_s(&self) -> f64;
}

/// What receiving needs: the destination's memory and its hash table.
#[derive(Debug, Clone)]
pub struct RecvCtx {
    /// Destination guest memory.
    pub mem: GuestMemory,
    /// Destination page-hash table.
    pub hashes: Arc<PageHashes>,
}

/// Destination half of a transport.
pub trait DestTransport: Send {
    /// Name for summaries.
    fn name(&self) -> &'static str;
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

/// Handover's source transport: pages never move (the destination adopts the memory).
pub(crate) struct NoCopy;

impl SourceTransport for NoCopy {
    fn name(&self) -> &'static str {
        "handover"
    }

    fn send_pages(
        &mut self,
        _: &GuestMemory,
        _: &[usize],
        _: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        Ok(PageStats::default())
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }
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
