//! `rdma`: one-sided RDMA WRITEs into the destination's registered guest memory, over the
//! verbs API that InfiniBand and RoCE NICs share (rdma-core's libibverbs and librdmacm).
//!
//! ```text
//! source                                   destination
//!   |== control stream (TCP): Hello ======>|  refuses without a device / without the feature
//!   |-- rdma_cm connect(session, budget, -->|  listens on the control stream's own ip:port
//!   |     QP i of Q), i = 0 .. Q-1         |  (rdma_cm's port space, not the kernel's TCP)
//!   |<------------- accept (each) ---------|  exactly Q of this session; one PD, one CQ
//!   |<-- SEND Setup(chunking, zero map, keys)  registers memory (whole, or on demand)
//!   |== RDMA WRITE runs, batch k on QP k mod Q, signalled every N ==>|  (no destination CPU)
//!   |-- SEND Map(chunk, release) on QP 0 ->|  pin budget: deregister one, register one
//!   |<-- SEND Mapped(chunk, addr, rkey) ---|  (a release first waits for the other QPs)
//!   |== Written(runs) on the control stream, once their WRITEs completed ==>| hash them
//!   |== RoundEnd / State / Complete / Commit: the engine, as for every transport
//!   |-- SEND Done, tear down ------------->|  deregister everything, tear down
//! ```
//!
//! Owns: the RDMA page path, its queue pairs and its memory registrations. Does not own:
//! rounds, the digest, the two-phase end (the engine's, on the control stream).
//! PROTOCOL.md, "Sequence: rdma", explains the choices (queue pairs, control channel,
//! chunking, signalling, verification). Files: `verbs.rs` (safe handles, every `unsafe`),
//! `shim.c` (the C layer), `qps.rs` (the source's queue pairs and completions), `source.rs`
//! (what to write where), `dest.rs`, `wire.rs`, `chunks.rs`, `slots.rs`.
//!
//! Built only with the cargo feature `rdma` (it links libibverbs and librdmacm); without it
//! the transport still exists as a name, and both halves refuse with [`NOT_BUILT`].

use super::{DestSetup, DestTransport, SourceSetup, SourceTransport};
use crate::conn::Conn;
use crate::error::MigrationError;

#[cfg(feature = "rdma")]
mod chunks;
#[cfg(feature = "rdma")]
mod dest;
#[cfg(feature = "rdma")]
mod qps;
#[cfg(feature = "rdma")]
mod slots;
#[cfg(feature = "rdma")]
mod source;
#[cfg(feature = "rdma")]
mod verbs;
#[cfg(feature = "rdma")]
mod wire;

/// Why a build without the `rdma` feature cannot use the transport.
pub const NOT_BUILT: &str = "built without RDMA support (cargo feature `rdma`)";
/// Why a machine without an RDMA device cannot use the transport.
pub const NO_DEVICE: &str = "no RDMA device found; use --transport multi-tcp";

fn setup_err(reason: impl Into<String>) -> MigrationError {
    MigrationError::TransportSetup {
        reason: reason.into(),
        source: None,
    }
}

/// Builds the source half: `pin_budget_mib` caps the registered memory of each side (0: all
/// of it); `qps` queue pairs carry the WRITEs.
pub(crate) fn source(
    s: &SourceSetup<'_>,
    pin_budget_mib: u32,
    qps: u32,
) -> Result<Box<dyn SourceTransport>, MigrationError> {
    #[cfg(feature = "rdma")]
    {
        Ok(Box::new(source::RdmaSource::connect(
            s,
            pin_budget_mib,
            qps,
        )?))
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (s, pin_budget_mib, qps);
        Err(setup_err(NOT_BUILT))
    }
}

/// Builds the destination half.
pub(crate) fn destination(d: DestSetup<'_>) -> Result<Box<dyn DestTransport>, MigrationError> {
    #[cfg(feature = "rdma")]
    {
        Ok(Box::new(dest::RdmaDest::accept(d)?))
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = d;
        Err(setup_err(NOT_BUILT))
    }
}

/// Destination, before accepting: why it cannot receive over RDMA, if it cannot.
pub(crate) fn refusal(control: &Conn) -> Option<String> {
    if control.as_unix().is_some() {
        return Some("rdma needs a host:port endpoint".into());
    }
    #[cfg(feature = "rdma")]
    {
        (verbs::device_count() == 0).then(|| NO_DEVICE.to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        Some(NOT_BUILT.into())
    }
}

/// Hooks for the Soft-RoCE lab (`tests/rdma-lab`): counters, registrations still alive, and
/// injected faults. Process-wide; not for production use.
#[cfg(all(feature = "rdma", feature = "test-utils"))]
pub mod lab {
    pub use super::qps::{counters, set_fault, Counters, Fault};

    /// Memory registrations alive in this process (source and destination halves).
    pub fn live_registrations() -> i64 {
        super::verbs::live_registrations()
    }

    /// The most bytes registered at once in this process since the last call (source and
    /// destination halves); restarts from what is registered now.
    pub fn take_peak_registered() -> u64 {
        super::verbs::take_peak_registered()
    }

    /// RDMA devices on this machine.
    pub fn device_count() -> usize {
        super::verbs::device_count()
    }
}
