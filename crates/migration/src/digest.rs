//! Per-page hash table and the whole-memory digest.
//!
//! Both ends keep one 64-bit xxh3 hash per guest page, updated as a page is sent (source: hash
//! of the bytes it put on the wire or copied) or received (destination: hash of the bytes now
//! in its memory). The completion digest is the xxh3 of that table, so the final check costs
//! O(pages) (512 KiB of hashing for 256 MiB of guest memory) instead of O(bytes) during
//! downtime. See PROTOCOL.md, "Digest".

use std::sync::atomic::{AtomicU64, Ordering};

use crate::vm::PAGE_SIZE;

/// Hash of one page's bytes.
pub fn hash_page_bytes(page: &[u8; PAGE_SIZE]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Hash of an all-zero page (what a zero page sent as a bit hashes to).
pub fn zero_page_hash() -> u64 {
    hash_page_bytes(&[0u8; PAGE_SIZE])
}

/// One hash per page, writable from several threads (multi-stream transports).
#[derive(Debug)]
pub struct PageHashes {
    table: Vec<AtomicU64>,
}

impl PageHashes {
    /// A table of `pages` entries, all set to the zero-page hash.
    pub fn new(pages: usize) -> Self {
        let z = zero_page_hash();
        Self {
            table: (0..pages).map(|_| AtomicU64::new(z)).collect(),
        }
    }

    /// Records the hash of page `page`; out-of-range indices are ignored.
    pub fn set(&self, page: usize, hash: u64) {
        if let Some(slot) = self.table.get(page) {
            slot.store(hash, Ordering::Relaxed);
        }
    }

    /// Hash recorded for `page`.
    pub fn get(&self, page: usize) -> Option<u64> {
        self.table.get(page).map(|s| s.load(Ordering::Relaxed))
    }

    /// Digest of the whole memory: xxh3 over the table in page order (little-endian words).
    pub fn digest(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for chunk in self.table.chunks(512) {
            let mut bytes = [0u8; 512 * 8];
            for (i, s) in chunk.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&s.load(Ordering::Relaxed).to_le_bytes());
            }
            h.update(&bytes[..chunk.len() * 8]);
        }
        h.digest()
    }

    /// What [`digest`](Self::digest) gives for a table of `pages` entries that were never
    /// set (every page the zero page), without building the table: a transport that adopts
    /// the memory copies no page and needs no table.
    pub fn untouched_digest(pages: usize) -> u64 {
        let bytes: Vec<u8> = std::iter::repeat_n(zero_page_hash().to_le_bytes(), 512)
            .flatten()
            .collect();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut left = pages;
        while left > 0 {
            let n = left.min(512);
            h.update(&bytes[..n * 8]);
            left -= n;
        }
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_untouched_digest_is_the_digest_of_a_fresh_table() {
        for pages in [0, 1, 511, 512, 513, 4096, 262_145] {
            assert_eq!(
                PageHashes::untouched_digest(pages),
                PageHashes::new(pages).digest(),
                "{pages} pages"
            );
        }
        assert_ne!(
            PageHashes::untouched_digest(2),
            PageHashes::untouched_digest(3)
        );
    }

    #[test]
    fn digest_depends_on_every_entry_and_position() {
        let a = PageHashes::new(1000);
        let b = PageHashes::new(1000);
        assert_eq!(a.digest(), b.digest());
        a.set(999, 42);
        assert_ne!(a.digest(), b.digest());
        b.set(998, 42);
        assert_ne!(a.digest(), b.digest());
        b.set(998, zero_page_hash());
        b.set(999, 42);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_page_hash_sees_every_byte() {
        let zero = [0u8; PAGE_SIZE];
        for at in [0, 1, PAGE_SIZE / 2, PAGE_SIZE - 1] {
            let mut p = zero;
            p[at] = 1;
            assert_ne!(hash_page_bytes(&p), hash_page_bytes(&zero), "byte {at}");
        }
        let mut a = zero;
        let mut b = zero;
        a[7] = 3;
        b[8] = 3;
        assert_ne!(hash_page_bytes(&a), hash_page_bytes(&b), "position");
    }

    #[test]
    fn a_new_table_holds_the_zero_page_hash_and_keeps_what_is_set() {
        let t = PageHashes::new(3);
        assert_eq!(t.get(1), Some(hash_page_bytes(&[0u8; PAGE_SIZE])));
        assert_eq!(zero_page_hash(), hash_page_bytes(&[0u8; PAGE_SIZE]));
        t.set(2, 0xDEAD_BEEF);
        assert_eq!(t.get(2), Some(0xDEAD_BEEF));
        assert_eq!(t.get(3), None);
        // Out of range: ignored, the table and its digest unchanged.
        let d = t.digest();
        t.set(3, 7);
        assert_eq!(t.digest(), d);
    }
}
