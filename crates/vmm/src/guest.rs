//! The built-in guest: memory layout, page tables, the one guest program, and a Rust mirror of
//! its page choice so the VMM can recompute what the guest wrote.
//!
//! Guest physical layout (identity mapped with 2 MiB pages up to 4 GiB):
//!
//! ```text
//! 0x0000_0000  page 0: unused (non-zero marker for `fill`)
//! 0x0000_1000  GDT (null, code64 0x08, data 0x10)
//! 0x0000_2000  PML4
//! 0x0000_3000  PDPT
//! 0x0000_4000  4 page directories (0x4000..0x8000), 2 MiB pages
//! 0x0000_8000  guest program (shared by all vCPUs)
//! 0x0001_0000  DATA_BASE: workload pages; vCPU c owns a contiguous slice
//! ```
//!
//! Each write stamps the page: bytes 0..8 = the writing vCPU's sequence number, bytes 8..16 =
//! the page frame number (GPA >> 12). The program keeps all its state in registers (set by the
//! VMM at boot): `rbx` next sequence number, `r8` slice base GPA, `r9` slice pages, `r10`
//! pattern, `r11` hot pages, `r12` seed, `r15` hot threshold (`hotw * 2^32`), `r13` batch end.
//! It asks the VMM for a batch with `in eax, 0x10`; the answer is a page count, or
//! `0xffff_ffff` to stop writing and halt forever (`idle`).

use crate::workload::{Pattern, WorkloadKind, WorkloadSpec};
use crate::PAGE_SIZE;

/// GPA of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// GPA of the PML4.
pub const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;
/// GPA where the guest program is loaded.
pub const CODE_ADDR: u64 = 0x8000;
/// First GPA of workload pages.
pub const DATA_BASE: u64 = 0x10000;
/// The mailbox port: `in eax, 0x10` asks for the next batch.
pub const MAILBOX_PORT: u16 = 0x10;
/// Answer that tells the guest to stop writing and halt forever.
pub const STOP_WRITING: u32 = u32::MAX;

/// The guest program, hand-assembled (GNU as, Intel syntax; listing in the comments, offsets
/// on the left). The two hash constants are splitmix64's.
pub const PROGRAM: &[u8] = &[
    0xe5, 0x10, //                         00 top:  in eax, 0x10
    0x83, 0xf8, 0xff, //                   02       cmp eax, -1
    0x0f, 0x84, 0x96, 0x00, 0x00, 0x00, // 05       je idle
    0x4c, 0x8d, 0x2c, 0x03, //             0b       lea r13, [rbx+rax]
    0x4c, 0x39, 0xeb, //                   0f loop: cmp rbx, r13
    0x73, 0xec, //                         12       jae top
    0x48, 0x89, 0xd8, //                   14       mov rax, rbx
    0x4d, 0x85, 0xd2, //                   17       test r10, r10
    0x74, 0x60, //                         1a       jz do_mod            (seq)
    0x4c, 0x01, 0xe0, //                   1c       add rax, r12
    0x48, 0xb9, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37,
    0x9e, // 1f movabs rcx, 0x9e3779b97f4a7c15
    0x48, 0x0f, 0xaf, 0xc1, //             29       imul rax, rcx
    0x48, 0x89, 0xc2, //                   2d       mov rdx, rax
    0x48, 0xc1, 0xea, 0x20, //             30       shr rdx, 32
    0x48, 0x31, 0xd0, //                   34       xor rax, rdx
    0x48, 0xb9, 0x93, 0xfd, 0x59, 0x66, 0xb8, 0xfe, 0xe8,
    0xd6, // 37 movabs rcx, 0xd6e8feb86659fd93
    0x48, 0x0f, 0xaf, 0xc1, //             41       imul rax, rcx
    0x48, 0x89, 0xc2, //                   45       mov rdx, rax
    0x48, 0xc1, 0xea, 0x20, //             48       shr rdx, 32
    0x48, 0x31, 0xd0, //                   4c       xor rax, rdx          (rax = hash)
    0x49, 0x83, 0xfa, 0x01, //             4f       cmp r10, 1
    0x74, 0x27, //                         53       je do_mod            (random)
    0x48, 0x89, 0xc2, //                   55       mov rdx, rax
    0x48, 0xc1, 0xea, 0x20, //             58       shr rdx, 32
    0x4c, 0x39, 0xfa, //                   5c       cmp rdx, r15
    0x73, 0x0a, //                         5f       jae cold
    0x31, 0xd2, //                         61       xor edx, edx
    0x49, 0xf7, 0xf3, //                   63       div r11
    0x48, 0x89, 0xd0, //                   66       mov rax, rdx          (hot: hash mod hot)
    0xeb, 0x19, //                         69       jmp have_idx
    0x4c, 0x89, 0xc9, //                   6b cold: mov rcx, r9
    0x4c, 0x29, 0xd9, //                   6e       sub rcx, r11
    0x31, 0xd2, //                         71       xor edx, edx
    0x48, 0xf7, 0xf1, //                   73       div rcx
    0x4a, 0x8d, 0x04,
    0x1a, //             76       lea rax, [rdx+r11]    (hot + hash mod cold)
    0xeb, 0x08, //                         7a       jmp have_idx
    0x31, 0xd2, //                         7c do_mod: xor edx, edx
    0x49, 0xf7, 0xf1, //                   7e       div r9
    0x48, 0x89, 0xd0, //                   81       mov rax, rdx
    0x48, 0xc1, 0xe0, 0x0c, //             84 have_idx: shl rax, 12
    0x4c, 0x01, 0xc0, //                   88       add rax, r8
    0x48, 0x89, 0xc2, //                   8b       mov rdx, rax
    0x48, 0xc1, 0xea, 0x0c, //             8e       shr rdx, 12
    0x48, 0x89, 0x50, 0x08, //             92       mov [rax+8], rdx      (stamp: pfn)
    0x48, 0x89, 0x18, //                   96       mov [rax], rbx        (stamp: seq)
    0x48, 0xff, 0xc3, //                   99 after_store: inc rbx
    0xe9, 0x6e, 0xff, 0xff, 0xff, //       9c       jmp loop
    0xf4, //                               a1 idle: hlt
    0xeb, 0xfd, //                         a2       jmp idle
];

