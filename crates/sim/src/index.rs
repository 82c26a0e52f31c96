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

use crate::ids::HostId;
use crate::policy::{PlacementContext, PlacementVm};
use crate::power::PowerTable;
use crate::setup::HostType;

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
    pub(crate) host: HostId,
    /// MIPS allocated now (`alloc_sum`).
    pub(crate) alloc_mips: f64,
    /// Power at the start of the round.
    pub(crate) power_now: f64,
}

/// What a search needs of each host type, computed once per simulation: the power model as a
/// lookup table, its value at every bucket edge, and the type's capacity.
#[derive(Debug, Clone)]
pub(crate) struct HostTypeTables {
    power: Vec<PowerTable>,
    /// Per type, power at each bucket edge `b / BUCKETS` (for the bucket bounds).
    edge_power: Vec<[f64; BUCKETS + 1]>,
    types: Vec<TypeCapacity>,
}

#[derive(Debug, Clone, Copy)]
struct TypeCapacity {
    pe_mips: f64,
    total_mips: f64,
    /// The power model's value at 0 % (power of a host that is on and idle).
    idle_power: f64,
}

impl HostTypeTables {
    pub(crate) fn new(host_types: &[HostType]) -> Self {
        Self {
            power: host_types
                .iter()
                .map(|t| PowerTable::new(&t.power))
                .collect(),
            edge_power: host_types
                .iter()
                .map(|t| {
                    let table = PowerTable::new(&t.power);
                    std::array::from_fn(|b| table.power(PabfdIndex::bucket_bounds(b).0))
                })
                .collect(),
            types: host_types
                .iter()
                .map(|t| TypeCapacity {
                    pe_mips: t.pe_mips,
                    total_mips: t.total_mips(),
                    idle_power: t.power.power(0.0),
                })
                .collect(),
        }
    }
}

/// Where each host currently sits.
#[derive(Debug, Clone)]
pub(crate) struct PabfdIndex {
    /// Per type and bucket: the hosts, sorted by key then host id.
    buckets: Vec<Vec<Vec<Entry>>>,
    /// Per type and bucket: the least key in the bucket (`+inf` when empty), so a search can
    /// tell which buckets may hold a candidate without visiting each bucket's storage.
    first_keys: Vec<[f64; BUCKETS]>,
    /// Per type and bucket: the greatest key (`-inf` when empty): when it is below a search's
    /// threshold the whole bucket qualifies, known without touching the bucket's far end.
    last_keys: Vec<[f64; BUCKETS]>,
    empty: BTreeMap<(usize, u64), BTreeSet<HostId>>,
    /// Hosts whose allocation dropped below their start-of-round utilisation.
    shrunk: BTreeSet<HostId>,
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

    fn bucket_of(frac: f64) -> usize {
        ((frac.max(0.0) * BUCKETS as f64) as usize).min(BUCKETS - 1)
    }

