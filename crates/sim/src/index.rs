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

use std::collections::{BTreeMap, BTreeSet};

/// Buckets per host type.
const BUCKETS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    None,
    Bucket(usize, usize),
    Empty(usize, u64),
}

/// Where each host currently sits.
#[derive(Debug, Clone)]
pub(crate) struct PabfdIndex {
    pub(crate) buckets: Vec<Vec<Vec<u32>>>,
    pub(crate) empty: BTreeMap<(usize, u64), BTreeSet<u32>>,
    /// Hosts whose allocation dropped below their start-of-round utilisation.
    pub(crate) shrunk: BTreeSet<u32>,
    slots: Vec<Slot>,
    /// Position of each host inside its bucket vector.
    pos: Vec<usize>,
    /// Hosts excluded for the rest of the round; kept out so searches never walk them.
    disabled: Vec<bool>,
}

impl PabfdIndex {
    pub(crate) fn new(types: usize, hosts: usize) -> Self {
        Self {
            buckets: vec![vec![Vec::new(); BUCKETS]; types],
            empty: BTreeMap::new(),
            shrunk: BTreeSet::new(),
            slots: vec![Slot::None; hosts],
            pos: vec![0; hosts],
            disabled: vec![false; hosts],
        }
    }

    pub(crate) fn bucket_of(frac: f64) -> usize {
        ((frac.max(0.0) * BUCKETS as f64) as usize).min(BUCKETS - 1)
    }

    pub(crate) fn bucket_bounds(b: usize) -> (f64, f64) {
        (b as f64 / BUCKETS as f64, (b + 1) as f64 / BUCKETS as f64)
    }

    /// Takes host `h` out of the index for the rest of the round.
    pub(crate) fn disable(&mut self, h: u32) {
        self.move_to(h, Slot::None);
        self.shrunk.remove(&h);
        self.disabled[h as usize] = true;
    }

    /// Moves host `h` to where its state says it belongs.
    pub(crate) fn update(
        &mut self,
        h: u32,
        ty: usize,
        alloc_frac: f64,
        power_now: f64,
        shrunk: bool,
    ) {
        if self.disabled[h as usize] {
            return;
        }
        let slot = if alloc_frac == 0.0 {
            Slot::Empty(ty, power_now.to_bits())
        } else {
            Slot::Bucket(ty, Self::bucket_of(alloc_frac))
        };
        self.move_to(h, slot);
        if shrunk {
            self.shrunk.insert(h);
        } else if !self.shrunk.is_empty() {
            self.shrunk.remove(&h);
        }
    }

    fn move_to(&mut self, h: u32, slot: Slot) {
        let old = self.slots[h as usize];
        if old != slot {
            match old {
                Slot::None => {}
                Slot::Bucket(t, b) => {
                    let v = &mut self.buckets[t][b];
                    let p = self.pos[h as usize];
                    v.swap_remove(p);
                    if let Some(&moved) = v.get(p) {
                        self.pos[moved as usize] = p;
                    }
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
                    self.pos[h as usize] = self.buckets[t][b].len();
                    self.buckets[t][b].push(h);
                }
                Slot::Empty(t, bits) => {
                    self.empty.entry((t, bits)).or_default().insert(h);
                }
            }
            self.slots[h as usize] = slot;
        }
    }
}
