//! The destination side: one entry point, [`receive`], for every transport.
//!
//! ```text
//!            accept ─ ← Hello ─ negotiate version ─ choose the VM ─ HelloReply →
//!                                                       │
//!         copying transport (classic, multi-tcp, shm)   │   adopting transport (handover)
//!   prepared VM, or make_vm(layout, None); layout and   │   ← MemoryFds: make_vm(layout,
//!   transport checked (refuse with a reason)            │     Some(regions)); RoundAck(0) →
//!                                                       ▼
//!   RECEIVING: pages (transport) │ RoundEnd → RoundAck │ State │ Complete(digest)
//!                                                       │ Failed / error / timeout ─► FAILED
//!   VERIFYING: every stream drained ─ digest compared ─ (verify_memory) ─ state restored
//!                                                       │ mismatch / error ───────► FAILED
//!   READY: Ready → ; paused, waiting commit_timeout for Commit
//!                                                       │ Failed / EOF / timeout ─► FAILED
//!   RUNNING: ← Commit ─ resume ─ Resumed(digest_match) →
//!
//!   FAILED: Failed → (unless the source failed or was refused); VM never resumed, dropped.
//! ```
//!
//! The VM is resumed only after the digest matched, the state was restored and the source
//! said `Commit` (it has given the VM up). Any failure before that returns an error, tells
//! the source `Failed`, and leaves the VM paused for the caller to discard.

use std::io::{BufReader, Read};
use std::os::fd::AsFd;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::accept::accept_source;
use crate::conn::{Conn, Listener};
use crate::deadline::send_bounded;
use crate::digest::PageHashes;
use crate::error::{wire, MigrationError};
use crate::guestmem::MemoryView;
use crate::handshake;
use crate::protocol::{read_message, write_message, Hello, Message, ProtocolError, Resumed};
use crate::summary::ReceiveSummary;
use crate::transport::handover::{self, HandoverRegion};
use crate::transport::{DestSetup, DestTransport, PageStats, RecvCtx};
use crate::util::thread_cpu_time;
use crate::vm::{MigratableVm, VmError, VmLayout};

/// Destination options.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// How long to wait for the source to connect (`None`: forever). Default none.
    pub accept_timeout: Option<Duration>,
    /// Socket read/write timeout (a silent source fails after this). Default 10 s.
    pub io_timeout: Duration,
    /// How long to wait for `Commit` after `Ready`. Default 30 s.
    pub commit_timeout: Duration,
    /// Also re-hash the whole received memory and compare with the digest (O(bytes), adds
    /// to downtime; for tests and paranoia). Default false.
    pub verify_memory: bool,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            accept_timeout: None,
            io_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(30),
            verify_memory: false,
        }
    }
}

/// After a failed receive: prefers the transport's root cause, logs, and tells the source
/// `Failed` (unless it was the source that failed or refused).
fn fail_incoming(
    control: &mut Conn,
    transport: Option<&mut Box<dyn DestTransport>>,
    mut e: MigrationError,
) -> MigrationError {
    if let Some(t) = transport {
        if let Some(root) = t.abort() {
            e = root;
        }
    }
    report_failure(control, &e);
    e
}

/// Waits until the data streams have delivered `bytes` (what the source wrote on them before
/// its `RoundEnd`); a stall of `io_timeout` without any new byte is a timeout.
fn wait_for_data(
    t: &mut dyn DestTransport,
    bytes: u64,
    io_timeout: Duration,
) -> Result<(), MigrationError> {
    let mut last = t.check()?;
    let mut last_change = Instant::now();
    while last < bytes {
        std::thread::sleep(Duration::from_micros(200));
        let now = t.check()?;
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > io_timeout {
            return Err(MigrationError::Timeout {
                phase: "receiving pages",
            });
        }
    }
    Ok(())
}

/// How long one poll of the control stream waits before looking at the data streams.
const POLL_SLICE: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// Waits until the control stream has data. While it is idle, page data arriving on other
/// streams counts as liveness: only `io_timeout` without any byte anywhere is a timeout (a
/// multi-tcp round can last far longer than `io_timeout` with a silent control stream).
/// Also surfaces a failed data stream without waiting for the control stream.
fn wait_for_control(
    control: &Conn,
    t: &mut dyn DestTransport,
    io_timeout: Duration,
) -> Result<(), MigrationError> {
    let mut marker = t.check()?;
    let mut idle_since = Instant::now();
    loop {
        let fd = match control {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        };
        let mut pfd = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut pfd, Some(&POLL_SLICE)) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(wire("receiving pages", ProtocolError::Io(e.into()))),
        }
        let now_marker = t.check()?;
        if now_marker != marker {
            marker = now_marker;
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= io_timeout {
            return Err(MigrationError::Timeout {
                phase: "receiving pages",
            });
        }
    }
}

