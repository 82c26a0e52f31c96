//! A VM's load follows its demand trace: the agent reports the trace's demand and the guest
//! dirties `demand × 10,000` pages/s, as KVM's dirty log measures it. Needs /dev/kvm and
//! `cargo build -p fastmig-cli` (see `agent_util`).

mod agent_util;

use std::time::{Duration, Instant};

use agent_util::TestAgent;
use fastmig_cluster::proto::{DemandSource, StartVm, TraceFormat, VmName};
use fastmig_cluster::AgentApi;

#[test]
fn the_dirty_rate_follows_a_planetlab_trace() {
    let a = TestAgent::start("h1");
    let trace = a.dir.path().join("trace");
    // A PlanetLab day (288 samples) alternating 5 % and 20 %: 500 then 2,000 pages/s, each
    // for 4 s.
    let day: String = (0..288)
        .map(|i| if i % 2 == 0 { "5\n" } else { "20\n" })
        .collect();
    std::fs::write(&trace, day).expect("trace");
    let vm = StartVm {
        vm: VmName("vm1".into()),
        mem_bytes: 32 << 20,
        vcpus: 1,
        mips: 1000.0,
        // A sequential sweep of 4,096 pages: each write in a second hits a distinct page,
        // so the distinct dirty rate equals the write rate.
        workload: "verify:rate=1000,wss=16M,pattern=seq".into(),
        demand: DemandSource::Trace {
            path: trace,
            format: TraceFormat::Planetlab,
            sample_period_ms: 4000,
        },
        demand_epoch_ms: None,
    };
    a.api().start_vm(&vm).expect("start");
    let mut seen = [false, false];
    let start = Instant::now();
    while seen != [true, true] {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the dirty rate did not follow the trace (seen {seen:?})\n{}",
            a.log()
        );
        let r = a.api().report().expect("report");
        let v = &r.vms[0];
        for (i, (demand, pps)) in [(0.05, 500.0), (0.2, 2000.0)].into_iter().enumerate() {
            if v.demand == demand && (v.dirty_rate_pps - pps).abs() < 0.2 * pps {
                seen[i] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The working set is measured: the pages swept, at most the 16 MiB of `wss` and a few of
    // the guest's own.
    // (The VM process measures it over complete 5 s windows: the first one may still be open.)
    let start = Instant::now();
    let mut ws = 0;
    while ws == 0 && start.elapsed() < Duration::from_secs(15) {
        ws = a.api().report().expect("report").vms[0].working_set_bytes;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ws > 0 && ws <= (16 << 20) + (256 << 10),
        "working set {ws} bytes"
    );
    let c = a.vm_client("vm1").expect("vm1");
    assert!(c.verify_memory().expect("verify").is_clean());
}
