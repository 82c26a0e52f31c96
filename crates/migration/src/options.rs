//! The source's options: [`MigrateOptions`] and the non-convergence policy [`OnNoConverge`].
//! One `Default` serves the library, the VM process and the CLI.

use std::sync::Arc;
use std::time::Duration;

use crate::summary::Progress;
use crate::transport::TransportKind;
use crate::util::CancelToken;

/// What to do when pre-copy rounds stop converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoConverge {
    /// Keep going until it converges or `max_rounds` is reached, then fail with
    /// [`crate::MigrationError::NotConverged`] (VM keeps running on the source).
    #[default]
    Wait,
    /// Stop-and-copy now, with whatever downtime that costs.
    Force,
    /// Fail at once with [`crate::MigrationError::NotConverged`].
    Abort,
}

/// Error parsing an [`OnNoConverge`].
#[derive(Debug, thiserror::Error)]
#[error("unknown non-convergence policy {0:?}: expected wait, force or abort")]
pub struct BadPolicy(pub String);

impl std::str::FromStr for OnNoConverge {
    type Err = BadPolicy;
    /// `wait`, `force` or `abort`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wait" => Ok(OnNoConverge::Wait),
            "force" => Ok(OnNoConverge::Force),
            "abort" => Ok(OnNoConverge::Abort),
            _ => Err(BadPolicy(s.into())),
        }
    }
}

/// Callback receiving [`Progress`] reports (called on the migrating thread; keep it short).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Default largest acceptable downtime (the VM process and the CLI use this too).
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(30);

/// Source options. `Default` gives sensible values for a LAN.
#[derive(Clone)]
pub struct MigrateOptions {
    /// Transport. Default: classic.
    pub transport: TransportKind,
    /// Largest acceptable downtime; pre-copy stops when the estimated remaining transfer fits.
    /// Default [`DEFAULT_DOWNTIME_LIMIT`] (30 ms).
    pub downtime_limit: Duration,
    /// Most rounds including the full pass. Default 30.
    pub max_rounds: u32,
    /// Policy when rounds stop converging. Default [`OnNoConverge::Wait`].
    pub on_no_converge: OnNoConverge,
    /// Bandwidth cap in bytes/s for page data (all streams together). Default none.
    pub bandwidth_limit: Option<u64>,
    /// Connection timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// Socket read/write timeout and handshake timeout. Default 10 s.
    pub io_timeout: Duration,
    /// How long to wait for `Ready` (destination verifying and restoring) and `Resumed`.
    /// Default 30 s.
    pub ack_timeout: Duration,
    /// Cancel from any thread. Honoured until `Commit` is sent.
    pub cancel: CancelToken,
    /// Progress callback: called after setup, after every dirty-log sync, at stop-and-copy
    /// and at the end, on the migrating thread; and every `progress_interval` during a round,
    /// from a ticker thread.
    pub progress: Option<ProgressFn>,
    /// Period of in-round progress reports; zero disables them. Default 500 ms.
    pub progress_interval: Duration,
}

impl std::fmt::Debug for MigrateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateOptions")
            .field("transport", &self.transport)
            .field("downtime_limit", &self.downtime_limit)
            .field("max_rounds", &self.max_rounds)
            .field("on_no_converge", &self.on_no_converge)
            .field("bandwidth_limit", &self.bandwidth_limit)
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("ack_timeout", &self.ack_timeout)
            .field("progress", &self.progress.is_some())
            .field("progress_interval", &self.progress_interval)
            .finish()
    }
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            transport: TransportKind::Classic,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            max_rounds: 30,
            on_no_converge: OnNoConverge::Wait,
            bandwidth_limit: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            cancel: CancelToken::new(),
            progress: None,
            progress_interval: Duration::from_millis(500),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_round_trip_through_json() {
        for (text, p) in [
            ("wait", OnNoConverge::Wait),
            ("force", OnNoConverge::Force),
            ("abort", OnNoConverge::Abort),
        ] {
            assert_eq!(text.parse::<OnNoConverge>().ok(), Some(p));
            assert_eq!(serde_json::to_string(&p).ok(), Some(format!("\"{text}\"")));
        }
        assert!("never".parse::<OnNoConverge>().is_err());
    }

    #[test]
    fn default_downtime_limit_is_the_documented_one() {
        assert_eq!(
            MigrateOptions::default().downtime_limit,
            Duration::from_millis(30)
        );
    }
}
