//! x86 boot of the built-in guest: each vCPU's CPUID, and the register state that puts it
//! straight into 64-bit long mode at the program's entry (no firmware, no real mode). The
//! page tables and GDT it relies on are written by [`guest::load`]. The register values are
//! built by pure functions, tested here; only [`boot_vcpu`] and [`set_cpuid`] touch KVM.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;

use crate::guest::{self, Slice};
use crate::VmmError;

/// CPUID for vCPU `id`: the host's supported set, with the vCPU's own APIC id (leaf 1
/// EBX[31:24], x2APIC id in leaves 0xb/0x1f EDX), as on real hardware.
pub(crate) fn vcpu_cpuid(supported: &CpuId, id: u8) -> CpuId {
    let mut own = supported.clone();
    for entry in own.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    own
}

/// Sets vCPU `id`'s CPUID from the supported set.
pub(crate) fn set_cpuid(fd: &VcpuFd, supported: &CpuId, id: u8) -> Result<(), VmmError> {
    fd.set_cpuid2(&vcpu_cpuid(supported, id))
        .map_err(|e| VmmError::kvm("KVM_SET_CPUID2", e))
}

// Control register bits.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// `sregs` (as KVM reset them) switched to flat 64-bit segments from the GDT, paging on with
/// the guest's PML4, and long mode active.
pub(crate) fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = guest::GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr3 = guest::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the program's entry: its parameters for `slice` (see
/// [`crate::guest`] for the register contract).
pub(crate) fn entry_regs(slice: &Slice) -> kvm_regs {
    kvm_regs {
        rip: guest::CODE_ADDR + guest::ENTRY_OFFSET,
        rflags: 0x2,
        rbx: 0,
        r8: slice.base,
        r9: slice.pages.max(1),
        r10: slice.pattern,
        r11: slice.hot_pages,
        r12: slice.seed,
        r13: 0,
        r15: slice.hot_threshold,
        ..Default::default()
    }
}

/// The x87/SSE state after FNINIT and the default MXCSR.
pub(crate) fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Puts the vCPU at the program's entry in long mode, with its slice's parameters.
pub(crate) fn boot_vcpu(fd: &VcpuFd, slice: &Slice) -> Result<(), VmmError> {
    let sregs = fd
        .get_sregs()
        .map_err(|e| VmmError::kvm("KVM_GET_SREGS", e))?;
    fd.set_sregs(&long_mode_sregs(sregs))
        .map_err(|e| VmmError::kvm("KVM_SET_SREGS", e))?;
    fd.set_regs(&entry_regs(slice))
        .map_err(|e| VmmError::kvm("KVM_SET_REGS", e))?;
    fd.set_fpu(&reset_fpu())
        .map_err(|e| VmmError::kvm("KVM_SET_FPU", e))
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;
    use crate::workload::WorkloadSpec;

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_nothing_else_changes() {
        let entry = |function, ebx, edx| kvm_cpuid_entry2 {
            function,
            ebx,
            edx,
            ..Default::default()
        };
        let host = CpuId::from_entries(&[
            entry(0, 0x1111, 0x2222),
            entry(1, 0xaa12_3456, 0x3333),
            entry(0xb, 0x4444, 0xff),
            entry(0x1f, 0x5555, 0xff),
        ])
        .expect("cpuid");
        let own = vcpu_cpuid(&host, 5);
        let e = own.as_slice();
        assert_eq!((e[0].ebx, e[0].edx), (0x1111, 0x2222));
        assert_eq!((e[1].ebx, e[1].edx), (0x0512_3456, 0x3333));
        assert_eq!((e[2].ebx, e[2].edx), (0x4444, 5));
        assert_eq!((e[3].ebx, e[3].edx), (0x5555, 5));
        // The host's set is left as it was, for the next vCPU.
        assert_eq!(host.as_slice()[1].ebx, 0xaa12_3456);
    }

    #[test]
    fn sregs_enter_long_mode_with_flat_segments() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.efer, 0x500, "LME and LMA");
        assert_eq!(s.cr0, 0x8001_0033, "PE MP ET NE WP PG");
        assert_eq!(s.cr4, 0x620, "PAE OSFXSR OSXMMEXCPT");
        assert_eq!(s.cr3, guest::PML4_ADDR);
        assert_eq!((s.gdt.base, s.gdt.limit), (guest::GDT_ADDR, 23));
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.type_),
            (0x08, 1, 0, 0xb)
        );
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((seg.selector, seg.l, seg.db, seg.type_), (0x10, 0, 1, 0x3));
            assert_eq!(
                (seg.base, seg.limit, seg.present, seg.s),
                (0, 0xffff_ffff, 1, 1)
            );
        }
    }

    #[test]
    fn entry_registers_carry_the_slice() {
        let spec: WorkloadSpec = "verify:wss=1M,pattern=hotcold,hot=0.5,hotw=0.5,seed=9"
            .parse()
            .expect("spec");
        let slice = guest::slices(&spec, 16 << 20, 2)[1];
        let r = entry_regs(&slice);
        assert_eq!(r.rip, guest::CODE_ADDR);
        assert_eq!((r.rbx, r.rflags), (0, 2));
        assert_eq!((r.r8, r.r9), (slice.base, 128));
        assert_eq!((r.r10, r.r11, r.r12), (2, 64, 9));
        assert_eq!(r.r15, 1 << 31);
        // An empty slice still divides by a non-zero page count.
        let idle = guest::slices(&"idle".parse().expect("idle"), 16 << 20, 1)[0];
        assert_eq!(entry_regs(&idle).r9, 1);
        assert_eq!((reset_fpu().fcw, reset_fpu().mxcsr), (0x37f, 0x1f80));
    }
}