/// Re-hashes every page of the received memory and compares it with the hash its transfer
/// recorded (`ReceiveOptions::verify_memory`).
fn verify_memory(ctx: &RecvCtx) -> Result<(), MigrationError> {
    let mut bad = (0..ctx.mem.pages()).filter(|&p| ctx.mem.hash_page(p) != ctx.hashes.get(p));
    match bad.next() {
        Some(page) => Err(MigrationError::VerifyMismatch {
            page,
            mismatched: 1 + bad.count(),
        }),
        None => Ok(()),
    }
}

/// The two-phase end shared by every transport: restore the state, say `Ready`, wait for the
/// source's `Commit` (it has given the VM up), and only then resume. `leftover`: bytes of the
/// control stream already read past `Complete`, read before the socket.
fn restore_commit_resume<V: MigratableVm + ?Sized>(
    vm: &V,
    control: &mut Conn,
    leftover: &[u8],
    opts: &ReceiveOptions,
    state: Option<Vec<u8>>,
) -> Result<(), MigrationError> {
    let state = state.ok_or(MigrationError::Unexpected {
        phase: "complete",
        got: "complete before state".into(),
    })?;
    vm.restore_state(&state)
        .map_err(MigrationError::RestoreState)?;
    write_message(control, &Message::Ready).map_err(|e| wire("ready", e))?;
    let _ = control.set_timeouts(Some(opts.commit_timeout));
    match read_message(&mut leftover.chain(&mut *control)).map_err(|e| wire("commit", e))? {
        Message::Commit => {}
        Message::Failed { reason } => return Err(MigrationError::PeerFailed { reason }),
        other => {
            return Err(MigrationError::Unexpected {
                phase: "commit",
                got: other.name().into(),
            })
        }
    }
    vm.resume().map_err(MigrationError::Resume)
}

/// Tells the source the VM runs here (`Resumed`) and what the digest comparison found. The
/// VM runs whatever happens to this ack; a lost one leaves the source in doubt (paused),
/// never both running.
fn acknowledge_resume(control: &mut Conn, dst_cpu_s: f64, setup_ms: f64, digest_match: bool) {
    let resumed = Resumed {
        dst_cpu_s,
        dst_setup_ms: setup_ms,
        digest_match,
    };
    if let Err(e) = write_message(control, &Message::Resumed(resumed)) {
        warn!(error = %e, "could not acknowledge the resume to the source");
    }
}

/// Logs a failed migration and tells the source why (unless the source said it first).
fn report_failure(control: &mut Conn, e: &MigrationError) {
    warn!(error = %e, "incoming migration failed; VM not resumed");
    if !matches!(
        e,
        MigrationError::PeerFailed { .. } | MigrationError::Incompatible { .. }
    ) {
        // Bounded in total: a stopped source must not hold the abort.
        send_bounded(
            control,
            &Message::Failed {
                reason: format!("destination: {}", crate::error::chain_text(e)),
            },
        );
    }
}

/// Builds the destination's VM for a source's layout: with `None` it allocates memory of its
/// own (a copying transport), with `Some(regions)` it maps the source's memory (handover).
/// The VM must come back paused.
pub type MakeVm<'a, V> =
    Box<dyn FnOnce(&VmLayout, Option<Vec<HandoverRegion>>) -> Result<V, VmError> + 'a>;

