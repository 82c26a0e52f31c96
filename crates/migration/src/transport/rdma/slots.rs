//! Registered message buffers for the queue pair's SEND/RECV messages: `rx` receive slots
//! and `tx` send slots of [`MSG_MAX`] bytes each.

use super::verbs::{Link, Mr};
use super::wire::{Msg, MSG_MAX};
use crate::error::MigrationError;

/// Work-request id tags (top bits): the rest is a slot or a sequence number.
pub(crate) const TAG_RECV: u64 = 1 << 63;
pub(crate) const TAG_SEND: u64 = 1 << 62;
pub(crate) const TAG_MASK: u64 = TAG_RECV | TAG_SEND;

pub(crate) struct Slots {
    // Declared before `buf`: deregistered before the buffer is freed.
    mr: Mr,
    /// The buffer. Only touched through raw pointers once registered (the NIC writes it).
    buf: Vec<u8>,
    base: usize,
    rx: usize,
}

fn io(what: &'static str, e: std::io::Error) -> MigrationError {
    MigrationError::TransportSetup {
        reason: what.into(),
        source: Some(e),
    }
}

impl Slots {
    pub(crate) fn new(link: &Link, rx: usize, tx: usize) -> std::io::Result<Self> {
        let mut buf = vec![0u8; (rx + tx) * MSG_MAX];
        let base = buf.as_mut_ptr() as usize;
        // SAFETY: `buf` is a live heap allocation that is never resized and outlives `mr`
        // (field order); it is freed only after `mr` is deregistered.
        let mr = unsafe { link.register(base, buf.len(), true)? };
        Ok(Self { mr, buf, base, rx })
    }

    /// Posts every receive slot.
    pub(crate) fn post_all(&self, link: &Link) -> std::io::Result<()> {
        (0..self.rx).try_for_each(|i| self.post_rx(link, i))
    }

    pub(crate) fn post_rx(&self, link: &Link, i: usize) -> std::io::Result<()> {
        link.post_recv(
            self.base + i * MSG_MAX,
            MSG_MAX as u32,
            self.mr.lkey(),
            TAG_RECV | i as u64,
        )
    }

    /// Decodes the message received in slot `i` (`len` bytes), then posts the slot again.
    pub(crate) fn take_rx(&self, link: &Link, i: usize, len: u32) -> Result<Msg, MigrationError> {
        if i >= self.rx || len as usize > MSG_MAX {
            return Err(MigrationError::Internal {
                what: format!("receive completion for slot {i} of {len} bytes"),
            });
        }
        let mut out = vec![0u8; len as usize];
        // SAFETY: slot `i` lies inside `buf`; its receive completed, so the NIC no longer
        // writes it until we post it again below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + i * MSG_MAX) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        self.post_rx(link, i)
            .map_err(|e| io("posting an RDMA receive", e))?;
        Msg::decode(&out).map_err(|e| crate::error::wire("rdma message", e))
    }

    /// Sends `msg` from send slot `j` (the caller waits for that send's completion, tagged
    /// `TAG_SEND | seq`, before reusing the slot).
    pub(crate) fn send(
        &self,
        link: &Link,
        j: usize,
        msg: &Msg,
        seq: u64,
    ) -> Result<(), MigrationError> {
        let b = msg
            .encode()
            .map_err(|e| crate::error::wire("rdma message", e))?;
        let at = self.base + (self.rx + j) * MSG_MAX;
        if (self.rx + j + 1) * MSG_MAX > self.buf.len() {
            return Err(MigrationError::Internal {
                what: format!("send slot {j} out of range"),
            });
        }
        // SAFETY: slot `j` lies inside `buf` (checked above) and no send from it is in
        // flight (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), at as *mut u8, b.len()) };
        link.post_send(at, b.len() as u32, self.mr.lkey(), TAG_SEND | seq)
            .map_err(|e| io("posting an RDMA send", e))
    }
}