    fn bucket_bounds(b: usize) -> (f64, f64) {
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
        let mut empty: BTreeMap<(usize, u64), Vec<HostId>> = BTreeMap::new();
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
                index.slots[h.idx()] = slot;
                index.keys[h.idx()] = entry.key;
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
    pub(crate) fn disable(&mut self, h: HostId) {
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
        self.disabled[h.idx()] = true;
    }

    /// Files host `entry.host` where its state says it belongs; `shrunk`: its allocation is
    /// below its start-of-round utilisation.
    pub(crate) fn update(&mut self, ty: usize, total_mips: f64, entry: Entry, shrunk: bool) {
        let h = entry.host;
        if self.disabled[h.idx()] {
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
    fn position(bucket: &[Entry], key: f64, h: HostId) -> Result<usize, usize> {
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

    /// PABFD over the indexed hosts: the host with the least power increase for `vm`, lowest
    /// id on ties, exactly as [`crate::policy::Pabfd`]'s full scan over `ctx` would choose
    /// (see the module docs), or with `budget > 0` the best valid host among the first
    /// `budget` candidates examined. `tau(ty)`: the VM's overload-key threshold on host type
    /// `ty` (`+inf` without a bound). `off_excluded`: every host idle at the start of the round
    /// is excluded (lets the search skip those groups without walking them).
    pub(crate) fn search<C: PlacementContext>(
        &self,
        types: &HostTypeTables,
        vm: &PlacementVm,
        ctx: &C,
        tau: impl Fn(usize) -> f64,
        off_excluded: bool,
        budget: usize,
    ) -> Option<HostId> {
        let mut best: Option<(f64, HostId)> = None;
        let better = |d: f64, h: HostId, best: &Option<(f64, HostId)>| match best {
            None => true,
            Some((bd, bh)) => d < *bd || (d == *bd && h < *bh),
        };
        // Exact check of one host, PABFD order: suitability, power, then over-utilisation.
        let consider = |id: HostId, best: &mut Option<(f64, HostId)>| {
            if ctx.is_excluded(id) || !ctx.is_suitable(id, vm) {
                return;
            }
            let (now, after) = ctx.power_now_and_after(id, vm);
            let Some(after) = after else { return };
            let diff = after - now;
            if !better(diff, id, best) {
                return;
            }
            if ctx.utilization_mips(id) != 0.0 && ctx.overloaded_after(id, vm) {
                return;
            }
            *best = Some((diff, id));
        };
        for &h in &self.shrunk {
            consider(h, &mut best);
        }
        for (&(ty, bits), set) in &self.empty {
            let t = &types.types[ty];
            if off_excluded && f64::from_bits(bits) == t.idle_power {
                continue;
            }
            // No host of this type can take the VM: do not walk the group.
            if t.pe_mips < vm.requested_mips || t.total_mips < vm.requested_mips {
                continue;
            }
            for &h in set {
                if ctx.is_excluded(h) || !ctx.is_suitable(h, vm) {
                    continue;
                }
                consider(h, &mut best);
                break;
            }
        }
        let mut order: Vec<(f64, usize, usize)> = Vec::with_capacity(self.buckets.len() * BUCKETS);
        // Per host type (types beyond the eighth are walked without the bound; still exact).
        let mut thresholds = [f64::INFINITY; 8];
        for (ty, buckets) in self.buckets.iter().enumerate() {
            let t = &types.types[ty];
            let total = t.total_mips;
            let tau = tau(ty);
            if let Some(slot) = thresholds.get_mut(ty) {
                *slot = tau;
            }
            let x = vm.requested_mips / total;
            let limit = 1.0 - x;
            // No host of this type can take the VM (too little room, or a core too small).
            if limit < 0.0 || t.pe_mips < vm.requested_mips {
                continue;
            }
            let table = &types.power[ty];
            let d = |f: f64| table.power(f + x) - table.power(f);
            // The same difference at a bucket edge, the edge's power looked up.
            let edges = &types.edge_power[ty];
            let d_edge = |b: usize| table.power(Self::bucket_bounds(b).0 + x) - edges[b];
            // D is piecewise linear in f, so its minimum over a bucket lies at the bucket's
            // ends or at a breakpoint (k/10 or k/10 - x) inside it.
            // Breakpoints with their bucket, then one bound per non-empty bucket from its two
            // ends and the breakpoints inside it.
            let mut bp_bound = [f64::INFINITY; BUCKETS];
            for k in 0..=10 {
                for bp in [k as f64 / 10.0, k as f64 / 10.0 - x] {
                    if (0.0..=limit).contains(&bp) {
                        let slot = &mut bp_bound[Self::bucket_of(bp)];
                        *slot = slot.min(d(bp));
                    }
                }
            }
            // D at the upper end of the last bucket bounded: the next bucket's lower end.
            let mut prev_hi: Option<(usize, f64)> = None;
            for (b, &bp_least) in bp_bound.iter().enumerate().take(buckets.len()) {
                // Sorted by key: the least tells whether any host may take the VM.
                if self.first_key(ty, b) >= tau || self.first_key(ty, b).is_nan() {
                    continue;
                }
                let (lo, hi) = Self::bucket_bounds(b);
                if lo > limit {
                    break;
                }
                let d_lo = match prev_hi {
                    Some((pb, v)) if pb + 1 == b => v,
                    _ => d_edge(b),
                };
                let d_hi = if hi <= limit { d_edge(b + 1) } else { d(limit) };
                prev_hi = (hi <= limit).then_some((b, d_hi));
                let lb = d_lo.min(d_hi).min(bp_least);
                // Margin for rounding in the bound.
                order.push((lb - 1e-9, ty, b));
            }
        }
        let mut examined = 0usize;
        // Walks one bucket; false when the approximate budget is used up.
        let mut walk = |ty: usize, b: usize, best: &mut Option<(f64, HostId)>| -> bool {
            let tau = thresholds.get(ty).copied().unwrap_or(f64::INFINITY);
            let total = types.types[ty].total_mips;
            let table = &types.power[ty];
            let entries = self.below(ty, b, tau);
            // Most candidates sit where the power curve is flattest, all tied up to rounding,
            // so each must be evaluated exactly; inside one segment that is a few flops.
            let (lo, hi) = Self::bucket_bounds(b);
            let segment = if budget == 0 {
                let x = vm.requested_mips / total;
                table.interior_segment(lo + x, hi + x)
            } else {
                None
            };
            if budget == 0 {
                // The power difference from the bucket's copy of the host's state, exactly as
                // `power_now_and_after` computes it. First the bucket's least (increase, id)
                // without touching any host's (large, scattered) state: when that host is
                // accepted nothing else in the bucket can beat it, so one exact check does.
                // Written without short-circuits: most hosts tie or lose (fewer mispredicted
                // branches in this, the hottest loop at scale).
                let mut least = (f64::INFINITY, HostId(u32::MAX));
                let mut any = false;
                let mut note = |d: f64, h: HostId, fits: bool| {
                    let lower = fits & ((d < least.0) | ((d == least.0) & (h < least.1)));
                    if lower {
                        least = (d, h);
                        any = true;
                    }
                };
                match segment {
                    // Inside one segment of the power curve: a few flops, no table lookups.
                    Some((w, delta, start)) => {
                        for e in entries {
                            let after = (e.alloc_mips + vm.requested_mips) / total;
                            note(
                                (w + delta * (after - start) * 100.0) - e.power_now,
                                e.host,
                                true,
                            );
                        }
                    }
                    None => {
                        for e in entries {
                            let after = (e.alloc_mips + vm.requested_mips) / total;
                            note(table.power(after) - e.power_now, e.host, after <= 1.0);
                        }
                    }
                }
                let (bd, bh) = best.unwrap_or((f64::INFINITY, HostId(u32::MAX)));
                if !any || !((least.0 < bd) || (least.0 == bd && least.1 < bh)) {
                    return true;
                }
                consider(least.1, best);
                if best.is_some_and(|(d, h)| h == least.1 && d == least.0) {
                    return true;
                }
                // That host was rejected (over-utilised after, say): check the bucket in full.
            }
            for e in entries {
                // The power difference from the bucket's copy of the host's state, exactly as
                // `power_now_and_after` computes it: a host that cannot beat the best so far
                // is skipped without touching its (large, scattered) state. Most hosts here
                // tie with the best or lose, so the test is written without short-circuits
                // (fewer mispredicted branches in this, the hottest loop at scale).
                if budget == 0 {
                    let after = (e.alloc_mips + vm.requested_mips) / total;
                    let d = table.power(after) - e.power_now;
                    let (bd, bh) = best.unwrap_or((f64::INFINITY, HostId(u32::MAX)));
                    let improves = (after <= 1.0) & ((d < bd) | ((d == bd) & (e.host < bh)));
                    if !improves {
                        continue;
                    }
                }
                consider(e.host, best);
                examined += 1;
                if budget > 0 && examined >= budget {
                    return false;
                }
            }
            true
        };
        if budget == 0 {
            // Exact: the answer is the least (increase, id) over every bucket whose bound does
            // not exceed it, whatever the visiting order. Walking the bucket with the least
            // bound first usually finds an answer close to the final one, and then only the
            // buckets bounded below it need sorting (most are not).
            let first = order
                .iter()
                .enumerate()
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                .map(|(i, _)| i);
            if let Some(i) = first {
                let (_, ty, b) = order.swap_remove(i);
                walk(ty, b, &mut best);
                if let Some((bd, _)) = best {
                    order.retain(|o| o.0 <= bd);
                }
            }
        }
        // Buckets with equal bounds may be visited in any order: the result is the minimum.
        order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        for (lb, ty, b) in order {
            if let Some((bd, _)) = best {
                if lb > bd {
                    break;
                }
            }
            if !walk(ty, b, &mut best) {
                break;
            }
        }
        best.map(|(_, h)| h)
    }

    fn move_to(&mut self, h: HostId, slot: Slot, entry: Entry) {
        let old = self.slots[h.idx()];
        let old_key = self.keys[h.idx()];
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
            self.slots[h.idx()] = slot;
            self.keys[h.idx()] = key;
        }
    }
}

#[cfg(test)]
mod edge_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn search_breaks_ties_between_shrunk_hosts_by_lowest_id() {
        use crate::ids::VmId;
        use crate::policy::tests::FakeCtx;
        let types = crate::setup::reference_host_types();
        let tables = HostTypeTables::new(&types);
        let total = types[0].total_mips();
        // Hosts 0 and 1 shrank this round (checked first, in id order) and give the same
        // increase, 110 - 100 = 10 W; host 2 is excluded. The bucket copies say power now 0,
        // so a bucket walk sees increases of 100 W and more and never beats 10 W: the answer
        // comes from the shrunk list alone, and on the tie it must be host 0.
        let items = (0..3).map(|h| {
            let entry = Entry {
                key: f64::NEG_INFINITY,
                host: HostId(h),
                alloc_mips: 1000.0,
                power_now: 0.0,
            };
            (0, total, entry, h < 2)
        });
        let index = PabfdIndex::from_hosts(types.len(), 3, items);
        let ctx = FakeCtx(vec![
            (false, true, 100.0, Some(110.0), 1000.0, false),
            (false, true, 100.0, Some(110.0), 1000.0, false),
            (true, true, 100.0, Some(101.0), 1000.0, false),
        ]);
        let vm = PlacementVm {
            id: VmId(0),
            requested_mips: 500.0,
        };
        for budget in [0, 10] {
            let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
            assert_eq!(found, Some(HostId(0)), "budget {budget}");
        }
    }

    #[test]
    fn search_walks_a_bucket_in_full_when_its_least_host_is_rejected() {
        use crate::ids::VmId;
        use crate::policy::tests::FakeCtx;
        use crate::policy::{Pabfd, VmPlacement};
        let types = crate::setup::reference_host_types();
        let tables = HostTypeTables::new(&types);
        let total = types[0].total_mips();
        let req = 500.0;
        let p = |mips: f64| tables.power[0].power(mips / total);
        // Hosts 0 and 1: 1,000 MIPS allocated (one bucket, equal increases, host 0 first);
        // host 2: 2,500 MIPS (another bucket). Power now = power at the allocation, as at the
        // start of a round. Host 0 is over-utilised after taking the VM, so the bucket's fast
        // path (its least (increase, id)) is rejected and the bucket must be walked in full.
        let alloc = [1000.0, 1000.0, 2500.0];
        let items = (0..3).map(|h| {
            let entry = Entry {
                key: f64::NEG_INFINITY,
                host: HostId(h as u32),
                alloc_mips: alloc[h],
                power_now: p(alloc[h]),
            };
            (0, total, entry, false)
        });
        let index = PabfdIndex::from_hosts(types.len(), 3, items);
        let host = |h: usize, over: bool| {
            let after = (alloc[h] + req) / total;
            let after = (after <= 1.0).then(|| tables.power[0].power(after));
            (false, true, p(alloc[h]), after, alloc[h], over)
        };
        let ctx = FakeCtx(vec![host(0, true), host(1, false), host(2, false)]);
        let vm = PlacementVm {
            id: VmId(0),
            requested_mips: req,
        };
        // The answer worked out on the G4 table (86, 89.4, 92.6, 96, 99.5, 102, 106, ... W):
        // host 1 goes from 26.9 % to 40.3 %, about 94.95 -> 99.58 W (+4.63); host 2 from
        // 67.2 % to 80.6 %, about 107.44 -> 112.12 W (+4.68). Host 0 is rejected, so host 1,
        // found only by walking its bucket past host 0; the full scan must agree.
        let inc = |h: usize| p(alloc[h] + req) - p(alloc[h]);
        assert!(inc(1) < inc(2), "{} {}", inc(1), inc(2));
        let expected = 1;
        assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(expected)));
        for budget in [0, 10] {
            let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
            assert_eq!(found, Some(HostId(expected)), "budget {budget}");
        }
        // Only host 2 may take the VM: found through its own bucket.
        let ctx = FakeCtx(vec![host(0, true), host(1, true), host(2, false)]);
        let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
        assert_eq!(found, Some(HostId(2)));
    }

