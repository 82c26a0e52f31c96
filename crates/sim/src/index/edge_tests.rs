//! Edge cases of `PabfdIndex::search` found by mutation testing (see `crates/sim/MUTANTS.md`):
//! each test pins an exact equality that a `<` turned into `<=` would get wrong.

use super::*;
use crate::ids::VmId;
use crate::policy::tests::FakeCtx;
use crate::policy::{Pabfd, VmPlacement};

#[test]
fn search_takes_an_empty_one_core_host_a_vm_fills_exactly() {
    // A host type with a single core: its total MIPS equal its core's MIPS, so a VM asking
    // exactly that much fits an empty host (100 % after). With two cores (the reference
    // types) a VM of the host's total size never fits one core, so only this type tells
    // "total < requested" from "total <= requested".
    let mut one_core = crate::setup::reference_host_types()[0].clone();
    one_core.pes = 1;
    let types = vec![one_core];
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    assert_eq!(total, types[0].pe_mips);
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: total,
    };
    let power = |f: f64| tables.power[0].power(f);
    let entry = Entry {
        key: f64::NEG_INFINITY,
        host: HostId(0),
        alloc_mips: 0.0,
        power_now: power(0.0),
    };
    let index = PabfdIndex::from_hosts(types.len(), 1, [(0, total, entry, false)].into_iter());
    let ctx = FakeCtx(vec![(
        false,
        true,
        power(0.0),
        Some(power(1.0)),
        0.0,
        false,
    )]);
    // The full scan takes it; the index must agree.
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(0)));
    for budget in [0, 10] {
        let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
        assert_eq!(found, Some(HostId(0)), "budget {budget}");
    }
}

#[test]
fn search_bounds_the_last_bucket_by_the_power_at_full_load() {
    // A VM asking for nothing (x = 0, so the limit is 1.0) and a host in the last bucket
    // (99.8 % allocated): the bucket's upper bound is the power at 100 %, the last bucket
    // edge. The index must find the host, as the full scan does.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let alloc = 0.998 * total;
    let power = |mips: f64| tables.power[0].power(mips / total);
    let entry = Entry {
        key: f64::NEG_INFINITY,
        host: HostId(0),
        alloc_mips: alloc,
        power_now: power(alloc),
    };
    let index = PabfdIndex::from_hosts(types.len(), 1, [(0, total, entry, false)].into_iter());
    let ctx = FakeCtx(vec![(
        false,
        true,
        power(alloc),
        Some(power(alloc)),
        alloc,
        false,
    )]);
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: 0.0,
    };
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(0)));
    for budget in [0, 10] {
        let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
        assert_eq!(found, Some(HostId(0)), "budget {budget}");
    }
}

#[test]
fn search_bounds_a_bucket_by_its_upper_edge_where_the_increase_falls() {
    // On the G4 table (..., 102, 106, 107 at 65 %, 108, 112, ...) a VM of 5 % sees the
    // increase D(f) = P(f + 0.05) - P(f) fall across 55-60 % (P(f) climbs 4 W per 10 %,
    // P(f + 0.05) only 2 W), so in bucket 119 (59.5-60 %) D is least at the upper edge:
    // D(0.595) = 1.1 W, D(0.6) = 1.0 W. Host 0 sits at 59.99 % (D = 1.002 W); host 1 at
    // 65.25 % (D = 1.05 W, bucket 130, whose bound is D(0.65) = 1.0 W). A bound of bucket 119
    // that missed its upper edge would be 1.1 W and the search would stop at host 1.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let x = 0.05;
    let p = |f: f64| tables.power[0].power(f);
    let inc = |f: f64| p(f + x) - p(f);
    let fracs = [0.5999, 0.6525];
    assert_eq!(
        fracs.map(PabfdIndex::bucket_of),
        [119, 130],
        "the hosts' buckets"
    );
    let (lo, _) = PabfdIndex::bucket_bounds(119);
    assert!(inc(fracs[0]) < inc(fracs[1]) && inc(fracs[1]) < inc(lo));
    let items = fracs.iter().enumerate().map(|(h, &f)| {
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h as u32),
            alloc_mips: f * total,
            power_now: p(f),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), 2, items);
    let ctx = FakeCtx(
        fracs
            .iter()
            .map(|&f| (false, true, p(f), Some(p(f + x)), f * total, false))
            .collect(),
    );
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: x * total,
    };
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(0)));
    let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
    assert_eq!(found, Some(HostId(0)));
}

