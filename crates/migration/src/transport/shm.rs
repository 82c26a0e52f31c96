//! `shm`: one-sided remote write between two processes on one host (RDMA-write semantics).
//!
//! The destination passes its memfd(s) over the Unix control socket (`SCM_RIGHTS`); the
//! source maps them and copies dirty pages straight into the destination's guest memory.
//! Only small `Written` frames cross the socket, telling the destination which pages changed
//! so it can keep its page-hash table (hashing its own memory) for the digest.
//!
//! Where the time goes, and what is done about it (PROTOCOL.md, "Sequence: shm"):
//! * page faults: a fresh mapping faults on every first write (~1-2 us a page here, as much
//!   as the copy); the copy threads populate each run's page tables just before the full pass
//!   copies it, one read per fault-around window (16 pages by default), one thread populating
//!   while the other copies;
//! * unmapping: the mapping takes no recency tracking (`MADV_RANDOM`), so the unmap at the
//!   end does not move each page on the kernel's LRU lists; the engine counts the unmap in
//!   the migration's CPU;
//! * copy and hash: runs of pages are copied 8 pages at a time and each piece hashed in place
//!   right after (from the first-level cache, no bounce buffer), by up to two threads;
//! * zero pages: skipped in the first pass when zero on both sides (checked, not assumed).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tracing::debug;

use super::{
    join_worker, merge_worker_results, page_runs, record_written, run_worker, split_zero_spans,
    DestTransport, PageStats, RecvCtx, SendCtx, SourceTransport, ZeroTest,
};
use crate::conn::Conn;
use crate::deadline::PeerReads;
use crate::digest::zero_page_hash;
use crate::error::{wire, MigrationError};
use crate::fdpass::{recv_memory, send_memory};
use crate::guestmem::MemoryView;
use crate::protocol::{encode, Message, ProtocolError};
use crate::util::CancelToken;
use crate::vm::{MemoryRegion, VmLayout, PAGE_SIZE};

/// Pages copied between two `Written` notifications (and token-bucket requests); also the
/// unit of work handed to a copy thread.
const NOTIFY_PAGES: usize = 512;
/// Most copy threads per round. A second thread uses a second core when one is free (copy and
/// hash are CPU-bound here, ~0.3 CPU s per GiB); more would only take CPU from the guest and
/// the destination, which hashes what we copy. On the shared 2-core bench machine one and two
/// threads measured within noise of each other.
const MAX_COPY_THREADS: usize = 2;
/// Pages copied before they are hashed: 32 KiB, within a core's first-level data cache.
const COPY_HASH_PAGES: usize = 8;

fn copy_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_COPY_THREADS)
}

fn setup_err(reason: impl Into<String>) -> MigrationError {
    MigrationError::TransportSetup {
        reason: reason.into(),
        source: None,
    }
}

/// The destination's memory, mapped into the source process.
pub(crate) struct ShmSource {
    control: Conn,
    remote: MemoryView,
    maps: Vec<(usize, usize)>,
    /// Copy threads per `send_pages` call.
    threads: usize,
    /// Pages one read fault maps in `remote` ([`fault_around_pages`]).
    fault_window: usize,
    /// The first call (the full pass) has been made.
    first_pass_done: bool,
    /// CPU seconds of the copy threads (when more than one).
    cpu_s: f64,
    /// Fails a send once the destination stops reading the control stream.
    reads: PeerReads,
}

/// The control stream as the copy threads share it.
struct ControlOut<'a> {
    conn: &'a mut Conn,
    reads: &'a mut PeerReads,
}

