//! The verify replay: recomputes, from a vCPU's registers alone, the stamp every page of its
//! slice must hold, and compares it with guest memory. Pure: memory comes in through a
//! closure, so the checker is tested here without KVM.
//!
//! Each `verify` write stamps its page with `(seq, pfn)` (see [`crate::guest`]). A vCPU
//! stopped with `rbx = n` has written sequence numbers `0..n`, except at two instructions:
//!
//! ```text
//!  mov [rax+8], rdx   ; pfn store
//!  mov [rax], rbx     ; SEQ_STORE_OFFSET: pfn of page_of(rbx) written, seq not yet
//!  inc rbx            ; AFTER_STORE_OFFSET: seq rbx written, rbx not yet counted
//! ```

use serde::{Deserialize, Serialize};

use crate::guest::{self, Slice};
use crate::{VmmError, PAGE_SIZE};

/// Most bad pages [`VerifyReport::first_errors`] describes.
pub const MAX_REPORTED: usize = 8;

/// Result of [`crate::Vm::verify_memory`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Working-set pages whose stamp was checked.
    pub pages_checked: u64,
    /// Writes (sequence numbers, over all vCPUs) the guest had made when checked.
    pub writes_replayed: u64,
    /// Pages whose stamp was not the expected one.
    pub errors: u64,
    /// Up to [`MAX_REPORTED`] descriptions of bad pages, each naming the vCPU and the GPA.
    pub first_errors: Vec<String>,
}

impl VerifyReport {
    /// True when every checked page held its expected stamp.
    pub fn is_clean(&self) -> bool {
        self.errors == 0
    }
}

/// Where a vCPU of the `verify` program stopped: its `rbx` (next sequence number) and `rip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StopPoint {
    /// Next sequence number.
    pub rbx: u64,
    /// Instruction pointer.
    pub rip: u64,
}

/// Checks one vCPU's slice and adds the result to `report`. `read_stamp(gpa)` returns the
/// first 16 bytes of the page at `gpa`.
pub(crate) fn check_slice(
    vcpu: usize,
    slice: &Slice,
    stop: StopPoint,
    mut read_stamp: impl FnMut(u64) -> Result<[u8; 16], VmmError>,
    report: &mut VerifyReport,
) -> Result<(), VmmError> {
    // Stopped right after the store, the guest has written `rbx` without counting it.
    let written = stop.rbx + u64::from(stop.rip == guest::CODE_ADDR + guest::AFTER_STORE_OFFSET);
    // Stopped between the two stores, the next page already has its frame number.
    let half_written =
        (stop.rip == guest::CODE_ADDR + guest::SEQ_STORE_OFFSET).then(|| slice.page_of(stop.rbx));
    let last = last_writes(slice, written);
    report.writes_replayed += written;
    for (i, expect) in last.iter().enumerate() {
        let gpa = slice.base + i as u64 * PAGE_SIZE as u64;
        let stamp = read_stamp(gpa)?;
        let (seq, pfn) = split_stamp(&stamp);
        let own_pfn = gpa / PAGE_SIZE as u64;
        let ok = match expect {
            Some(s) => seq == *s && pfn == own_pfn,
            None if half_written == Some(i as u64) => seq == 0 && (pfn == 0 || pfn == own_pfn),
            None => seq == 0 && pfn == 0,
        };
        report.pages_checked += 1;
        if !ok {
            report.errors += 1;
            if report.first_errors.len() < MAX_REPORTED {
                let expected = expect.map_or("never written".to_string(), |s| format!("seq {s}"));
                report.first_errors.push(format!(
                    "vCPU {vcpu} page {gpa:#x}: found seq {seq} pfn {pfn:#x}, expected {expected}"
                ));
            }
        }
    }
    Ok(())
}

/// The last sequence number (of `0..written`) that wrote each page of the slice, `None` for
/// pages never written.
fn last_writes(slice: &Slice, written: u64) -> Vec<Option<u64>> {
    let mut last: Vec<Option<u64>> = vec![None; slice.pages as usize];
    // Walk backwards: the first time a page comes up is its last write. Stop once every page
    // is accounted for, so long runs cost ~n log n, not one step per write.
    let mut unseen = slice.pages;
    for seq in (0..written).rev() {
        let page = &mut last[slice.page_of(seq) as usize];
        if page.is_none() {
            *page = Some(seq);
            unseen -= 1;
            if unseen == 0 {
                break;
            }
        }
    }
    last
}

