//! Shared dirty-page tracking on top of `KVM_GET_DIRTY_LOG`.
//!
//! `KVM_GET_DIRTY_LOG` returns *and clears* KVM's bitmap, so two consumers calling it directly
//! would steal each other's pages. The VM owns one fetcher; every fetch ORs KVM's bitmap into
//! each live subscriber's accumulated bitmap, and a subscriber then takes (and clears) only its
//! own.
//!
//! ```text
//!   KVM bitmap --fetch--> OR into [monitor acc] [migration acc] ...
//!                                      |take          |take
//! ```

use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::VmFd;

use crate::{VmmError, PAGE_SIZE};

/// The pages KVM's dirty log reported as written in an interval: bit `i` of the words is 4 KiB
/// page `i` (GPA `i * 4096`). The migration engine converts it into its own `DirtyBitmap`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmDirtyLog {
    /// The bitmap words, page `i` is bit `i % 64` of word `i / 64`.
    pub words: Vec<u64>,
}

impl KvmDirtyLog {
    /// An empty bitmap covering `pages` pages.
    pub fn new(pages: u64) -> Self {
        KvmDirtyLog {
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether page `page` is dirty.
    pub fn is_set(&self, page: u64) -> bool {
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Indices of the dirty pages, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut rest = w;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// Adds `other`'s pages to these (growing to its length).
    pub fn union(&mut self, other: &KvmDirtyLog) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        self.or_assign(&other.words);
    }

    fn or_assign(&mut self, other: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(other) {
            *a |= *b;
        }
    }
}

type Accumulator = Arc<Mutex<KvmDirtyLog>>;

/// The VM's single caller of `KVM_GET_DIRTY_LOG` and its subscribers.
pub(crate) struct DirtyLogSource {
    vm: Arc<VmFd>,
    slot: u32,
    mem_size: u64,
    subscribers: Mutex<Vec<Weak<Mutex<KvmDirtyLog>>>>,
}

impl DirtyLogSource {
    pub(crate) fn new(vm: Arc<VmFd>, slot: u32, mem_size: u64) -> Self {
        DirtyLogSource {
            vm,
            slot,
            mem_size,
            subscribers: Mutex::new(Vec::new()),
        }
    }

    fn pages(&self) -> u64 {
        self.mem_size / PAGE_SIZE as u64
    }

    /// Syncs KVM's bitmap into every live subscriber. Callers hold the subscriber lock.
    fn sync_locked(&self, subs: &mut Vec<Weak<Mutex<KvmDirtyLog>>>) -> Result<(), VmmError> {
        let bitmap = self
            .vm
            .get_dirty_log(self.slot, self.mem_size as usize)
            .map_err(|e| VmmError::kvm("KVM_GET_DIRTY_LOG", e))?;
        subs.retain(|w| w.strong_count() > 0);
        for sub in subs.iter().filter_map(Weak::upgrade) {
            sub.lock()
                .unwrap_or_else(|p| p.into_inner())
                .or_assign(&bitmap);
        }
        Ok(())
    }

    /// A new subscription that sees pages dirtied from now on.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Result<DirtyLogHandle, VmmError> {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        // Hand what KVM has so far to the existing subscribers, so the new one starts clean.
        self.sync_locked(&mut subs)?;
        let acc: Accumulator = Arc::new(Mutex::new(KvmDirtyLog::new(self.pages())));
        subs.push(Arc::downgrade(&acc));
        Ok(DirtyLogHandle {
            log: Arc::clone(self),
            acc,
        })
    }
}

/// One consumer's view of the dirty log. Dropping it unsubscribes.
pub struct DirtyLogHandle {
    log: Arc<DirtyLogSource>,
    acc: Accumulator,
}

impl DirtyLogHandle {
    /// Pages dirtied by the guest since this handle's previous fetch (or its creation).
    pub fn fetch(&self) -> Result<KvmDirtyLog, VmmError> {
        let mut subs = self
            .log
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.log.sync_locked(&mut subs)?;
        let mut acc = self.acc.lock().unwrap_or_else(|p| p.into_inner());
        let empty = KvmDirtyLog::new(self.log.pages());
        Ok(std::mem::replace(&mut *acc, empty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_helpers_count_and_iterate() {
        let mut b = KvmDirtyLog::new(130);
        assert_eq!(b.words.len(), 3);
        b.or_assign(&[0b101, 0, 1 << 1]);
        assert_eq!(b.count(), 3);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 2, 129]);
        assert!(b.is_set(129) && !b.is_set(1) && !b.is_set(10_000));
    }

    #[test]
    fn union_counts_a_page_dirtied_in_two_windows_once() {
        // The working-set window ORs each second's log: pages 0 and 2, then 2 and 129, are
        // three distinct pages; an empty accumulator grows to the log's length.
        let mut acc = KvmDirtyLog::default();
        let mut a = KvmDirtyLog::new(130);
        a.or_assign(&[0b101, 0, 0]);
        let mut b = KvmDirtyLog::new(130);
        b.or_assign(&[0b100, 0, 1 << 1]);
        acc.union(&a);
        acc.union(&b);
        assert_eq!(acc.words.len(), 3);
        assert_eq!(acc.iter_set().collect::<Vec<_>>(), vec![0, 2, 129]);
    }
}