impl ShmSource {
    /// Receives the destination's memory descriptors and maps them.
    pub(crate) fn open(control: &Conn, layout: &VmLayout) -> Result<Self, MigrationError> {
        let sock = control
            .as_unix()
            .ok_or_else(|| setup_err("shm needs a unix: endpoint"))?;
        let offered = recv_memory(sock, layout, "shm setup")?;
        let mut me = Self {
            control: clone(control)?,
            remote: MemoryView::new(&[]).map_err(MigrationError::Memory)?,
            maps: Vec::new(),
            threads: copy_threads(),
            fault_window: 1,
            first_pass_done: false,
            cpu_s: 0.0,
            reads: PeerReads::new(control.write_timeout()),
        };
        let mut mrs = Vec::new();
        let started = std::time::Instant::now();
        for (r, fd) in &offered {
            let addr = map_shared(fd, r.size as usize, r.fd_offset)?;
            me.maps.push((addr, r.size as usize));
            mrs.push(MemoryRegion {
                gpa: r.gpa,
                size: r.size,
                host_addr: addr,
                fd: None,
                fd_offset: 0,
            });
        }
        me.remote = MemoryView::new(&mrs)?;
        if let Some(&(addr, len)) = me.maps.iter().max_by_key(|&&(_, len)| len) {
            me.fault_window = fault_around_pages(addr, len);
        }
        let map_ms = started.elapsed().as_secs_f64() * 1e3;
        debug!(
            map_ms,
            fault_window = me.fault_window,
            "destination memory mapped"
        );
        Ok(me)
    }
}

#[cfg(test)]
impl ShmSource {
    /// A source writing into `remote` directly (no fd passing), for unit tests.
    fn from_parts(control: Conn, remote: MemoryView, threads: usize) -> Self {
        Self {
            control,
            remote,
            maps: Vec::new(),
            threads,
            fault_window: 1,
            first_pass_done: false,
            cpu_s: 0.0,
            reads: PeerReads::new(None),
        }
    }
}

fn clone(c: &Conn) -> Result<Conn, MigrationError> {
    c.try_clone().map_err(|e| MigrationError::TransportSetup {
        reason: "cloning the control stream".into(),
        source: Some(e),
    })
}

fn map_shared(fd: &OwnedFd, len: usize, offset: u64) -> Result<usize, MigrationError> {
    // Touching a mapping past the end of the file raises SIGBUS and would kill the source
    // (and its VM): check the peer's memfd really is that large.
    let st = rustix::fs::fstat(fd).map_err(|e| MigrationError::TransportSetup {
        reason: "fstat on the destination's memory".into(),
        source: Some(e.into()),
    })?;
    if (st.st_size as u64) < offset.saturating_add(len as u64) {
        return Err(setup_err(format!(
            "destination memfd has {} bytes, region needs {} at offset {offset}",
            st.st_size, len
        )));
    }
    // SAFETY: a fresh MAP_SHARED mapping chosen by the kernel (null hint) cannot overlap any
    // Rust object; `fd` is a valid descriptor for the call's duration.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MigrationError::TransportSetup {
            reason: "mapping the destination's memory".into(),
            source: Some(std::io::Error::last_os_error()),
        });
    }
    // No recency tracking on this mapping: otherwise unmapping it at the end marks each of
    // the destination's pages accessed and moves it on the kernel's LRU lists, one lock round
    // trip per page (about half the cost of the unmap, measured). A hint: nothing depends on it.
    // SAFETY: advice on the mapping just created; it changes no byte.
    unsafe { libc::madvise(p, len, libc::MADV_RANDOM) };
    Ok(p as usize)
}

/// Builds the page tables of `addr .. addr + len`, a run of the destination's mapping, just
/// before the full pass copies into it. Otherwise every first copy into a page takes a write
/// fault (about 1-2 us here, as much as the copy itself), since shared write faults map one
/// page each. A read fault instead maps the whole aligned window of `window` pages around it
/// (the kernel's fault-around, learnt by [`fault_around_pages`]) when the destination's pages
/// exist; shmem needs no write notification, so the entries are writable at once. So one
/// byte is read per window (and at the run's start), not per page: a read per page waited
/// for each page's first line from memory and cost as much CPU as the copy. A page the
/// fault-around did not map takes its write fault in the copy, which is only slower. Done
/// run by run by the copy threads, so one thread's populating overlaps the other's copying.
/// Not `MADV_POPULATE_READ`: it walks the pages as `get_user_pages`, which marks each one
/// accessed and moves it on the kernel's LRU lists under a lock (about 9 % more CPU for the
/// whole migration, measured).
fn populate(addr: usize, len: usize, window: usize) {
    let window_bytes = window.max(1) * PAGE_SIZE;
    let mut at = addr;
    while at < addr + len {
        // SAFETY: `at` lies inside the caller's live mapping (of a file checked to be large
        // enough in `map_shared`); a volatile read of one byte faults the page in and
        // changes nothing.
        unsafe { std::ptr::read_volatile(at as *const u8) };
        at = (at + 1).next_multiple_of(window_bytes);
    }
}