#[test]
fn search_walks_only_the_hosts_keyed_below_a_negative_threshold() {
    // LR's overload keys and thresholds are linear forms with signed weights, so both may be
    // negative. One bucket: hosts 0-2 keyed -3, -2.9, -2.8 (below the VM's threshold -2: they
    // may take the VM), host 3 keyed 5 (at or above it: certainly over-utilised after, as its
    // context says). The index must walk hosts 0-2, may skip host 3, and agrees with the full
    // scan: host 0 (equal increases, lowest id).
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let alloc = 0.3 * total;
    let p = |mips: f64| tables.power[0].power(mips / total);
    let req = 500.0;
    let keys = [-3.0, -2.9, -2.8, 5.0];
    let items = keys.iter().enumerate().map(|(h, &key)| {
        let entry = Entry {
            key,
            host: HostId(h as u32),
            alloc_mips: alloc,
            power_now: p(alloc),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), keys.len(), items);
    let ctx = FakeCtx(
        keys.iter()
            .map(|&key| {
                (
                    false,
                    true,
                    p(alloc),
                    Some(p(alloc + req)),
                    alloc,
                    key >= -2.0,
                )
            })
            .collect(),
    );
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: req,
    };
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(0)));
    for budget in [0, 10] {
        let found = index.search(&tables, &vm, &ctx, |_| -2.0, false, budget);
        assert_eq!(found, Some(HostId(0)), "budget {budget}");
    }
}

#[test]
fn search_bounds_a_bucket_by_the_breakpoint_inside_it() {
    // G4 table, a VM of 12.34 %: at f = 0.5 - x = 0.3766, inside bucket 75 (37.5-38 %), the
    // increase D(f) = P(f + x) - P(f) stops falling (P(f + x) climbs 2.5 W per 10 % below 50 %)
    // and starts rising (4 W above), while P(f) climbs 3.5 W: D is least at that breakpoint,
    // 3.319 W, and 1.6 W per 100 % higher at the bucket's edges (3.335 and 3.336 W). Host 0
    // sits at 37.67 % (D = 3.3195 W); host 1 at 55.67 % (bucket 111, D = 3.334 W, its bucket
    // bounded at 3.268 W, so walked first). A bound of bucket 75 from its edges alone (3.335 W)
    // exceeds host 1's increase and the search would stop at host 1.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let x = 0.1234;
    let p = |f: f64| tables.power[0].power(f);
    let inc = |f: f64| p(f + x) - p(f);
    let fracs = [0.3767, 0.5567];
    assert_eq!(
        fracs.map(PabfdIndex::bucket_of),
        [75, 111],
        "the hosts' buckets"
    );
    let (lo, hi) = PabfdIndex::bucket_bounds(75);
    assert!(inc(fracs[0]) < inc(fracs[1]), "host 0 is the better one");
    assert!(
        inc(fracs[1]) + 1e-6 < inc(lo).min(inc(hi)),
        "the edges alone over-bound"
    );
    let items = fracs.iter().enumerate().map(|(h, &f)| {
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h as u32),
            alloc_mips: f * total,
            power_now: p(f),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), 2, items);
    let ctx = FakeCtx(
        fracs
            .iter()
            .map(|&f| (false, true, p(f), Some(p(f + x)), f * total, false))
            .collect(),
    );
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: x * total,
    };
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(0)));
    let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
    assert_eq!(found, Some(HostId(0)));
}