/// The destination's VM for [`receive`].
pub enum IncomingVm<'a, V> {
    /// This VM and no other (memory allocated, paused): the source must match its layout,
    /// and a handover is refused (the VM has memory of its own).
    Only(V),
    /// Built before the migration (memory prepared): a copying source must match its
    /// layout; a handover source instead gets a VM made by the function on its memory (this
    /// one is then dropped unused).
    Prepared(V, MakeVm<'a, V>),
    /// Made during setup by the function, from the source's announced layout (counted in
    /// `setup_ms`).
    OnDemand(MakeVm<'a, V>),
}

/// Receives one migration, of any transport, from the first source that connects to
/// `listener`, into the VM `vm` says. Returns the VM, running, and the summary; on error the
/// VM is dropped without ever having been resumed, and the source has been told why.
pub fn receive<V: MigratableVm>(
    listener: &Listener,
    opts: &ReceiveOptions,
    vm: IncomingVm<'_, V>,
) -> Result<(V, ReceiveSummary), MigrationError> {
    // Strays (port scans, garbage, silence) are refused here; the first real Hello wins.
    let (mut control, t0, hello) = accept_source(listener, opts.accept_timeout, opts.io_timeout)?;
    // Setup is timed from the source's arrival (`t0`), not from when we started waiting.
    let cpu0 = thread_cpu_time();
    run_then_report(&mut control, hello, listener, opts, vm, (t0, cpu0))
}

/// [`receive`] on a connection already accepted, whose first frame must be the `Hello`
/// (no accept loop: a first frame that is not a `Hello` fails at once). For the fuzzer and
/// tests that drive one connection; feature `test-utils`.
#[cfg(any(test, feature = "test-utils"))]
pub fn receive_accepted<V: MigratableVm>(
    mut control: Conn,
    listener: &Listener,
    opts: &ReceiveOptions,
    vm: IncomingVm<'_, V>,
) -> Result<(V, ReceiveSummary), MigrationError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    let hello = match crate::deadline::read_message_within(&mut control, opts.io_timeout)
        .map_err(|e| wire("handshake", e))?
    {
        Message::Hello(h) => h,
        other => {
            return Err(MigrationError::Unexpected {
                phase: "handshake",
                got: other.name().into(),
            })
        }
    };
    run_then_report(&mut control, hello, listener, opts, vm, (t0, cpu0))
}

/// The session after the `Hello` ([`run`]); on failure the transport is stopped and the
/// source told why ([`fail_incoming`]). `start` is when the source arrived and the thread's
/// CPU time then.
fn run_then_report<V: MigratableVm>(
    control: &mut Conn,
    hello: Hello,
    listener: &Listener,
    opts: &ReceiveOptions,
    vm: IncomingVm<'_, V>,
    (t0, cpu0): (Instant, f64),
) -> Result<(V, ReceiveSummary), MigrationError> {
    let mut transport: Option<Box<dyn DestTransport>> = None;
    run(control, hello, listener, opts, vm, &mut transport, t0, cpu0)
        .map_err(|e| fail_incoming(control, transport.as_mut(), e))
}

/// Chooses (or builds) the VM for the source's `Hello`, refusing the source with a reason
/// when it cannot, and accepts it. A transport that adopts memory is accepted first (the
/// memory comes after the reply) and its VM is built on that memory.
fn choose_vm<V: MigratableVm>(
    control: &mut Conn,
    layout: &VmLayout,
    kind: crate::TransportKind,
    version: u16,
    vm: IncomingVm<'_, V>,
) -> Result<V, MigrationError> {
    if kind.adopts_memory() {
        let make_vm = match vm {
            IncomingVm::Only(_) => {
                return Err(handshake::refuse(
                    control,
                    "this destination was not started for a handover (it has its own memory)"
                        .into(),
                ))
            }
            IncomingVm::Prepared(_, make_vm) | IncomingVm::OnDemand(make_vm) => make_vm,
        };
        if let Some(reason) = kind.refusal(control, None) {
            return Err(handshake::refuse(control, reason));
        }
        handshake::accept(control, version)?;
        let regions = handover::adopt(control, layout)?;
        let vm = make_vm(layout, Some(regions)).map_err(MigrationError::Adopt)?;
        if let Some(reason) = layout.incompatibility(&vm.layout()) {
            return Err(MigrationError::Incompatible { reason });
        }
        return Ok(vm);
    }
    let vm = match vm {
        IncomingVm::Only(vm) | IncomingVm::Prepared(vm, _) => vm,
        IncomingVm::OnDemand(make_vm) => match make_vm(layout, None) {
            Ok(vm) => vm,
            Err(e) => {
                let reason = format!(
                    "cannot build a VM for this source: {}",
                    crate::error::chain_text(&e)
                );
                return Err(handshake::refuse(control, reason));
            }
        },
    };
    if let Some(reason) = layout.incompatibility(&vm.layout()) {
        return Err(handshake::refuse(control, reason));
    }
    if let Some(reason) = kind.refusal(control, Some(&vm.memory())) {
        return Err(handshake::refuse(control, reason));
    }
    handshake::accept(control, version)?;
    Ok(vm)
}

