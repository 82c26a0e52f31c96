//! `multi-tcp`: N parallel TCP data streams carrying batch descriptors of contiguous runs,
//! sent with `sendmsg` straight from guest memory and received with `readv` straight into the
//! destination's guest memory. Zero pages travel as one bit in the descriptor.
//!
//! Ordering: a page always travels on the same stream (`(page / CHUNK_PAGES) % streams`),
//! and TCP keeps each stream in order, so a page re-sent in a later round can never be
//! overtaken by its older copy. No per-round barrier is needed.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{
    join_worker, merge_worker_results, page_runs, run_worker, split_zero_spans, DestTransport,
    PageStats, RecvCtx, SendCtx, SourceTransport, ZeroTest,
};
use crate::conn::{Conn, Endpoint, Listener};
use crate::digest::zero_page_hash;
use crate::error::{wire, MigrationError};
use crate::guestmem::MemoryView;
use crate::protocol::{
    encode_batch, read_message, write_message, Message, ProtocolError, Run, HEADER_LEN,
    MAX_RUN_PAGES,
};
use crate::rawio::{iovec_of, recv_all, send_all_until};
use crate::util::{thread_cpu_time, CancelToken};
use crate::vm::PAGE_SIZE;

/// Pages per stream-assignment chunk (256 KiB): big enough for long runs, small enough to
/// spread a dirty region over all streams.
const CHUNK_PAGES: usize = 64;
/// Most pages per batch descriptor (1 MiB of data).
const BATCH_PAGES: usize = 256;

fn stream_of(page: usize, streams: usize) -> usize {
    (page / CHUNK_PAGES) % streams
}

/// Source side: one TCP connection per data stream.
pub(crate) struct MultiTcpSource {
    streams: Vec<Conn>,
    cpu_s: f64,
}

impl MultiTcpSource {
    /// Opens `n` data streams to `ep` and introduces each with `DataHello`.
    pub(crate) fn connect(
        ep: &Endpoint,
        n: u32,
        session: u64,
        connect_timeout: std::time::Duration,
        io_timeout: std::time::Duration,
    ) -> Result<Self, MigrationError> {
        let mut streams = Vec::with_capacity(n as usize);
        for stream in 0..n {
            let mut c = Conn::connect(ep, connect_timeout)?;
            c.set_timeouts(Some(io_timeout))
                .map_err(|e| MigrationError::TransportSetup {
                    reason: "setting data stream timeouts".into(),
                    source: Some(e),
                })?;
            write_message(&mut c, &Message::DataHello { session, stream })
                .map_err(|e| wire("handshake", e))?;
            streams.push(c);
        }
        Ok(Self {
            streams,
            cpu_s: 0.0,
        })
    }
}

fn send_err(e: std::io::Error) -> MigrationError {
    wire("sending pages", ProtocolError::Io(e))
}

/// Sends `list` (this stream's share of the pages, ascending) in batches.
fn send_stream(
    conn: &mut Conn,
    mem: &MemoryView,
    list: &[usize],
    ctx: &SendCtx<'_>,
    stop: &CancelToken,
) -> Result<PageStats, MigrationError> {
    let fd = conn.as_raw_fd();
    let io_timeout = conn.write_timeout();
    let mut stats = PageStats::default();
    let mut hdr = Vec::with_capacity(4096);
    let mut runs = Vec::new();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for batch in list.chunks(BATCH_PAGES) {
        if ctx.cancel.is_cancelled() || stop.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        runs.clear();
        spans.clear();
        for (first, count) in page_runs(mem, batch, MAX_RUN_PAGES as usize) {
            let gpa = mem
                .page_gpa(first)
                .ok_or_else(|| MigrationError::Internal {
                    what: format!("page index {first} outside guest memory"),
                })?;
            let mut zero = vec![0u8; count.div_ceil(8)];
            let (mut zeros, mut data) = (0, 0);
            let mut zero_test = ZeroTest::new(mem, first, count);
            split_zero_spans(
                first,
                count,
                |p| zero_test.is_zero(p),
                |p| {
                    let t = p - first;
                    zero[t / 8] |= 1 << (t % 8);
                    ctx.hashes.set(p, zero_page_hash());
                    zeros += 1;
                },
                |s, n| {
                    // Hashed from a copy taken now; if the guest writes the page before the
                    // kernel sends it, the page is dirty and goes again in a later round
                    // (at the latest in stop-and-copy, when both agree).
                    for p in s..s + n {
                        ctx.hashes.set(p, mem.hash_page(p).unwrap_or(0));
                    }
                    data += n as u64;
                    spans.push((s, n));
                    Ok::<_, MigrationError>(())
                },
            )?;
            stats.zero_pages += zeros;
            stats.pages += data;
            runs.push(Run {
                gpa,
                pages: count as u32,
                zero,
            });
        }
        encode_batch(&mut hdr, &runs);
        let mut iovs = Vec::with_capacity(spans.len() + 1);
        iovs.push(iovec_of(&hdr));
        let mut total = hdr.len();
        for &(s, c) in &spans {
            let addr = mem.run_addr(s, c).ok_or_else(|| MigrationError::Internal {
                what: format!("run {s}+{c} crosses a region"),
            })?;
            iovs.push(libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: c * PAGE_SIZE,
            });
            total += c * PAGE_SIZE;
        }
        if let Some(b) = ctx.bucket {
            if !b.take(total, ctx.cancel) {
                return Err(MigrationError::Cancelled);
            }
        }
        // One deadline for the whole batch (1 MiB at most), from the socket's timeout.
        let batch_deadline = io_timeout.map(|t| std::time::Instant::now() + t);
        // SAFETY: the first iovec covers `hdr`, alive for this call; the others come from
        // `run_addr`, which bounds-checks them inside a live guest mapping (MemoryView
        // invariant). The kernel only reads them.
        unsafe { send_all_until(fd, &mut iovs, batch_deadline) }.map_err(send_err)?;
        stats.bytes += total as u64;
        ctx.done_pages
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(stats)
}