/// Offset of `top` (first instruction).
pub const ENTRY_OFFSET: u64 = 0x00;
/// Offset of the sequence-number store. A vCPU stopped with RIP here has already written the
/// frame number of page `page_of(rbx)` but not yet its sequence number.
pub const SEQ_STORE_OFFSET: u64 = 0x96;
/// Offset of the instruction right after the sequence-number store: a vCPU stopped with RIP
/// here has written sequence number `rbx` but not yet incremented it.
pub const AFTER_STORE_OFFSET: u64 = 0x99;
/// Offset of the `hlt` loop.
pub const IDLE_OFFSET: u64 = 0xa1;

/// The part of the working set one vCPU writes, and the parameters it runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// First GPA of the slice.
    pub base: u64,
    /// Pages in the slice.
    pub pages: u64,
    /// Pattern code (`r10`).
    pub pattern: u64,
    /// Hot pages (`r11`), at least 1 and below `pages` for hotcold.
    pub hot_pages: u64,
    /// Seed (`r12`).
    pub seed: u64,
    /// Hot threshold (`r15`): a write goes hot when `hash >> 32 < hot_threshold`.
    pub hot_threshold: u64,
}

impl Slice {
    /// The page index (within the slice) that sequence number `seq` writes: the exact mirror of
    /// the guest program.
    pub fn page_of(&self, seq: u64) -> u64 {
        if self.pattern == 0 {
            return seq % self.pages;
        }
        let mut x = seq.wrapping_add(self.seed);
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 32;
        x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
        x ^= x >> 32;
        if self.pattern == 1 {
            return x % self.pages;
        }
        if (x >> 32) < self.hot_threshold {
            x % self.hot_pages
        } else {
            self.hot_pages + x % (self.pages - self.hot_pages)
        }
    }
}