    #[test]
    fn search_gives_a_tie_found_in_a_full_bucket_walk_to_the_lower_id() {
        use crate::ids::VmId;
        use crate::policy::tests::FakeCtx;
        use crate::policy::{Pabfd, VmPlacement};
        let types = crate::setup::reference_host_types();
        let tables = HostTypeTables::new(&types);
        let total = types[0].total_mips();
        let req = 500.0;
        let p = |mips: f64| tables.power[0].power(mips / total);
        // Hosts 0 and 1: 1,000 MIPS, one bucket, the same increase d. Host 2 shrank this round
        // (checked first) and its context reports exactly the same d (same power now and
        // after, bit for bit), so it is the best so far when the bucket is reached. Host 0,
        // the bucket's least, is over-utilised after; the full walk then meets host 1, which
        // ties with host 2 and has the lower id: host 1 (the full scan says the same).
        let alloc = [1000.0, 1000.0, 2500.0];
        let items = (0..3).map(|h| {
            let entry = Entry {
                key: f64::NEG_INFINITY,
                host: HostId(h as u32),
                alloc_mips: alloc[h],
                power_now: p(alloc[h]),
            };
            (0, total, entry, h == 2)
        });
        let index = PabfdIndex::from_hosts(types.len(), 3, items);
        let tie = (
            p(1000.0),
            Some(tables.power[0].power((1000.0 + req) / total)),
        );
        let ctx = FakeCtx(vec![
            (false, true, tie.0, tie.1, 1000.0, true),
            (false, true, tie.0, tie.1, 1000.0, false),
            (false, true, tie.0, tie.1, 2500.0, false),
        ]);
        let vm = PlacementVm {
            id: VmId(0),
            requested_mips: req,
        };
        assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(1)));
        let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
        assert_eq!(found, Some(HostId(1)));
    }

    #[test]
    fn search_takes_hosts_a_vm_fills_exactly() {
        use crate::ids::VmId;
        use crate::policy::tests::FakeCtx;
        let types = crate::setup::reference_host_types();
        let tables = HostTypeTables::new(&types);
        let total = types[0].total_mips(); // 3,720 MIPS: two cores of 1,860
        let p = |mips: f64| tables.power[0].power(mips / total);
        // The VM asks for exactly one core, 1,860 MIPS (x = 0.5, so limit = 1 - x = 0.5).
        let vm = PlacementVm {
            id: VmId(0),
            requested_mips: 1860.0,
        };
        let search = |allocs: &[(f64, f64)], off_excluded: bool| {
            let items = allocs.iter().enumerate().map(|(h, &(alloc, power_now))| {
                let entry = Entry {
                    key: f64::NEG_INFINITY,
                    host: HostId(h as u32),
                    alloc_mips: alloc,
                    power_now,
                };
                (0, total, entry, false)
            });
            let index = PabfdIndex::from_hosts(types.len(), allocs.len(), items);
            let ctx = FakeCtx(
                allocs
                    .iter()
                    .map(|&(alloc, now)| {
                        let after = tables.power[0].power((alloc + 1860.0) / total);
                        (false, true, now, Some(after), alloc, false)
                    })
                    .collect(),
            );
            index.search(&tables, &vm, &ctx, |_| f64::INFINITY, off_excluded, 0)
        };
        // A host with 1,860 MIPS allocated: fraction exactly 0.5 = limit, the first host of
        // bucket 100 (whose lower edge is the limit), and 100 % after: it fits.
        assert_eq!(search(&[(1860.0, p(1860.0))], false), Some(HostId(0)));
        // An empty host: a core of exactly the VM's size is enough.
        assert_eq!(search(&[(0.0, p(0.0))], false), Some(HostId(0)));
        // With the idle hosts excluded (evacuation), an empty host whose power now is not
        // the idle power (it was emptied this round) is still a candidate.
        assert_eq!(search(&[(0.0, p(0.0) + 5.0)], true), Some(HostId(0)));
    }

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
                    host: HostId(h as u32),
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
        let ids = |v: &Vec<Vec<Vec<Entry>>>| -> Vec<Vec<Vec<(u64, HostId)>>> {
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
