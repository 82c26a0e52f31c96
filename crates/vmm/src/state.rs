//! Saved VM state: a plain serde struct plus a framed byte encoding that can cross a network.
//!
//! Frame: `MAGIC (8) | version u32 LE | payload length u64 LE | CRC-32 of payload u32 LE |
//! payload (bincode)`. Compatibility rule: a reader accepts exactly [`STATE_VERSION`]; any
//! change to the payload layout bumps it (no silent cross-version restores).

use bincode::Options as _;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::msrs::{read_msrs, write_msrs};

use crate::workload::WorkloadSpec;
use crate::VmmError;

/// First 8 bytes of an encoded [`VmState`].
pub const STATE_MAGIC: [u8; 8] = *b"FMIGVMST";
/// Version of the payload layout. Readers accept only this value.
pub const STATE_VERSION: u32 = 1;
/// Largest payload [`VmState::from_bytes`] accepts (vCPU state is a few KiB per vCPU).
pub const STATE_MAX_BYTES: u64 = 16 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Everything needed to resume a VM elsewhere, except guest memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory size in bytes (the destination must match).
    pub mem_size: u64,
    /// The workload spec the guest was booted with.
    pub workload: WorkloadSpec,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
}

/// Architectural state of one vCPU plus the VMM-side state of its workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// Raw `kvm_regs`.
    pub regs: Vec<u8>,
    /// Raw `kvm_sregs`.
    pub sregs: Vec<u8>,
    /// Raw `kvm_fpu`.
    pub fpu: Vec<u8>,
    /// Raw `kvm_xsave` (4 KiB legacy area).
    pub xsave: Vec<u8>,
    /// Raw `kvm_xcrs`.
    pub xcrs: Vec<u8>,
    /// Raw `kvm_debugregs`.
    pub debug_regs: Vec<u8>,
    /// Raw `kvm_vcpu_events`.
    pub events: Vec<u8>,
    /// Raw `kvm_mp_state`.
    pub mp_state: Vec<u8>,
    /// `(index, value)` of every MSR KVM lists as saveable and that could be read.
    pub msrs: Vec<(u32, u64)>,
    /// The VMM side of the workload on this vCPU.
    pub workload: WorkloadVcpuState,
}

/// VMM-side workload state of one vCPU: counters and pacing, so a restored VM continues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadVcpuState {
    /// Pages the guest has confirmed written (it asked for the next batch after them).
    pub pages_done: u64,
    /// Pages granted in the last batch and not yet confirmed.
    pub in_flight: u64,
    /// Heartbeats counted while the guest was halted.
    pub heartbeats: u64,
    /// The guest was told to stop writing (fill finished).
    pub stopped_writing: bool,
}

impl VcpuState {
    /// Reads the complete state of a vCPU that is not running (its thread is paused or was
    /// never started), plus `msrs` (see [`crate::msrs::readable_msrs`]). No side effects.
    pub(crate) fn capture(
        fd: &VcpuFd,
        msrs: &[u32],
        workload: WorkloadVcpuState,
    ) -> Result<VcpuState, VmmError> {
        let k = |op| move |e| VmmError::kvm(op, e);
        Ok(VcpuState {
            regs: pod_to_bytes(&fd.get_regs().map_err(k("KVM_GET_REGS"))?),
            sregs: pod_to_bytes(&fd.get_sregs().map_err(k("KVM_GET_SREGS"))?),
            fpu: pod_to_bytes(&fd.get_fpu().map_err(k("KVM_GET_FPU"))?),
            xsave: pod_to_bytes(&fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?),
            xcrs: pod_to_bytes(&fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?),
            debug_regs: pod_to_bytes(&fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?),
            events: pod_to_bytes(&fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?),
            mp_state: pod_to_bytes(&fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?),
            msrs: read_msrs(fd, msrs)?,
            workload,
        })
    }

