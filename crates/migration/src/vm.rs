//! The seam between the migration engine and a VM: [`MigratableVm`] and its plain data types.
//!
//! The engine never sees KVM. A real VMM implements this trait over its KVM VM; tests use
//! [`crate::test_utils::SoftVm`].

use serde::{Deserialize, Serialize};

/// Size of a guest page as tracked by the dirty log and sent on the wire, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// An error reported by a [`MigratableVm`] implementation (boxed source, one line of context).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct VmError {
    context: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl VmError {
    /// An error with only a message.
    pub fn msg(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// An error with a message and the underlying cause.
    pub fn with_source(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Guest-physical placement of one memory region, as compared in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical start address (page aligned).
    pub gpa: u64,
    /// Size in bytes (multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

/// What both ends must agree on before any page moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLayout {
    /// Memory regions in the order their pages are numbered (page index 0 is the first page
    /// of the first region).
    pub regions: Vec<RegionLayout>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// VM feature bits (CPU model, devices); must be equal on both ends.
    pub features: u64,
}

impl VmLayout {
    /// Total guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total number of pages.
    pub fn pages(&self) -> u64 {
        self.memory_bytes() / PAGE_SIZE as u64
    }

    /// Why `other` cannot receive a VM laid out as `self`, or `None` if it can.
    pub fn incompatibility(&self, other: &VmLayout) -> Option<String> {
        if self.memory_bytes() != other.memory_bytes() {
            return Some(format!(
                "memory size mismatch: source has {} bytes, destination has {} bytes",
                self.memory_bytes(),
                other.memory_bytes()
            ));
        }
        if self.regions != other.regions {
            return Some(format!(
                "memory layout mismatch: source regions {:?}, destination regions {:?}",
                self.regions, other.regions
            ));
        }
        if self.vcpus != other.vcpus {
            return Some(format!(
                "vCPU count mismatch: source has {}, destination has {}",
                self.vcpus, other.vcpus
            ));
        }
        if self.features != other.features {
            return Some(format!(
                "feature mismatch: source {:#x}, destination {:#x}",
                self.features, other.features
            ));
        }
        None
    }
}

/// One mapped guest memory region, as the VMM sees it.
///
/// `host_addr` must point to a mapping of `size` bytes that stays valid for as long as the
/// VM object that returned it lives; the guest may write it concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping (a `MAP_SHARED` memfd mapping for real VMs).
    pub host_addr: usize,
    /// The memfd backing the mapping, if any (needed by the `shm` and `handover` transports).
    pub fd: Option<i32>,
    /// Offset of this region inside `fd`, in bytes.
    pub fd_offset: u64,
}

/// Pages written since the last sync, one bit per page in layout page order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// An all-dirty bitmap (the first full pass).
    pub fn all(pages: usize) -> Self {
        let mut b = Self::new(pages);
        for i in 0..pages {
            b.set(i);
        }
        b
    }

    /// Builds a bitmap from raw 64-bit words (KVM's `KVM_GET_DIRTY_LOG` layout, bit i of word
    /// w = page 64*w+i); bits past `pages` are ignored.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Self { words, pages }
    }

    /// ORs a per-region bitmap (KVM layout, one `KVM_GET_DIRTY_LOG` result) into this
    /// global bitmap, its page 0 landing on global page `first_page`.
    pub fn or_region_words(&mut self, first_page: usize, words: &[u64]) {
        for (wi, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                self.set(first_page + wi * 64 + bit);
            }
        }
    }

    /// Number of pages covered.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// True if the bitmap covers no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Marks page `i` dirty; out-of-range indices are ignored.
    pub fn set(&mut self, i: usize) {
        if i < self.pages {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// True if page `i` is dirty.
    pub fn get(&self, i: usize) -> bool {
        i < self.pages && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Adds every page dirty in `other` (pages beyond our length are ignored).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
    }

    /// Indices of dirty pages, ascending.
    pub fn iter_dirty(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }
}

/// A VM the engine can migrate. Required methods have no default bodies on purpose: an empty
/// `impl` must not compile into a VM that silently saves nothing.
///
/// ```compile_fail
/// struct Nothing;
/// impl fastmig_migration::MigratableVm for Nothing {}
/// ```
pub trait MigratableVm: Send + Sync {
    /// Memory regions, vCPU count and features, for the handshake.
    fn layout(&self) -> VmLayout;
    /// The mapped memory regions, in the same order as [`VmLayout::regions`].
    fn memory(&self) -> Vec<MemoryRegion>;
    /// Begins dirty tracking; pages written from now on show up in the next sync.
    fn start_dirty_log(&self) -> Result<(), VmError>;
    /// Pages written since the previous sync (or since start), and clears them (fetch-and-clear).
    fn sync_dirty_log(&self) -> Result<DirtyBitmap, VmError>;
    /// Ends dirty tracking.
    fn stop_dirty_log(&self) -> Result<(), VmError>;
    /// Stops the vCPUs; returns once no vCPU runs guest code any more.
    fn pause(&self) -> Result<(), VmError>;
    /// Restarts the vCPUs.
    fn resume(&self) -> Result<(), VmError>;
    /// Device and vCPU state as opaque bytes. Only called while paused.
    fn save_state(&self) -> Result<Vec<u8>, VmError>;
    /// Loads state produced by [`MigratableVm::save_state`] on the peer. Only called while paused.
    fn restore_state(&self, state: &[u8]) -> Result<(), VmError>;
}

/// A borrowed VM is a VM (a destination that keeps its VM after `receive`, tests).
impl<T: MigratableVm + ?Sized> MigratableVm for &T {
    fn layout(&self) -> VmLayout {
        (**self).layout()
    }
    fn memory(&self) -> Vec<MemoryRegion> {
        (**self).memory()
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        (**self).start_dirty_log()
    }
    fn sync_dirty_log(&self) -> Result<DirtyBitmap, VmError> {
        (**self).sync_dirty_log()
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        (**self).stop_dirty_log()
    }
    fn pause(&self) -> Result<(), VmError> {
        (**self).pause()
    }
    fn resume(&self) -> Result<(), VmError> {
        (**self).resume()
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        (**self).save_state()
    }
    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        (**self).restore_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_set_count_iter() {
        let mut b = DirtyBitmap::new(130);
        for i in [0, 63, 64, 129, 500] {
            b.set(i);
        }
        assert_eq!(b.count(), 4);
        assert_eq!(b.iter_dirty().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert!(b.get(129) && !b.get(128));
        let from = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX, u64::MAX], 130);
        assert_eq!(from.count(), 130);
        let mut g = DirtyBitmap::new(200);
        g.or_region_words(100, &[0b101, 1 << 3, u64::MAX]);
        // Region bits 0, 2 and 64+3 land on pages 100, 102 and 167; word 2 (pages 228..)
        // lies past the 200 pages and is dropped.
        assert_eq!(g.iter_dirty().collect::<Vec<_>>(), vec![100, 102, 167]);
    }

    #[test]
    fn layout_mismatch_reasons() {
        let a = VmLayout {
            regions: vec![RegionLayout {
                gpa: 0,
                size: 1 << 20,
            }],
            vcpus: 1,
            features: 0,
        };
        let mut b = a.clone();
        assert!(a.incompatibility(&b).is_none());
        b.regions[0].size = 2 << 20;
        assert!(a
            .incompatibility(&b)
            .unwrap_or_default()
            .contains("memory size mismatch"));
        let mut c = a.clone();
        c.vcpus = 2;
        assert!(a.incompatibility(&c).unwrap_or_default().contains("vCPU"));
    }
}
