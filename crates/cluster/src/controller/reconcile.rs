//! How a migration the controller has open ends, from what its two agents report.
//!
//! The source's record decides when it has one (`completed` or `failed`). When it has none
//! (the agent restarted, or the controller died before starting it) or it is in doubt, where
//! the VM runs decides: on the destination only, done; on the source only, failed. Anything
//! else waits for the next report. A migration is ended once, in the store, so it is never
//! both and never forgotten.

use fastmig_host::RunStatus;
use fastmig_migration::MigrationSummary;

use crate::proto::{HostReport, MigrationPhase, MigrationRecord, VmName};
use crate::store::MigrationRow;

/// What the reports say about one open migration.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Still going (or not enough is known yet).
    Pending,
    /// The source sent `Commit` and the destination has not been seen running the VM.
    InDoubt(String),
    /// The VM runs on the destination.
    Done(Option<Box<MigrationSummary>>),
    /// The VM runs on the source. `cancel_destination`: the destination may still hold a
    /// prepared incoming VM to clean up.
    Failed {
        /// Why.
        error: String,
        /// Ask the destination to cancel.
        cancel_destination: bool,
    },
}

fn record<'a>(r: Option<&'a HostReport>, m: &MigrationRow) -> Option<&'a MigrationRecord> {
    r?.migrations.iter().find(|x| x.migration == m.id)
}

fn runs(r: Option<&HostReport>, vm: &VmName) -> Option<bool> {
    Some(
        r?.vms
            .iter()
            .any(|v| &v.vm == vm && matches!(v.status, RunStatus::Running | RunStatus::Paused)),
    )
}

