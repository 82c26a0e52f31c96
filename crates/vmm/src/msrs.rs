//! Model-specific registers: which ones a vCPU state saves, and reading and writing them in
//! chunks KVM accepts.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::VmmError;

/// MSRs KVM_GET_MSRS accepts per call (KVM_MAX_MSR_ENTRIES in kvm-bindings).
const MSR_CHUNK: usize = 200;

/// The MSRs of `all` that KVM_GET_MSRS can read on this host: the ones a state saves.
pub(crate) fn readable_msrs(fd: &VcpuFd, all: &[u32]) -> Result<Vec<u32>, VmmError> {
    // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read; drop
    // that one and carry on, so the list holds exactly the MSRs that can be saved.
    let mut ok = Vec::new();
    let mut rest: &[u32] = all;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let n = read_msr_chunk(fd, chunk)?.len();
        ok.extend_from_slice(&chunk[..n]);
        rest = if n < chunk.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", chunk[n]),
                "MSR not readable, not saved"
            );
            &rest[n + 1..]
        } else {
            &rest[n..]
        };
    }
    Ok(ok)
}

fn read_msr_chunk(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|source| VmmError::MsrList {
        op: "KVM_GET_MSRS",
        source,
    })?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| VmmError::kvm("KVM_GET_MSRS", e))?;
    Ok(msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect())
}

/// Reads `indices` (all readable, see [`readable_msrs`]) as `(index, value)` pairs.
pub(crate) fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmmError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSR_CHUNK) {
        out.extend(read_msr_chunk(fd, chunk)?);
    }
    Ok(out)
}

/// Writes saved MSRs; one KVM refuses is skipped with a log line (see the comment inside).
pub(crate) fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), VmmError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|source| VmmError::MsrList {
            op: "KVM_SET_MSRS",
            source,
        })?;
        let n = fd
            .set_msrs(&list)
            .map_err(|e| VmmError::kvm("KVM_SET_MSRS", e))?;
        rest = if n < chunk.len() {
            // Some saveable MSRs are read-only or host-specific; skip and report.
            // Nothing is lost when the vCPU already holds the saved value (seen for KVM's
            // async-PF MSR 0x4b564d06 when the guest CPUID lacks that PV feature).
            let (index, wanted) = chunk[n];
            let current = read_msr_chunk(fd, &[index])?.first().map(|&(_, v)| v);
            if current == Some(wanted) {
                tracing::debug!(
                    msr = format_args!("{index:#x}"),
                    "MSR not writable, already equal"
                );
            } else {
                tracing::warn!(
                    msr = format_args!("{index:#x}"),
                    wanted,
                    ?current,
                    "MSR could not be restored"
                );
            }
            &rest[n + 1..]
        } else {
            &rest[n..]
        };
    }
    Ok(())
}
