//! `SoftVm`: a KVM-free [`MigratableVm`] for tests and benchmarks.
//!
//! Memory is a `MAP_SHARED` memfd mapping (like a real VM's), dirty tracking is done in
//! software, and an optional writer thread plays the guest: it writes pages at a given rate
//! in a chosen pattern and stamps each write (sequence number + page index), so a test can
//! check that the destination's memory equals the source's as of the pause.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::fs::{fstat, ftruncate, memfd_create, MemfdFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use crate::guestmem::MemoryView;
use crate::vm::{
    DirtyBitmap, MemoryRegion, MigratableVm, RegionLayout, VmError, VmLayout, PAGE_SIZE,
};

pub use crate::receive::receive_accepted;

/// Which pages the scripted guest writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WritePattern {
    /// Page 0, 1, 2, ... wrapping around.
    Sequential,
    /// Uniformly random pages (seeded).
    Random {
        /// PRNG seed.
        seed: u64,
    },
    /// A hot set gets most writes.
    HotCold {
        /// Fraction of pages in the hot set (0..1), at the start of memory.
        hot_fraction: f64,
        /// Probability that a write goes to the hot set.
        hot_probability: f64,
        /// PRNG seed.
        seed: u64,
    },
}

/// Scripted guest writer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriterConfig {
    /// Page writes per second.
    pub pages_per_sec: u64,
    /// Which pages.
    pub pattern: WritePattern,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    fd: OwnedFd,
    addr: usize,
    layout: VmLayout,
    mem: MemoryView,
    dirty: Mutex<DirtyBitmap>,
    tracking: AtomicBool,
    paused: AtomicBool,
    /// Held by the writer for each write; `pause` takes it to wait out an in-flight write.
    vcpu: Mutex<()>,
    stop: AtomicBool,
    seq: AtomicU64,
    state: Mutex<Vec<u8>>,
    restored: Mutex<Option<Vec<u8>>>,
    resumes: AtomicU64,
    fail_sync: AtomicBool,
}

/// A software VM: memfd memory, software dirty log, scripted writer.
pub struct SoftVm {
    inner: Arc<Inner>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SoftVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftVm")
            .field("layout", &self.inner.layout)
            .finish()
    }
}

impl SoftVm {
    /// A running VM with one region of `bytes` bytes at gpa 0, 1 vCPU, all memory zero.
    pub fn new(bytes: u64) -> Result<Self, VmError> {
        Self::with_regions(&[(0, bytes)], 1, 0)
    }

    /// A running VM with the given `(gpa, size)` regions, vCPU count and feature bits.
    pub fn with_regions(
        regions: &[(u64, u64)],
        vcpus: u32,
        features: u64,
    ) -> Result<Self, VmError> {
        let total: u64 = regions.iter().map(|r| r.1).sum();
        if total == 0
            || regions
                .iter()
                .any(|r| r.0 % PAGE_SIZE as u64 != 0 || r.1 % PAGE_SIZE as u64 != 0)
        {
            return Err(VmError::msg("regions must be non-empty and page aligned"));
        }
        let fd = memfd_create("softvm", MemfdFlags::CLOEXEC)
            .map_err(|e| VmError::with_source("memfd_create", e))?;
        ftruncate(&fd, total).map_err(|e| VmError::with_source("ftruncate", e))?;
        Self::map(fd, regions, vcpus, features)
    }

