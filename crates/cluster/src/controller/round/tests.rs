//! Rounds on hand-made clusters (THR 0.8 + MMT unless said; G4 hosts: 2 × 1860 MIPS,
//! 4096 MB).

use super::*;
use fastmig_sim::setup::reference_host_types;
use fastmig_sim::spec::{DetectorKind, SelectorKind};

fn host(name: &str, active: bool) -> RoundHost {
    RoundHost {
        name: HostName(name.into()),
        host_type: reference_host_types()[0].clone(),
        active,
        standby: !active,
        in_flight: 0,
        history: Vec::new(),
    }
}

fn vm(name: &str, host: usize, mips: f64, ram_mb: u32, demand: f64) -> RoundVm {
    RoundVm {
        name: VmName(name.into()),
        host,
        mips,
        ram_mb,
        requested_mips: mips * demand,
        history: vec![demand],
        movable: true,
    }
}

fn run(hosts: &[RoundHost], vms: &[RoundVm], max_in_flight: usize) -> Plan {
    let d = DetectorKind::Thr.build(0.8);
    let s = SelectorKind::Mmt.build();
    let p = Policies {
        detector: d.as_ref(),
        selector: s.as_ref(),
        placement: &fastmig_sim::policy::Pabfd,
        cost: &fastmig_sim::CloudSimCost,
        interval_s: 10.0,
        max_in_flight,
    };
    plan(hosts, vms, &p, &mut SplitMix64::new(1))
}

fn mv(vm: &str, s: &str, d: &str, origin: Origin) -> PlannedMove {
    PlannedMove {
        vm: VmName(vm.into()),
        source: HostName(s.into()),
        destination: HostName(d.into()),
        origin,
    }
}

#[test]
fn an_overloaded_host_sheds_its_smallest_vm_to_an_active_host() {
    // a: 1000 + 2000 MIPS of 3720 = 0.806 > 0.8. MMT takes v1 (870 MB < 1740 MB); a is then
    // at 0.54. b (250 MIPS) takes v1: 1250 / 3720 = 0.34, not over. c is in standby.
    let hosts = [host("a", true), host("b", true), host("c", false)];
    let vms = [
        vm("v1", 0, 1000.0, 870, 1.0),
        vm("v2", 0, 2000.0, 1740, 1.0),
        vm("v3", 1, 500.0, 613, 0.5),
    ];
    let p = run(&hosts, &vms, 1);
    assert_eq!(p.overloaded, vec![HostName("a".into())]);
    assert_eq!(p.moves, vec![mv("v1", "a", "b", Origin::Policy)]);
    assert!(p.unplaced.is_empty());
    assert_eq!(p.wake, None);
    assert!(p.to_standby.is_empty());
}

#[test]
fn the_least_utilised_host_is_evacuated_all_or_nothing() {
    // a at 100/3720, b at 500/3720: a is evacuated onto b.
    let hosts = [host("a", true), host("b", true)];
    let vms = [vm("v1", 0, 1000.0, 613, 0.1), vm("v2", 1, 1000.0, 613, 0.5)];
    let p = run(&hosts, &vms, 1);
    assert_eq!(p.moves, vec![mv("v1", "a", "b", Origin::Evacuation)]);
    assert_eq!(p.evacuated, vec![HostName("a".into())]);

    // Two VMs on a whose second does not fit on b (RAM: 1740 + 1740 + 870 > 4096 - 870):
    // nothing moves.
    let vms = [
        vm("v1", 0, 1000.0, 1740, 0.1),
        vm("v4", 0, 1000.0, 1740, 0.1),
        vm("v2", 1, 1000.0, 870, 0.5),
        vm("v3", 1, 1000.0, 870, 0.5),
    ];
    let p = run(&hosts, &vms, 1);
    assert!(p.moves.is_empty(), "{:?}", p.moves);
}

#[test]
fn a_host_the_agent_would_refuse_by_declared_mips_is_no_destination() {
    // a: one 1000-MIPS VM at 10 %; b: three 1000-MIPS VMs at 10 % (300 of 3720 MIPS used,
    // 3000 declared). By use, a's VM fits on b; by what the agent admits (declared MIPS,
    // 3000 + 1000 > 3720) it does not: nothing moves, rather than an order the agent refuses.
    let hosts = [host("a", true), host("b", true)];
    let vms = [
        vm("v1", 0, 1000.0, 613, 0.1),
        vm("v2", 1, 1000.0, 613, 0.1),
        vm("v3", 1, 1000.0, 613, 0.1),
        vm("v4", 1, 1000.0, 613, 0.1),
    ];
    let p = run(&hosts, &vms, 1);
    assert!(p.moves.is_empty(), "{:?}", p.moves);
    // With b's VMs declaring 900 MIPS (2700 + 1000 <= 3720) the evacuation goes ahead.
    let vms = [
        vm("v1", 0, 1000.0, 613, 0.1),
        vm("v2", 1, 900.0, 613, 0.1),
        vm("v3", 1, 900.0, 613, 0.1),
        vm("v4", 1, 900.0, 613, 0.1),
    ];
    let p = run(&hosts, &vms, 1);
    assert_eq!(p.moves, vec![mv("v1", "a", "b", Origin::Evacuation)]);
}

#[test]
fn no_room_wakes_a_standby_host_which_is_never_a_destination() {
    let hosts = [host("a", true), host("s", false)];
    let vms = [
        vm("v1", 0, 1000.0, 870, 1.0),
        vm("v2", 0, 2000.0, 1740, 1.0),
    ];
    let p = run(&hosts, &vms, 1);
    assert_eq!(p.unplaced, vec![VmName("v1".into())]);
    assert!(p.moves.is_empty());
    assert_eq!(p.wake, Some(HostName("s".into())));
}

#[test]
fn hosts_at_their_in_flight_limit_are_no_destination_and_busy_vms_stay() {
    let mut b = host("b", true);
    b.in_flight = 1;
    let hosts = [host("a", true), b];
    let mut vms = vec![
        vm("v1", 0, 1000.0, 870, 1.0),
        vm("v2", 0, 2000.0, 1740, 1.0),
        vm("v3", 1, 500.0, 613, 0.5),
    ];
    let p = run(&hosts, &vms, 1);
    assert!(p.moves.is_empty());
    assert_eq!(p.unplaced, vec![VmName("v1".into())]);
    // With two allowed, b takes it.
    let p = run(&hosts, &vms, 2);
    assert_eq!(p.moves, vec![mv("v1", "a", "b", Origin::Policy)]);
    // A VM already migrating is never selected: MMT takes v2 instead (whose 2000 MIPS exceed
    // a G4 core's 1860, so it finds no host).
    vms[0].movable = false;
    let p = run(&hosts, &vms, 2);
    assert!(p.moves.is_empty());
    assert_eq!(p.unplaced, vec![VmName("v2".into())]);
}

#[test]
fn empty_active_hosts_go_to_standby() {
    let hosts = [host("a", true), host("b", true), host("c", false)];
    let vms = [vm("v1", 0, 1000.0, 613, 0.5)];
    let p = run(&hosts, &vms, 1);
    assert_eq!(p.to_standby, vec![HostName("b".into())]);
    assert!(p.moves.is_empty());
}
