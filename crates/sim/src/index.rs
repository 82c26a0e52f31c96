//! An exact index for PABFD over many hosts.
//!
//! PABFD picks the host with the least power increase `P(a + x) - p_now` (a: allocated
//! fraction now, x: the VM's share, p_now: power at the start of the round). Scanning every
//! host for every VM is quadratic at 50,000 hosts, so hosts are kept per type in buckets of
//! allocated fraction. For a bucket, `min D(f) = P(f + x) - P(f)` over the bucket's fractions
//! is a lower bound of every member's increase (because `p_now <= P(a)` for hosts that did not
//! lose VMs this round; the others are kept in a side list and always checked). Buckets are
//! visited in order of their bound and the search stops once the bound exceeds the best
//! increase found, so the answer, including the lowest-id tie-break, is the same as a full
//! scan. Hosts with nothing allocated are grouped by (type, p_now): within a group they are
//! interchangeable, so only the lowest eligible id matters.
//!
//! Within a bucket, hosts are sorted by an *overload key* (see `OverloadPrune` in the engine):
//! a conservative lower bound of the detector's statistic, such that every host whose key is
//! at least a VM-dependent threshold is certainly over-utilised after taking that VM. A search
//! walks only the prefix below the threshold; the hosts it skips are exactly hosts the full
//! scan would have rejected, so the answer does not change. Without such a bound the key is
//! `-inf` and every host is walked.

use std::collections::{BTreeMap, BTreeSet};

/// Buckets per host type.
pub(crate) const BUCKETS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    None,
    Bucket(usize, usize),
    Empty(usize, u64),
}

/// A host filed in a bucket, with the two values PABFD's power difference needs, so a search
/// can compute it from the bucket alone (contiguous memory) before looking at the host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    /// Overload key (sort key, see the module docs).
    pub(crate) key: f64,
    pub(crate) host: u32,
    /// MIPS allocated now (`alloc_sum`).
    pub(crate) alloc_mips: f64,
    /// Power at the start of the round.
    pub(crate) power_now: f64,
}

/// Where each host currently sits.
#[derive(Debug, Clone)]
pub(crate) struct PabfdIndex {
    /// Per type and bucket: the hosts, sorted by key then host id.
    pub(crate) buckets: Vec<Vec<Vec<Entry>>>,
    /// Per type and bucket: the least key in the bucket (`+inf` when empty), so a search can
    /// tell which buckets may hold a candidate without visiting each bucket's storage.
    first_keys: Vec<[f64; BUCKETS]>,
    /// Per type and bucket: the greatest key (`-inf` when empty): when it is below a search's
    /// threshold the whole bucket qualifies, known without touching the bucket's far end.
    last_keys: Vec<[f64; BUCKETS]>,
    pub(crate) empty: BTreeMap<(usize, u64), BTreeSet<u32>>,
    /// Hosts whose allocation dropped below their start-of-round utilisation.
    pub(crate) shrunk: BTreeSet<u32>,
    slots: Vec<Slot>,
    /// Overload key each host is filed under in its bucket.
    keys: Vec<f64>,
    /// Hosts excluded for the rest of the round; kept out so searches never walk them.
    disabled: Vec<bool>,
}

impl PabfdIndex {
    pub(crate) fn new(types: usize, hosts: usize) -> Self {
        Self {
            buckets: vec![vec![Vec::new(); BUCKETS]; types],
            first_keys: vec![[f64::INFINITY; BUCKETS]; types],
            last_keys: vec![[f64::NEG_INFINITY; BUCKETS]; types],
            empty: BTreeMap::new(),
            shrunk: BTreeSet::new(),
            slots: vec![Slot::None; hosts],
            keys: vec![f64::NEG_INFINITY; hosts],
            disabled: vec![false; hosts],
        }
    }

    pub(crate) fn bucket_of(frac: f64) -> usize {
        ((frac.max(0.0) * BUCKETS as f64) as usize).min(BUCKETS - 1)
    }

