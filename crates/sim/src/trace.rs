//! CPU-utilisation traces: the PlanetLab directory format and a CSV format.
//!
//! **PlanetLab directory**: one file per VM, each with (at least) 288 lines holding one integer
//! CPU percentage (0-100) per 300 s sample. Files are read in sorted name order (byte order of
//! the file name) so runs are deterministic; CloudSim lists the folder unsorted. Only the first
//! 288 values are used, as CloudSim does.
//!
//! **CSV** (`*.csv` file): one VM per line, `name,u0,u1,...,uN` with utilisation in percent
//! (decimals allowed, 0-100). Empty lines and lines starting with `#` are skipped; a first line
//! whose second field is not a number is taken as a header. Every row must have the same number
//! of samples (at least 2); the sampling interval is 300 s unless the caller overrides it.
//!
//! **Google cluster data 2011** (`google-gcd-2011/vms`): a directory like PlanetLab's whose
//! lines hold two numbers, `CPU_PERCENT MEMORY_PERCENT`; [`Trace::load`] tells the two apart
//! by the first line of the first file. It gives each VM a memory series as well
//! ([`Trace::memory`]), read in [`crate::trace_google`], which also says how out-of-range
//! samples are handled.

use std::path::{Path, PathBuf};

use crate::error::SimError;

/// Samples per PlanetLab file (one day at 300 s).
pub const PLANETLAB_SAMPLES: usize = 288;

/// Interpolation coordinates of one point in time (see [`Trace::instant`]).
#[derive(Debug, Clone, Copy)]
pub struct Instant {
    t1: usize,
    t2: usize,
    denom: f64,
    offset: f64,
}

/// A set of VM utilisation traces sampled at a fixed interval.
#[derive(Debug, Clone)]
pub struct Trace {
    /// One name per VM (the file name for PlanetLab).
    pub names: Vec<String>,
    /// Per VM, utilisation as a fraction 0..=1 per sample, with one extra trailing sample that
    /// repeats the last one (CloudSim keeps 289 values so interpolation past the last sample is
    /// defined).
    pub samples: Vec<Vec<f64>>,
    /// Seconds between samples.
    pub interval_s: f64,
    /// Per VM, memory in use as a fraction 0..=1 of the VM's RAM per sample (with the same
    /// repeated tail), when the trace has it (Google's does, PlanetLab's does not).
    pub memory: Option<Vec<Vec<f64>>>,
    /// Samples the reader changed to bring them in range (see [`crate::trace_google`]).
    pub clamped: Vec<Clamped>,
}

/// Out-of-range samples of one file that the reader clamped.
#[derive(Debug, Clone, PartialEq)]
pub struct Clamped {
    /// The file.
    pub path: PathBuf,
    /// How many samples were clamped.
    pub samples: usize,
    /// The first one: 1-based line and value as read.
    pub first_line: usize,
    /// The value read on `first_line`.
    pub first_value: f64,
}

impl Trace {
    /// Number of VMs.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no VMs.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of real samples per VM (without the repeated tail).
    pub fn sample_count(&self) -> usize {
        self.samples
            .first()
            .map_or(0, |s| s.len().saturating_sub(1))
    }

    /// Utilisation of VM `vm` at `time` seconds, linearly interpolated between samples exactly
    /// as CloudSim's `UtilizationModelPlanetLabInMemory.getUtilization` does.
    pub fn utilization(&self, vm: usize, time: f64) -> f64 {
        let data = &self.samples[vm];
        let interval = self.interval_s;
        let last = data.len() - 1;
        if time % interval == 0.0 {
            return data[((time as i64 / interval as i64) as usize).min(last)];
        }
        let t1 = ((time / interval).floor() as usize).min(last);
        let t2 = ((time / interval).ceil() as usize).min(last);
        let u1 = data[t1];
        let u2 = data[t2];
        let delta = (u2 - u1) / ((t2 as f64 - t1 as f64) * interval);
        if !delta.is_finite() {
            return u1;
        }
        u1 + delta * (time - t1 as f64 * interval)
    }