/// Pages the kernel maps on one read fault in the mapping `addr .. addr + len` (its
/// fault-around window, 16 by default): found by faulting the first page of an aligned
/// 64-page window and counting the pages of the window then present in the page tables
/// (`/proc/self/pagemap`, which needs no privilege for that bit). 1 if it cannot tell, which
/// makes [`populate`] read every page.
fn fault_around_pages(addr: usize, len: usize) -> usize {
    const PROBE: usize = 64;
    let start = addr.next_multiple_of(PROBE * PAGE_SIZE);
    if start + PROBE * PAGE_SIZE > addr + len {
        return 1;
    }
    // SAFETY: `start` lies inside the live mapping (checked above); a volatile one-byte read
    // changes nothing.
    unsafe { std::ptr::read_volatile(start as *const u8) };
    let mut entries = [0u8; PROBE * 8];
    let read = std::fs::File::open("/proc/self/pagemap").and_then(|f| {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut entries, (start / PAGE_SIZE * 8) as u64)
    });
    if read.is_err() {
        return 1;
    }
    let present = entries
        .chunks_exact(8)
        .take_while(|e| e[7] & 0x80 != 0) // bit 63: page present
        .count();
    // The kernel's window is a power of two; a shorter count means holes in the file.
    if present == 0 {
        1
    } else {
        1 << present.ilog2()
    }
}

impl Drop for ShmSource {
    fn drop(&mut self) {
        for &(addr, len) in &self.maps {
            // SAFETY: unmapping a mapping this struct created; `remote` (which points into it)
            // dies with the struct and no copy is in flight (`send_pages` borrows `self`).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

impl SourceTransport for ShmSource {
    fn send_pages(
        &mut self,
        mem: &MemoryView,
        pages: &[usize],
        ctx: &SendCtx<'_>,
    ) -> Result<PageStats, MigrationError> {
        let first_pass = !self.first_pass_done;
        self.first_pass_done = true;
        let chunks: Vec<&[usize]> = pages.chunks(NOTIFY_PAGES).collect();
        let next = AtomicUsize::new(0);
        let stop = CancelToken::new();
        let control = Mutex::new(ControlOut {
            conn: &mut self.control,
            reads: &mut self.reads,
        });
        let job = CopyJob {
            mem,
            remote: &self.remote,
            chunks: &chunks,
            next: &next,
            stop: &stop,
            control: &control,
            ctx,
            first_pass,
            fault_window: self.fault_window,
        };
        let threads = self.threads.min(chunks.len()).max(1);
        let results: Vec<(Result<PageStats, MigrationError>, f64)> = if threads == 1 {
            // The calling thread's CPU time is already counted by the engine.
            vec![(job.run(), 0.0)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let job = &job;
                        s.spawn(move || run_worker(job.stop, || job.run()))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| join_worker(h, "a copy thread"))
                    .collect()
            })
        };
        merge_worker_results(results, ctx.cancel, &mut self.cpu_s)
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        Ok(())
    }

    fn worker_cpu_s(&self) -> f64 {
        self.cpu_s
    }

    fn peer_quiet_since(&self) -> Option<std::time::Instant> {
        self.reads.quiet_since()
    }
}

/// One `send_pages` call, shared by the copy threads: each takes the next chunk of
/// `NOTIFY_PAGES` pages, copies it and names it in one `Written` frame.
struct CopyJob<'a> {
    mem: &'a MemoryView,
    remote: &'a MemoryView,
    chunks: &'a [&'a [usize]],
    next: &'a AtomicUsize,
    /// Set by a failing thread so that its sibling stops at its next chunk.
    stop: &'a CancelToken,
    control: &'a Mutex<ControlOut<'a>>,
    ctx: &'a SendCtx<'a>,
    /// The full first pass: zero pages may be skipped where the destination is zero too.
    first_pass: bool,
    /// Pages one read fault maps in `remote`.
    fault_window: usize,
}