    /// Maps all of memfd `fd` (which this VM then owns) with `regions` laid out back to back.
    fn map(
        fd: OwnedFd,
        regions: &[(u64, u64)],
        vcpus: u32,
        features: u64,
    ) -> Result<Self, VmError> {
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let size = fstat(&fd)
            .map_err(|e| VmError::with_source("fstat", e))?
            .st_size;
        if (size as u64) < total {
            return Err(VmError::msg(
                "memfd smaller than the regions (would SIGBUS)",
            ));
        }
        // SAFETY: a fresh shared mapping of `total` bytes of our memfd; the kernel picks the
        // address, so it cannot overlap anything of ours.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                total as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| VmError::with_source("mmap", e))?;
        let addr = p as usize;
        let mut off = 0;
        let mut mrs = Vec::new();
        for &(gpa, size) in regions {
            mrs.push(MemoryRegion {
                gpa,
                size,
                host_addr: addr + off as usize,
                fd: Some(fd.as_raw_fd()),
                fd_offset: off,
            });
            off += size;
        }
        let mem = MemoryView::new(&mrs).map_err(|e| VmError::with_source("softvm memory", e))?;
        let layout = VmLayout {
            regions: regions
                .iter()
                .map(|&(gpa, size)| RegionLayout { gpa, size })
                .collect(),
            vcpus,
            features,
        };
        let pages = mem.pages();
        Ok(Self {
            inner: Arc::new(Inner {
                fd,
                addr,
                layout,
                mem,
                dirty: Mutex::new(DirtyBitmap::new(pages)),
                tracking: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                vcpu: Mutex::new(()),
                stop: AtomicBool::new(false),
                seq: AtomicU64::new(0),
                state: Mutex::new(b"softvm-state".to_vec()),
                restored: Mutex::new(None),
                resumes: AtomicU64::new(0),
                fail_sync: AtomicBool::new(false),
            }),
            writer: Mutex::new(None),
        })
    }

    /// A paused VM built on memory handed over by another process (`handover` transport):
    /// the regions must lie back to back from offset 0 of one memfd.
    pub fn adopt(layout: &VmLayout, regions: Vec<crate::HandoverRegion>) -> Result<Self, VmError> {
        let mut expected = 0;
        for r in &regions {
            if r.fd_offset != expected {
                return Err(VmError::msg(
                    "SoftVm adopts only back-to-back regions of one memfd",
                ));
            }
            expected += r.size;
        }
        let spans: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.size)).collect();
        let fd = regions
            .into_iter()
            .next()
            .map(|r| r.fd)
            .ok_or_else(|| VmError::msg("no memory handed over"))?;
        let vm = Self::map(fd, &spans, layout.vcpus, layout.features)?;
        vm.inner.paused.store(true, Ordering::SeqCst);
        Ok(vm)
    }

    /// A destination VM for `layout`, paused: adopting `regions` when given (handover),
    /// else with fresh memory of its own (back-to-back regions of one memfd). Fits
    /// [`crate::IncomingVm::OnDemand`].
    pub fn incoming(
        layout: &VmLayout,
        regions: Option<Vec<crate::HandoverRegion>>,
    ) -> Result<Self, VmError> {
        if let Some(regions) = regions {
            return Self::adopt(layout, regions);
        }
        let spans: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.gpa, r.size)).collect();
        let vm = Self::with_regions(&spans, layout.vcpus, layout.features)?;
        vm.inner.paused.store(true, Ordering::SeqCst);
        Ok(vm)
    }

    /// A paused VM, as a destination waits for an incoming migration.
    pub fn new_incoming(bytes: u64) -> Result<Self, VmError> {
        let vm = Self::new(bytes)?;
        vm.inner.paused.store(true, Ordering::SeqCst);
        Ok(vm)
    }

    /// Pauses this VM without the trait (to build destinations with odd layouts).
    pub fn set_paused(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::SeqCst);
    }

    /// Fills `fraction` of the pages (spread evenly) with stamped non-zero data; the rest stay
    /// zero so zero-page handling is exercised.
    pub fn fill(&self, fraction: f64) {
        let n = self.inner.mem.pages();
        let step = if fraction <= 0.0 {
            usize::MAX
        } else {
            (1.0 / fraction.min(1.0)).round().max(1.0) as usize
        };
        for p in (0..n).step_by(step.min(n.max(1))) {
            if fraction > 0.0 {
                self.inner.write_stamp(p);
            }
        }
    }

    /// Starts the scripted guest writer (replaces a running one).
    pub fn start_writer(&self, cfg: WriterConfig) {
        self.stop_writer();
        self.inner.stop.store(false, Ordering::SeqCst);
        let inner = Arc::clone(&self.inner);
        *lock(&self.writer) = Some(std::thread::spawn(move || inner.writer_loop(cfg)));
    }

    /// Stops the writer thread and waits for it.
    pub fn stop_writer(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }

    /// True unless paused.
    pub fn is_running(&self) -> bool {
        !self.inner.paused.load(Ordering::SeqCst)
    }

    /// True while dirty tracking is on.
    pub fn is_dirty_logging(&self) -> bool {
        self.inner.tracking.load(Ordering::SeqCst)
    }

    /// How many times `resume` was called.
    pub fn resume_count(&self) -> u64 {
        self.inner.resumes.load(Ordering::SeqCst)
    }

    /// Page writes done by the writer so far.
    pub fn writes(&self) -> u64 {
        self.inner.seq.load(Ordering::SeqCst)
    }

    /// A copy of all guest memory (take it while paused for a stable picture).
    pub fn snapshot(&self) -> Vec<u8> {
        let n = self.inner.mem.pages();
        let mut out = vec![0u8; n * PAGE_SIZE];
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..n {
            self.inner.mem.read_page(p, &mut page);
            out[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page);
        }
        out
    }

    /// The stamp `(sequence number, page index)` in the first 16 bytes of page `page`.
    pub fn stamp(&self, page: usize) -> Option<(u64, u64)> {
        let mut b = [0u8; PAGE_SIZE];
        self.inner.mem.read_page(page, &mut b).then(|| {
            let mut s = [0u8; 8];
            let mut i = [0u8; 8];
            s.copy_from_slice(&b[..8]);
            i.copy_from_slice(&b[8..16]);
            (u64::from_le_bytes(s), u64::from_le_bytes(i))
        })
    }

    /// Sets the opaque state `save_state` returns.
    pub fn set_state(&self, s: Vec<u8>) {
        *lock(&self.inner.state) = s;
    }

    /// State last given to `restore_state`.
    pub fn restored_state(&self) -> Option<Vec<u8>> {
        lock(&self.inner.restored).clone()
    }

    /// Makes the next `sync_dirty_log` fail (failure-path tests).
    pub fn fail_next_sync(&self) {
        self.inner.fail_sync.store(true, Ordering::SeqCst);
    }
}