// Private, called from `receive` only; bundling would only rename the list.
#[allow(clippy::too_many_arguments)]
fn run<V: MigratableVm>(
    control: &mut Conn,
    hello: Hello,
    listener: &Listener,
    opts: &ReceiveOptions,
    vm: IncomingVm<'_, V>,
    transport: &mut Option<Box<dyn DestTransport>>,
    t0: Instant,
    cpu0: f64,
) -> Result<(V, ReceiveSummary), MigrationError> {
    let (hello, version) = handshake::negotiate_hello(control, opts.io_timeout, hello)?;
    let kind = hello.transport;
    let vm = choose_vm(control, &hello.layout, kind, version, vm)?;
    let memory = vm.memory();
    let mem = MemoryView::new(&memory)?;
    // Adopted memory is never copied: no page hash is ever recorded, so there is no table,
    // and its digest (of every page the zero page) is taken now, before the source may pause
    // (building the transport tells it to), rather than inside the downtime (about 0.2 ms per
    // GiB here).
    let adopts = kind.adopts_memory();
    let early_digest = adopts.then(|| PageHashes::untouched_digest(mem.pages()));
    let ctx = RecvCtx {
        hashes: Arc::new(PageHashes::new(if adopts { 0 } else { mem.pages() })),
        mem,
    };
    let t: &mut Box<dyn DestTransport> = transport.insert(kind.destination(DestSetup {
        control,
        listener,
        session: hello.session,
        memory: &memory,
        ctx: &ctx,
        accept_timeout: opts.accept_timeout.unwrap_or(opts.io_timeout),
        io_timeout: opts.io_timeout,
    })?);
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    info!(
        transport = kind.name(),
        version, setup_ms, "incoming migration set up"
    );

    let mut state = None;
    let mut rounds = 0;
    // Frames are read through a buffer: a classic page is one frame, and reading each
    // header and payload with its own system call (and a poll before it) cost more than the
    // page itself. No descriptor travels inside this loop (fd passing is part of setup), and
    // the source writes nothing after `Complete` until it has our `Ready`, so what the
    // buffer holds past `Complete` can only be an abort (`Failed`), read on below.
    let mut rd = BufReader::with_capacity(
        256 * 1024,
        control
            .try_clone()
            .map_err(|e| MigrationError::TransportSetup {
                reason: "cloning the control stream".into(),
                source: Some(e),
            })?,
    );
    let complete = loop {
        if rd.buffer().is_empty() {
            wait_for_control(control, t.as_mut(), opts.io_timeout)?;
        } else {
            // What the poll would have surfaced: a data stream that failed meanwhile.
            t.check()?;
        }
        let msg = read_message(&mut rd).map_err(|e| wire("receiving pages", e))?;
        let Some(msg) = t.on_control(msg, &ctx)? else {
            continue;
        };
        match msg {
            Message::RoundEnd { round, data_bytes } => {
                rounds = round;
                wait_for_data(t.as_mut(), data_bytes, opts.io_timeout)?;
                write_message(control, &Message::RoundAck { round })
                    .map_err(|e| wire("round ack", e))?;
                debug!(round, "round received");
            }
            Message::State(s) => state = Some(s),
            Message::Complete(c) => break c,
            Message::Failed { reason } => return Err(MigrationError::PeerFailed { reason }),
            other => {
                return Err(MigrationError::Unexpected {
                    phase: "receiving pages",
                    got: other.name().into(),
                })
            }
        }
    };
    let leftover = rd.buffer().to_vec();
    drop(rd);
    let stats: PageStats = t.finish()?;
    // For adopted memory nothing was copied: both tables still hold only zero-page hashes,
    // and the comparison proves only that both sides count the same pages.
    let digest = early_digest.unwrap_or_else(|| ctx.hashes.digest());
    let digest_match = digest == complete.digest;
    if !digest_match {
        return Err(MigrationError::Digest {
            source_digest: complete.digest,
            destination_digest: digest,
        });
    }
    if opts.verify_memory && t.copies_pages() {
        verify_memory(&ctx)?;
    }
    restore_commit_resume(&vm, control, &leftover, opts, state)?;
    let dst_cpu_s = thread_cpu_time() - cpu0 + t.worker_cpu_s();
    acknowledge_resume(control, dst_cpu_s, setup_ms, digest_match);
    let summary = ReceiveSummary {
        transport: kind.name().into(),
        setup_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        pages_received: stats.pages,
        zero_pages: stats.zero_pages,
        bytes_received: stats.bytes,
        rounds: complete.rounds.max(rounds),
        dst_cpu_s,
        digest,
        source_digest: complete.digest,
        digest_match,
    };
    info!(
        total_ms = summary.total_ms,
        "incoming migration completed; VM resumed"
    );
    Ok((vm, summary))
}
