//! Safe handles over `shim.c`: a connected RC queue pair ([`Link`]) on a protection domain
//! and completion queue it may share with the other links of one migration, and memory
//! registrations ([`Mr`]). The only `unsafe` of the RDMA transport is here.
//!
//! Ownership: a [`Link`] owns its rdma_cm id and QP and holds a reference on the shared PD,
//! CQ and completion channel (the shim counts them; the last link dropped frees them). A
//! registration made through any link is on the shared PD, so its keys are valid on every
//! link of it. An [`Mr`] borrows nothing from Rust's point of view (it is a registration of
//! raw guest memory) and must be dropped before the last [`Link`] of its PD and before the
//! memory is unmapped: the transport halves keep their registrations in fields declared
//! before the links and deregister them explicitly on every exit path.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

#[repr(C)]
struct FmLink {
    _opaque: [u8; 0],
}

#[repr(C)]
struct IbvMr {
    _opaque: [u8; 0],
}

/// One work completion (layout of `struct fm_wc` in `shim.c`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wc {
    pub wr_id: u64,
    /// `enum ibv_wc_status`: 0 is success.
    pub status: u32,
    pub opcode: u32,
    pub byte_len: u32,
    pub vendor_err: u32,
}

impl Wc {
    /// Why this work request failed (its status and the vendor's code), or `None` if it
    /// succeeded.
    pub(crate) fn failure(&self) -> Option<String> {
        (self.status != 0).then(|| {
            format!(
                "{} (vendor error {:#x})",
                status_text(self.status),
                self.vendor_err
            )
        })
    }
}

extern "C" {
    fn fm_device_count() -> c_int;
    fn fm_connect(
        addr: *const libc::sockaddr,
        timeout_ms: c_int,
        data: *const c_void,
        len: u8,
        sq_depth: c_int,
        rq_depth: c_int,
        with: *const FmLink,
        cq_depth: c_int,
        err: *mut c_int,
    ) -> *mut FmLink;
    fn fm_listen(addr: *const libc::sockaddr, err: *mut c_int) -> *mut FmLink;
    fn fm_get_request(
        ls: *mut FmLink,
        timeout_ms: c_int,
        sq_depth: c_int,
        rq_depth: c_int,
        with: *const FmLink,
        cq_depth: c_int,
        err: *mut c_int,
    ) -> *mut FmLink;
    fn fm_accept_request(l: *mut FmLink, timeout_ms: c_int) -> c_int;
    fn fm_peer_data(l: *const FmLink, out: *mut u8, cap: c_int) -> c_int;
    fn fm_destroy(l: *mut FmLink);
    fn fm_reg_mr(
        l: *mut FmLink,
        addr: *mut c_void,
        len: usize,
        remote_write: c_int,
        err: *mut c_int,
    ) -> *mut IbvMr;
    fn fm_mr_lkey(mr: *const IbvMr) -> u32;
    fn fm_mr_rkey(mr: *const IbvMr) -> u32;
    fn fm_dereg_mr(mr: *mut IbvMr) -> c_int;
    fn fm_post_write(
        l: *mut FmLink,
        laddr: u64,
        len: u32,
        lkey: u32,
        raddr: u64,
        rkey: u32,
        wr_id: u64,
        signaled: c_int,
    ) -> c_int;
    fn fm_post_send(l: *mut FmLink, laddr: u64, len: u32, lkey: u32, wr_id: u64) -> c_int;
    fn fm_post_recv(l: *mut FmLink, laddr: u64, len: u32, lkey: u32, wr_id: u64) -> c_int;
    fn fm_poll_wait(l: *mut FmLink, out: *mut Wc, max: c_int, timeout_ms: c_int) -> c_int;
    fn fm_qp_to_error(l: *mut FmLink) -> c_int;
    fn fm_wc_status_str(status: u32) -> *const c_char;
}

/// Live registrations in this process (all links): the lab checks it is 0 after a failure.
static LIVE_MRS: AtomicI64 = AtomicI64::new(0);

/// Bytes registered now in this process, and the most since [`take_peak_registered`].
static REGISTERED: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Memory registrations currently alive in this process.
#[cfg(feature = "test-utils")]
pub(crate) fn live_registrations() -> i64 {
    LIVE_MRS.load(Ordering::Relaxed)
}

/// The most bytes registered at once in this process since the last call; restarts the
/// count from what is registered now.
#[cfg(feature = "test-utils")]
pub(crate) fn take_peak_registered() -> u64 {
    PEAK.swap(REGISTERED.load(Ordering::Relaxed), Ordering::Relaxed)
}

fn os_err(r: c_int) -> std::io::Error {
    std::io::Error::from_raw_os_error(r.unsigned_abs() as i32)
}

fn ms(d: Duration) -> c_int {
    d.as_millis().clamp(1, c_int::MAX as u128) as c_int
}