impl SourceTransport for MultiTcpSource {
    fn send_pages(
        &mut self,
        mem: &MemoryView,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        let n = self.streams.len();
        let mut lists = vec![Vec::new(); n];
        for &p in pages {
            lists[stream_of(p, n)].push(p);
        }
        // A failing stream stops its siblings at their next batch.
        let stop = CancelToken::new();
        let results: Vec<(Result<PageStats, MigrationError>, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .streams
                .iter_mut()
                .zip(&lists)
                .filter(|(_, l)| !l.is_empty())
                .map(|(conn, list)| {
                    let stop = &stop;
                    s.spawn(move || run_worker(stop, || send_stream(conn, mem, list, ctx, stop)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| join_worker(h, "a sender thread"))
                .collect()
        });
        merge_worker_results(results, ctx.cancel, &mut self.cpu_s)
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        for c in &mut self.streams {
            write_message(c, &Message::EndOfData).map_err(|e| wire("sending pages", e))?;
        }
        Ok(())
    }

    fn worker_cpu_s(&self) -> f64 {
        self.cpu_s
    }
}

type WorkerResult = (Result<PageStats, MigrationError>, f64);

/// Destination side: one receiving thread per data stream, writing straight into memory.
pub(crate) struct MultiTcpDest {
    workers: Vec<JoinHandle<WorkerResult>>,
    results: Vec<WorkerResult>,
    conns: Vec<Conn>,
    /// Bytes received on all data streams so far.
    progress: Arc<AtomicU64>,
}

fn recv_err(e: ProtocolError) -> MigrationError {
    wire("receiving pages", e)
}

fn malformed(reason: String) -> MigrationError {
    wire(
        "receiving pages",
        ProtocolError::Malformed {
            kind: "batch",
            reason,
        },
    )
}

fn recv_stream(
    conn: &mut Conn,
    ctx: &RecvCtx,
    progress: &AtomicU64,
) -> Result<PageStats, MigrationError> {
    let fd = conn.as_raw_fd();
    let mut stats = PageStats::default();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    loop {
        let runs = match read_message(conn).map_err(recv_err)? {
            Message::Batch(runs) => runs,
            Message::EndOfData => return Ok(stats),
            other => {
                return Err(MigrationError::Unexpected {
                    phase: "multi-tcp data stream",
                    got: other.name().into(),
                })
            }
        };
        spans.clear();
        let mut desc = 4usize;
        for run in &runs {
            desc += 12 + run.zero.len();
            let first = ctx
                .mem
                .gpa_to_page(run.gpa)
                .ok_or_else(|| malformed(format!("gpa {:#x} outside guest memory", run.gpa)))?;
            ctx.mem
                .run_addr(first, run.pages as usize)
                .ok_or_else(|| malformed(format!("run at {:#x} crosses a region end", run.gpa)))?;
            let mut span: Option<usize> = None;
            for t in 0..run.pages as usize {
                let p = first + t;
                if run.is_zero(t) {
                    ctx.mem.zero_page(p);
                    ctx.hashes.set(p, zero_page_hash());
                    stats.zero_pages += 1;
                    if let Some(s) = span.take() {
                        spans.push((s, p - s));
                    }
                } else {
                    span.get_or_insert(p);
                }
            }
            if let Some(s) = span {
                spans.push((s, first + run.pages as usize - s));
            }
        }
        let mut iovs = Vec::with_capacity(spans.len());
        let mut data = 0usize;
        for &(s, c) in &spans {
            // Checked above: the whole run lies in one region.
            let addr = ctx
                .mem
                .run_addr(s, c)
                .ok_or_else(|| malformed("run out of range".into()))?;
            iovs.push(libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: c * PAGE_SIZE,
            });
            data += c * PAGE_SIZE;
        }
        // SAFETY: every iovec was bounds-checked by `run_addr` inside the destination's live
        // guest mapping; the destination VM is paused (never resumed before `Commit`), so
        // nothing else touches these pages while the kernel fills them.
        unsafe { recv_all(fd, &mut iovs) }.map_err(|e| {
            recv_err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ProtocolError::Truncated
            } else {
                ProtocolError::Io(e)
            })
        })?;
        for &(s, c) in &spans {
            for p in s..s + c {
                ctx.hashes.set(p, ctx.mem.hash_page(p).unwrap_or(0));
            }
            stats.pages += c as u64;
        }
        stats.bytes += (HEADER_LEN + desc + data) as u64;
        progress.fetch_add((HEADER_LEN + desc + data) as u64, Ordering::Relaxed);
    }
}

