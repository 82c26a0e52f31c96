//! `classic`: every page in its own frame on the control stream, as 2011 hypervisors did.

use std::io::{BufWriter, Write};

use super::{DestTransport, PageStats, RecvCtx, SendCtx, SourceTransport};
use crate::conn::Conn;
use crate::deadline::Paced;
use crate::digest::{hash_page_bytes, zero_page_hash};
use crate::error::{wire, MigrationError};
use crate::guestmem::MemoryView;
use crate::protocol::{encode_page, Message, ProtocolError};
use crate::vm::PAGE_SIZE;

/// Source side: writes page frames on a clone of the control stream.
pub(crate) struct ClassicSource {
    conn: Conn,
}

impl ClassicSource {
    pub(crate) fn new(control: &Conn) -> Result<Self, MigrationError> {
        let conn = control
            .try_clone()
            .map_err(|e| MigrationError::TransportSetup {
                reason: "cloning the control stream".into(),
                source: Some(e),
            })?;
        Ok(Self { conn })
    }
}

fn send_err(e: std::io::Error) -> MigrationError {
    wire("sending pages", ProtocolError::Io(e))
}

impl SourceTransport for ClassicSource {
    fn send_pages(
        &mut self,
        mem: &MemoryView,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        let mut stats = PageStats::default();
        let mut frame = Vec::with_capacity(PAGE_SIZE + 64);
        let mut page = [0u8; PAGE_SIZE];
        // Each 256 KiB flush is due within the socket's timeout as a whole (see `Until`).
        let within = self.conn.write_timeout();
        let mut out = BufWriter::with_capacity(256 * 1024, Paced::new(&mut self.conn, within));
        for (i, &p) in pages.iter().enumerate() {
            if i % 64 == 0 && ctx.cancel.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let gpa = mem.page_gpa(p).ok_or_else(|| MigrationError::Internal {
                what: format!("page index {p} outside guest memory"),
            })?;
            if mem.is_zero_page(p) {
                encode_page(&mut frame, gpa, None);
                ctx.hashes.set(p, zero_page_hash());
                stats.zero_pages += 1;
            } else {
                mem.read_page(p, &mut page);
                ctx.hashes.set(p, hash_page_bytes(&page));
                encode_page(&mut frame, gpa, Some(&page));
                stats.pages += 1;
            }
            if let Some(b) = ctx.bucket {
                if !b.take(frame.len(), ctx.cancel) {
                    return Err(MigrationError::Cancelled);
                }
            }
            out.write_all(&frame).map_err(send_err)?;
            stats.bytes += frame.len() as u64;
            if i % 64 == 63 {
                ctx.done_pages
                    .store(i as u64 + 1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        out.flush().map_err(send_err)?;
        Ok(stats)
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }
}

/// Destination side: applies page frames as they arrive on the control stream.
#[derive(Default)]
pub(crate) struct ClassicDest {
    stats: PageStats,
}

impl DestTransport for ClassicDest {
    fn copies_pages(&self) -> bool {
        true
    }

    fn on_control(
        &mut self,
        msg: Message,
        ctx: &RecvCtx,
    ) -> Result<Option<Message>, MigrationError> {
        let Message::Page { gpa, data } = msg else {
            return Ok(Some(msg));
        };
        let page = ctx.mem.gpa_to_page(gpa).ok_or_else(|| {
            wire(
                "receiving pages",
                ProtocolError::Malformed {
                    kind: "page",
                    reason: format!("gpa {gpa:#x} outside guest memory"),
                },
            )
        })?;
        match data {
            None => {
                ctx.mem.zero_page(page);
                ctx.hashes.set(page, zero_page_hash());
                self.stats.zero_pages += 1;
                self.stats.bytes += 24;
            }
            Some(d) => {
                let d: &[u8; PAGE_SIZE] = d.as_slice().try_into().map_err(|_| {
                    wire(
                        "receiving pages",
                        ProtocolError::Malformed {
                            kind: "page",
                            reason: "wrong page length".into(),
                        },
                    )
                })?;
                ctx.mem.write_page(page, d);
                ctx.hashes.set(page, hash_page_bytes(d));
                self.stats.pages += 1;
                self.stats.bytes += (24 + PAGE_SIZE) as u64;
            }
        }
        Ok(None)
    }

    fn finish(&mut self) -> Result<PageStats, MigrationError> {
        Ok(self.stats)
    }

    fn worker_cpu_s(&self) -> f64 {
        0.0
    }

    fn check(&mut self) -> Result<u64, MigrationError> {
        // Pages travel on the control stream itself: nothing else to watch.
        Ok(0)
    }

    fn abort(&mut self) -> Option<MigrationError> {
        None
    }
}
