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