    pub(crate) fn bucket_bounds(b: usize) -> (f64, f64) {
        (b as f64 / BUCKETS as f64, (b + 1) as f64 / BUCKETS as f64)
    }

    /// An index holding every host at once, each as [`PabfdIndex::update`] would file it (one
    /// sort per bucket instead of one sorted insertion per host). `items`: per host, its type,
    /// total MIPS, entry and whether its allocation shrank this round.
    pub(crate) fn from_hosts(
        types: usize,
        hosts: usize,
        items: impl Iterator<Item = (usize, f64, Entry, bool)>,
    ) -> Self {
        let mut index = Self::new(types, hosts);
        let mut empty: BTreeMap<(usize, u64), Vec<u32>> = BTreeMap::new();
        let mut shrunk = Vec::new();
        for (ty, total_mips, entry, is_shrunk) in items {
            let h = entry.host;
            let slot = Self::slot_for(ty, total_mips, &entry);
            match slot {
                Slot::None => {}
                Slot::Bucket(t, b) => index.buckets[t][b].push(entry),
                Slot::Empty(t, bits) => empty.entry((t, bits)).or_default().push(h),
            }
            if slot != Slot::None {
                index.slots[h as usize] = slot;
                index.keys[h as usize] = entry.key;
            }
            if is_shrunk {
                shrunk.push(h);
            }
        }
        for t in 0..types {
            for b in 0..BUCKETS {
                index.buckets[t][b]
                    .sort_unstable_by(|x, y| x.key.total_cmp(&y.key).then(x.host.cmp(&y.host)));
                index.note_key_range(t, b);
            }
        }
        index.empty = empty
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect();
        index.shrunk = shrunk.into_iter().collect();
        index
    }

    fn slot_for(ty: usize, total_mips: f64, entry: &Entry) -> Slot {
        let alloc_frac = entry.alloc_mips / total_mips;
        if alloc_frac == 0.0 {
            Slot::Empty(ty, entry.power_now.to_bits())
        } else {
            Slot::Bucket(ty, Self::bucket_of(alloc_frac))
        }
    }

    /// Takes host `h` out of the index for the rest of the round.
    pub(crate) fn disable(&mut self, h: u32) {
        self.move_to(
            h,
            Slot::None,
            Entry {
                key: f64::NEG_INFINITY,
                host: h,
                alloc_mips: 0.0,
                power_now: 0.0,
            },
        );
        self.shrunk.remove(&h);
        self.disabled[h as usize] = true;
    }

    /// Files host `entry.host` where its state says it belongs; `shrunk`: its allocation is
    /// below its start-of-round utilisation.
    pub(crate) fn update(&mut self, ty: usize, total_mips: f64, entry: Entry, shrunk: bool) {
        let h = entry.host;
        if self.disabled[h as usize] {
            return;
        }
        let slot = Self::slot_for(ty, total_mips, &entry);
        self.move_to(h, slot, entry);
        if shrunk {
            self.shrunk.insert(h);
        } else if !self.shrunk.is_empty() {
            self.shrunk.remove(&h);
        }
    }

    /// Where `(key, h)` sits (or would be inserted) in a sorted bucket.
    fn position(bucket: &[Entry], key: f64, h: u32) -> Result<usize, usize> {
        bucket.binary_search_by(|e| e.key.total_cmp(&key).then(e.host.cmp(&h)))
    }

    /// The least key in a bucket (`+inf` when empty).
    pub(crate) fn first_key(&self, ty: usize, b: usize) -> f64 {
        self.first_keys[ty][b]
    }

    fn note_key_range(&mut self, t: usize, b: usize) {
        let v = &self.buckets[t][b];
        self.first_keys[t][b] = v.first().map_or(f64::INFINITY, |e| e.key);
        self.last_keys[t][b] = v.last().map_or(f64::NEG_INFINITY, |e| e.key);
    }