impl CopyJob<'_> {
    fn run(&self) -> Result<PageStats, MigrationError> {
        let mut stats = PageStats::default();
        let mut written: Vec<(u64, u32)> = Vec::new();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = self.chunks.get(i) else {
                return Ok(stats);
            };
            if self.ctx.cancel.is_cancelled() || self.stop.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if let Some(b) = self.ctx.bucket {
                if !b.take(chunk.len() * PAGE_SIZE, self.ctx.cancel) {
                    return Err(MigrationError::Cancelled);
                }
            }
            written.clear();
            // Runs: consecutive page indices inside one region (contiguous on both sides).
            for (first, count) in page_runs(self.mem, chunk, usize::MAX) {
                self.copy_run(first, count, &mut written, &mut stats)?;
            }
            if !written.is_empty() {
                let f = encode(&Message::Written(std::mem::take(&mut written)));
                let mut control = self
                    .control
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let ControlOut { conn, reads } = &mut *control;
                conn.write_all(&f)
                    .and_then(|_| reads.after_write(conn, f.len()))
                    .map_err(|e| wire("sending pages", ProtocolError::Io(e)))?;
                stats.bytes += f.len() as u64;
            }
            self.ctx
                .done_pages
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }

    /// Copies pages `first .. first + count` (one region) into the destination's memory,
    /// records their hashes, and appends the copied spans to `written`.
    fn copy_run(
        &self,
        first: usize,
        count: usize,
        written: &mut Vec<(u64, u32)>,
        stats: &mut PageStats,
    ) -> Result<(), MigrationError> {
        let outside = || MigrationError::Internal {
            what: format!("run {first}+{count} outside memory"),
        };
        let (Some(from), Some(to), Some(gpa)) = (
            self.mem.run_addr(first, count),
            self.remote.run_addr(first, count),
            self.remote.page_gpa(first),
        ) else {
            return Err(outside());
        };
        if self.first_pass {
            populate(to, count * PAGE_SIZE, self.fault_window);
        }
        let mut zeros = 0;
        // In the first pass a page that is zero here *and* there needs no copy: the
        // destination's table starts at the zero-page hash for every page. Both sides are
        // checked, nothing is assumed about the destination's memory. A page the guest writes
        // after our check is dirty and copied in a later round.
        let mut zero_here = ZeroTest::new(self.mem, first, count);
        let skip = |p| self.first_pass && zero_here.is_zero(p) && self.remote.is_zero_page(p);
        let skipped = |p| {
            self.ctx.hashes.set(p, zero_page_hash());
            zeros += 1;
        };
        split_zero_spans(first, count, skip, skipped, |s, n| {
            let off = (s - first) * PAGE_SIZE;
            // Copied and hashed a few pages at a time, so that the hash reads what was just
            // written from the core's first-level cache, not from further out.
            for piece in (s..s + n).step_by(COPY_HASH_PAGES) {
                let k = COPY_HASH_PAGES.min(s + n - piece);
                let at = (piece - first) * PAGE_SIZE;
                // SAFETY: `run_addr` bounds-checked both runs inside live mappings (ours per
                // the MemoryView invariant, the destination's mapped in `open`); they are
                // distinct mappings. The destination VM is paused until Commit and each page
                // belongs to one copy thread, so nothing else writes `to`; the guest may write
                // `from`, which only makes the page dirty again.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (from + at) as *const u8,
                        (to + at) as *mut u8,
                        k * PAGE_SIZE,
                    )
                };
                // Hash what landed, read back from the destination's memory.
                for p in piece..piece + k {
                    // SAFETY: only this thread writes page `p` of the destination's memory
                    // (see above) and it is done writing it.
                    let h = unsafe { self.remote.hash_page_unshared(p) }.ok_or_else(outside)?;
                    self.ctx.hashes.set(p, h);
                }
            }
            // One entry per span: spans of one run are split by zero pages, and runs by
            // gaps or region ends, so no two are ever adjacent to merge.
            written.push((gpa + off as u64, n as u32));
            stats.pages += n as u64;
            stats.bytes += (n * PAGE_SIZE) as u64;
            Ok::<_, MigrationError>(())
        })?;
        stats.zero_pages += zeros;
        Ok(())
    }
}

/// Destination side: offers its memory, then tracks `Written` notifications.
pub(crate) struct ShmDest {
    stats: PageStats,
}

