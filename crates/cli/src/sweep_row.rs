//! One row of `sweep.csv`: every input of a real migration and every field of its summary,
//! flat for the `csv` crate; and its conversion to the model's [`Observation`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fastmig_model::{
    Measured, MigrationScenario, Observation, OnNoConverge, Outcome, Pattern, Transport,
};
use serde::{Deserialize, Serialize};

use crate::usage;

/// Whether a run is used to fit the model or held out to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Fitting run.
    Train,
    /// Held-out run (other sizes, rates and bandwidths than the fitting runs).
    Test,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Converged.
    Completed,
    /// Stop-and-copy forced after pre-copy stopped converging.
    CompletedForced,
    /// The migration failed (the error column says why).
    Failed,
}

/// A sweep row. Sizes in bytes, rates per second, times in ms unless named otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// Unique key of the grid point and repetition (resuming skips keys already present).
    pub key: String,
    /// Fitting or held-out run.
    pub split: Split,
    /// Repetition number.
    pub rep: u32,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// Write pattern.
    pub pattern: Pattern,
    /// Target guest writes/s (0: idle guest).
    pub target_write_pps: f64,
    /// Guest writes/s measured before the migration (the model's input).
    pub guest_write_pps: f64,
    /// Distinct dirty pages/s from the dirty log before the migration.
    pub guest_dirty_pps: f64,
    /// Working set, bytes.
    pub wss_bytes: u64,
    /// Link emulated with `tc tbf`, bytes/s; empty = loopback, unlimited.
    pub link_bytes_s: Option<f64>,
    /// Transport's own cap (`--max-bandwidth`), bytes/s; empty = none.
    pub cap_bytes_s: Option<f64>,
    /// Transport.
    pub transport: Transport,
    /// Streams (multi-tcp).
    pub streams: u32,
    /// Cores the migration may use (cpu share of the model; 1 = unrestricted).
    pub cpu_share: f64,
    /// The machine's 1-minute load average when the migration started (a shared machine's
    /// neighbours; 0 when not recorded).
    #[serde(default)]
    pub load1: f64,
    /// Fraction of the machine's CPU time that was idle over the warm-up just before the
    /// migration (`/proc/stat`, all cores): the CPU a migration could get, measured before
    /// it starts (empty in sweeps that did not record it).
    #[serde(default)]
    pub cpu_idle: Option<f64>,
    /// Downtime limit, ms.
    pub downtime_limit_ms: f64,
    /// Round limit.
    pub max_rounds: u32,
    /// Non-convergence policy.
    pub on_no_converge: OnNoConverge,
    /// Outcome.
    pub status: RunStatus,
    /// Error of a failed run.
    pub error: String,
    /// Total time, ms.
    pub total_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Source setup, ms.
    pub setup_ms: f64,
    /// Destination setup, ms.
    pub dst_setup_ms: f64,
    /// Rounds including stop-and-copy.
    pub rounds: u32,
    /// Page bytes on the wire.
    pub bytes_sent: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Zero pages sent as flags.
    pub zero_pages_skipped: u64,
    /// Throughput, MiB/s.
    pub throughput_mib_s: f64,
    /// Source CPU, s.
    pub src_cpu_s: f64,
    /// Destination CPU, s.
    pub dst_cpu_s: f64,
    /// Memory digests matched.
    pub digest_match: bool,
    /// Per-round wall times, ms, `;`-separated.
    pub round_ms: String,
    /// Per-round bytes, `;`-separated.
    pub round_bytes: String,
}

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>> {
    s.split(';')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| usage!("bad number `{x}` in a per-round list"))
        })
        .collect()
}

impl SweepRow {
    /// The model's inputs for this run.
    pub fn scenario(&self) -> MigrationScenario {
        let mut s = MigrationScenario::new(self.mem_bytes, self.transport);
        s.dirty_rate_pps = self.guest_write_pps;
        s.wss_bytes = self.wss_bytes;
        s.pattern = self.pattern;
        s.link_bytes_s = self.link_bytes_s;
        s.bandwidth_cap_bytes_s = self.cap_bytes_s;
        s.streams = self.streams;
        s.cpu_share = self.cpu_share;
        s.downtime_limit_s = self.downtime_limit_ms / 1e3;
        s.max_rounds = self.max_rounds;
        s.on_no_converge = self.on_no_converge;
        s
    }

    /// The run as a model observation; `None` for a failed run (nothing was measured).
    pub fn observation(&self) -> Result<Option<Observation>> {
        let outcome = match self.status {
            RunStatus::Completed => Outcome::Completed,
            RunStatus::CompletedForced => Outcome::CompletedForced,
            RunStatus::Failed => return Ok(None),
        };
        Ok(Some(Observation {
            scenario: self.scenario(),
            measured: Measured {
                outcome,
                total_ms: self.total_ms,
                downtime_ms: self.downtime_ms,
                setup_ms: self.setup_ms,
                bytes: self.bytes_sent,
                pages: self.pages_sent,
                zero_pages: self.zero_pages_skipped,
                rounds: self.rounds,
                src_cpu_s: self.src_cpu_s,
                dst_cpu_s: self.dst_cpu_s,
                round_ms: list(&self.round_ms)?,
                round_bytes: list(&self.round_bytes)?,
            },
        }))
    }
}

