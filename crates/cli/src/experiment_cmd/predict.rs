//! The simulator's prediction of one scenario: `crates/sim` on the same hosts (G4), VMs
//! (MIPS, RAM, the testbed's placement at the start), trace files and compression, with the
//! controller's policy (`dvfs`, which never migrates and whose power follows utilisation, for
//! `none`), its migrations priced by the fitted model for the scenario's transport, link (or
//! bandwidth cap) and downtime limit.
//!
//! **Clocks.** The simulator runs on the trace's clock (one sample = 300 s); the testbed on
//! the wall clock, `compression` times faster. A migration takes real seconds on the testbed,
//! so the simulator is given each migration's modelled time multiplied by `compression`
//! ([`OnTraceClock`]): a 0.6 s migration spans the same fraction of a sample in both.

use anyhow::Result;
use fastmig_migration::TransportKind;
use fastmig_sim::cost::{MigrationCost, MigrationCostModel, MigrationCostQuery};
use fastmig_sim::setup::{reference_host_types, DatacenterSpec, VmType};
use fastmig_sim::{CloudSimCost, Link, ModelCost, PolicySpec, SimOptions, SimResult};

use super::{Scenario, Setup, VM_MEM_BYTES};

/// A cost model whose times are on the trace's clock: the inner model's duration and
/// downtime times `factor`; CPU overheads (MIPS, a rate) unchanged.
pub struct OnTraceClock<'a> {
    inner: &'a dyn MigrationCostModel,
    factor: f64,
}

impl MigrationCostModel for OnTraceClock<'_> {
    fn describe(&self) -> String {
        format!(
            "{}, times x{} (trace clock)",
            self.inner.describe(),
            self.factor
        )
    }

    fn cost(&self, req: &MigrationCostQuery, pe_mips: f64) -> MigrationCost {
        let c = self.inner.cost(req, pe_mips);
        MigrationCost {
            duration_s: c.duration_s * self.factor,
            downtime_s: c.downtime_s * self.factor,
            ..c
        }
    }
}

/// What the simulator predicts, on the trace's clock except the migrations' time and
/// downtime (wall clock, comparable with the testbed's).
#[derive(Debug, Clone)]
pub struct Predicted {
    /// The simulator's result.
    pub result: SimResult,
    /// Sum of the migrations' durations, wall s.
    pub total_migration_s: f64,
    /// Sum of the migrations' downtimes, wall ms.
    pub total_downtime_ms: f64,
    /// Sum of the migrations' CPU on both hosts, s (the CPU overheads are rates, so their
    /// PE-seconds scale with the migrations' stretched time: divided back here).
    pub total_migration_cpu_s: f64,
    /// What priced the migrations.
    pub cost: String,
}

/// The spec and options of the scenario's simulation.
fn spec_and_opts(setup: &Setup) -> (DatacenterSpec, SimOptions) {
    let vms = setup.hosts * setup.vms_per_host;
    let spec = DatacenterSpec {
        host_types: vec![reference_host_types()[0].clone()],
        hosts: vec![0; setup.hosts],
        vm_types: vec![VmType {
            mips: setup.vm_mips,
            // CloudSim's MB, read as 10^6 bytes by the model: 16 MiB is 16.8 of them.
            ram_mb: u32::try_from(VM_MEM_BYTES.div_ceil(1_000_000)).unwrap_or(u32::MAX),
            bw: 100_000,
            size_mb: 0,
        }],
        // VM i follows trace file i (mod their number), as the testbed starts them.
        vms: (0..vms)
            .map(|i| (0, i % setup.trace_files.max(1)))
            .collect(),
    };
    let opts = SimOptions {
        // The window in trace seconds.
        duration_s: setup.window_s * setup.compression,
        // The testbed's VMs never disappear when idle.
        remove_idle_vms: false,
        // VM i starts on host i / vms_per_host, as `testbed up` places them.
        initial_hosts: Some((0..vms).map(|i| i / setup.vms_per_host).collect()),
        ..SimOptions::default()
    };
    (spec, opts)
}