    /// The hosts of a bucket whose key is below `threshold`: the only ones that may not be
    /// over-utilised after taking the VM the threshold was computed for.
    pub(crate) fn below(&self, ty: usize, b: usize, threshold: f64) -> &[Entry] {
        let v = &self.buckets[ty][b];
        // Often the whole bucket qualifies: one comparison instead of a binary search.
        if self.last_keys[ty][b] < threshold {
            return v;
        }
        let n = v.partition_point(|e| e.key < threshold);
        &v[..n]
    }

    fn move_to(&mut self, h: u32, slot: Slot, entry: Entry) {
        let old = self.slots[h as usize];
        let old_key = self.keys[h as usize];
        let key = entry.key;
        let same_key = old_key.total_cmp(&key).is_eq();
        if old == slot && same_key {
            if let Slot::Bucket(t, b) = slot {
                let v = &mut self.buckets[t][b];
                if let Ok(p) = Self::position(v, key, h) {
                    v[p] = entry;
                }
            }
        }
        if old != slot || (!same_key && matches!(slot, Slot::Bucket(..))) {
            match old {
                Slot::None => {}
                Slot::Bucket(t, b) => {
                    let v = &mut self.buckets[t][b];
                    if let Ok(p) = Self::position(v, old_key, h) {
                        v.remove(p);
                    }
                    self.note_key_range(t, b);
                }
                Slot::Empty(t, bits) => {
                    if let Some(set) = self.empty.get_mut(&(t, bits)) {
                        set.remove(&h);
                        if set.is_empty() {
                            self.empty.remove(&(t, bits));
                        }
                    }
                }
            }
            match slot {
                Slot::None => {}
                Slot::Bucket(t, b) => {
                    let v = &mut self.buckets[t][b];
                    let p = Self::position(v, key, h).unwrap_or_else(|p| p);
                    v.insert(p, entry);
                    self.note_key_range(t, b);
                }
                Slot::Empty(t, bits) => {
                    self.empty.entry((t, bits)).or_default().insert(h);
                }
            }
            self.slots[h as usize] = slot;
            self.keys[h as usize] = key;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn bulk_build_files_hosts_as_one_by_one_updates_do() {
        let mut rng = SplitMix64::new(7);
        let n = 3000;
        let items: Vec<(usize, f64, Entry, bool)> = (0..n)
            .map(|h| {
                let ty = h % 2;
                let total = [3720.0, 5320.0][ty];
                // A quarter empty (two power levels), keys with ties, some shrunk.
                let alloc = if h % 4 == 0 {
                    0.0
                } else {
                    rng.below(total as u64) as f64
                };
                let entry = Entry {
                    key: rng.below(8) as f64 / 8.0,
                    host: h as u32,
                    alloc_mips: alloc,
                    power_now: [86.0, 93.7][(h / 4) % 2],
                };
                (ty, total, entry, h % 7 == 0)
            })
            .collect();
        let bulk = PabfdIndex::from_hosts(2, n, items.iter().copied());
        let mut one = PabfdIndex::new(2, n);
        for &(ty, total, entry, shrunk) in &items {
            one.update(ty, total, entry, shrunk);
        }
        let ids = |v: &Vec<Vec<Vec<Entry>>>| -> Vec<Vec<Vec<(u64, u32)>>> {
            v.iter()
                .map(|t| {
                    t.iter()
                        .map(|b| b.iter().map(|e| (e.key.to_bits(), e.host)).collect())
                        .collect()
                })
                .collect()
        };
        assert_eq!(ids(&bulk.buckets), ids(&one.buckets));
        assert_eq!(bulk.empty, one.empty);
        assert_eq!(bulk.shrunk, one.shrunk);
        assert_eq!(bulk.slots, one.slots);
        for t in 0..2 {
            for b in 0..BUCKETS {
                assert_eq!(
                    bulk.first_key(t, b).to_bits(),
                    one.first_key(t, b).to_bits()
                );
                assert_eq!(
                    bulk.last_keys[t][b].to_bits(),
                    one.last_keys[t][b].to_bits()
                );
            }
        }
        assert!(!bulk.empty.is_empty() && !bulk.shrunk.is_empty());
    }
}
