//! The source side: pre-copy engine.
//!
//! ```text
//! connect ─ Hello/HelloReply ─ transport setup ─ start dirty log
//!   round 1: every page
//!   loop: sync dirty log ─ estimate (dirty bytes / measured bandwidth) ≤ downtime limit? ─ yes → stop
//!         no convergence? ─ Wait: go on (round limit) │ Force: stop now │ Abort: fail
//!         send dirty pages
//! pause ─ final sync ─ send last pages ─ stop dirty log ─ State ─ Complete(digest)
//!   ← Ready ─ Commit → ← Resumed   (downtime = pause → Resumed, source clock)
//! ```
//!
//! Failure safety: until `Commit` is written, any error (or cancel) stops the dirty log,
//! resumes the VM if this call paused it, and tells the destination `Failed` (best effort).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::conn::{Conn, Endpoint};
use crate::convergence::{decide, Decision, History, Limits, Observation};
use crate::deadline::{read_message_within, send_bounded, ABORT_BOUND};
use crate::digest::PageHashes;
use crate::error::{wire, MigrationError};
use crate::guestmem::MemoryView;
use crate::handshake;
use crate::options::MigrateOptions;
use crate::protocol::{write_message, Complete, Message};
use crate::summary::{MigrationStatus, MigrationSummary, Phase, Progress, RoundStats};
use crate::transport::{PageStats, SendCtx, SourceSetup, SourceTransport};
use crate::util::{thread_cpu_time, TokenBucket};
use crate::vm::{DirtyBitmap, MigratableVm, PAGE_SIZE};

#[derive(Default)]
struct Guard {
    paused: bool,
    dirty_on: bool,
    committed: bool,
    control: Option<Conn>,
}

/// Migrates `vm` to the destination listening at `dest`.
///
/// On success the VM stays paused here (the destination runs it): the caller should tear
/// it down. On error before `Commit`, the VM is running here again with its memory intact.
pub fn migrate<V: MigratableVm + ?Sized>(
    vm: &V,
    dest: &Endpoint,
    opts: &MigrateOptions,
) -> Result<MigrationSummary, MigrationError> {
    let mut g = Guard::default();
    let r = run(vm, dest, opts, &mut g);
    let Err(mut e) = r else { return r };
    if g.committed {
        return Err(e);
    }
    if let Some(c) = g.control.as_mut() {
        // A destination that failed first usually said why before closing: prefer its reason.
        // Both bounded in total (not per call): a stopped peer must not hold the abort.
        if matches!(e, MigrationError::Wire { .. }) {
            if let Ok(Message::Failed { reason }) = read_message_within(c, ABORT_BOUND) {
                e = MigrationError::PeerFailed { reason };
            }
        }
        send_bounded(
            c,
            &Message::Failed {
                reason: format!("source: {}", crate::error::chain_text(&e)),
            },
        );
        c.shutdown();
    }
    if g.dirty_on {
        if let Err(se) = vm.stop_dirty_log() {
            warn!(error = %se, "stopping the dirty log after a failed migration");
        }
    }
    if g.paused {
        if let Err(re) = vm.resume() {
            warn!(error = %re, "resuming the VM after a failed migration");
            return Err(MigrationError::Resume(re));
        }
    }
    warn!(error = %e, "migration failed; VM runs on the source");
    Err(e)
}

fn session_id() -> u64 {
    RandomState::new().hash_one((std::process::id(), Instant::now()))
}

struct Sender<'a, V: ?Sized> {
    vm: &'a V,
    opts: &'a MigrateOptions,
    mem: MemoryView,
    transport: Box<dyn SourceTransport>,
    hashes: PageHashes,
    bucket: Option<TokenBucket>,
    rounds: Vec<RoundStats>,
    total: PageStats,
    send_s: f64,
    t0: Instant,
}