impl MultiTcpDest {
    /// Accepts the `n` data streams announced in `Hello` and starts one receiver per stream.
    pub(crate) fn accept(
        listener: &Listener,
        n: u32,
        session: u64,
        accept_timeout: std::time::Duration,
        io_timeout: std::time::Duration,
        ctx: &RecvCtx,
    ) -> Result<Self, MigrationError> {
        let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let mut c = listener.accept(Some(accept_timeout))?;
            c.set_timeouts(Some(io_timeout))
                .map_err(|e| MigrationError::TransportSetup {
                    reason: "setting data stream timeouts".into(),
                    source: Some(e),
                })?;
            match read_message(&mut c).map_err(|e| wire("handshake", e))? {
                Message::DataHello { session: s, stream }
                    if s == session
                        && (stream as usize) < slots.len()
                        && slots[stream as usize].is_none() =>
                {
                    slots[stream as usize] = Some(c);
                }
                other => {
                    return Err(MigrationError::TransportSetup {
                        reason: format!("bad data stream introduction: {}", other.name()),
                        source: None,
                    })
                }
            }
        }
        let progress = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::with_capacity(n as usize);
        let mut conns = Vec::with_capacity(n as usize);
        for mut c in slots.into_iter().flatten() {
            // No per-stream read timeout: with a bandwidth cap a stream may legitimately wait
            // longer than io_timeout between batches. Liveness is judged over all streams by
            // the control loop (`receive::wait_for_control`), which shuts the streams down.
            c.set_timeouts(None)
                .map_err(|e| MigrationError::TransportSetup {
                    reason: "clearing data stream timeouts".into(),
                    source: Some(e),
                })?;
            conns.push(c.try_clone().map_err(|e| MigrationError::TransportSetup {
                reason: "cloning a data stream".into(),
                source: Some(e),
            })?);
            let ctx = ctx.clone();
            let progress = Arc::clone(&progress);
            workers.push(std::thread::spawn(move || {
                let c0 = thread_cpu_time();
                let r = recv_stream(&mut c, &ctx, &progress);
                (r, thread_cpu_time() - c0)
            }));
        }
        Ok(Self {
            workers,
            results: Vec::new(),
            conns,
            progress,
        })
    }

    /// Collects the results of workers that have already stopped.
    fn poll(&mut self) {
        let mut i = 0;
        while i < self.workers.len() {
            if self.workers[i].is_finished() {
                let h = self.workers.swap_remove(i);
                self.results
                    .push(h.join().unwrap_or_else(|_| (Err(panicked()), 0.0)));
            } else {
                i += 1;
            }
        }
    }

    fn first_error(&mut self) -> Option<MigrationError> {
        let i = self.results.iter().position(|(r, _)| r.is_err())?;
        self.results.swap_remove(i).0.err()
    }
}

fn panicked() -> MigrationError {
    MigrationError::Internal {
        what: "a receiver thread panicked".into(),
    }
}

impl DestTransport for MultiTcpDest {
    fn copies_pages(&self) -> bool {
        true
    }

    fn on_control(
        &mut self,
        msg: Message,
        _ctx: &RecvCtx,
    ) -> Result<Option<Message>, MigrationError> {
        // A data stream that already failed is the root cause of whatever the control stream
        // shows next: report it first.
        self.poll();
        if let Some(e) = self.first_error() {
            return Err(e);
        }
        Ok(Some(msg))
    }

    fn finish(&mut self) -> Result<PageStats, MigrationError> {
        for h in self.workers.drain(..) {
            self.results
                .push(h.join().unwrap_or_else(|_| (Err(panicked()), 0.0)));
        }
        if let Some(e) = self.first_error() {
            return Err(e);
        }
        let mut stats = PageStats::default();
        for (r, _) in &self.results {
            if let Ok(s) = r {
                stats.add(*s);
            }
        }
        Ok(stats)
    }

    fn worker_cpu_s(&self) -> f64 {
        self.results.iter().map(|(_, c)| c).sum()
    }

    fn check(&mut self) -> Result<u64, MigrationError> {
        self.poll();
        match self.first_error() {
            Some(e) => Err(e),
            None => Ok(self.progress.load(Ordering::Relaxed)),
        }
    }

    fn abort(&mut self) -> Option<MigrationError> {
        // Errors of workers that stopped by themselves are root causes; errors induced by our
        // shutdown below are not.
        self.poll();
        let root = self.first_error();
        for c in &self.conns {
            c.shutdown();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        root
    }
}

impl Drop for MultiTcpDest {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            let _ = self.abort();
        }
    }
}

#[cfg(test)]
mod stream_tests;