/// Runs the simulator on the scenario.
pub fn predict(
    setup: &Setup,
    sc: Scenario,
    bandwidth: Option<u64>,
    downtime_limit: std::time::Duration,
    transport: TransportKind,
) -> Result<Predicted> {
    let trace = fastmig_sim::trace::load_planetlab_dir(&setup.trace_dir)?;
    let (spec, opts) = spec_and_opts(setup);
    let link = bandwidth.map_or(setup.link, |b| b.min(setup.link)) as f64;
    let model = ModelCost::new(
        setup.model.clone(),
        crate::model_cmd::model_transport(transport),
        Link::BytesPerS(link),
    )?
    .with_downtime_limit(downtime_limit.as_secs_f64())?;
    let (policy, inner): (PolicySpec, &dyn MigrationCostModel) = match sc {
        Scenario::None => (PolicySpec::Dvfs, &CloudSimCost),
        Scenario::Classic2011 | Scenario::Fast => (PolicySpec::parse(&setup.policy, None)?, &model),
    };
    let cost = OnTraceClock {
        inner,
        factor: setup.compression,
    };
    let result = fastmig_sim::simulate(&trace, &spec, policy, &cost, &opts)?;
    Ok(Predicted {
        total_migration_s: result.migration_s / setup.compression,
        total_downtime_ms: result.migration_downtime_s / setup.compression * 1e3,
        total_migration_cpu_s: result.migration_cpu_s / setup.compression,
        cost: cost.describe(),
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_on_the_trace_clock_are_the_models_times_the_compression() {
        let model = fastmig_model::Model::from_json(super::super::COMMITTED_MODEL).unwrap();
        let inner = ModelCost::new(
            model,
            fastmig_model::Transport::Classic,
            Link::BytesPerS(32.0 * 1048576.0),
        )
        .unwrap();
        let q = MigrationCostQuery {
            ram_mb: 17,
            target_bw: 1_000_000,
            cpu_utilization: 0.3,
            mem_utilization: None,
        };
        let wall = inner.cost(&q, 1860.0);
        let traced = OnTraceClock {
            inner: &inner,
            factor: 150.0,
        }
        .cost(&q, 1860.0);
        assert!(wall.duration_s > 0.0 && wall.downtime_s > 0.0);
        assert!((traced.duration_s - 150.0 * wall.duration_s).abs() < 1e-9);
        assert!((traced.downtime_s - 150.0 * wall.downtime_s).abs() < 1e-9);
        assert_eq!(traced.source_overhead_mips, wall.source_overhead_mips);
        // 17 MB at 32 MiB/s through classic's efficiency: about half a second.
        assert!(wall.duration_s > 0.4 && wall.duration_s < 1.5, "{wall:?}");
    }

    #[test]
    fn the_simulation_starts_from_the_testbeds_placement() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            let lines: String = (0..288)
                .map(|k| format!("{}\n", (i * 7 + k) % 40))
                .collect();
            std::fs::write(dir.path().join(format!("f{i}")), lines).unwrap();
        }
        let setup = Setup {
            hosts: 4,
            vms_per_host: 3,
            vm_mips: 1000.0,
            trace_dir: dir.path().to_path_buf(),
            trace_files: 3,
            sample_period_s: 2.0,
            compression: 150.0,
            window_s: 60.0,
            link: 125_000_000,
            policy: "lr-mmt".into(),
            model: fastmig_model::Model::from_json(super::super::COMMITTED_MODEL).unwrap(),
            model_source: "test".into(),
        };
        let (spec, opts) = spec_and_opts(&setup);
        assert_eq!(spec.vms.len(), 12);
        assert_eq!(spec.vms[4], (0, 1));
        assert_eq!(
            opts.initial_hosts,
            Some(vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
        );
        // 30 samples of 300 s.
        assert_eq!(opts.duration_s, 9000.0);
        let limit = std::time::Duration::from_millis(30);
        let none = predict(&setup, Scenario::None, None, limit, TransportKind::Classic).unwrap();
        assert_eq!(none.result.migrations, 0);
        // Four hosts active for the whole window (CloudSim's accounting may start at the
        // first or second sample).
        let h = none.result.active_host_hours;
        assert!((4.0 * (9000.0 - 600.0) / 3600.0..=10.0).contains(&h), "{h}");
        let fast = predict(
            &setup,
            Scenario::Fast,
            None,
            limit,
            TransportKind::MultiTcp { streams: 2 },
        )
        .unwrap();
        assert!(fast.result.migrations > 0);
        assert!(fast.result.energy_kwh < none.result.energy_kwh);
    }
}