impl<V: MigratableVm + ?Sized> Sender<'_, V> {
    fn send_round(
        &mut self,
        pages: &[usize],
        dirty_rate: f64,
        stop_and_copy: bool,
    ) -> Result<(), MigrationError> {
        let done_pages = AtomicU64::new(0);
        // Dropping the sender wakes the ticker at once: joining it must not add a tick's
        // sleep to the round (in stop-and-copy that would be downtime).
        let (finished, finished_rx) = std::sync::mpsc::channel::<()>();
        let start = Instant::now();
        let stats = std::thread::scope(|sc| {
            if let (Some(cb), false, false) = (
                &self.opts.progress,
                self.opts.progress_interval.is_zero(),
                stop_and_copy,
            ) {
                // Periodic progress inside long pre-copy rounds, from a ticker thread.
                let (cb, done_pages) = (cb.clone(), &done_pages);
                let base = Progress {
                    phase: if stop_and_copy {
                        Phase::StopAndCopy
                    } else {
                        Phase::PreCopy
                    },
                    round: self.rounds.len() as u32,
                    remaining_pages: pages.len() as u64,
                    dirty_rate_pages_s: dirty_rate,
                    bandwidth_mib_s: 0.0, // each tick measures this round's
                    bytes_sent: self.total.bytes,
                    pages_sent: self.total.pages,
                    elapsed_ms: 0.0,
                };
                let (t0, interval) = (self.t0, self.opts.progress_interval);
                sc.spawn(move || {
                    let mut next = Instant::now() + interval;
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        finished_rx.recv_timeout(Duration::from_millis(20))
                    {
                        if Instant::now() < next {
                            continue;
                        }
                        next += interval;
                        let done = done_pages.load(Ordering::Relaxed);
                        let secs = start.elapsed().as_secs_f64();
                        let mut p = base.clone();
                        p.remaining_pages = p.remaining_pages.saturating_sub(done);
                        p.pages_sent += done;
                        p.bytes_sent += done * PAGE_SIZE as u64;
                        p.bandwidth_mib_s = done as f64 * PAGE_SIZE as f64 / secs.max(1e-6) / MIB;
                        p.elapsed_ms = t0.elapsed().as_secs_f64() * 1e3;
                        cb(&p);
                    }
                });
            }
            let ctx = SendCtx {
                hashes: &self.hashes,
                bucket: self.bucket.as_ref(),
                cancel: &self.opts.cancel,
                done_pages: &done_pages,
            };
            let r = self.transport.send_pages(&self.mem, pages, &ctx);
            drop(finished);
            r
        })?;
        let secs = start.elapsed().as_secs_f64();
        self.send_s += secs;
        self.total.add(stats);
        let r = RoundStats {
            round: self.rounds.len() as u32 + 1,
            pages: stats.pages,
            zero_pages: stats.zero_pages,
            bytes: stats.bytes,
            ms: secs * 1e3,
            bandwidth_mib_s: if secs > 0.0 {
                stats.bytes as f64 / secs / MIB
            } else {
                0.0
            },
            dirty_rate_pages_s: dirty_rate,
            stop_and_copy,
        };
        debug!(?r, "round sent");
        self.rounds.push(r);
        Ok(())
    }

    /// Ends a pre-copy round and waits until the destination has every page of it: the
    /// round's time (and so the bandwidth estimate) is then end to end, and no backlog of
    /// pages still in flight can spill into the downtime.
    fn end_round(&mut self, control: &mut Conn) -> Result<(), MigrationError> {
        let start = Instant::now();
        let round = self.rounds.len() as u32;
        let data_bytes = if self.opts.transport.uses_data_streams() {
            self.total.bytes
        } else {
            0
        };
        write_message(control, &Message::RoundEnd { round, data_bytes })
            .map_err(|e| wire("sending pages", e))?;
        // The ack comes once the destination has every page of the round: on a stalled
        // destination this is where the source waits, so the whole frame has one deadline.
        let quiet = self
            .transport
            .peer_quiet_since()
            .map_or(Duration::ZERO, |t| t.elapsed());
        let within = self
            .opts
            .io_timeout
            .saturating_sub(quiet)
            .max(Duration::from_millis(1));
        match read_message_within(control, within).map_err(|e| wire("round ack", e))? {
            Message::RoundAck { round: r } if r == round => {}
            Message::Failed { reason } => return Err(MigrationError::PeerFailed { reason }),
            other => {
                return Err(MigrationError::Unexpected {
                    phase: "round ack",
                    got: other.name().into(),
                })
            }
        }
        let waited = start.elapsed().as_secs_f64();
        self.send_s += waited;
        if let Some(last) = self.rounds.last_mut() {
            last.ms += waited * 1e3;
            last.bandwidth_mib_s = last.bytes as f64 / (last.ms / 1e3).max(1e-9) / MIB;
        }
        Ok(())
    }

    /// Bytes/s measured over all rounds so far (bounded by the cap).
    fn bandwidth(&self) -> f64 {
        let measured = if self.send_s > 0.0 {
            self.total.bytes as f64 / self.send_s
        } else {
            0.0
        };
        let measured = if measured > 0.0 { measured } else { 1e9 };
        match self.opts.bandwidth_limit {
            Some(cap) => measured.min(cap as f64),
            None => measured,
        }
    }

    fn progress(&self, phase: Phase, remaining: usize, dirty_rate: f64) {
        if let Some(cb) = &self.opts.progress {
            cb(&Progress {
                phase,
                round: self.rounds.len() as u32,
                remaining_pages: remaining as u64,
                dirty_rate_pages_s: dirty_rate,
                bandwidth_mib_s: self.bandwidth() / MIB,
                bytes_sent: self.total.bytes,
                pages_sent: self.total.pages,
                elapsed_ms: self.t0.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
}

impl<V: MigratableVm + ?Sized> Sender<'_, V> {
    /// Pre-copy: the full pass, then rounds of dirty pages until the stop rule
    /// ([`decide`]) says stop. Returns the pages still dirty, whether the stop was forced,
    /// and the last dirty rate.
    fn precopy(
        &mut self,
        control: &mut Conn,
        g: &mut Guard,
    ) -> Result<(DirtyBitmap, bool, f64), MigrationError> {
        let opts = self.opts;
        self.vm
            .start_dirty_log()
            .map_err(MigrationError::DirtyLog)?;
        g.dirty_on = true;
        // The log counts from here: the first sync's pages were dirtied during the full pass.
        let mut last_sync = Instant::now();
        let all: Vec<usize> = (0..self.mem.pages()).collect();
        self.send_round(&all, 0.0, false)?;
        self.end_round(control)?;
        let mut history = History::default();
        let limits = Limits {
            downtime: opts.downtime_limit,
            max_rounds: opts.max_rounds,
            on_no_converge: opts.on_no_converge,
        };
        let mut warned = false;
        loop {
            if opts.cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let pending = self
                .vm
                .sync_dirty_log()
                .map_err(MigrationError::DirtyLogSync)?;
            let now = Instant::now();
            let dirty = pending.count();
            let dirty_rate = dirty as f64 / now.duration_since(last_sync).as_secs_f64().max(1e-6);
            last_sync = now;
            self.progress(Phase::PreCopy, dirty, dirty_rate);
            let est = Duration::from_secs_f64(dirty as f64 * PAGE_SIZE as f64 / self.bandwidth());
            let rounds = self.rounds.len() as u32;
            debug!(rounds, dirty, ?est, "dirty log synced");
            let seen = Observation {
                dirty,
                dirty_rate,
                est,
                rounds,
                bandwidth_mib_s: self.bandwidth() / MIB,
            };
            let (decision, next) = decide(history, &seen, &limits);
            history = next;
            match decision {
                Decision::StopAndCopy => return Ok((pending, false, dirty_rate)),
                Decision::Force { reason } => {
                    warn!(%reason, "pre-copy not converging: forcing stop-and-copy");
                    return Ok((pending, true, dirty_rate));
                }
                Decision::Fail { reason } => {
                    return Err(MigrationError::NotConverged { rounds, reason })
                }
                Decision::AnotherRound { stalling } => {
                    if let (Some(reason), false) = (stalling, warned) {
                        warn!(%reason, "pre-copy not converging: waiting (round limit {})", opts.max_rounds);
                        warned = true;
                    }
                }
            }
            let list: Vec<usize> = pending.iter_dirty().collect();
            self.send_round(&list, dirty_rate, false)?;
            self.end_round(control)?;
        }
    }

    /// Pauses the VM and sends what is still dirty (`pending` and whatever the guest wrote
    /// since). Returns the pause instant.
    fn stop_and_copy(
        &mut self,
        control: &mut Conn,
        g: &mut Guard,
        pending: &DirtyBitmap,
        dirty_rate: f64,
    ) -> Result<Instant, MigrationError> {
        self.transport.before_pause(control, &self.vm.memory())?;
        if self.opts.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        // Marked first: a pause that fails half-way (some vCPUs stopped) is undone by resume.
        g.paused = true;
        self.vm.pause().map_err(MigrationError::Pause)?;
        let paused_at = Instant::now();
        let last = self
            .vm
            .sync_dirty_log()
            .map_err(MigrationError::DirtyLogSync)?;
        let mut fin = DirtyBitmap::new(self.mem.pages());
        fin.union_with(pending);
        fin.union_with(&last);
        let list: Vec<usize> = fin.iter_dirty().collect();
        self.send_round(&list, dirty_rate, true)?;
        self.transport.finish()?;
        self.vm.stop_dirty_log().map_err(MigrationError::DirtyLog)?;
        g.dirty_on = false;
        Ok(paused_at)
    }

    /// A transport that moves no page: its hook runs while the VM still runs, then the
    /// pause. Returns the pause instant.
    fn hand_over(&mut self, control: &mut Conn, g: &mut Guard) -> Result<Instant, MigrationError> {
        if self.opts.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        self.transport.before_pause(control, &self.vm.memory())?;
        if self.opts.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        // Marked first: a pause that fails half-way (some vCPUs stopped) is undone by resume.
        g.paused = true;
        self.vm.pause().map_err(MigrationError::Pause)?;
        Ok(Instant::now())
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn run<V: MigratableVm + ?Sized>(
    vm: &V,
    dest: &Endpoint,
    opts: &MigrateOptions,
    g: &mut Guard,
) -> Result<MigrationSummary, MigrationError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    let layout = vm.layout();
    let mem = MemoryView::new(&vm.memory())?;
    let npages = mem.pages();

    // Setup: connect, handshake, transport.
    let mut control = Conn::connect_retrying(dest, opts.connect_timeout)?;
    control
        .set_timeouts(Some(opts.io_timeout))
        .map_err(|e| MigrationError::TransportSetup {
            reason: "setting control stream timeouts".into(),
            source: Some(e),
        })?;
    g.control = control.try_clone().ok();
    let session = session_id();
    let kind = opts.transport.normalized();
    let version = handshake::offer(&mut control, &layout, kind, session)?;
    let transport = kind.source(&SourceSetup {
        control: &control,
        dest,
        layout: &layout,
        session,
        connect_timeout: opts.connect_timeout,
        io_timeout: opts.io_timeout,
    })?;
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    info!(
        transport = kind.name(),
        version,
        setup_ms,
        pages = npages,
        "migration set up"
    );

    let mut s = Sender {
        vm,
        opts,
        mem,
        transport,
        hashes: PageHashes::new(npages),
        bucket: opts.bandwidth_limit.map(TokenBucket::new),
        rounds: Vec::new(),
        total: PageStats::default(),
        send_s: 0.0,
        t0,
    };
    s.progress(Phase::Setup, npages, 0.0);

    // Without pre-copy no page is sent: the table never changes, so its digest is taken
    // before the pause rather than inside the downtime (about 0.2 ms per GiB of table here).
    let early_digest = (!s.transport.precopy()).then(|| s.hashes.digest());
    let (paused_at, forced, dirty_rate) = if s.transport.precopy() {
        let (pending, forced, dirty_rate) = s.precopy(&mut control, g)?;
        let paused_at = s.stop_and_copy(&mut control, g, &pending, dirty_rate)?;
        (paused_at, forced, dirty_rate)
    } else {
        (s.hand_over(&mut control, g)?, false, 0.0)
    };
    let state = s.vm.save_state().map_err(MigrationError::SaveState)?;
    let rounds = s.rounds.len() as u32;
    let digest = early_digest.unwrap_or_else(|| s.hashes.digest());
    write_message(&mut control, &Message::State(state))
        .and_then(|_| {
            write_message(
                &mut control,
                &Message::Complete(Complete {
                    digest,
                    pages: npages as u64,
                    rounds,
                }),
            )
        })
        .map_err(|e| wire("sending state", e))?;
    s.progress(Phase::StopAndCopy, 0, dirty_rate);

    // Two-phase end: the destination must say Ready (digest verified, state restored) before
    // we give the VM up with Commit.
    // Whole-frame deadlines from here: nothing else shows progress while we wait.
    match read_message_within(&mut control, opts.ack_timeout).map_err(|e| wire("ready", e))? {
        Message::Ready => {}
        Message::Failed { reason } => return Err(MigrationError::PeerFailed { reason }),
        other => {
            return Err(MigrationError::Unexpected {
                phase: "ready",
                got: other.name().into(),
            })
        }
    }
    if opts.cancel.is_cancelled() {
        return Err(MigrationError::Cancelled);
    }
    write_message(&mut control, &Message::Commit).map_err(|e| wire("commit", e))?;
    g.committed = true;
    let resumed = match read_message_within(&mut control, opts.ack_timeout) {
        Ok(Message::Resumed(r)) => r,
        Ok(other) => {
            return Err(MigrationError::InDoubt(Box::new(
                MigrationError::Unexpected {
                    phase: "resumed",
                    got: other.name().into(),
                },
            )))
        }
        Err(e) => return Err(MigrationError::InDoubt(Box::new(wire("resumed", e)))),
    };
    let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    s.progress(Phase::Done, 0, 0.0);
    let worker_cpu_s = s.transport.worker_cpu_s();
    let Sender {
        rounds: round_details,
        total,
        send_s,
        transport,
        ..
    } = s;
    // The transport's teardown (shm unmapping the destination's memory, RDMA deregistering
    // its own) is part of what the migration costs: done before the CPU clock is read. The
    // VM already runs on the destination, so it is not in the total time.
    drop(transport);
    let summary = MigrationSummary {
        status: if forced {
            MigrationStatus::CompletedForced
        } else {
            MigrationStatus::Completed
        },
        transport: kind.name().into(),
        total_ms,
        downtime_ms,
        setup_ms,
        dst_setup_ms: resumed.dst_setup_ms,
        rounds,
        bytes_sent: total.bytes,
        pages_sent: total.pages,
        zero_pages_skipped: total.zero_pages,
        throughput_mib_s: if send_s > 0.0 {
            total.bytes as f64 / send_s / MIB
        } else {
            0.0
        },
        src_cpu_s: thread_cpu_time() - cpu0 + worker_cpu_s,
        dst_cpu_s: resumed.dst_cpu_s,
        digest_match: resumed.digest_match,
        round_details,
    };
    info!(
        total_ms = summary.total_ms,
        downtime_ms = summary.downtime_ms,
        rounds = summary.rounds,
        "migration completed"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    /// Each migration announces its own session id: a data stream left over from an earlier
    /// attempt to the same destination names another session and is refused (`DataHello`).
    #[test]
    fn every_migration_gets_its_own_session_id() {
        let ids: std::collections::HashSet<u64> = (0..16).map(|_| super::session_id()).collect();
        assert_eq!(ids.len(), 16, "{ids:?}");
    }
}