impl ShmDest {
    /// Sends the memory descriptors of `regions` to the source.
    pub(crate) fn offer(control: &Conn, regions: &[MemoryRegion]) -> Result<Self, MigrationError> {
        let sock = control
            .as_unix()
            .ok_or_else(|| setup_err("shm needs a unix: endpoint"))?;
        send_memory(sock, regions)?;
        Ok(Self {
            stats: PageStats::default(),
        })
    }
}

impl DestTransport for ShmDest {
    fn copies_pages(&self) -> bool {
        true
    }

    fn on_control(
        &mut self,
        msg: Message,
        ctx: &RecvCtx,
    ) -> Result<Option<Message>, MigrationError> {
        record_written(msg, ctx, &mut self.stats)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{hash_page_bytes, PageHashes};
    use crate::protocol::read_message;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicU64;

    /// Page-aligned anonymous memory of `pages` pages, unmapped on drop.
    struct Anon {
        addr: usize,
        len: usize,
    }

    impl Anon {
        fn new(pages: usize) -> Self {
            let len = pages * PAGE_SIZE;
            // SAFETY: a fresh private anonymous mapping chosen by the kernel.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            Self {
                addr: p as usize,
                len,
            }
        }

        fn mem(&self) -> MemoryView {
            MemoryView::new(&[MemoryRegion {
                gpa: 0,
                size: self.len as u64,
                host_addr: self.addr,
                fd: None,
                fd_offset: 0,
            }])
            .expect("aligned")
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping; every MemoryView over it is gone by now.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    fn page_of(byte: u8) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        p[17] = byte;
        p
    }

    /// Every page named by the `Written` frames waiting on `rx`.
    fn written(rx: &mut UnixStream) -> Vec<usize> {
        rx.set_nonblocking(true).expect("nonblocking");
        let mut pages = Vec::new();
        while let Ok(Message::Written(runs)) = read_message(rx) {
            for (gpa, n) in runs {
                let first = (gpa / PAGE_SIZE as u64) as usize;
                pages.extend(first..first + n as usize);
            }
        }
        rx.set_nonblocking(false).expect("blocking");
        pages.sort_unstable();
        pages
    }

    fn send(t: &mut ShmSource, src: &MemoryView, pages: &[usize], h: &PageHashes) -> PageStats {
        let cancel = CancelToken::new();
        let done = AtomicU64::new(0);
        let ctx = SendCtx {
            hashes: h,
            bucket: None,
            cancel: &cancel,
            done_pages: &done,
        };
        let stats = t.send_pages(src, pages, &ctx).expect("send");
        assert_eq!(done.load(Ordering::Relaxed), pages.len() as u64);
        stats
    }

    #[test]
    fn zero_pages_skipped_only_in_first_pass_and_only_where_both_sides_are_zero() {
        for threads in [1, 2] {
            let pages = 2000; // several chunks, so two threads really share the work
            let (src_buf, dst_buf) = (Anon::new(pages), Anon::new(pages));
            let (src, dst) = (src_buf.mem(), dst_buf.mem());
            // Source: every third page non-zero. Destination: zero except page 1 and 4.
            for p in (0..pages).step_by(3) {
                assert!(src.write_page(p, &page_of(p as u8 | 1)));
            }
            assert!(dst.write_page(1, &page_of(9)));
            assert!(dst.write_page(4, &page_of(9)));
            let (a, mut b) = UnixStream::pair().expect("socketpair");
            let mut t = ShmSource::from_parts(Conn::Unix(a), dst.clone(), threads);
            let h = PageHashes::new(pages);

            let all: Vec<usize> = (0..pages).collect();
            let st = send(&mut t, &src, &all, &h);
            let named = written(&mut b);
            // Copied: the non-zero source pages, plus pages 1 and 4 (zero here, not there).
            let mut expect: Vec<usize> = (0..pages).step_by(3).collect();
            expect.extend([1, 4]);
            expect.sort_unstable();
            assert_eq!(named, expect, "threads {threads}");
            assert_eq!(st.pages as usize, expect.len());
            assert_eq!(st.zero_pages as usize, pages - expect.len());
            let mut buf = [0u8; PAGE_SIZE];
            for p in 0..pages {
                assert!(dst.read_page(p, &mut buf));
                let mut want = [0u8; PAGE_SIZE];
                assert!(src.read_page(p, &mut want));
                assert!(buf == want, "page {p} differs after the first pass");
                assert_eq!(h.get(p), Some(hash_page_bytes(&want)), "hash of page {p}");
            }

            // After the first pass a page that became zero is copied (and named) like any
            // other: the destination still holds its old bytes.
            assert!(src.zero_page(3));
            let st = send(&mut t, &src, &[3, 5], &h);
            assert_eq!(written(&mut b), vec![3, 5]);
            assert_eq!((st.pages, st.zero_pages), (2, 0));
            assert!(dst.is_zero_page(3));
            assert_eq!(h.get(3), Some(zero_page_hash()));
        }
    }

    #[test]
    fn a_cancelled_send_copies_and_names_nothing() {
        // The token is read before each chunk, whatever the sibling threads do.
        for threads in [1, 2] {
            let pages = 2000;
            let (src_buf, dst_buf) = (Anon::new(pages), Anon::new(pages));
            let (src, dst) = (src_buf.mem(), dst_buf.mem());
            for p in 0..pages {
                assert!(src.write_page(p, &page_of(7)));
            }
            let (a, mut b) = UnixStream::pair().expect("socketpair");
            let mut t = ShmSource::from_parts(Conn::Unix(a), dst.clone(), threads);
            let h = PageHashes::new(pages);
            let cancel = CancelToken::new();
            cancel.cancel();
            let done = AtomicU64::new(0);
            let ctx = SendCtx {
                hashes: &h,
                bucket: None,
                cancel: &cancel,
                done_pages: &done,
            };
            let all: Vec<usize> = (0..pages).collect();
            let r = t.send_pages(&src, &all, &ctx);
            assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
            assert!(written(&mut b).is_empty(), "threads {threads}");
            assert!((0..pages).all(|p| dst.is_zero_page(p)), "threads {threads}");
            assert_eq!(done.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn the_source_counts_every_page_and_every_written_frame() {
        // Pages 0..100 and 200..300 (two runs), 512-page chunks: the bytes are the pages'
        // plus the `Written` frames' own, exactly.
        let pages = 400;
        let (src_buf, dst_buf) = (Anon::new(pages), Anon::new(pages));
        let (src, dst) = (src_buf.mem(), dst_buf.mem());
        for p in 0..pages {
            assert!(src.write_page(p, &page_of(3)));
        }
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let mut t = ShmSource::from_parts(Conn::Unix(a), dst, 1);
        let h = PageHashes::new(pages);
        let list: Vec<usize> = (0..100).chain(200..300).collect();
        let st = send(&mut t, &src, &list, &h);
        b.set_nonblocking(true).expect("nonblocking");
        let mut frames = 0;
        while let Ok(m) = read_message(&mut b) {
            assert_eq!(
                m,
                Message::Written(vec![(0, 100), (200 * PAGE_SIZE as u64, 100)])
            );
            frames += encode(&m).len() as u64;
        }
        assert!(frames > 0);
        assert_eq!(st.pages, 200);
        assert_eq!(st.bytes, 200 * PAGE_SIZE as u64 + frames);
    }

    #[test]
    fn copy_threads_are_the_cores_up_to_two() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(copy_threads(), cores.clamp(1, MAX_COPY_THREADS));
    }

    #[test]
    fn the_destination_hashes_and_counts_the_named_pages() {
        let pages = 16;
        let buf = Anon::new(pages);
        let mem = buf.mem();
        for p in 0..pages {
            assert!(mem.write_page(p, &page_of(p as u8 + 1)));
        }
        let ctx = RecvCtx {
            hashes: std::sync::Arc::new(PageHashes::new(pages)),
            mem,
        };
        let mut d = ShmDest {
            stats: PageStats::default(),
        };
        let runs = vec![(0, 3), (8 * PAGE_SIZE as u64, 2)];
        assert_eq!(
            d.on_control(Message::Written(runs), &ctx).expect("written"),
            None
        );
        let st = d.finish().expect("finish");
        assert_eq!((st.pages, st.bytes), (5, 5 * PAGE_SIZE as u64));
        for p in 0..pages {
            let want = if p < 3 || p == 8 || p == 9 {
                hash_page_bytes(&page_of(p as u8 + 1))
            } else {
                zero_page_hash() // never named: the table's initial value
            };
            assert_eq!(ctx.hashes.get(p), Some(want), "page {p}");
        }
        // A run outside memory is refused, not hashed.
        let bad = Message::Written(vec![(15 * PAGE_SIZE as u64, 2)]);
        assert!(d.on_control(bad, &ctx).is_err());
    }

    /// Pages of `addr .. addr + len` present in this process's page tables.
    fn present_pages(addr: usize, len: usize) -> usize {
        let mut entries = vec![0u8; len / PAGE_SIZE * 8];
        let f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut entries, (addr / PAGE_SIZE * 8) as u64)
            .expect("read pagemap");
        entries.chunks_exact(8).filter(|e| e[7] & 0x80 != 0).count()
    }

    #[test]
    fn populating_by_fault_around_windows_maps_every_page_of_allocated_memory() {
        // The destination's memory exists (allocated, as a destination VM's is): one read per
        // learnt window must leave every page mapped, or the copy takes a fault per page.
        let pages = 1000; // not a multiple of the window, and the mapping maybe unaligned
        let len = pages * PAGE_SIZE;
        let fd = rustix::fs::memfd_create("shm-populate-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd");
        rustix::fs::ftruncate(&fd, len as u64).expect("ftruncate");
        rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), 0, len as u64)
            .expect("fallocate");
        let addr = map_shared(&fd, len, 0).expect("map");
        let window = fault_around_pages(addr, len);
        assert!(window.is_power_of_two(), "{window}");
        let (from, n) = (addr + 3 * PAGE_SIZE, pages - 3); // a run starting mid-window
        assert!(
            present_pages(from, n * PAGE_SIZE) < n,
            "mapped before populating"
        );
        populate(from, n * PAGE_SIZE, window);
        assert_eq!(present_pages(from, n * PAGE_SIZE), n, "window {window}");
        // SAFETY: our own mapping, no view over it is left.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    }

    #[test]
    fn dropping_the_source_unmaps_the_destinations_memory() {
        let len = 64 * PAGE_SIZE;
        let fd = rustix::fs::memfd_create("shm-drop-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd");
        rustix::fs::ftruncate(&fd, len as u64).expect("ftruncate");
        let addr = map_shared(&fd, len, 0).expect("map");
        let mapped = || {
            let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
            let start = format!("{addr:x}-");
            maps.lines().any(|l| l.starts_with(&start))
        };
        assert!(mapped());
        let view = MemoryView::new(&[MemoryRegion {
            gpa: 0,
            size: len as u64,
            host_addr: addr,
            fd: None,
            fd_offset: 0,
        }])
        .expect("view");
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let mut t = ShmSource::from_parts(Conn::Unix(a), view, 1);
        t.maps.push((addr, len));
        drop(t);
        assert!(
            !mapped(),
            "the destination's memory stays mapped in the source"
        );
    }

    #[test]
    fn two_copy_threads_report_their_cpu_and_a_silent_peer_is_seen() {
        // Two threads share 4000 pages: their CPU is the transport's own (`worker_cpu_s`),
        // which the engine adds to the source's. The peer reads none of the `Written`
        // frames: with a stall watch set, the source knows since when it has been quiet.
        let pages = 4000;
        let (src_buf, dst_buf) = (Anon::new(pages), Anon::new(pages));
        let (src, dst) = (src_buf.mem(), dst_buf.mem());
        for p in 0..pages {
            assert!(src.write_page(p, &page_of(5)));
        }
        let (a, _peer) = UnixStream::pair().expect("socketpair");
        let mut t = ShmSource::from_parts(Conn::Unix(a), dst, 2);
        t.reads = PeerReads::new(Some(std::time::Duration::from_secs(60)));
        assert_eq!(t.peer_quiet_since(), None, "nothing sent yet");
        let h = PageHashes::new(pages);
        let all: Vec<usize> = (0..pages).collect();
        send(&mut t, &src, &all, &h);
        assert!(t.worker_cpu_s() > 0.0, "{}", t.worker_cpu_s());
        assert!(
            t.peer_quiet_since().is_some(),
            "8 frames unread, yet no stall seen"
        );
    }
}