    /// The time-dependent part of [`Trace::utilization`] at `time`, shared by every VM.
    pub fn instant(&self, time: f64) -> Instant {
        let interval = self.interval_s;
        let last = self.samples.first().map_or(0, |d| d.len() - 1);
        if time % interval == 0.0 {
            let i = ((time as i64 / interval as i64) as usize).min(last);
            return Instant {
                t1: i,
                t2: i,
                denom: 0.0,
                offset: 0.0,
            };
        }
        let t1 = ((time / interval).floor() as usize).min(last);
        let t2 = ((time / interval).ceil() as usize).min(last);
        Instant {
            t1,
            t2,
            denom: (t2 as f64 - t1 as f64) * interval,
            offset: time - t1 as f64 * interval,
        }
    }

    /// Utilisation of VM `vm` at a precomputed instant; same arithmetic as
    /// [`Trace::utilization`].
    pub fn utilization_at(&self, vm: usize, at: &Instant) -> f64 {
        let data = &self.samples[vm];
        let u1 = data[at.t1];
        if at.denom == 0.0 {
            return u1;
        }
        let delta = (data[at.t2] - u1) / at.denom;
        u1 + delta * at.offset
    }

    /// Memory in use by VM `vm` as a fraction of its RAM at a precomputed instant, when the
    /// trace has a memory series (same interpolation as the CPU series).
    pub fn memory_at(&self, vm: usize, at: &Instant) -> Option<f64> {
        let data = self.memory.as_ref()?.get(vm)?;
        let u1 = data[at.t1];
        if at.denom == 0.0 {
            return Some(u1);
        }
        Some(u1 + (data[at.t2] - u1) / at.denom * at.offset)
    }

    /// Builds a trace from percent values (tests and generators). Each row gets the repeated
    /// tail sample appended.
    pub fn from_percent_rows(rows: Vec<(String, Vec<f64>)>, interval_s: f64) -> Self {
        let mut names = Vec::with_capacity(rows.len());
        let mut samples = Vec::with_capacity(rows.len());
        for (name, row) in rows {
            let mut s: Vec<f64> = row.iter().map(|p| p / 100.0).collect();
            if let Some(&l) = s.last() {
                s.push(l);
            }
            names.push(name);
            samples.push(s);
        }
        Self {
            names,
            samples,
            interval_s,
            memory: None,
            clamped: Vec::new(),
        }
    }

    /// Loads a PlanetLab or Google directory (told apart by the number of fields on the first
    /// file's first line) or, when `path` is a file ending in `.csv`, a CSV trace.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            load_csv(path, 300.0)
        } else {
            let files = trace_files(path)?;
            if crate::trace_google::is_google_file(&files[0])? {
                crate::trace_google::load_files(&files)
            } else {
                load_planetlab_files(&files)
            }
        }
    }
}

/// Loads a PlanetLab day directory (files in sorted name order).
pub fn load_planetlab_dir(dir: &Path) -> Result<Trace, SimError> {
    load_planetlab_files(&trace_files(dir)?)
}

/// The VM files of a trace directory in sorted name order (READMEs and hidden files are
/// documentation, not VMs); at least one.
pub(crate) fn trace_files(dir: &Path) -> Result<Vec<PathBuf>, SimError> {
    let io = |source| SimError::TraceIo {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // README files and hidden files are documentation, not VMs.
        if name.starts_with('.') || name.to_ascii_lowercase().starts_with("readme") || !p.is_file()
        {
            continue;
        }
        files.push(p);
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        return Err(SimError::EmptyTrace(dir.to_path_buf()));
    }
    Ok(files)
}