/// splitmix64: tiny seeded PRNG, enough for write patterns.
fn next_rand(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Inner {
    /// Writes a stamp into page `p` and marks it dirty (after the write, as hardware does:
    /// a sync between the two just moves the page to the next round).
    fn write_stamp(&self, p: usize) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(addr) = self.mem.run_addr(p, 1) else {
            return;
        };
        let mut stamp = [0u8; 24];
        stamp[..8].copy_from_slice(&seq.to_le_bytes());
        stamp[8..16].copy_from_slice(&(p as u64).to_le_bytes());
        stamp[16..].copy_from_slice(&(seq ^ 0xA5A5).to_le_bytes());
        // A second copy further in the page, at a place that moves with seq, so pages differ
        // in more than their first bytes.
        let at = 64 + (seq as usize % ((PAGE_SIZE - 128) / 8)) * 8;
        // SAFETY: `addr` is a page inside our live mapping (run_addr bounds check); 24 bytes
        // at offset 0 and at `at` (< PAGE_SIZE - 24) stay inside the page.
        unsafe {
            std::ptr::copy_nonoverlapping(stamp.as_ptr(), addr as *mut u8, 24);
            std::ptr::copy_nonoverlapping(stamp.as_ptr(), (addr + at) as *mut u8, 24);
        }
        if self.tracking.load(Ordering::SeqCst) {
            lock(&self.dirty).set(p);
        }
    }

    fn writer_loop(&self, cfg: WriterConfig) {
        let n = self.mem.pages();
        let mut rng = match cfg.pattern {
            WritePattern::Random { seed } | WritePattern::HotCold { seed, .. } => seed,
            WritePattern::Sequential => 0,
        };
        let mut next_seq = 0usize;
        let start = Instant::now();
        let mut done = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let due = (start.elapsed().as_secs_f64() * cfg.pages_per_sec as f64) as u64;
            if due <= done || self.paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_micros(500));
                if self.paused.load(Ordering::SeqCst) {
                    done = due; // a paused guest does not catch up later
                }
                continue;
            }
            let burst = (due - done).min(4096);
            let _vcpu = lock(&self.vcpu);
            for _ in 0..burst {
                if self.paused.load(Ordering::SeqCst) {
                    break;
                }
                let p = match cfg.pattern {
                    WritePattern::Sequential => {
                        next_seq = (next_seq + 1) % n;
                        next_seq
                    }
                    WritePattern::Random { .. } => (next_rand(&mut rng) % n as u64) as usize,
                    WritePattern::HotCold {
                        hot_fraction,
                        hot_probability,
                        ..
                    } => {
                        let hot = ((n as f64 * hot_fraction) as usize).clamp(1, n);
                        let r = next_rand(&mut rng);
                        if (r % 10_000) as f64 / 10_000.0 < hot_probability {
                            (next_rand(&mut rng) % hot as u64) as usize
                        } else {
                            (next_rand(&mut rng) % n as u64) as usize
                        }
                    }
                };
                self.write_stamp(p);
                done += 1;
            }
        }
    }
}