#[test]
fn search_passes_over_excluded_or_unsuitable_empty_hosts_to_the_next_of_their_group() {
    // Three empty hosts of one type at the same power: one group, interchangeable, so only
    // the lowest eligible id is considered. Host 0 is excluded (but would fit), host 1 does
    // not suit the VM (but is not excluded): host 2 must be taken, as the full scan takes it.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let p = |mips: f64| tables.power[0].power(mips / total);
    let req = 500.0;
    let items = (0..3).map(|h| {
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h),
            alloc_mips: 0.0,
            power_now: p(0.0),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), 3, items);
    let host =
        |excluded: bool, suitable: bool| (excluded, suitable, p(0.0), Some(p(req)), 0.0, false);
    let ctx = FakeCtx(vec![
        host(true, true),
        host(false, false),
        host(false, true),
    ]);
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: req,
    };
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(2)));
    for budget in [0, 10] {
        let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
        assert_eq!(found, Some(HostId(2)), "budget {budget}");
    }
}

/// PABFD over hosts of reference type 0 at the given allocated fractions (power now = power
/// at the allocation, none over-utilised) for a VM of `x` of the type's capacity: the index's
/// exact answer and the full scan's.
fn index_and_full_scan(fracs: &[f64], x: f64) -> (Option<HostId>, Option<HostId>) {
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let p = |f: f64| tables.power[0].power(f);
    let items = fracs.iter().enumerate().map(|(h, &f)| {
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h as u32),
            alloc_mips: f * total,
            power_now: p(f),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), fracs.len(), items);
    let ctx = FakeCtx(
        fracs
            .iter()
            .map(|&f| (false, true, p(f), Some(p(f + x)), f * total, false))
            .collect(),
    );
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: x * total,
    };
    let indexed = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
    (indexed, Pabfd.find_host(&vm, &ctx))
}

#[test]
fn search_ranks_the_hosts_of_one_bucket_by_their_exact_increase() {
    let x = 0.1234;
    // Bucket 82 (41-41.5 %): f + x stays inside one power segment (53.3-53.8 %, 4 W per
    // 10 %) while P(f) climbs 2.5 W per 10 %, so the increase grows with f: the host at
    // 41.1 % beats the one at 41.4 %, by 0.045 W. (The bucket's fast path, one linear formula.)
    assert_eq!(
        [0.414, 0.411].map(PabfdIndex::bucket_of),
        [82, 82],
        "one bucket"
    );
    assert_eq!(
        index_and_full_scan(&[0.414, 0.411], x),
        (Some(HostId(1)), Some(HostId(1)))
    );
    // Bucket 75 (37.5-38 %): f + x crosses 50 %, so each host's increase comes from the table.
    // The increase is least at 37.66 % (see the breakpoint test): 37.67 % beats 37.95 %.
    assert_eq!([0.3795, 0.3767].map(PabfdIndex::bucket_of), [75, 75]);
    assert_eq!(
        index_and_full_scan(&[0.3795, 0.3767], x),
        (Some(HostId(1)), Some(HostId(1)))
    );
}

#[test]
fn search_sees_a_key_updated_within_its_bucket() {
    // Host 0 is filed with overload key 5 (at or above the VM's threshold -2: skipped), then
    // its key drops to -3 without leaving its bucket: the index must re-sort it and walk it.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let alloc = 0.3 * total;
    let p = |mips: f64| tables.power[0].power(mips / total);
    let req = 500.0;
    let entry = |key: f64| Entry {
        key,
        host: HostId(0),
        alloc_mips: alloc,
        power_now: p(alloc),
    };
    let mut index =
        PabfdIndex::from_hosts(types.len(), 1, [(0, total, entry(5.0), false)].into_iter());
    let ctx = FakeCtx(vec![(
        false,
        true,
        p(alloc),
        Some(p(alloc + req)),
        alloc,
        false,
    )]);
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: req,
    };
    assert_eq!(index.search(&tables, &vm, &ctx, |_| -2.0, false, 0), None);
    index.update(0, total, entry(-3.0), false);
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(0)));
    for budget in [0, 10] {
        let found = index.search(&tables, &vm, &ctx, |_| -2.0, false, budget);
        assert_eq!(found, Some(HostId(0)), "budget {budget}");
    }
}

