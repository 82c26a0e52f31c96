//! The destination side.
//!
//! ```text
//! accept ─ ← Hello ─ check version/layout/transport ─ HelloReply → ─ data streams (multi-tcp)
//! loop: pages (any transport) │ RoundEnd │ State │ Complete(digest)
//! wait for every stream ─ compare digests ─ restore state ─ Ready →
//! ← Commit ─ resume ─ Resumed →
//! ```
//!
//! The VM is resumed only after the digest matched, the state was restored and the source
//! said `Commit` (it has given the VM up). Any failure before that returns an error, tells
//! the source `Failed`, and leaves the VM paused for the caller to discard.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::conn::{Conn, Listener};
use crate::digest::PageHashes;
use crate::error::{wire, MigrationError};
use crate::fdpass::recv_frame_with_fds;
use crate::guestmem::GuestMemory;
use crate::protocol::{
    read_message, write_message, Hello, HelloReply, Message, ProtocolError, Resumed,
    PROTOCOL_VERSION,
};
use crate::summary::ReceiveSummary;
use crate::transport::classic::ClassicDest;
use crate::transport::multi_tcp::MultiTcpDest;
use crate::transport::shm::ShmDest;
use crate::transport::{DestTransport, PageStats, RecvCtx};
use crate::util::thread_cpu_time;
use crate::vm::MigratableVm;
use crate::vm::{VmError, VmLayout};
use std::os::fd::OwnedFd;

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

/// Receives one migration into `vm` (memory allocated, VM paused) from the first source that
/// connects to `listener`, and resumes `vm` once it is complete and verified.
pub fn receive<V: MigratableVm + ?Sized>(
    vm: &V,
    listener: &Listener,
    opts: &ReceiveOptions,
) -> Result<ReceiveSummary, MigrationError> {
    let control = listener.accept(opts.accept_timeout)?;
    receive_on(vm, control, listener, opts)
}

/// Like [`receive`] on an already accepted control connection (`listener` is still needed to
/// accept multi-tcp data streams).
pub fn receive_on<V: MigratableVm + ?Sized>(
    vm: &V,
    mut control: Conn,
    listener: &Listener,
    opts: &ReceiveOptions,
) -> Result<ReceiveSummary, MigrationError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    run_reporting_failure(vm, &mut control, listener, opts, t0, cpu0, None)
}