/// Splits the workload's pages between `vcpus` vCPUs (contiguous slices; the last vCPU takes
/// the remainder). `fill` covers all memory from [`DATA_BASE`]; `idle` has empty slices.
pub fn slices(spec: &WorkloadSpec, mem_size: u64, vcpus: u8) -> Vec<Slice> {
    let n = u64::from(vcpus.max(1));
    let total_pages = match spec.kind {
        WorkloadKind::Idle => 0,
        WorkloadKind::Fill => mem_size.saturating_sub(DATA_BASE) / PAGE_SIZE as u64,
        WorkloadKind::Dirty | WorkloadKind::Verify => spec.wss / PAGE_SIZE as u64,
    };
    let per = total_pages / n;
    (0..n)
        .map(|c| {
            let pages = if c + 1 == n {
                total_pages - per * (n - 1)
            } else {
                per
            };
            let pattern = if spec.kind == WorkloadKind::Fill {
                Pattern::Seq
            } else {
                spec.pattern
            };
            let hot_pages =
                ((pages as f64 * spec.hot).round() as u64).clamp(1, pages.saturating_sub(1).max(1));
            let hot_threshold = (spec.hot_writes * 4_294_967_296.0).round() as u64;
            Slice {
                base: DATA_BASE + c * per * PAGE_SIZE as u64,
                pages,
                pattern: pattern.guest_code(),
                hot_pages,
                seed: spec.seed,
                hot_threshold: hot_threshold.min(1 << 32),
            }
        })
        .collect()
}

/// Writes the GDT, page tables and program into guest memory through `write(gpa, bytes)`.
pub fn load(mut write: impl FnMut(u64, &[u8])) {
    // Null, 64-bit code (L=1, P, DPL0, type 0xb), data (P, writable, type 0x3).
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    write(GDT_ADDR, &words(&gdt));
    // PML4[0] -> PDPT; PDPT[0..4] -> PDs; each PD maps 1 GiB with 2 MiB pages (PS bit 0x80).
    // Accessed (0x20) and Dirty (0x40) are preset: otherwise the MMU sets them on first use,
    // which writes the page-table pages and shows up in the dirty log as guest writes.
    write(PML4_ADDR, &(PDPT_ADDR | 0x23).to_le_bytes());
    let pdpt: Vec<u64> = (0..4)
        .map(|i| (PD_ADDR + i * PAGE_SIZE as u64) | 0x23)
        .collect();
    write(PDPT_ADDR, &words(&pdpt));
    let pd: Vec<u64> = (0..4 * 512u64).map(|i| (i << 21) | 0xe3).collect();
    write(PD_ADDR, &words(&pd));
    write(CODE_ADDR, PROGRAM);
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_offsets_match_the_listing() {
        assert_eq!(PROGRAM.len(), 0xa4);
        assert_eq!(
            &PROGRAM[AFTER_STORE_OFFSET as usize..][..3],
            &[0x48, 0xff, 0xc3]
        );
        assert_eq!(PROGRAM[IDLE_OFFSET as usize], 0xf4);
        assert_eq!(
            &PROGRAM[SEQ_STORE_OFFSET as usize..][..3],
            &[0x48, 0x89, 0x18]
        );
        assert_eq!(PROGRAM[ENTRY_OFFSET as usize], 0xe5);
    }

    #[test]
    fn slices_split_the_working_set_and_stay_in_range() {
        let spec: WorkloadSpec = "verify:wss=40K,pattern=hotcold,hot=0.5"
            .parse()
            .expect("spec");
        let s = slices(&spec, 1 << 20, 3);
        assert_eq!(s.iter().map(|x| x.pages).collect::<Vec<_>>(), vec![3, 3, 4]);
        assert_eq!(s[1].base, DATA_BASE + 3 * PAGE_SIZE as u64);
        for slice in &s {
            for seq in 0..1000 {
                assert!(slice.page_of(seq) < slice.pages);
            }
        }
        let fill = slices(&"fill".parse().expect("fill"), 1 << 20, 1);
        assert_eq!(fill[0].pages, ((1 << 20) - DATA_BASE) / PAGE_SIZE as u64);
    }

    #[test]
    fn hotcold_sends_about_hotw_of_writes_to_the_hot_pages() {
        let spec: WorkloadSpec = "dirty:wss=4M,pattern=hotcold,hot=0.1,hotw=0.9"
            .parse()
            .expect("spec");
        let s = slices(&spec, 8 << 20, 1)[0];
        assert_eq!(s.hot_pages, 102);
        let hot = (0..100_000).filter(|&q| s.page_of(q) < s.hot_pages).count();
        assert!((88_000..92_000).contains(&hot), "{hot}");
    }
}