#[test]
fn a_full_bucket_walk_skips_only_hosts_that_cannot_beat_the_best() {
    // A small VM (1 % of the host): increases well under a watt. Host 2 shrank this round and
    // is checked first: +0.5 W (its bucket copy says power now 0, so the buckets never offer
    // it). Hosts 0 and 1 share a bucket at 1,000 MIPS, about +0.32 W; host 0, the bucket's
    // least, is over-utilised after, so the bucket is walked in full, where host 1 must pass
    // the "can it beat +0.5 W" filter: the answer is host 1, as in the full scan.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let req = 0.01 * total;
    let p = |mips: f64| tables.power[0].power(mips / total);
    let items = (0..3).map(|h| {
        let (alloc, power_now) = if h < 2 {
            (1000.0, p(1000.0))
        } else {
            (2000.0, 0.0)
        };
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h),
            alloc_mips: alloc,
            power_now,
        };
        (0, total, entry, h == 2)
    });
    let index = PabfdIndex::from_hosts(types.len(), 3, items);
    let inc = p(1000.0 + req) - p(1000.0);
    assert!(inc < 0.5, "{inc}");
    let ctx = FakeCtx(vec![
        (false, true, p(1000.0), Some(p(1000.0 + req)), 1000.0, true),
        (false, true, p(1000.0), Some(p(1000.0 + req)), 1000.0, false),
        (false, true, 100.0, Some(100.5), 2000.0, false),
    ]);
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: req,
    };
    assert_eq!(Pabfd.find_host(&vm, &ctx), Some(HostId(1)));
    let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
    assert_eq!(found, Some(HostId(1)));
    // The same once host 1's copy is refreshed in place (same bucket, same key) from a stale
    // one whose power now of 0 W made it look +100 W: the filter must see the new copy.
    let fresh = |h: u32| {
        let (alloc, power_now) = if h < 2 {
            (1000.0, p(1000.0))
        } else {
            (2000.0, 0.0)
        };
        Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h),
            alloc_mips: alloc,
            power_now,
        }
    };
    let stale = (0..3).map(|h| {
        let mut e = fresh(h);
        if h == 1 {
            e.power_now = 0.0;
        }
        (0, total, e, h == 2)
    });
    let mut index = PabfdIndex::from_hosts(types.len(), 3, stale);
    index.update(0, total, fresh(1), false);
    let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, 0);
    assert_eq!(found, Some(HostId(1)), "after an in-place refresh");
}

#[test]
fn a_budgeted_search_stops_after_that_many_candidates() {
    // Bucket 82 as in the ranking test: the host at 41.4 % gives a larger increase than the
    // one at 41.1 %. Within a bucket hosts are walked by key, then id: host 0 (41.4 %) first.
    // A budget of one candidate takes it; two candidates find the better host 1; the exact
    // search (budget 0) finds host 1 too.
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let x = 0.1234;
    let p = |f: f64| tables.power[0].power(f);
    let fracs = [0.414, 0.411];
    let items = fracs.iter().enumerate().map(|(h, &f)| {
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h as u32),
            alloc_mips: f * total,
            power_now: p(f),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), 2, items);
    let ctx = FakeCtx(
        fracs
            .iter()
            .map(|&f| (false, true, p(f), Some(p(f + x)), f * total, false))
            .collect(),
    );
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: x * total,
    };
    let search = |budget| index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
    assert_eq!(search(1), Some(HostId(0)));
    assert_eq!(search(2), Some(HostId(1)));
    assert_eq!(search(0), Some(HostId(1)));
}

#[test]
fn search_bounds_each_bucket_by_its_own_lower_edge() {
    // G4 table, a VM of 5 %: hosts at 9.55 % (bucket 19, +1.609 W), 15.25 % (bucket 30,
    // +1.605 W) and 47.02 % (bucket 94, +1.553 W, the least). Bucket 94's increase is least at
    // its lower edge (1.550 W); the upper edge of bucket 30, the non-empty bucket before it,
    // gives 1.610 W. A bound that carried that value over to a bucket it does not touch would
    // exceed the other hosts' increases and the search would stop before bucket 94.
    let fracs = [0.0955, 0.1525, 0.4702];
    assert_eq!(fracs.map(PabfdIndex::bucket_of), [19, 30, 94]);
    assert_eq!(
        index_and_full_scan(&fracs, 0.05),
        (Some(HostId(2)), Some(HostId(2)))
    );
}