/// Reads every row of a sweep CSV; a malformed file is a usage error.
impl SweepRow {
    /// The grid point this run measured: its key without the repetition (the key's last
    /// `|`-separated field), so that repetitions of one point share it.
    pub fn point(&self) -> &str {
        let suffix = format!("|{}", self.rep);
        self.key.strip_suffix(&suffix).unwrap_or(&self.key)
    }
}

/// Reads the rows of several sweeps, in order (their runs are pooled).
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<SweepRow>> {
    let mut rows = Vec::new();
    for p in paths {
        rows.extend(read(p)?);
    }
    Ok(rows)
}

pub fn read(path: &Path) -> Result<Vec<SweepRow>> {
    let mut r = csv::Reader::from_path(path)
        .map_err(|e| usage!("cannot read sweep {}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for (i, row) in r.deserialize().enumerate() {
        let row: SweepRow = row.map_err(|e| usage!("{} row {}: {e}", path.display(), i + 1))?;
        rows.push(row);
    }
    Ok(rows)
}
/// Appends rows to `path`, writing the header only when the file is new or empty; refuses
/// a file whose columns differ from this build's.
pub fn append(path: &Path, rows: &[SweepRow]) -> Result<()> {
    let fresh = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    if !fresh && !rows.is_empty() {
        // An existing file must have this build's columns: appending others corrupts it.
        let mut r = csv::Reader::from_path(path)
            .map_err(|e| usage!("cannot read sweep {}: {e}", path.display()))?;
        let have = r
            .headers()
            .map_err(|e| usage!("{}: {e}", path.display()))?
            .iter()
            .collect::<Vec<_>>()
            .join(",");
        let mut w = csv::Writer::from_writer(Vec::new());
        w.serialize(&rows[0]).context("writing a sweep row")?;
        let text = String::from_utf8(w.into_inner().context("writing a sweep row")?)
            .context("writing a sweep row")?;
        if text.lines().next() != Some(have.as_str()) {
            return Err(usage!(
                "{} has other columns than this build writes; resume it with the build that started it, or start a new sweep",
                path.display()
            ));
        }
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = csv::WriterBuilder::new().has_headers(fresh).from_writer(f);
    for row in rows {
        w.serialize(row).context("writing a sweep row")?;
    }
    w.flush().context("writing a sweep row")?;
    Ok(())
}

/// A completed run for tests.
#[cfg(test)]
pub(crate) fn sample_row(key: &str) -> SweepRow {
    SweepRow {
        key: key.into(),
        split: Split::Train,
        rep: 0,
        mem_bytes: 64 << 20,
        pattern: Pattern::HotCold,
        target_write_pps: 1000.0,
        guest_write_pps: 990.0,
        guest_dirty_pps: 800.0,
        wss_bytes: 16 << 20,
        link_bytes_s: Some(1.25e8),
        cap_bytes_s: None,
        transport: Transport::MultiTcp,
        streams: 2,
        cpu_share: 1.0,
        load1: 3.5,
        cpu_idle: Some(0.25),
        downtime_limit_ms: 30.0,
        max_rounds: 30,
        on_no_converge: OnNoConverge::Force,
        status: RunStatus::Completed,
        error: String::new(),
        total_ms: 700.0,
        downtime_ms: 3.0,
        setup_ms: 2.0,
        dst_setup_ms: 1.0,
        rounds: 3,
        bytes_sent: 70_000_000,
        pages_sent: 17_000,
        zero_pages_skipped: 0,
        throughput_mib_s: 100.0,
        src_cpu_s: 0.1,
        dst_cpu_s: 0.2,
        digest_match: true,
        round_ms: "600.5;90;3".into(),
        round_bytes: "67108864;2000000;40000".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str) -> SweepRow {
        sample_row(key)
    }

    #[test]
    fn rows_round_trip_and_resume_appends_without_a_second_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sweep.csv");
        append(&p, &[row("a")]).expect("first");
        append(&p, &[row("b")]).expect("second");
        let rows = read(&p).expect("read");
        assert_eq!(rows, vec![row("a"), row("b")]);
        let o = rows[0].observation().expect("obs").expect("completed");
        assert_eq!(o.measured.round_ms, vec![600.5, 90.0, 3.0]);
        assert_eq!(o.scenario.link_bytes_s, Some(1.25e8));
        assert_eq!(
            o.scenario.dirty_rate_pps, 990.0,
            "the measured rate is the input"
        );
    }

    #[test]
    fn a_point_is_its_key_without_the_repetition_and_sweeps_pool() {
        let mut r = row("train|64|Random|0|4194304|||classic|2|30000|Force|30|2");
        r.rep = 2;
        assert_eq!(
            r.point(),
            "train|64|Random|0|4194304|||classic|2|30000|Force|30"
        );
        // A key that does not end in its repetition is its own point.
        assert_eq!(row("odd").point(), "odd");
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        append(&a, &[row("a")]).expect("a");
        append(&b, &[row("b"), row("c")]).expect("b");
        let keys: Vec<String> = read_all(&[a, b])
            .expect("read")
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    #[test]
    fn appending_to_a_csv_of_other_columns_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sweep.csv");
        std::fs::write(&p, "key,split\nx,train\n").expect("write");
        let e = append(&p, &[row("a")]).expect_err("other columns");
        assert!(e.to_string().contains("other columns"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "key,split\nx,train\n"
        );
    }
}
