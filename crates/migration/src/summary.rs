//! Result types for callers (CLI, benchmarks): progress reports and the final summary.

use serde::{Deserialize, Serialize};

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// Converged within the downtime limit; the destination runs the VM.
    Completed,
    /// Did not converge; stop-and-copy was forced (`OnNoConverge::Force`); the destination
    /// runs the VM, downtime may exceed the limit.
    CompletedForced,
}

/// Per pre-copy round figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number: 1 is the full pass; the last one is stop-and-copy.
    pub round: u32,
    /// Pages whose bytes were sent.
    pub pages: u64,
    /// Zero pages sent as a flag only.
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Wall time of the round, ms.
    pub ms: f64,
    /// Measured bandwidth of the round, MiB/s.
    pub bandwidth_mib_s: f64,
    /// Dirty rate seen at the sync that opened this round, pages/s (0 for round 1).
    pub dirty_rate_pages_s: f64,
    /// True for the stop-and-copy round (VM paused).
    pub stop_and_copy: bool,
}

/// What the source reports when a migration succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// How it ended.
    pub status: MigrationStatus,
    /// Transport name.
    pub transport: String,
    /// Wall time from `migrate` call to the destination's `Resumed`, ms.
    pub total_ms: f64,
    /// From the source pausing the vCPUs to receipt of the destination's `Resumed`
    /// acknowledgement, on the source's clock, ms.
    pub downtime_ms: f64,
    /// Connection, handshake and transport setup, ms.
    pub setup_ms: f64,
    /// Destination's own setup time (accept, handshake, streams), ms.
    pub dst_setup_ms: f64,
    /// Rounds including the stop-and-copy round.
    pub rounds: u32,
    /// Bytes put on the wire for pages (headers included).
    pub bytes_sent: u64,
    /// Pages whose bytes were sent (re-sends counted).
    pub pages_sent: u64,
    /// Zero pages sent as a flag only.
    pub zero_pages_skipped: u64,
    /// `bytes_sent` over the time spent sending pages, MiB/s.
    pub throughput_mib_s: f64,
    /// CPU time of the source's migration threads, s, the transport's teardown included
    /// (e.g. shm unmapping the destination's memory after the VM resumed there).
    pub src_cpu_s: f64,
    /// CPU time of the destination's migration threads, s (from its `Resumed`).
    pub dst_cpu_s: f64,
    /// What the destination found when it compared its memory digest with the source's
    /// (carried back in `Resumed`).
    pub digest_match: bool,
    /// Per-round details.
    pub round_details: Vec<RoundStats>,
}

/// What the destination reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiveSummary {
    /// Transport name.
    pub transport: String,
    /// Accept, handshake and stream setup, ms.
    pub setup_ms: f64,
    /// From accept to resume, ms.
    pub total_ms: f64,
    /// Pages whose bytes were received.
    pub pages_received: u64,
    /// Zero pages received as a flag.
    pub zero_pages: u64,
    /// Page bytes received, headers included.
    pub bytes_received: u64,
    /// Rounds the source reported.
    pub rounds: u32,
    /// CPU time of the destination's migration threads, s.
    pub dst_cpu_s: f64,
    /// The destination's memory digest (its page-hash table, see PROTOCOL.md "Digest").
    pub digest: u64,
    /// The digest the source sent in `Complete`.
    pub source_digest: u64,
    /// `digest == source_digest`, as compared by the destination (a mismatch fails the
    /// migration before `Ready`, so a returned summary always says true).
    pub digest_match: bool,
}

/// Phase reported in a [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connected and handshake accepted.
    Setup,
    /// A pre-copy round finished.
    PreCopy,
    /// VM paused, final round sent.
    StopAndCopy,
    /// Destination resumed the VM.
    Done,
}

/// Progress report, given to the callback after setup, after every round and at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// Rounds finished so far.
    pub round: u32,
    /// Pages known dirty and not yet sent.
    pub remaining_pages: u64,
    /// Last measured dirty rate, pages/s.
    pub dirty_rate_pages_s: f64,
    /// Last measured bandwidth, MiB/s.
    pub bandwidth_mib_s: f64,
    /// Page bytes sent so far (in-round ticks estimate the current round as pages × 4 KiB).
    pub bytes_sent: u64,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Time since the start, ms.
    pub elapsed_ms: f64,
}