/// Loads the given PlanetLab VM files (in this order): one CPU percentage per line, the first
/// 288 lines (one day) of each.
pub fn load_planetlab_files(files: &[PathBuf]) -> Result<Trace, SimError> {
    let mut rows = Vec::with_capacity(files.len());
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| SimError::TraceIo {
            path: f.clone(),
            source,
        })?;
        let mut vals = Vec::with_capacity(PLANETLAB_SAMPLES);
        for (i, line) in text.lines().enumerate() {
            if vals.len() == PLANETLAB_SAMPLES {
                break;
            }
            let t = line.trim();
            let v: f64 = t
                .parse::<i64>()
                .map(|v| v as f64)
                .or_else(|_| t.parse::<f64>())
                .map_err(|_| SimError::TraceFormat {
                    path: f.clone(),
                    line: i + 1,
                    msg: format!("not a number: {t:?}"),
                })?;
            if !(0.0..=100.0).contains(&v) {
                return Err(SimError::TraceFormat {
                    path: f.clone(),
                    line: i + 1,
                    msg: format!("utilisation {v} outside 0..=100"),
                });
            }
            vals.push(v);
        }
        if vals.len() < PLANETLAB_SAMPLES {
            return Err(SimError::TraceFormat {
                path: f.clone(),
                line: vals.len() + 1,
                msg: format!(
                    "short file: {} samples, expected {PLANETLAB_SAMPLES}",
                    vals.len()
                ),
            });
        }
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        rows.push((name, vals));
    }
    Ok(Trace::from_percent_rows(rows, 300.0))
}

/// Loads a CSV trace (see the module docs for the format).
pub fn load_csv(path: &Path, interval_s: f64) -> Result<Trace, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::TraceIo {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    let mut width: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut fields = t.split(',').map(str::trim);
        let name = fields.next().unwrap_or_default().to_string();
        let rest: Vec<&str> = fields.collect();
        if rows.is_empty()
            && width.is_none()
            && rest.first().is_some_and(|f| f.parse::<f64>().is_err())
        {
            continue; // header
        }
        let mut vals = Vec::with_capacity(rest.len());
        for f in rest {
            let v: f64 = f.parse().map_err(|_| SimError::TraceFormat {
                path: path.to_path_buf(),
                line: i + 1,
                msg: format!("not a number: {f:?}"),
            })?;
            if !(0.0..=100.0).contains(&v) {
                return Err(SimError::TraceFormat {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("utilisation {v} outside 0..=100"),
                });
            }
            vals.push(v);
        }
        if vals.len() < 2 {
            return Err(SimError::TraceFormat {
                path: path.to_path_buf(),
                line: i + 1,
                msg: "fewer than 2 samples".into(),
            });
        }
        match width {
            None => width = Some(vals.len()),
            Some(w) if w != vals.len() => {
                return Err(SimError::TraceFormat {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("{} samples, earlier rows have {w}", vals.len()),
                })
            }
            _ => {}
        }
        rows.push((name, vals));
    }
    if rows.is_empty() {
        return Err(SimError::EmptyTrace(path.to_path_buf()));
    }
    Ok(Trace::from_percent_rows(rows, interval_s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_matches_cloudsim() {
        let t = Trace::from_percent_rows(vec![("a".into(), vec![24.0, 34.0, 29.0])], 300.0);
        assert_eq!(t.utilization(0, 0.0), 0.24);
        assert_eq!(t.utilization(0, 300.0), 0.34);
        // 60 s into the first interval: 0.24 + (0.10 / 300) * 60 = 0.26.
        assert!((t.utilization(0, 60.0) - 0.26).abs() < 1e-12);
        // Past the last sample the repeated tail keeps the value flat: 0.29.
        assert!((t.utilization(0, 700.0) - 0.29).abs() < 1e-12);
        for time in [0.0, 60.0, 300.0, 300.1, 555.5, 700.0] {
            assert_eq!(
                t.utilization(0, time),
                t.utilization_at(0, &t.instant(time)),
                "{time}"
            );
        }
    }
}