impl Drop for SoftVm {
    fn drop(&mut self) {
        self.stop_writer();
        // SAFETY: the writer thread is joined, so nothing else uses the mapping of
        // `memory_bytes` bytes at `addr` that we created (the memfd closes with `Inner`).
        let _ = unsafe {
            munmap(
                self.inner.addr as *mut std::ffi::c_void,
                self.inner.layout.memory_bytes() as usize,
            )
        };
    }
}

impl MigratableVm for SoftVm {
    fn layout(&self) -> VmLayout {
        self.inner.layout.clone()
    }

    fn memory(&self) -> Vec<MemoryRegion> {
        let mut off = 0;
        self.inner
            .layout
            .regions
            .iter()
            .map(|r| {
                let m = MemoryRegion {
                    gpa: r.gpa,
                    size: r.size,
                    host_addr: self.inner.addr + off as usize,
                    fd: Some(self.inner.fd.as_raw_fd()),
                    fd_offset: off,
                };
                off += r.size;
                m
            })
            .collect()
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        *lock(&self.inner.dirty) = DirtyBitmap::new(self.inner.mem.pages());
        self.inner.tracking.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn sync_dirty_log(&self) -> Result<DirtyBitmap, VmError> {
        if self.inner.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(VmError::msg("injected dirty log sync failure"));
        }
        if !self.inner.tracking.load(Ordering::SeqCst) {
            return Err(VmError::msg("dirty log not started"));
        }
        let mut d = lock(&self.inner.dirty);
        let fresh = DirtyBitmap::new(d.len());
        Ok(std::mem::replace(&mut *d, fresh))
    }

    fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.inner.tracking.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn pause(&self) -> Result<(), VmError> {
        self.inner.paused.store(true, Ordering::SeqCst);
        // Wait out a write in flight: after this no guest write happens until resume.
        drop(lock(&self.inner.vcpu));
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.inner.paused.store(false, Ordering::SeqCst);
        self.inner.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        if !self.inner.paused.load(Ordering::SeqCst) {
            return Err(VmError::msg("save_state on a running VM"));
        }
        let mut s = lock(&self.inner.state).clone();
        s.extend_from_slice(&self.inner.seq.load(Ordering::SeqCst).to_le_bytes());
        Ok(s)
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        if !self.inner.paused.load(Ordering::SeqCst) {
            return Err(VmError::msg("restore_state on a running VM"));
        }
        *lock(&self.inner.restored) = Some(state.to_vec());
        Ok(())
    }
}

/// A hand-driven classic source for destination tests: it speaks the protocol frame by frame
/// (handshake, pages, rounds, state, `Complete` with the right digest) and leaves the ending
/// (`Commit`, `Failed`, silence, a closed socket) to the test.
pub struct ScriptedSource {
    conn: crate::Conn,
    version: u16,
    layout: VmLayout,
    hashes: crate::PageHashes,
    rounds: u32,
}

