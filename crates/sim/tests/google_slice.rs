//! The simulator on a slice of the Google cluster-data trace (ten real VM files in
//! `tests/data/google-slice`): the format is read with its memory series, the out-of-range
//! memory samples are clamped and reported, the memory series sets the model's working set,
//! and every run is deterministic.

use std::path::PathBuf;

use fastmig_model::Transport;
use fastmig_sim::model_cost::cloudsim_equivalent_model;
use fastmig_sim::{
    simulate, CloudSimCost, DatacenterSpec, Link, MigrationCostModel, ModelCost, PolicySpec,
    SimOptions, SimResult, Trace,
};

fn slice() -> Trace {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/google-slice");
    Trace::load(&dir).expect("google slice")
}

/// The slice on 6 hosts (three of each reference type) with LR-MMT 1.2: few enough hosts
/// that VMs are packed and migrated.
fn run(trace: &Trace, cost: &dyn MigrationCostModel) -> SimResult {
    let spec = DatacenterSpec::scaled(6, trace.len(), trace.len());
    let policy = PolicySpec::parse("lr-mmt", Some(1.2)).expect("policy");
    let mut r = simulate(trace, &spec, policy, cost, &SimOptions::default()).expect("run");
    r.migration_model.clear();
    r
}

#[test]
fn the_slice_reads_with_memory_and_its_clamped_samples() {
    let t = slice();
    assert_eq!(t.len(), 10);
    assert_eq!(t.sample_count(), 288);
    let mem = t.memory.as_ref().expect("memory series");
    assert!(mem.iter().flatten().all(|m| (0.0..=1.0).contains(m)));
    // The two files with memory above 100 % (2 and 105 samples), in name order.
    let clamped: Vec<(String, usize)> = t
        .clamped
        .iter()
        .map(|c| {
            (
                c.path.file_name().unwrap().to_string_lossy().into_owned(),
                c.samples,
            )
        })
        .collect();
    assert_eq!(
        clamped,
        [
            ("vm_259235987_2".to_string(), 2),
            ("vm_6280614335_4".to_string(), 105)
        ]
    );
    // vm_1218322450_1's first line is `6.763 5.103`.
    assert_eq!(t.samples[0][0], 0.06763);
    assert_eq!(mem[0][0], 0.05103);
}

#[test]
fn the_model_reduced_to_cloudsims_formula_reproduces_it_and_the_memory_series_matters() {
    let t = slice();
    let cloudsim = run(&t, &CloudSimCost);
    assert!(cloudsim.migrations > 0, "{cloudsim:?}");
    // The reduced model ignores the working set (its guest writes nothing while migrating):
    // CloudSim's results, bit for bit.
    let reduced = ModelCost::new(
        cloudsim_equivalent_model(Transport::Classic),
        Transport::Classic,
        Link::Host,
    )
    .expect("model");
    assert_eq!(run(&t, &reduced), cloudsim);

    // The fitted model: deterministic, and its working set comes from the memory series:
    // without it (all of RAM is the working set) the same run differs.
    let fitted = fastmig_model::Model::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/characterisation/model.json"),
    )
    .expect("fitted model");
    let cost =
        ModelCost::new(fitted, Transport::Classic, "32mib".parse().expect("link")).expect("model");
    let a = run(&t, &cost);
    assert_eq!(a, run(&t, &cost));
    assert!(a.migrations > 0 && a.migration_downtime_s > 0.0, "{a:?}");
    let mut no_memory = t.clone();
    no_memory.memory = None;
    let b = run(&no_memory, &cost);
    assert_ne!(a, b, "the memory series must change the model's costs");
    // Working sets of 5-100 % of RAM instead of all of it: less is sent again, so less
    // downtime is forced over a slow link.
    assert!(
        a.migration_downtime_s <= b.migration_downtime_s,
        "{} vs {}",
        a.migration_downtime_s,
        b.migration_downtime_s
    );
}
