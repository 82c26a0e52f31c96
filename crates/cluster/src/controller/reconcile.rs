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