/// Number of RDMA devices (0 when the machine has no RDMA subsystem at all).
pub(crate) fn device_count() -> usize {
    // SAFETY: no arguments; the shim frees the list it gets.
    let n = unsafe { fm_device_count() };
    n.max(0) as usize
}

/// Text of a completion status (`ibv_wc_status_str`).
fn status_text(status: u32) -> String {
    // SAFETY: libibverbs returns a pointer to a static string for any value.
    let p = unsafe { fm_wc_status_str(status) };
    if p.is_null() {
        return format!("status {status}");
    }
    // SAFETY: non-null, NUL-terminated, static (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A `sockaddr_storage` for `addr`, and its length.
fn sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
        }
    }
    ss
}

/// A listening rdma_cm id (destination, before the source connects).
pub(crate) struct Listener(*mut FmLink);

// SAFETY: the handle is used by one thread at a time (the struct is moved, never shared);
// rdma-core objects are not tied to the creating thread.
unsafe impl Send for Listener {}

impl Listener {
    pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let ss = sockaddr(addr);
        let mut err = 0;
        // SAFETY: `ss` is a valid sockaddr for the call's duration; `err` is writable.
        let p = unsafe { fm_listen(&ss as *const _ as *const libc::sockaddr, &mut err) };
        if p.is_null() {
            return Err(os_err(err));
        }
        Ok(Self(p))
    }

    /// Waits for a connect request and builds its queue pair, without accepting it: the
    /// caller checks [`Link::peer_data`], posts its receives, then calls [`Link::accept`].
    /// Dropping the link before that rejects the request. The queue pair shares the PD and
    /// CQ of `share` (same device), or gets new ones with `share.1` CQ entries.
    pub(crate) fn request(
        &self,
        timeout: Duration,
        depths: (u32, u32),
        share: (Option<&Link>, u32),
    ) -> std::io::Result<Link> {
        let mut err = 0;
        let with = share.0.map_or(std::ptr::null(), |l| l.0 as *const FmLink);
        // SAFETY: `self.0` is a live listener; `with` is null or a live link (borrowed for
        // the call; the shim takes its own reference on what it shares); `err` is writable.
        let p = unsafe {
            fm_get_request(
                self.0,
                ms(timeout),
                depths.0 as c_int,
                depths.1 as c_int,
                with,
                share.1 as c_int,
                &mut err,
            )
        };
        if p.is_null() {
            return Err(os_err(err));
        }
        Ok(Link(p))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: we own the listener; destroyed once.
        unsafe { fm_destroy(self.0) }
    }
}

/// A connected RC queue pair, and a reference on its (maybe shared) PD, CQ and completion
/// channel.
pub(crate) struct Link(*mut FmLink);

// SAFETY: a Link is used by one thread at a time (it moves into the destination's service
// thread, or stays with the source's sending thread); verbs objects are thread-agnostic.
unsafe impl Send for Link {}

impl Link {
    /// Source: resolves `addr` through rdma_cm and connects, sending `data` (at most 56 bytes,
    /// the room rdma_cm leaves in a connect request) as private data. The queue pair shares
    /// the PD and CQ of `share.0` (same device), or gets new ones with `share.1` CQ entries.
    pub(crate) fn connect(
        addr: SocketAddr,
        timeout: Duration,
        data: &[u8],
        depths: (u32, u32),
        share: (Option<&Link>, u32),
    ) -> std::io::Result<Self> {
        let ss = sockaddr(addr);
        let mut err = 0;
        let with = share.0.map_or(std::ptr::null(), |l| l.0 as *const FmLink);
        // SAFETY: `ss` and `data` are valid for the call (the shim copies the private data
        // into the request before returning); `with` is null or a live link (the shim takes
        // its own reference on what it shares); `err` is writable.
        let p = unsafe {
            fm_connect(
                &ss as *const _ as *const libc::sockaddr,
                ms(timeout),
                data.as_ptr() as *const c_void,
                data.len().min(56) as u8,
                depths.0 as c_int,
                depths.1 as c_int,
                with,
                share.1 as c_int,
                &mut err,
            )
        };
        if p.is_null() {
            return Err(os_err(err));
        }
        Ok(Self(p))
    }

    /// Destination: accepts the request this link came from ([`Listener::request`]) and
    /// waits until the connection is established.
    pub(crate) fn accept(&self, timeout: Duration) -> std::io::Result<()> {
        // SAFETY: live link, built by `fm_get_request`.
        Self::check(unsafe { fm_accept_request(self.0, ms(timeout)) })
    }

    /// Private data of the source's connect request (destination side).
    pub(crate) fn peer_data(&self) -> Vec<u8> {
        let mut buf = [0u8; 64];
        // SAFETY: live link; `buf` holds `cap` bytes.
        let n = unsafe { fm_peer_data(self.0, buf.as_mut_ptr(), buf.len() as c_int) };
        buf[..n.max(0) as usize].to_vec()
    }