impl ScriptedSource {
    /// Connects to `dest` and announces a classic migration of a VM laid out as `layout`.
    /// Returns the destination's `HelloReply` refusal as an error.
    pub fn connect(
        dest: &crate::Endpoint,
        layout: &VmLayout,
    ) -> Result<Self, crate::MigrationError> {
        use crate::protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
        Self::connect_speaking(dest, layout, MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
    }

    /// Like [`ScriptedSource::connect`], offering the protocol `versions` (`2..=2`: a
    /// version-2 source, whose `Hello` has no `max_version`).
    pub fn connect_speaking(
        dest: &crate::Endpoint,
        layout: &VmLayout,
        versions: std::ops::RangeInclusive<u16>,
    ) -> Result<Self, crate::MigrationError> {
        let conn = crate::Conn::connect(dest, Duration::from_secs(5))?;
        Self::handshake(conn, layout, versions)
    }

    /// Like [`ScriptedSource::connect_speaking`] on a connection the test opened itself
    /// (for example to wait before saying `Hello`).
    pub fn handshake(
        mut conn: crate::Conn,
        layout: &VmLayout,
        versions: std::ops::RangeInclusive<u16>,
    ) -> Result<Self, crate::MigrationError> {
        use crate::protocol::{read_message, write_message, Hello, Message};
        let hello = Hello {
            version: *versions.start(),
            max_version: *versions.end(),
            layout: layout.clone(),
            transport: crate::TransportKind::Classic,
            session: 7,
        };
        let wire = |e| crate::MigrationError::Wire {
            phase: "handshake",
            source: e,
        };
        write_message(&mut conn, &Message::Hello(hello)).map_err(wire)?;
        let version = match read_message(&mut conn).map_err(wire)? {
            Message::HelloReply(r) if r.accepted => r.version,
            other => {
                return Err(crate::MigrationError::PeerRefused {
                    reason: format!("{other:?}"),
                })
            }
        };
        Ok(Self {
            conn,
            version,
            layout: layout.clone(),
            hashes: crate::PageHashes::new(layout.pages() as usize),
            rounds: 0,
        })
    }

    /// Guest-physical address of page index `page` (regions in layout order).
    fn gpa(&self, mut page: u64) -> Option<u64> {
        for r in &self.layout.regions {
            let n = r.size / PAGE_SIZE as u64;
            if page < n {
                return Some(r.gpa + page * PAGE_SIZE as u64);
            }
            page -= n;
        }
        None
    }

    /// Sends page index `page` filled with `fill` and records its hash.
    pub fn send_page(
        &mut self,
        page: usize,
        fill: u8,
    ) -> Result<(), crate::protocol::ProtocolError> {
        let gpa =
            self.gpa(page as u64)
                .ok_or_else(|| crate::protocol::ProtocolError::Malformed {
                    kind: "page",
                    reason: format!("page {page} outside the layout"),
                })?;
        let bytes = [fill; PAGE_SIZE];
        let mut frame = Vec::new();
        crate::protocol::encode_page(&mut frame, gpa, Some(&bytes));
        std::io::Write::write_all(&mut self.conn, &frame)
            .map_err(crate::protocol::ProtocolError::Io)?;
        self.hashes.set(page, crate::hash_page_bytes(&bytes));
        Ok(())
    }

    /// Ends a round and returns the destination's answer (`RoundAck` expected).
    pub fn end_round(
        &mut self,
    ) -> Result<crate::protocol::Message, crate::protocol::ProtocolError> {
        use crate::protocol::{read_message, write_message, Message};
        self.rounds += 1;
        let end = Message::RoundEnd {
            round: self.rounds,
            data_bytes: 0,
        };
        write_message(&mut self.conn, &end)?;
        read_message(&mut self.conn)
    }

    /// The digest of every page sent so far (what `Complete` carries).
    pub fn digest(&self) -> u64 {
        self.hashes.digest()
    }

    /// Sends `State(state)` and `Complete` with the digest of the pages sent, and returns
    /// the destination's answer (`Ready` expected).
    pub fn complete(
        &mut self,
        state: &[u8],
    ) -> Result<crate::protocol::Message, crate::protocol::ProtocolError> {
        use crate::protocol::{read_message, write_message, Complete, Message};
        write_message(&mut self.conn, &Message::State(state.to_vec()))?;
        let complete = Complete {
            digest: self.digest(),
            pages: self.layout.pages(),
            rounds: self.rounds + 1,
        };
        write_message(&mut self.conn, &Message::Complete(complete))?;
        read_message(&mut self.conn)
    }

    /// The protocol version the destination chose.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The control connection, to script the ending.
    pub fn conn(&mut self) -> &mut crate::Conn {
        &mut self.conn
    }
}