    /// Loads the architectural part into a vCPU that is not running; the caller keeps
    /// [`VcpuState::workload`].
    pub(crate) fn apply(&self, fd: &VcpuFd) -> Result<(), VmmError> {
        let k = |op| move |e| VmmError::kvm(op, e);
        // Order as Firecracker/Cloud Hypervisor: mode state first, then registers, then the
        // MSRs and pending events that depend on them.
        fd.set_mp_state(pod_from_bytes(&self.mp_state, "mp_state")?)
            .map_err(k("KVM_SET_MP_STATE"))?;
        fd.set_regs(&pod_from_bytes(&self.regs, "regs")?)
            .map_err(k("KVM_SET_REGS"))?;
        fd.set_sregs(&pod_from_bytes(&self.sregs, "sregs")?)
            .map_err(k("KVM_SET_SREGS"))?;
        fd.set_fpu(&pod_from_bytes(&self.fpu, "fpu")?)
            .map_err(k("KVM_SET_FPU"))?;
        fd.set_xsave(&pod_from_bytes(&self.xsave, "xsave")?)
            .map_err(k("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&pod_from_bytes(&self.xcrs, "xcrs")?)
            .map_err(k("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&pod_from_bytes(&self.debug_regs, "debug_regs")?)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&pod_from_bytes(&self.events, "vcpu_events")?)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl VmState {
    /// Encodes the state in a framed, checksummed form.
    pub fn to_bytes(&self) -> Result<Vec<u8>, VmmError> {
        let payload = codec()
            .serialize(self)
            .map_err(|e| VmmError::StateEncode(e.to_string()))?;
        if payload.len() as u64 > STATE_MAX_BYTES {
            return Err(VmmError::StateEncode(format!(
                "state is {} bytes, over the {STATE_MAX_BYTES}-byte cap",
                payload.len()
            )));
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes a frame written by [`VmState::to_bytes`], checking magic, version, size cap,
    /// length and checksum before deserialising.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, VmmError> {
        let bad = |m: String| VmmError::StateDecode(m);
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than the header",
                bytes.len()
            )));
        }
        if bytes[..8] != STATE_MAGIC {
            return Err(bad("bad magic: not a fastmig VM state".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != STATE_VERSION {
            return Err(bad(format!(
                "unsupported state version {version} (this build reads {STATE_VERSION})"
            )));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[12..20]);
        let len = u64::from_le_bytes(len_bytes);
        if len > STATE_MAX_BYTES {
            return Err(bad(format!(
                "payload of {len} bytes is over the {STATE_MAX_BYTES}-byte cap"
            )));
        }
        let payload = &bytes[HEADER_LEN..];
        if payload.len() as u64 != len {
            return Err(bad(format!(
                "payload is {} bytes, header says {len}",
                payload.len()
            )));
        }
        let crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        if crc32fast::hash(payload) != crc {
            return Err(bad("checksum mismatch".into()));
        }
        codec().deserialize(payload).map_err(|e| bad(e.to_string()))
    }
}

/// bincode with a size limit, so a corrupt length prefix cannot make the decoder allocate
/// more than the cap.
fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(STATE_MAX_BYTES)
}

/// Plain-old-data KVM structures that can be copied to and from raw bytes.
///
/// # Safety
/// Implementors must be `repr(C)` structs with no pointers, no padding-dependent invariants
/// and for which every bit pattern is a valid value (true of these kvm-bindings types: they
/// mirror the kernel's UAPI structs, which the kernel fills from arbitrary bytes).
pub(crate) unsafe trait Pod: Default {}
// SAFETY: kvm UAPI structs of integers and integer arrays (see trait docs).
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above (the trailing flexible array has size 0 in `size_of`).
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}

pub(crate) fn pod_to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    let len = std::mem::size_of::<T>();
    // SAFETY: `T: Pod` is plain data of `len` bytes, so viewing it as bytes is valid.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), len) }.to_vec()
}

pub(crate) fn pod_from_bytes<T: Pod>(bytes: &[u8], what: &str) -> Result<T, VmmError> {
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(VmmError::StateDecode(format!(
            "{what}: {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut v = T::default();
    // SAFETY: `bytes` has exactly size_of::<T>() bytes and every bit pattern is a valid `T`
    // (`Pod` contract); the destination is a distinct local.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), bytes.len())
    };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadKind;

    fn sample() -> VmState {
        let regs = kvm_regs {
            rip: 0x8000,
            rbx: 42,
            ..Default::default()
        };
        VmState {
            mem_size: 16 << 20,
            workload: WorkloadSpec::new(WorkloadKind::Verify),
            vcpus: vec![VcpuState {
                regs: pod_to_bytes(&regs),
                sregs: pod_to_bytes(&kvm_sregs::default()),
                fpu: vec![1, 2, 3],
                xsave: vec![0; 4096],
                xcrs: vec![],
                debug_regs: vec![],
                events: vec![],
                mp_state: vec![],
                msrs: vec![(0x10, 99)],
                workload: WorkloadVcpuState {
                    pages_done: 7,
                    in_flight: 3,
                    heartbeats: 1,
                    stopped_writing: false,
                },
            }],
        }
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let st = sample();
        let bytes = st.to_bytes().expect("encode");
        assert_eq!(VmState::from_bytes(&bytes).expect("decode"), st);
        let regs: kvm_regs = pod_from_bytes(&st.vcpus[0].regs, "regs").expect("regs");
        assert_eq!((regs.rip, regs.rbx), (0x8000, 42));
        assert!(pod_from_bytes::<kvm_regs>(&[0; 3], "regs").is_err());
    }

    #[test]
    fn corrupted_frames_never_panic_the_decoder() {
        let good = sample().to_bytes().expect("encode");
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            let cut = (next() % (b.len() as u64 + 1)) as usize;
            // Any outcome but a panic is fine; a frame that still decodes must be intact.
            if let Ok(st) = VmState::from_bytes(&b[..cut]) {
                assert_eq!(st, sample());
            }
        }
        // A payload that passes the checksum but lies about a length inside is caught by the
        // size limit rather than allocating.
        let mut payload = vec![0xff; 64];
        payload[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut frame = Vec::new();
        frame.extend_from_slice(&STATE_MAGIC);
        frame.extend_from_slice(&STATE_VERSION.to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        assert!(VmState::from_bytes(&frame).is_err());
    }

    #[test]
    fn bad_magic_version_checksum_and_length_are_rejected() {
        let good = sample().to_bytes().expect("encode");
        let expect_err = |b: &[u8], needle: &str| match VmState::from_bytes(b) {
            Err(VmmError::StateDecode(m)) => assert!(m.contains(needle), "{m} lacks {needle}"),
            other => panic!("expected a decode error containing {needle}, got {other:?}"),
        };
        let mut b = good.clone();
        b[0] ^= 1;
        expect_err(&b, "magic");
        let mut b = good.clone();
        b[8] = 9;
        expect_err(&b, "version");
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 0x55;
        expect_err(&b, "checksum");
        expect_err(&good[..good.len() - 1], "header says");
        expect_err(&good[..10], "shorter");
        let mut b = good.clone();
        b[12..20].copy_from_slice(&(STATE_MAX_BYTES + 1).to_le_bytes());
        expect_err(&b, "cap");
    }
}
