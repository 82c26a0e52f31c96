//! Raw access to guest memory that the guest may be writing at the same time.
//!
//! This is the only module (with the `shm` transport's mapping) that touches guest memory.
//! It never creates a `&[u8]` over guest memory: the guest can write any byte at any time, so
//! a shared reference would be a lie. Reads and writes are raw-pointer copies into/out of
//! buffers we own, or `iovec`s handed to the kernel.

use crate::vm::{MemoryRegion, RegionLayout, PAGE_SIZE};

#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    pages: usize,
    host_addr: usize,
    first_page: usize,
}

/// A safe view of a VM's mapped memory, addressed by page index (layout order) or by gpa.
///
/// Invariant (upheld by the [`crate::MigratableVm`] implementor, see [`MemoryRegion`]): every
/// region's `host_addr .. host_addr + size` is a live, writable mapping for as long as the VM
/// lives. The engine keeps the VM borrowed while a `MemoryView` is in use.
#[derive(Debug, Clone)]
pub struct MemoryView {
    regions: Vec<Region>,
    pages: usize,
}

/// Error for a region list that cannot be used (unaligned, overlapping the null page...).
#[derive(Debug, thiserror::Error)]
#[error("unusable guest memory region {index}: {reason}")]
pub struct BadRegion {
    /// Index of the region in the VM's list.
    pub index: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl MemoryView {
    /// Builds the view; checks alignment so that page arithmetic below cannot go out of a region.
    pub fn new(regions: &[MemoryRegion]) -> Result<Self, BadRegion> {
        let mut out = Vec::with_capacity(regions.len());
        let mut first_page = 0usize;
        for (index, r) in regions.iter().enumerate() {
            if r.size % PAGE_SIZE as u64 != 0 || r.gpa % PAGE_SIZE as u64 != 0 {
                return Err(BadRegion {
                    index,
                    reason: "gpa or size not page aligned",
                });
            }
            if r.host_addr == 0 || r.host_addr % PAGE_SIZE != 0 {
                return Err(BadRegion {
                    index,
                    reason: "host address null or not page aligned",
                });
            }
            let pages = (r.size / PAGE_SIZE as u64) as usize;
            out.push(Region {
                gpa: r.gpa,
                pages,
                host_addr: r.host_addr,
                first_page,
            });
            first_page += pages;
        }
        Ok(Self {
            regions: out,
            pages: first_page,
        })
    }

    /// Total number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The layout (gpa, size) of each region.
    pub fn layout(&self) -> Vec<RegionLayout> {
        self.regions
            .iter()
            .map(|r| RegionLayout {
                gpa: r.gpa,
                size: (r.pages * PAGE_SIZE) as u64,
            })
            .collect()
    }

    fn region_of(&self, page: usize) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages)
    }

    /// Guest-physical address of page `page`.
    pub fn page_gpa(&self, page: usize) -> Option<u64> {
        let r = self.region_of(page)?;
        Some(r.gpa + ((page - r.first_page) * PAGE_SIZE) as u64)
    }

    /// Page index of guest-physical address `gpa` (must be page aligned).
    pub fn gpa_to_page(&self, gpa: u64) -> Option<usize> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return None;
        }
        self.regions.iter().find_map(|r| {
            let end = r.gpa + (r.pages * PAGE_SIZE) as u64;
            (gpa >= r.gpa && gpa < end)
                .then(|| r.first_page + ((gpa - r.gpa) / PAGE_SIZE as u64) as usize)
        })
    }

    /// Host address of `count` contiguous pages starting at `page`, if they lie in one region.
    pub(crate) fn run_addr(&self, page: usize, count: usize) -> Option<usize> {
        let r = self.region_of(page)?;
        if page + count > r.first_page + r.pages {
            return None;
        }
        Some(r.host_addr + (page - r.first_page) * PAGE_SIZE)
    }

    /// True if `a` and `b` (consecutive indices) are also contiguous in host memory and gpa.
    pub(crate) fn same_region(&self, a: usize, b: usize) -> bool {
        match (self.region_of(a), self.region_of(b)) {
            (Some(x), Some(y)) => x.first_page == y.first_page,
            _ => false,
        }
    }

    /// Copies page `page` into `buf`. Returns false if the index is out of range.
    pub fn read_page(&self, page: usize, buf: &mut [u8; PAGE_SIZE]) -> bool {
        let Some(addr) = self.run_addr(page, 1) else {
            return false;
        };
        // SAFETY: `addr .. addr + PAGE_SIZE` lies inside a live mapping (struct invariant and
        // the bounds check in `run_addr`); `buf` is our own buffer and cannot overlap guest
        // memory. The guest may write concurrently: we copy bytes, never form a reference.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };
        true
    }

    /// Overwrites page `page` with `data`. Returns false if the index is out of range.
    pub fn write_page(&self, page: usize, data: &[u8; PAGE_SIZE]) -> bool {
        let Some(addr) = self.run_addr(page, 1) else {
            return false;
        };
        // SAFETY: as in `read_page`; the destination VM is not running while pages arrive.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, PAGE_SIZE) };
        true
    }

    /// Zeroes page `page` unless it is already zero (avoids faulting in untouched pages).
    pub fn zero_page(&self, page: usize) -> bool {
        if self.is_zero_page(page) {
            return self.run_addr(page, 1).is_some();
        }
        let Some(addr) = self.run_addr(page, 1) else {
            return false;
        };
        // SAFETY: as in `write_page`.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, PAGE_SIZE) };
        true
    }

    /// True if every byte of page `page` is zero, checked 64 bits at a time straight in guest
    /// memory (no copy). Out-of-range pages are reported non-zero.
    pub fn is_zero_page(&self, page: usize) -> bool {
        let Some(addr) = self.run_addr(page, 1) else {
            return false;
        };
        let words = addr as *const u64;
        for i in 0..PAGE_SIZE / 8 {
            // SAFETY: page-aligned address inside a live mapping (see `read_page`), so every
            // u64 is aligned and in bounds. Volatile: the guest may change it under us and the
            // compiler must not assume otherwise.
            if unsafe { std::ptr::read_volatile(words.add(i)) } != 0 {
                return false;
            }
        }
        true
    }

    /// Which pages of the run `first .. first + count` (at most 64 pages) start with eight
    /// zero bytes, as a mask (bit `i`: page `first + i`): the only pages `is_zero_page` can
    /// find zero. One load per page and no branch on its value, so the CPU overlaps the
    /// pages' cache misses; checking page after page waits for each page's first line from
    /// memory in turn, which cost the first pass more than the copy itself. `None` if the run
    /// is out of range or longer than 64 pages.
    pub fn zero_candidates(&self, first: usize, count: usize) -> Option<u64> {
        if count > 64 {
            return None;
        }
        let addr = self.run_addr(first, count)?;
        let mut mask = 0u64;
        for i in 0..count {
            // SAFETY: page `first + i` lies in the run `run_addr` bounds-checked inside a live
            // mapping; its first u64 is aligned. Volatile, as in `is_zero_page`.
            let word = unsafe { std::ptr::read_volatile((addr + i * PAGE_SIZE) as *const u64) };
            mask |= u64::from(word == 0) << i;
        }
        Some(mask)
    }

    /// 64-bit hash of page `page`, read in place (no copy into a buffer first).
    ///
    /// # Safety
    /// Nothing may write the page during the call: e.g. the shm source's mapping of the
    /// paused destination's memory, for a page it has just copied itself, or the paused shm
    /// destination's memory for a page the source has named as written in this round (the
    /// protocol orders its writes before); never the memory of a VM that may run.
    pub(crate) unsafe fn hash_page_unshared(&self, page: usize) -> Option<u64> {
        let addr = self.run_addr(page, 1)?;
        // SAFETY: `addr .. addr + PAGE_SIZE` lies inside a live mapping (struct invariant and
        // the bounds check in `run_addr`), and the caller guarantees nobody writes it while
        // the shared slice lives (this call).
        let bytes = unsafe { &*(addr as *const [u8; PAGE_SIZE]) };
        Some(crate::digest::hash_page_bytes(bytes))
    }

    /// 64-bit hash of page `page` as it is now (copied first, then hashed).
    pub fn hash_page(&self, page: usize) -> Option<u64> {
        let mut buf = [0u8; PAGE_SIZE];
        self.read_page(page, &mut buf)
            .then(|| crate::digest::hash_page_bytes(&buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_gpa_mapping() {
        let mut a = vec![0u64; 4 * PAGE_SIZE / 8 + PAGE_SIZE / 8];
        // Align by hand: find a page-aligned address inside the buffer.
        let base = (a.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let regions = [
            MemoryRegion {
                gpa: 0,
                size: 2 * PAGE_SIZE as u64,
                host_addr: base,
                fd: None,
                fd_offset: 0,
            },
            MemoryRegion {
                gpa: 1 << 20,
                size: 2 * PAGE_SIZE as u64,
                host_addr: base + 2 * PAGE_SIZE,
                fd: None,
                fd_offset: 0,
            },
        ];
        let m = MemoryView::new(&regions).expect("aligned");
        assert_eq!(m.pages(), 4);
        assert_eq!(m.page_gpa(2), Some(1 << 20));
        assert_eq!(m.gpa_to_page((1 << 20) + PAGE_SIZE as u64), Some(3));
        assert_eq!(m.gpa_to_page(2 * PAGE_SIZE as u64), None);
        assert!(!m.same_region(1, 2));
        assert!(m.run_addr(1, 2).is_none());
        assert!(m.is_zero_page(3));
        let mut page = [0u8; PAGE_SIZE];
        page[100] = 7;
        assert!(m.write_page(3, &page));
        assert!(!m.is_zero_page(3));
        let mut back = [0u8; PAGE_SIZE];
        assert!(m.read_page(3, &mut back));
        assert_eq!(back[100], 7);
        assert!(m.zero_page(3));
        assert!(m.is_zero_page(3));
        assert!(!m.read_page(4, &mut back));
        // Candidates for zero: pages whose first word is zero; none across a region end.
        page[100] = 0;
        page[0] = 1;
        assert!(m.write_page(2, &page));
        assert_eq!(m.zero_candidates(2, 2), Some(0b10));
        assert_eq!(m.zero_candidates(0, 2), Some(0b11));
        assert_eq!(m.zero_candidates(1, 2), None, "a run across regions");
        assert_eq!(m.zero_candidates(0, 65), None, "more than 64 pages");
        drop(a);
    }
}
