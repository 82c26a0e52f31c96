//! Saved VM state: a plain serde struct (the KVM structures through kvm-bindings' `serde`
//! feature) plus a framed byte encoding that can cross a network. [`VcpuState::capture`]
//! and [`VcpuState::apply`] move it in and out of a vCPU that is not running.
//!
//! Frame: `MAGIC (8) | version u32 LE | payload length u64 LE | CRC-32 of payload u32 LE |
//! payload (postcard)`. Compatibility rule: a reader accepts exactly [`STATE_VERSION`]; any
//! change to the payload layout bumps it (no silent cross-version restores).

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};
use crate::msrs::{read_msrs, write_msrs};
use crate::workload::WorkloadSpec;
use crate::VmmError;

/// First 8 bytes of an encoded [`VmState`].
pub const STATE_MAGIC: [u8; 8] = *b"FMIGVMST";
/// Version of the payload layout. Readers accept only this value. Version 2: postcard
/// payload, typed KVM structures, no separate FPU (the XSAVE area holds it).
pub const STATE_VERSION: u32 = 2;
/// Largest payload [`VmState::from_bytes`] accepts (vCPU state is a few KiB per vCPU).
pub const STATE_MAX_BYTES: u64 = 16 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// 32-bit words in the legacy XSAVE area KVM_GET_XSAVE returns.
const XSAVE_WORDS: usize = 1024;

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
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE, AVX, ...; a superset of KVM_GET_FPU), 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs and SMM state.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
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
            regs: fd.get_regs().map_err(k("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(k("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?.region.to_vec(),
            xcrs: fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
            events: fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
            msrs: read_msrs(fd, msrs)?,
            workload,
        })
    }

    /// Loads the architectural part into a vCPU that is not running; the caller keeps
    /// [`VcpuState::workload`].
    pub(crate) fn apply(&self, fd: &VcpuFd) -> Result<(), VmmError> {
        let k = |op| move |e| VmmError::kvm(op, e);
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != XSAVE_WORDS {
            return Err(VmmError::StateDecode(DecodeError::Field {
                what: "xsave",
                len: self.xsave.len(),
                expected: XSAVE_WORDS,
            }));
        }
        xsave.region.copy_from_slice(&self.xsave);
        // Order as Firecracker/Cloud Hypervisor: mode state first, then registers, then the
        // MSRs and pending events that depend on them.
        fd.set_mp_state(self.mp_state)
            .map_err(k("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(k("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(k("KVM_SET_SREGS"))?;
        fd.set_xsave(&xsave).map_err(k("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(k("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl VmState {
    /// Encodes the state in a framed, checksummed form.
    pub fn to_bytes(&self) -> Result<Vec<u8>, VmmError> {
        let payload = postcard::to_allocvec(self)
            .map_err(|e| VmmError::StateEncode(EncodeError::Payload(e)))?;
        if payload.len() as u64 > STATE_MAX_BYTES {
            return Err(VmmError::StateEncode(EncodeError::TooLarge {
                len: payload.len() as u64,
                max: STATE_MAX_BYTES,
            }));
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
    /// length and checksum before deserialising. A corrupt length prefix inside the payload
    /// cannot make the decoder allocate much: serde caps what it reserves for a sequence up
    /// front (`size_hint::cautious`) and postcard fails at the end of the payload.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, VmmError> {
        decode(bytes).map_err(VmmError::StateDecode)
    }
}

fn decode(bytes: &[u8]) -> Result<VmState, DecodeError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Short(bytes.len()));
    };
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if header[..8] != STATE_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = word(8);
    if version != STATE_VERSION {
        return Err(DecodeError::BadVersion {
            found: version,
            supported: STATE_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..20]);
    let len = u64::from_le_bytes(len);
    if len > STATE_MAX_BYTES {
        return Err(DecodeError::TooLarge {
            len,
            max: STATE_MAX_BYTES,
        });
    }
    if payload.len() as u64 != len {
        return Err(DecodeError::Length {
            actual: payload.len() as u64,
            header: len,
        });
    }
    let crc = word(20);
    if crc32fast::hash(payload) != crc {
        return Err(DecodeError::Checksum);
    }
    let (state, rest) = postcard::take_from_bytes(payload).map_err(DecodeError::Payload)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(state)
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
        let sregs = kvm_sregs {
            cr0: 0x8001_0033,
            cs: kvm_bindings::kvm_segment {
                selector: 8,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut events = kvm_vcpu_events::default();
        events.exception.nr = 14;
        VmState {
            mem_size: 16 << 20,
            workload: WorkloadSpec::new(WorkloadKind::Verify),
            vcpus: vec![VcpuState {
                regs,
                sregs,
                xsave: (0..XSAVE_WORDS as u32).collect(),
                xcrs: kvm_xcrs {
                    nr_xcrs: 1,
                    ..Default::default()
                },
                debug_regs: kvm_debugregs {
                    dr7: 0x400,
                    ..Default::default()
                },
                events,
                mp_state: kvm_mp_state { mp_state: 3 },
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
        let back = VmState::from_bytes(&bytes).expect("decode");
        let v = &back.vcpus[0];
        assert_eq!((v.regs.rip, v.regs.rbx), (0x8000, 42));
        assert_eq!((v.sregs.cr0, v.sregs.cs.selector), (0x8001_0033, 8));
        assert_eq!((v.events.exception.nr, v.mp_state.mp_state), (14, 3));
        assert_eq!((v.debug_regs.dr7, v.xcrs.nr_xcrs), (0x400, 1));
        assert_eq!(v.xsave[1023], 1023);
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

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&STATE_MAGIC);
        frame.extend_from_slice(&STATE_VERSION.to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn a_lying_vcpu_count_and_trailing_bytes_are_rejected() {
        let empty = VmState {
            vcpus: Vec::new(),
            ..sample()
        };
        let mut payload = postcard::to_allocvec(&empty).expect("encode");
        // The vCPU count is the last field: a varint 0. Claim 2^32 - 1 vCPUs instead; the
        // decoder must fail at the end of the payload, not reserve room for them first.
        assert_eq!(payload.pop(), Some(0));
        payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            VmState::from_bytes(&frame(&payload)),
            Err(VmmError::StateDecode(DecodeError::Payload(_)))
        ));
        let mut payload = postcard::to_allocvec(&sample()).expect("encode");
        payload.push(0);
        assert!(matches!(
            VmState::from_bytes(&frame(&payload)),
            Err(VmmError::StateDecode(DecodeError::Trailing(1)))
        ));
        assert!(VmState::from_bytes(&frame(&payload[..payload.len() - 1])).is_ok());
    }

    #[test]
    fn an_over_cap_state_is_not_encoded() {
        let mut st = sample();
        st.vcpus[0].msrs = vec![(u32::MAX, u64::MAX); (STATE_MAX_BYTES / 8) as usize];
        assert!(matches!(
            st.to_bytes(),
            Err(VmmError::StateEncode(EncodeError::TooLarge { .. }))
        ));
    }

    #[test]
    fn bad_magic_version_checksum_and_length_are_rejected() {
        let good = sample().to_bytes().expect("encode");
        let expect_err = |b: &[u8], needle: &str| match VmState::from_bytes(b) {
            Err(VmmError::StateDecode(e)) => {
                let m = e.to_string();
                assert!(m.contains(needle), "{m} lacks {needle}")
            }
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
