//! `handover`: the memory itself changes hands, nothing is copied (VMM upgrade on one host).
//!
//! Its two hooks are what makes it a transport like the others:
//! * source, before the pause ([`SourceTransport::before_pause`]): pass the memfds
//!   (`MemoryFds` + `SCM_RIGHTS`) while the VM still runs, and wait until the destination has
//!   built its VM on them (`RoundAck(0)`), so that building it is not downtime; there is no
//!   pre-copy and no dirty log ([`SourceTransport::precopy`] is false);
//! * destination, adopting memory ([`adopt`]): receive the memfds and hand them to the
//!   caller's constructor, instead of using a VM with memory of its own.
//!
//! The destination never runs the shared memory before `Commit` (it is only restored), so
//! sharing it early is safe.

use std::os::fd::OwnedFd;

use super::{DestTransport, PageStats, RecvCtx, SendCtx, SourceTransport};
use crate::conn::Conn;
use crate::error::{wire, MigrationError};
use crate::fdpass::{recv_memory, send_memory};
use crate::guestmem::MemoryView;
use crate::protocol::{read_message, write_message, Message};
use crate::vm::{MemoryRegion, VmLayout};

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

fn unix(control: &Conn) -> Result<&std::os::unix::net::UnixStream, MigrationError> {
    control
        .as_unix()
        .ok_or_else(|| MigrationError::TransportSetup {
            reason: "handover needs a unix: endpoint".into(),
            source: None,
        })
}

/// Source half: nothing per page; the memory goes over before the pause.
pub(crate) struct HandoverSource;

impl SourceTransport for HandoverSource {
    fn precopy(&self) -> bool {
        false
    }

    fn before_pause(
        &mut self,
        control: &mut Conn,
        memory: &[MemoryRegion],
    ) -> Result<(), MigrationError> {
        send_memory(unix(control)?, memory)?;
        match read_message(control).map_err(|e| wire("handover", e))? {
            Message::RoundAck { round: 0 } => Ok(()),
            Message::Failed { reason } => Err(MigrationError::PeerFailed { reason }),
            other => Err(MigrationError::Unexpected {
                phase: "handover",
                got: other.name().into(),
            }),
        }
    }

    fn send_pages(
        &mut self,
        _: &MemoryView,
        pages: &[usize],
        _: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        // The engine never asks (no pre-copy); pages would have nowhere to go.
        match pages.is_empty() {
            true => Ok(PageStats::default()),
            false => Err(MigrationError::Internal {
                what: "pages sent over a handover".into(),
            }),
        }
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }
}

/// Destination, adopting: receives the source's memfds, checked against its `layout`.
pub(crate) fn adopt(
    control: &mut Conn,
    layout: &VmLayout,
) -> Result<Vec<HandoverRegion>, MigrationError> {
    let offered = recv_memory(unix(control)?, layout, "handover")?;
    Ok(offered
        .into_iter()
        .map(|(d, fd)| HandoverRegion {
            gpa: d.gpa,
            size: d.size,
            fd,
            fd_offset: d.fd_offset,
        })
        .collect())
}

/// Destination half, once the VM is built on the adopted memory: says so (`RoundAck(0)`, the
/// source may pause now), then only control frames follow.
pub(crate) struct HandoverDest;

impl HandoverDest {
    pub(crate) fn built(control: &mut Conn) -> Result<Self, MigrationError> {
        write_message(control, &Message::RoundAck { round: 0 }).map_err(|e| wire("handover", e))?;
        Ok(Self)
    }
}

impl DestTransport for HandoverDest {
    fn copies_pages(&self) -> bool {
        false
    }

    fn on_control(&mut self, msg: Message, _: &RecvCtx) -> Result<Option<Message>, MigrationError> {
        Ok(Some(msg))
    }

    fn finish(&mut self) -> Result<PageStats, MigrationError> {
        Ok(PageStats::default())
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }

    fn check(&mut self) -> Result<u64, MigrationError> {
        Ok(0)
    }

    fn abort(&mut self) -> Option<MigrationError> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::PageHashes;
    use crate::test_utils::SoftVm;
    use crate::util::CancelToken;
    use crate::vm::MigratableVm;

    /// The engine never gives a handover pages to send (no pre-copy); if it did, they would
    /// have nowhere to go, so the call must fail rather than report them sent.
    #[test]
    fn pages_given_to_a_handover_source_are_an_error_not_a_silent_loss() {
        let vm = SoftVm::new(1 << 20).expect("vm");
        let mem = MemoryView::new(&vm.memory()).expect("memory view");
        let hashes = PageHashes::new(mem.pages());
        let (cancel, done) = (CancelToken::new(), std::sync::atomic::AtomicU64::new(0));
        let ctx = SendCtx {
            hashes: &hashes,
            bucket: None,
            cancel: &cancel,
            done_pages: &done,
        };
        let mut t = HandoverSource;
        assert_eq!(
            t.send_pages(&mem, &[], &ctx).ok(),
            Some(PageStats::default())
        );
        let r = t.send_pages(&mem, &[0, 1], &ctx);
        assert!(
            matches!(r, Err(MigrationError::Internal { ref what }) if what.contains("handover")),
            "{r:?}"
        );
    }
}