/// [`run`], and on failure [`fail_incoming`]: the source hears why.
fn run_reporting_failure<V: MigratableVm + ?Sized>(
    vm: &V,
    control: &mut Conn,
    listener: &Listener,
    opts: &ReceiveOptions,
    t0: Instant,
    cpu0: f64,
    hello: Option<Hello>,
) -> Result<ReceiveSummary, MigrationError> {
    let mut transport: Option<Box<dyn DestTransport>> = None;
    match run(vm, control, listener, opts, &mut transport, t0, cpu0, hello) {
        Ok(s) => Ok(s),
        Err(e) => Err(fail_incoming(control, transport.as_mut(), e)),
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
    let r: Result<(), _> = Err(e);
    report_failure(control, &r, "migration");
    r.err().unwrap_or(MigrationError::Cancelled)
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
        let mut pfd = libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on our stack, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(wire("receiving pages", ProtocolError::Io(e)));
            }
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

/// Reads the source's `Hello` and refuses a peer of another protocol version.
fn read_hello(control: &mut Conn, opts: &ReceiveOptions) -> Result<Hello, MigrationError> {
    control
        .set_timeouts(Some(opts.io_timeout))
        .map_err(|e| MigrationError::TransportSetup {
            reason: "setting control stream timeouts".into(),
            source: Some(e),
        })?;
    let hello = match read_message(control).map_err(|e| wire("handshake", e))? {
        Message::Hello(h) => h,
        other => {
            return Err(MigrationError::Unexpected {
                phase: "handshake",
                got: other.name().into(),
            })
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(refuse(
            control,
            format!(
                "protocol version mismatch: source speaks {}, destination speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    Ok(hello)
}

fn refuse(control: &mut Conn, reason: String) -> MigrationError {
    let reply = HelloReply {
        version: PROTOCOL_VERSION,
        accepted: false,
        reason: Some(reason.clone()),
    };
    let _ = write_message(control, &Message::HelloReply(reply));
    MigrationError::Incompatible { reason }
}

// Private and called from the two entry points only; bundling would only rename the list.
#[allow(clippy::too_many_arguments)]
fn run<V: MigratableVm + ?Sized>(
    vm: &V,
    control: &mut Conn,
    listener: &Listener,
    opts: &ReceiveOptions,
    transport: &mut Option<Box<dyn DestTransport>>,
    t0: Instant,
    cpu0: f64,
    hello: Option<Hello>,
) -> Result<ReceiveSummary, MigrationError> {
    let hello = match hello {
        Some(h) => h,
        None => read_hello(control, opts)?,
    };
    if let Some(reason) = hello.layout.incompatibility(&vm.layout()) {
        return Err(refuse(control, reason));
    }
    let mem = GuestMemory::new(&vm.memory())?;
    let ctx = RecvCtx {
        hashes: Arc::new(PageHashes::new(mem.pages())),
        mem,
    };
    match hello.transport.as_str() {
        "classic" | "multi-tcp" => {}
        "shm" => {
            if control.as_unix().is_none() {
                return Err(refuse(control, "shm needs a unix: endpoint".into()));
            }
            if vm.memory().iter().any(|r| r.fd.is_none()) {
                return Err(refuse(
                    control,
                    "shm needs memfd-backed guest memory".into(),
                ));
            }
        }
        "handover" => {
            return Err(refuse(
                control,
                "this destination was not started for a handover (it has its own memory)".into(),
            ))
        }
        other => {
            return Err(refuse(
                control,
                format!("transport {other:?} not supported here"),
            ))
        }
    }
    if hello.transport == "multi-tcp" && !(1..=64).contains(&hello.data_streams) {
        return Err(refuse(
            control,
            format!("bad data stream count {}", hello.data_streams),
        ));
    }
    let reply = HelloReply {
        version: PROTOCOL_VERSION,
        accepted: true,
        reason: None,
    };
    write_message(control, &Message::HelloReply(reply)).map_err(|e| wire("handshake", e))?;
    let t: &mut Box<dyn DestTransport> = transport.insert(match hello.transport.as_str() {
        "multi-tcp" => Box::new(MultiTcpDest::accept(
            listener,
            hello.data_streams,
            hello.session,
            opts.accept_timeout.unwrap_or(opts.io_timeout),
            opts.io_timeout,
            &ctx,
        )?),
        "shm" => Box::new(ShmDest::offer(control, &vm.memory())?),
        _ => Box::<ClassicDest>::default(),
    });
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    info!(transport = %hello.transport, setup_ms, "incoming migration set up");

    let mut state = None;
    let mut rounds = 0;
    let complete = loop {
        wait_for_control(control, t.as_mut(), opts.io_timeout)?;
        let msg = read_message(control).map_err(|e| wire("receiving pages", e))?;
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
    let stats: PageStats = t.finish()?;
    let digest = ctx.hashes.digest();
    let digest_match = digest == complete.digest;
    if !digest_match {
        return Err(MigrationError::Digest {
            source_digest: complete.digest,
            destination_digest: digest,
        });
    }
    if opts.verify_memory {
        verify_memory(&ctx)?;
    }
    restore_commit_resume(vm, control, opts, state)?;
    let dst_cpu_s = thread_cpu_time() - cpu0 + t.worker_cpu_s();
    acknowledge_resume(control, dst_cpu_s, setup_ms, digest_match);
    let summary = ReceiveSummary {
        transport: hello.transport,
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
    Ok(summary)
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
/// source's `Commit` (it has given the VM up), and only then resume.
fn restore_commit_resume<V: MigratableVm + ?Sized>(
    vm: &V,
    control: &mut Conn,
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
    match read_message(control).map_err(|e| wire("commit", e))? {
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

/// One region of handed-over guest memory: where it sits in the guest and in its memfd.
#[derive(Debug)]
pub struct HandoverRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memfd (received from the source process; now owned by the caller).
    pub fd: OwnedFd,
    /// Offset of the region inside `fd`.
    pub fd_offset: u64,
}

/// Receives a `handover` migration: the source passes its memory descriptors, `make_vm`
/// builds the new VM on them (nothing is copied), then the state is restored and the VM
/// resumed after `Commit`. For live upgrade of the VMM binary on one host.
///
/// `make_vm` must return a paused VM mapping exactly the given regions. On error the VM it
/// built is dropped without ever being resumed.
pub fn receive_handover<V, F>(
    listener: &Listener,
    opts: &ReceiveOptions,
    make_vm: F,
) -> Result<(V, ReceiveSummary), MigrationError>
where
    V: MigratableVm,
    F: FnOnce(&VmLayout, Vec<HandoverRegion>) -> Result<V, VmError>,
{
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    let mut control = listener.accept(opts.accept_timeout)?;
    let r = handover_run(&mut control, opts, make_vm, t0, cpu0, None);
    report_failure(&mut control, &r, "handover");
    r
}

/// Logs a failed handover and tells the source why (unless the source said it first).
fn report_failure<T>(control: &mut Conn, r: &Result<T, MigrationError>, what: &str) {
    if let Err(e) = r {
        warn!(error = %e, "incoming {what} failed; VM not resumed");
        if !matches!(
            e,
            MigrationError::PeerFailed { .. } | MigrationError::Incompatible { .. }
        ) {
            let _ = control.set_timeouts(Some(Duration::from_millis(300)));
            let _ = write_message(
                control,
                &Message::Failed {
                    reason: format!("destination: {}", crate::error::chain_text(&e)),
                },
            );
        }
    }
}

/// The destination's VM when a source connects to [`receive_any`].
pub enum IncomingVm<V> {
    /// Built before the migration, memory prepared: the source must match its layout.
    Prepared(V),
    /// Not built yet: made during setup from the source's announced layout.
    OnDemand,
}

/// Receives one migration of any transport from the first source that connects.
///
/// The source's `Hello` decides the path. A `handover` builds the VM on the source's own
/// memory with `make_vm(layout, Some(regions))` (a prepared VM is then dropped unused); any
/// other transport uses the prepared VM, or builds one with `make_vm(layout, None)` during
/// setup (counted in `setup_ms`). Returns the VM, running, and the summary; on error the VM
/// is dropped without ever having been resumed.
pub fn receive_any<V, F>(
    listener: &Listener,
    opts: &ReceiveOptions,
    vm: IncomingVm<V>,
    make_vm: F,
) -> Result<(V, ReceiveSummary), MigrationError>
where
    V: MigratableVm,
    F: FnOnce(&VmLayout, Option<Vec<HandoverRegion>>) -> Result<V, VmError>,
{
    let mut control = listener.accept(opts.accept_timeout)?;
    // Setup is timed from the source's arrival, not from when we started waiting.
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    let hello = match read_hello(&mut control, opts) {
        Ok(h) => h,
        Err(e) => {
            let r: Result<(), _> = Err(e);
            report_failure(&mut control, &r, "migration");
            return Err(r.err().unwrap_or(MigrationError::Cancelled));
        }
    };
    if hello.transport == "handover" {
        drop(vm);
        let r = handover_run(
            &mut control,
            opts,
            |layout: &VmLayout, regions| make_vm(layout, Some(regions)),
            t0,
            cpu0,
            Some(hello),
        );
        report_failure(&mut control, &r, "handover");
        return r;
    }
    let vm = match vm {
        IncomingVm::Prepared(vm) => vm,
        IncomingVm::OnDemand => match make_vm(&hello.layout, None) {
            Ok(vm) => vm,
            Err(e) => {
                let reason = format!("cannot build a VM for this source: {e}");
                return Err(refuse(&mut control, reason));
            }
        },
    };
    let summary = run_reporting_failure(&vm, &mut control, listener, opts, t0, cpu0, Some(hello))?;
    Ok((vm, summary))
}

fn handover_run<V, F>(
    control: &mut Conn,
    opts: &ReceiveOptions,
    make_vm: F,
    t0: Instant,
    cpu0: f64,
    hello: Option<Hello>,
) -> Result<(V, ReceiveSummary), MigrationError>
where
    V: MigratableVm,
    F: FnOnce(&VmLayout, Vec<HandoverRegion>) -> Result<V, VmError>,
{
    let hello = match hello {
        Some(h) => h,
        None => read_hello(control, opts)?,
    };
    if hello.transport != "handover" {
        return Err(refuse(
            control,
            format!(
                "this destination expects a handover, not {:?}",
                hello.transport
            ),
        ));
    }
    if control.as_unix().is_none() {
        return Err(refuse(control, "handover needs a unix: endpoint".into()));
    }
    let reply = HelloReply {
        version: PROTOCOL_VERSION,
        accepted: true,
        reason: None,
    };
    write_message(control, &Message::HelloReply(reply)).map_err(|e| wire("handshake", e))?;
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let sock = control.as_unix().ok_or(MigrationError::TransportSetup {
        reason: "not a unix socket".into(),
        source: None,
    })?;
    let (msg, fds) = recv_frame_with_fds(sock).map_err(|e| wire("handover", e))?;
    let Message::MemoryFds(desc) = msg else {
        return Err(MigrationError::Unexpected {
            phase: "handover",
            got: msg.name().into(),
        });
    };
    let matches_layout = desc.len() == fds.len()
        && desc.len() == hello.layout.regions.len()
        && desc
            .iter()
            .zip(&hello.layout.regions)
            .all(|(d, l)| d.gpa == l.gpa && d.size == l.size);
    if !matches_layout {
        return Err(MigrationError::Unexpected {
            phase: "handover",
            got: "memory descriptors that do not match the announced layout".into(),
        });
    }
    let regions = desc
        .iter()
        .zip(fds)
        .map(|(d, fd)| HandoverRegion {
            gpa: d.gpa,
            size: d.size,
            fd,
            fd_offset: d.fd_offset,
        })
        .collect();
    let vm = make_vm(&hello.layout, regions).map_err(MigrationError::Adopt)?;
    if let Some(reason) = hello.layout.incompatibility(&vm.layout()) {
        return Err(MigrationError::Incompatible { reason });
    }
    // The VM is built on the shared memory while the source still runs it; only now does the
    // source pause, so building it stays out of the downtime.
    write_message(control, &Message::RoundAck { round: 0 }).map_err(|e| wire("handover", e))?;
    let mut state = None;
    let complete = loop {
        match read_message(control).map_err(|e| wire("handover", e))? {
            Message::State(s) => state = Some(s),
            Message::Complete(c) => break c,
            Message::Failed { reason } => return Err(MigrationError::PeerFailed { reason }),
            other => {
                return Err(MigrationError::Unexpected {
                    phase: "handover",
                    got: other.name().into(),
                })
            }
        }
    };
    // Nothing was copied, so both page-hash tables still hold only zero-page hashes: the
    // comparison proves only that both sides count the same pages (the memory is one object).
    let digest = PageHashes::new(hello.layout.pages() as usize).digest();
    let digest_match = digest == complete.digest;
    if !digest_match {
        return Err(MigrationError::Digest {
            source_digest: complete.digest,
            destination_digest: digest,
        });
    }
    restore_commit_resume(&vm, control, opts, state)?;
    let dst_cpu_s = thread_cpu_time() - cpu0;
    acknowledge_resume(control, dst_cpu_s, setup_ms, digest_match);
    let summary = ReceiveSummary {
        transport: "handover".into(),
        setup_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        pages_received: 0,
        zero_pages: 0,
        bytes_received: 0,
        rounds: complete.rounds,
        dst_cpu_s,
        digest,
        source_digest: complete.digest,
        digest_match,
    };
    info!(
        total_ms = summary.total_ms,
        "handover completed; VM resumed"
    );
    Ok((vm, summary))
}