/// The budgeted search over hosts of type 0 (G4) at the given allocated fractions, for a VM of
/// `x` of a host, with budget `budget`; and each host's exact increase.
fn budgeted(fracs: &[f64], x: f64, budget: usize) -> (Option<HostId>, Vec<f64>) {
    let types = crate::setup::reference_host_types();
    let tables = HostTypeTables::new(&types);
    let total = types[0].total_mips();
    let p = |f: f64| tables.power[0].power(f);
    let items = fracs.iter().enumerate().map(|(h, &f)| {
        let entry = Entry {
            key: f64::NEG_INFINITY,
            host: HostId(h as u32),
            alloc_mips: f * total,
            power_now: p(f),
        };
        (0, total, entry, false)
    });
    let index = PabfdIndex::from_hosts(types.len(), fracs.len(), items);
    let ctx = FakeCtx(
        fracs
            .iter()
            .map(|&f| (false, true, p(f), Some(p(f + x)), f * total, false))
            .collect(),
    );
    let vm = PlacementVm {
        id: VmId(0),
        requested_mips: x * total,
    };
    let found = index.search(&tables, &vm, &ctx, |_| f64::INFINITY, false, budget);
    (found, fracs.iter().map(|&f| p(f + x) - p(f)).collect())
}

#[test]
fn a_budget_counts_every_candidate_examined_even_one_that_cannot_win() {
    // One bucket (82), walked by id: host 0 (41.2 %), then host 1 (41.4 %, a larger increase
    // than host 0's), then host 2 (41.1 %, the least). A budget of two examines hosts 0 and 1
    // and answers host 0: host 1, which cannot beat it, still uses up a candidate. A search
    // that skipped such hosts without counting them would go on to host 2.
    let fracs = [0.412, 0.414, 0.411];
    assert_eq!(fracs.map(PabfdIndex::bucket_of), [82, 82, 82], "one bucket");
    let x = 0.1234;
    let (_, inc) = budgeted(&fracs, x, 0);
    assert!(inc[1] > inc[0] && inc[0] > inc[2], "{inc:?}");
    assert_eq!(budgeted(&fracs, x, 1).0, Some(HostId(0)));
    assert_eq!(budgeted(&fracs, x, 2).0, Some(HostId(0)));
    assert_eq!(budgeted(&fracs, x, 3).0, Some(HostId(2)));
    assert_eq!(budgeted(&fracs, x, 0).0, Some(HostId(2)));
}

#[test]
fn a_budget_spent_in_the_first_bucket_ends_the_search_there() {
    // G4, a VM of 5 %. Bucket 130 (65-65.5 %) lies where the increase climbs 20 W per unit of
    // load (P(f + 5 %) in the 4 W-per-10 % segment, P(f) in the 2 W one): its bound, 1.0 W at
    // its lower edge, is the least, so it is walked first; its host at 65.49 % costs 1.098 W.
    // Bucket 171 (85.5-86 %) climbs only 10 W per unit: bound 1.05 W, and its host at
    // 85.5 % costs 1.05 W, the least of the two. A budget of one candidate is spent on bucket
    // 130's host; a search that went on to the next bucket would answer host 1.
    let fracs = [0.6549, 0.855];
    assert_eq!(fracs.map(PabfdIndex::bucket_of), [130, 171]);
    let x = 0.05;
    let (_, inc) = budgeted(&fracs, x, 0);
    assert!(inc[1] < inc[0], "{inc:?}");
    assert_eq!(budgeted(&fracs, x, 1).0, Some(HostId(0)));
    assert_eq!(budgeted(&fracs, x, 2).0, Some(HostId(1)));
    assert_eq!(budgeted(&fracs, x, 0).0, Some(HostId(1)));
}