fn split_stamp(stamp: &[u8; 16]) -> (u64, u64) {
    let mut seq = [0u8; 8];
    let mut pfn = [0u8; 8];
    seq.copy_from_slice(&stamp[..8]);
    pfn.copy_from_slice(&stamp[8..]);
    (u64::from_le_bytes(seq), u64::from_le_bytes(pfn))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::workload::WorkloadSpec;

    /// A software guest: runs the `verify` program's writes for one slice into a sparse
    /// memory of stamps, exactly as the guest code does.
    struct Guest {
        slice: Slice,
        mem: HashMap<u64, [u8; 16]>,
        rbx: u64,
    }

    fn stamp(seq: u64, pfn: u64) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&seq.to_le_bytes());
        s[8..].copy_from_slice(&pfn.to_le_bytes());
        s
    }

    impl Guest {
        fn new(spec: &str, vcpus: u8, vcpu: usize) -> Guest {
            let spec: WorkloadSpec = spec.parse().expect("spec");
            let slice = guest::slices(&spec, 64 << 20, vcpus)[vcpu];
            Guest {
                slice,
                mem: HashMap::new(),
                rbx: 0,
            }
        }

        fn gpa(&self, seq: u64) -> u64 {
            self.slice.base + self.slice.page_of(seq) * PAGE_SIZE as u64
        }

        fn run(&mut self, writes: u64) {
            for _ in 0..writes {
                let gpa = self.gpa(self.rbx);
                self.mem
                    .insert(gpa, stamp(self.rbx, gpa / PAGE_SIZE as u64));
                self.rbx += 1;
            }
        }

        fn check_at(&self, rip_offset: u64) -> VerifyReport {
            let mut report = VerifyReport::default();
            let stop = StopPoint {
                rbx: self.rbx,
                rip: guest::CODE_ADDR + rip_offset,
            };
            check_slice(
                3,
                &self.slice,
                stop,
                |gpa| {
                    assert!(
                        gpa >= self.slice.base
                            && gpa < self.slice.base + self.slice.pages * PAGE_SIZE as u64,
                        "read outside the slice: {gpa:#x}"
                    );
                    Ok(self.mem.get(&gpa).copied().unwrap_or_default())
                },
                &mut report,
            )
            .expect("check");
            report
        }

        fn check(&self) -> VerifyReport {
            self.check_at(guest::ENTRY_OFFSET)
        }
    }

    const SPECS: [&str; 3] = [
        "verify:wss=64K,pattern=seq",
        "verify:wss=64K,pattern=random,seed=7",
        "verify:wss=128K,pattern=hotcold,hot=0.25,hotw=0.75",
    ];

    fn only_error_names(report: &VerifyReport, gpa: u64) {
        assert_eq!(report.errors, 1, "{:?}", report.first_errors);
        assert!(
            report.first_errors[0].contains(&format!("vCPU 3 page {gpa:#x}:")),
            "{:?} does not name page {gpa:#x}",
            report.first_errors
        );
    }

    #[test]
    fn an_untouched_guest_checks_clean_at_every_point() {
        for spec in SPECS {
            let mut g = Guest::new(spec, 2, 1);
            for writes in [0, 1, 5, 40, 300] {
                g.run(writes);
                let r = g.check();
                assert_eq!(r.errors, 0, "{spec}: {:?}", r.first_errors);
                assert!(r.is_clean());
                assert_eq!(r.pages_checked, g.slice.pages);
                assert_eq!(r.writes_replayed, g.rbx);
            }
        }
    }

    #[test]
    fn a_lost_write_is_found_and_named() {
        for spec in SPECS {
            let mut g = Guest::new(spec, 2, 1);
            g.run(200);
            // Undo the last write: its page keeps the stamp of its previous write (or none).
            let seq = g.rbx - 1;
            let gpa = g.gpa(seq);
            let previous = (0..seq).rev().find(|&s| g.gpa(s) == gpa);
            let old = previous.map_or([0; 16], |s| stamp(s, gpa / PAGE_SIZE as u64));
            g.mem.insert(gpa, old);
            only_error_names(&g.check(), gpa);
        }
    }

    #[test]
    fn a_stale_stamp_is_found_and_named() {
        let mut g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        g.run(100);
        // 16 pages written in order: page 2 was last written by seq 98 (2 + 6 * 16); an older
        // image of it holds seq 82.
        let gpa = g.slice.base + 2 * PAGE_SIZE as u64;
        assert_eq!(g.mem[&gpa], stamp(98, gpa / PAGE_SIZE as u64));
        g.mem.insert(gpa, stamp(82, gpa / PAGE_SIZE as u64));
        let r = g.check();
        only_error_names(&r, gpa);
        assert!(
            r.first_errors[0].contains("found seq 82"),
            "{:?}",
            r.first_errors
        );
        assert!(
            r.first_errors[0].contains("expected seq 98"),
            "{:?}",
            r.first_errors
        );
        // A stamp from the future (the next write to page 2) is wrong too.
        g.mem.insert(gpa, stamp(114, gpa / PAGE_SIZE as u64));
        only_error_names(&g.check(), gpa);
    }

    #[test]
    fn a_page_from_a_guest_with_another_seed_is_found_and_named() {
        let mut g = Guest::new("verify:wss=64K,pattern=random,seed=1", 1, 0);
        let mut other = Guest::new("verify:wss=64K,pattern=random,seed=2", 1, 0);
        g.run(100);
        other.run(100);
        let gpa = (0..g.slice.pages)
            .map(|p| g.slice.base + p * PAGE_SIZE as u64)
            .find(|gpa| g.mem.get(gpa) != other.mem.get(gpa))
            .expect("two seeds leave some page different");
        match other.mem.get(&gpa) {
            Some(s) => g.mem.insert(gpa, *s),
            None => g.mem.remove(&gpa),
        };
        only_error_names(&g.check(), gpa);
    }

    #[test]
    fn a_misplaced_write_and_a_stray_write_are_found() {
        let mut g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        g.run(10);
        // Right sequence number, wrong frame number.
        let gpa = g.slice.base + 5 * PAGE_SIZE as u64;
        g.mem.insert(gpa, stamp(5, 7));
        only_error_names(&g.check(), gpa);
        g.mem.insert(gpa, stamp(5, gpa / PAGE_SIZE as u64));
        // A page the guest never wrote: any seq or any pfn is an error.
        let never = g.slice.base + 12 * PAGE_SIZE as u64;
        g.mem.insert(never, stamp(0, never / PAGE_SIZE as u64));
        only_error_names(&g.check(), never);
        g.mem.insert(never, stamp(3, 0));
        only_error_names(&g.check(), never);
    }

    #[test]
    fn a_pause_between_the_two_stores_is_not_an_error() {
        let mut g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        g.run(10);
        // Stopped on the seq store of seq 10 (page 10, never written): nothing visible yet is
        // accepted too (a copy taken before the pfn store reached memory).
        let gpa = g.gpa(g.rbx);
        assert_eq!(g.check_at(guest::SEQ_STORE_OFFSET).errors, 0);
        // Or pfn only.
        g.mem.insert(gpa, stamp(0, gpa / PAGE_SIZE as u64));
        assert_eq!(g.check_at(guest::SEQ_STORE_OFFSET).errors, 0);
        // Elsewhere the same memory is an error: that page should be all zero.
        only_error_names(&g.check(), gpa);
        // And between the stores a wrong pfn is still wrong.
        g.mem.insert(gpa, stamp(0, 1));
        only_error_names(&g.check_at(guest::SEQ_STORE_OFFSET), gpa);
        // Only the page of `rbx` may be half written.
        g.mem.insert(gpa, [0; 16]);
        let other = g.slice.base + 11 * PAGE_SIZE as u64;
        g.mem.insert(other, stamp(0, other / PAGE_SIZE as u64));
        only_error_names(&g.check_at(guest::SEQ_STORE_OFFSET), other);
    }

    #[test]
    fn a_pause_after_the_seq_store_counts_that_write() {
        let mut g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        g.run(11);
        // Seq 10 stored, `inc rbx` not yet run: rbx is still 10.
        g.rbx -= 1;
        let r = g.check_at(guest::AFTER_STORE_OFFSET);
        assert_eq!(r.errors, 0, "{:?}", r.first_errors);
        assert_eq!(r.writes_replayed, 11);
        // Anywhere else with rbx = 10, that stamp is one write too many.
        only_error_names(&g.check(), g.gpa(10));
    }

    #[test]
    fn reports_add_up_over_vcpus_and_cap_the_descriptions() {
        let mut g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        g.run(16);
        for p in 0..12 {
            g.mem
                .insert(g.slice.base + p * PAGE_SIZE as u64, stamp(999, 0));
        }
        let mut report = g.check();
        assert_eq!(report.errors, 12);
        assert_eq!(report.first_errors.len(), MAX_REPORTED);
        assert!(!report.is_clean());
        let stop = StopPoint {
            rbx: g.rbx,
            rip: guest::CODE_ADDR,
        };
        check_slice(
            4,
            &g.slice,
            stop,
            |gpa| Ok(g.mem.get(&gpa).copied().unwrap_or_default()),
            &mut report,
        )
        .expect("check");
        assert_eq!(report.errors, 24);
        assert_eq!(report.pages_checked, 32);
        assert_eq!(report.writes_replayed, 32);
        assert_eq!(report.first_errors.len(), MAX_REPORTED);
    }

    #[test]
    fn a_long_history_is_replayed_from_its_end() {
        // A guest that made 2^40 writes: the replay stops once every page has its last write
        // (one pass over the slice) instead of walking the whole history, which would not
        // finish.
        let g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        let written = 1u64 << 40;
        let last = last_writes(&g.slice, written);
        assert_eq!(last.len(), 16);
        // seq pattern: page p was last written by the largest seq < 2^40 with seq % 16 == p.
        for (p, seq) in last.iter().enumerate() {
            assert_eq!(*seq, Some(written - 16 + p as u64), "page {p}");
        }
        // Fewer writes than pages: the rest were never written.
        let last = last_writes(&g.slice, 3);
        assert_eq!(&last[..4], &[Some(0), Some(1), Some(2), None]);
    }

    #[test]
    fn a_read_error_is_returned() {
        let g = Guest::new("verify:wss=64K,pattern=seq", 1, 0);
        let mut report = VerifyReport::default();
        let stop = StopPoint { rbx: 0, rip: 0 };
        let r = check_slice(
            0,
            &g.slice,
            stop,
            |gpa| Err(VmmError::OutOfRange { gpa, len: 16 }),
            &mut report,
        );
        assert!(matches!(r, Err(VmmError::OutOfRange { .. })));
    }
}