/// Decides from the source's and destination's reports (`None`: unreachable).
pub fn resolve(m: &MigrationRow, src: Option<&HostReport>, dst: Option<&HostReport>) -> Resolution {
    let src_rec = record(src, m);
    let dst_rec = record(dst, m);
    let mut in_doubt = None;
    match src_rec.map(|r| &r.phase) {
        Some(MigrationPhase::Completed { summary }) => {
            return Resolution::Done(summary.clone().map(Box::new))
        }
        Some(MigrationPhase::Failed { error }) => {
            return Resolution::Failed {
                error: error.clone(),
                cancel_destination: true,
            }
        }
        Some(MigrationPhase::Prepared | MigrationPhase::Running { .. }) => {
            return Resolution::Pending
        }
        Some(MigrationPhase::InDoubt { error }) => in_doubt = Some(error.clone()),
        None if src.is_none() => {
            // Source unreachable: only the destination's own end is certain.
            return match dst_rec.map(|r| &r.phase) {
                Some(MigrationPhase::Completed { .. }) => Resolution::Done(None),
                Some(MigrationPhase::Failed { error }) => Resolution::Failed {
                    error: error.clone(),
                    cancel_destination: false,
                },
                _ => Resolution::Pending,
            };
        }
        None => {}
    }
    // The source has no record, or is in doubt: where does the VM run?
    let on_src = runs(src, &m.vm);
    let on_dst = runs(dst, &m.vm);
    match (on_src, on_dst, in_doubt) {
        (Some(false), Some(true), _) => Resolution::Done(None),
        (Some(true), Some(false) | None, None) => Resolution::Failed {
            error: "the source runs the VM and has no record of the migration (never started, \
                    or the agent restarted)"
                .into(),
            cancel_destination: true,
        },
        (_, _, Some(e)) => Resolution::InDoubt(e),
        _ => Resolution::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_agent::test_vm;
    use crate::proto::{HostName, HostState, MigrationId, Side};
    use crate::store::{MigrationState, Origin};
    use fastmig_migration::TransportKind;
    use fastmig_sim::setup::reference_host_types;

    fn row() -> MigrationRow {
        MigrationRow {
            id: MigrationId(7),
            vm: VmName("v".into()),
            source: HostName("s".into()),
            destination: HostName("d".into()),
            transport: "{}".into(),
            state: MigrationState::Running,
            origin: Origin::Policy,
            decision: None,
            predicted_s: None,
            predicted_downtime_s: None,
            measured_s: None,
            measured_downtime_s: None,
            summary: None,
            error: None,
            started_ms: 0,
            ended_ms: None,
        }
    }

    /// A report of `host` with the VM in `status` (if any) and the migration in `phase` (if
    /// any).
    fn report(host: &str, vm: Option<RunStatus>, phase: Option<MigrationPhase>) -> HostReport {
        let spec = test_vm("v", 64, 500.0, 0.5);
        HostReport {
            host: HostName(host.into()),
            host_type: reference_host_types()[0].clone(),
            state: HostState::Active,
            migration_address: String::new(),
            vms: vm
                .map(|status| crate::proto::VmReport {
                    vm: spec.vm.clone(),
                    status,
                    mem_bytes: spec.mem_bytes,
                    vcpus: 1,
                    mips: 500.0,
                    demand: 0.5,
                    dirty_rate_pps: 0.0,
                    working_set_bytes: 0,
                    workload: "idle".into(),
                    demand_source: spec.demand.clone(),
                    demand_epoch_ms: None,
                })
                .into_iter()
                .collect(),
            migrations: phase
                .map(|phase| MigrationRecord {
                    migration: MigrationId(7),
                    vm: VmName("v".into()),
                    side: if host == "s" {
                        Side::Source
                    } else {
                        Side::Destination
                    },
                    peer: HostName(if host == "s" { "d" } else { "s" }.into()),
                    transport: TransportKind::Classic,
                    phase,
                })
                .into_iter()
                .collect(),
            time_ms: 0,
        }
    }

    fn failed(r: &Resolution) -> bool {
        matches!(r, Resolution::Failed { .. })
    }

    #[test]
    fn the_sources_record_decides() {
        let running = MigrationPhase::Running { progress: None };
        let s = report("s", Some(RunStatus::Running), Some(running.clone()));
        let d = report("d", Some(RunStatus::Inmigrate), Some(running));
        assert_eq!(resolve(&row(), Some(&s), Some(&d)), Resolution::Pending);
        let s = report("s", None, Some(MigrationPhase::Completed { summary: None }));
        assert_eq!(resolve(&row(), Some(&s), None), Resolution::Done(None));
        let s = report(
            "s",
            Some(RunStatus::Running),
            Some(MigrationPhase::Failed { error: "x".into() }),
        );
        assert!(failed(&resolve(&row(), Some(&s), None)));
    }

    #[test]
    fn an_unreachable_source_leaves_it_to_the_destinations_end() {
        let d = report(
            "d",
            Some(RunStatus::Running),
            Some(MigrationPhase::Completed { summary: None }),
        );
        assert_eq!(resolve(&row(), None, Some(&d)), Resolution::Done(None));
        let d = report(
            "d",
            Some(RunStatus::Inmigrate),
            Some(MigrationPhase::Running { progress: None }),
        );
        assert_eq!(resolve(&row(), None, Some(&d)), Resolution::Pending);
        assert_eq!(resolve(&row(), None, None), Resolution::Pending);
    }

    #[test]
    fn in_doubt_is_resolved_by_where_the_vm_runs() {
        let doubt = MigrationPhase::InDoubt {
            error: "no Resumed".into(),
        };
        let s = report("s", Some(RunStatus::Postmigrate), Some(doubt.clone()));
        // The destination has not been seen running it: in doubt, never guessed.
        let d = report("d", Some(RunStatus::Inmigrate), None);
        assert!(matches!(
            resolve(&row(), Some(&s), Some(&d)),
            Resolution::InDoubt(_)
        ));
        assert!(matches!(
            resolve(&row(), Some(&s), None),
            Resolution::InDoubt(_)
        ));
        // It runs there: done.
        let d = report("d", Some(RunStatus::Running), None);
        assert_eq!(resolve(&row(), Some(&s), Some(&d)), Resolution::Done(None));
        // The source runs it again and the destination does not have it: still in doubt as
        // long as the source's record says so (the operator who resumed it ends it).
        let s = report("s", Some(RunStatus::Running), Some(doubt));
        let d = report("d", None, None);
        assert!(matches!(
            resolve(&row(), Some(&s), Some(&d)),
            Resolution::InDoubt(_)
        ));
    }

    #[test]
    fn without_records_the_vms_place_decides() {
        let s = report("s", None, None);
        let d = report("d", Some(RunStatus::Running), None);
        assert_eq!(resolve(&row(), Some(&s), Some(&d)), Resolution::Done(None));
        let s = report("s", Some(RunStatus::Running), None);
        let d = report(
            "d",
            Some(RunStatus::Inmigrate),
            Some(MigrationPhase::Prepared),
        );
        assert!(failed(&resolve(&row(), Some(&s), Some(&d))));
        // Running on both (cannot happen with the protocol): wait, never pick one.
        let d = report("d", Some(RunStatus::Running), None);
        assert_eq!(resolve(&row(), Some(&s), Some(&d)), Resolution::Pending);
    }
}
