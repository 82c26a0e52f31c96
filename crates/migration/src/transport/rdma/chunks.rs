//! Guest memory cut into registration chunks, computed identically on both sides from the
//! layout and the chunk size the destination announces.

use crate::guestmem::MemoryView;
use crate::vm::{RegionLayout, PAGE_SIZE};

/// One chunk: pages `first .. first + pages` (page indices of the `MemoryView`), inside one
/// region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub first: usize,
    pub pages: usize,
}

#[derive(Debug, Clone, Copy)]
struct Region {
    first_page: usize,
    pages: usize,
    first_chunk: usize,
}

/// The chunks of a memory layout.
#[derive(Debug, Clone)]
pub(crate) struct Chunks {
    list: Vec<Chunk>,
    regions: Vec<Region>,
    /// Pages per chunk (the last of a region may be shorter); `usize::MAX`: one per region.
    chunk_pages: usize,
}

impl Chunks {
    /// `chunk_bytes` 0: one chunk per region (whole registration).
    pub(crate) fn new(layout: &[RegionLayout], chunk_bytes: u64) -> Option<Self> {
        let chunk_pages = match chunk_bytes {
            0 => usize::MAX,
            b if b % PAGE_SIZE as u64 == 0 => usize::try_from(b / PAGE_SIZE as u64).ok()?,
            _ => return None,
        };
        let mut list = Vec::new();
        let mut regions = Vec::new();
        let mut first_page = 0;
        for r in layout {
            let pages = (r.size / PAGE_SIZE as u64) as usize;
            regions.push(Region {
                first_page,
                pages,
                first_chunk: list.len(),
            });
            let mut p = 0;
            while p < pages {
                let n = (pages - p).min(chunk_pages);
                list.push(Chunk {
                    first: first_page + p,
                    pages: n,
                });
                p += n;
            }
            first_page += pages;
        }
        Some(Self {
            list,
            regions,
            chunk_pages,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn get(&self, i: usize) -> Option<Chunk> {
        self.list.get(i).copied()
    }

    /// The chunk holding `page`.
    pub(crate) fn of(&self, page: usize) -> Option<usize> {
        let r = self
            .regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages)?;
        let within = page - r.first_page;
        Some(r.first_chunk + within.checked_div(self.chunk_pages).unwrap_or(0))
    }

    /// True when every page of chunk `i` is zero in `mem` now.
    pub(crate) fn is_zero(&self, mem: &MemoryView, i: usize) -> bool {
        self.get(i)
            .is_some_and(|c| (c.first..c.first + c.pages).all(|p| mem.is_zero_page(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::MemoryRegion;

    #[test]
    fn chunks_follow_regions_and_the_size() {
        // Two regions of 5 and 3 pages (one buffer), chunks of 2 pages.
        let mut buf = vec![0u8; 9 * PAGE_SIZE];
        let base = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let region = |gpa: u64, at: usize, pages: usize| MemoryRegion {
            gpa,
            size: (pages * PAGE_SIZE) as u64,
            host_addr: base + at * PAGE_SIZE,
            fd: None,
            fd_offset: 0,
        };
        let mem = MemoryView::new(&[region(0, 0, 5), region(1 << 30, 5, 3)]).expect("mem");
        let c = Chunks::new(&mem.layout(), 2 * PAGE_SIZE as u64).expect("chunks");
        // Region 0: [0,1] [2,3] [4]; region 1: [5,6] [7].
        let firsts: Vec<_> = (0..c.len())
            .map(|i| c.get(i).map(|k| (k.first, k.pages)))
            .collect();
        assert_eq!(
            firsts,
            [
                Some((0, 2)),
                Some((2, 2)),
                Some((4, 1)),
                Some((5, 2)),
                Some((7, 1))
            ]
        );
        let of: Vec<_> = (0..9).map(|p| c.of(p)).collect();
        assert_eq!(
            of,
            [
                Some(0),
                Some(0),
                Some(1),
                Some(1),
                Some(2),
                Some(3),
                Some(3),
                Some(4),
                None
            ]
        );
        let whole = Chunks::new(&mem.layout(), 0).expect("whole");
        assert_eq!(whole.len(), 2);
        assert_eq!((whole.of(4), whole.of(5)), (Some(0), Some(1)));
        assert!(
            Chunks::new(&mem.layout(), 100).is_none(),
            "not a page multiple"
        );
        assert!(c.is_zero(&mem, 1));
        assert!(mem.write_page(3, &[1u8; PAGE_SIZE]));
        assert!(!c.is_zero(&mem, 1) && c.is_zero(&mem, 0));
        drop(buf);
    }
}