    /// Registers `len` bytes at `addr` (local read only, or remote write too).
    ///
    /// # Safety
    /// `addr .. addr + len` must be a live mapping that outlives the returned [`Mr`]; the
    /// caller drops the `Mr` before unmapping it and before dropping this link.
    pub(crate) unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        remote_write: bool,
    ) -> std::io::Result<Mr> {
        let mut err = 0;
        // SAFETY: per this function's contract the range is live; `err` is writable.
        let p = unsafe {
            fm_reg_mr(
                self.0,
                addr as *mut c_void,
                len,
                remote_write as c_int,
                &mut err,
            )
        };
        if p.is_null() {
            return Err(os_err(err));
        }
        LIVE_MRS.fetch_add(1, Ordering::Relaxed);
        let now = REGISTERED.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        PEAK.fetch_max(now, Ordering::Relaxed);
        Ok(Mr { mr: p, len })
    }

    fn check(r: c_int) -> std::io::Result<()> {
        if r < 0 {
            Err(os_err(r))
        } else {
            Ok(())
        }
    }

    /// Posts one RDMA WRITE of `len` bytes from registered `laddr` to `raddr`.
    // The work request's fields, one argument each: a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post_write(
        &self,
        laddr: usize,
        len: u32,
        lkey: u32,
        raddr: u64,
        rkey: u32,
        wr_id: u64,
        signaled: bool,
    ) -> std::io::Result<()> {
        // SAFETY: live link. The local range lies in a registration of `lkey` (the caller
        // computed it from its `Mr`); the remote side is checked by the destination's NIC.
        Self::check(unsafe {
            fm_post_write(
                self.0,
                laddr as u64,
                len,
                lkey,
                raddr,
                rkey,
                wr_id,
                signaled as c_int,
            )
        })
    }

    /// Posts a signalled SEND of `len` bytes at registered `laddr`.
    pub(crate) fn post_send(
        &self,
        laddr: usize,
        len: u32,
        lkey: u32,
        wr_id: u64,
    ) -> std::io::Result<()> {
        // SAFETY: live link; the buffer is a registered message slot owned by the caller,
        // not reused until this send's completion.
        Self::check(unsafe { fm_post_send(self.0, laddr as u64, len, lkey, wr_id) })
    }

    /// Posts a receive into registered `laddr .. + len`.
    pub(crate) fn post_recv(
        &self,
        laddr: usize,
        len: u32,
        lkey: u32,
        wr_id: u64,
    ) -> std::io::Result<()> {
        // SAFETY: live link; the slot is owned by the caller and not read until this
        // receive's completion.
        Self::check(unsafe { fm_post_recv(self.0, laddr as u64, len, lkey, wr_id) })
    }

    /// Up to `out.len()` completions of the shared CQ (every link of it), sleeping on the
    /// completion channel up to `timeout` when none is ready. Returns how many were filled
    /// (0: timed out).
    pub(crate) fn poll(&self, out: &mut [Wc], timeout: Duration) -> std::io::Result<usize> {
        // SAFETY: live link; `out` has room for `out.len()` entries.
        let n = unsafe {
            fm_poll_wait(
                self.0,
                out.as_mut_ptr(),
                out.len().min(c_int::MAX as usize) as c_int,
                ms(timeout),
            )
        };
        if n < 0 {
            return Err(os_err(n));
        }
        Ok(n as usize)
    }

    /// Moves the QP to the error state: every outstanding work request completes in error.
    pub(crate) fn to_error(&self) -> std::io::Result<()> {
        // SAFETY: live link.
        Self::check(unsafe { fm_qp_to_error(self.0) })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // SAFETY: we own the link; destroyed once. If it is the PD's last link, the
        // registrations on the PD are gone by now (see the module header).
        unsafe { fm_destroy(self.0) }
    }
}

/// A memory registration: pinned pages the NIC may read (and, with remote write, write).
pub(crate) struct Mr {
    mr: *mut IbvMr,
    len: usize,
}

// SAFETY: an MR handle is only read (keys) or deregistered, by one owner at a time.
unsafe impl Send for Mr {}

impl Mr {
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: live registration.
        unsafe { fm_mr_lkey(self.mr) }
    }

    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: live registration.
        unsafe { fm_mr_rkey(self.mr) }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: we own the registration; deregistered once, while its PD is alive (see
        // the module header).
        let r = unsafe { fm_dereg_mr(self.mr) };
        if r == 0 {
            LIVE_MRS.fetch_sub(1, Ordering::Relaxed);
            REGISTERED.fetch_sub(self.len as u64, Ordering::Relaxed);
        } else {
            tracing::warn!(error = %os_err(r), "deregistering guest memory failed");
        }
    }
}
