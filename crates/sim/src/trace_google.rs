//! The Google cluster-data 2011 trace (`google-gcd-2011/vms`): per-VM CPU and memory series.
//!
//! One file per VM, read in sorted name order; each line `CPU_PERCENT MEMORY_PERCENT`
//! (decimal numbers separated by white space) per 300 s sample. The first 288 lines (one day)
//! are used, as for PlanetLab; a shorter file is refused.
//!
//! **Out-of-range samples.** The data set's README warns that 613 memory samples in 12 files
//! exceed 100 % (the job used more memory than it asked for). A VM cannot use more than its
//! RAM, so such a sample is **clamped to 100 % and reported** ([`Trace::clamped`]: file,
//! count, first line and value; `fastmig simulate` prints one warning line per trace). Every
//! other out-of-range value is refused with its file and line: a CPU above 100 %, a negative
//! or non-finite number, a line without exactly two numbers.
//!
//! **What the memory series is for.** The migration cost model takes a VM's working set from
//! it: at the start of a migration the working set is the interpolated memory fraction times
//! the VM's RAM (CloudSim's VM types, as for PlanetLab), over which the VM's page writes (its
//! CPU utilisation × the dirty rate at full CPU) fall uniformly at random. The CPU series
//! drives placement exactly as a PlanetLab trace does.

use std::path::{Path, PathBuf};

use crate::error::SimError;
use crate::trace::{Clamped, Trace, PLANETLAB_SAMPLES};

/// Whether `file` is in the Google format: its first non-empty line has two fields.
pub fn is_google_file(file: &Path) -> Result<bool, SimError> {
    let text = std::fs::read_to_string(file).map_err(|source| SimError::TraceIo {
        path: file.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.split_whitespace().count() == 2))
}

/// Loads a Google trace directory.
pub fn load_dir(dir: &Path) -> Result<Trace, SimError> {
    load_files(&crate::trace::trace_files(dir)?)
}

/// Loads the given VM files (in this order).
pub fn load_files(files: &[PathBuf]) -> Result<Trace, SimError> {
    let mut rows = Vec::with_capacity(files.len());
    let mut memory = Vec::with_capacity(files.len());
    let mut clamped = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| SimError::TraceIo {
            path: f.clone(),
            source,
        })?;
        let (cpu, mem, clamp) = parse_file(f, &text)?;
        clamped.extend(clamp);
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        rows.push((name, cpu));
        memory.push(mem);
    }
    let mut trace = Trace::from_percent_rows(rows, 300.0);
    trace.memory = Some(
        memory
            .into_iter()
            .map(|m| {
                let mut s: Vec<f64> = m.iter().map(|p| p / 100.0).collect();
                if let Some(&l) = s.last() {
                    s.push(l);
                }
                s
            })
            .collect(),
    );
    trace.clamped = clamped;
    Ok(trace)
}

type Parsed = (Vec<f64>, Vec<f64>, Option<Clamped>);

/// One file's CPU and memory percentages (memory clamped to 100) and what was clamped.
fn parse_file(path: &Path, text: &str) -> Result<Parsed, SimError> {
    let bad = |line: usize, msg: String| SimError::TraceFormat {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut cpu = Vec::with_capacity(PLANETLAB_SAMPLES);
    let mut mem = Vec::with_capacity(PLANETLAB_SAMPLES);
    let mut clamped: Option<Clamped> = None;
    for (i, line) in text.lines().enumerate() {
        if cpu.len() == PLANETLAB_SAMPLES {
            break;
        }
        let n = i + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [c, m] = fields.as_slice() else {
            return Err(bad(
                n,
                format!("expected `CPU_PERCENT MEMORY_PERCENT`, got {line:?}"),
            ));
        };
        let num = |f: &str, what: &str| -> Result<f64, SimError> {
            match f.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                _ => Err(bad(n, format!("{what} {f:?} is not a number >= 0"))),
            }
        };
        let c = num(c, "CPU")?;
        let m = num(m, "memory")?;
        if c > 100.0 {
            return Err(bad(n, format!("CPU {c} % outside 0..=100")));
        }
        if m > 100.0 {
            let e = clamped.get_or_insert(Clamped {
                path: path.to_path_buf(),
                samples: 0,
                first_line: n,
                first_value: m,
            });
            e.samples += 1;
        }
        cpu.push(c);
        mem.push(m.min(100.0));
    }
    if cpu.len() < PLANETLAB_SAMPLES {
        return Err(bad(
            cpu.len() + 1,
            format!(
                "short file: {} samples, expected {PLANETLAB_SAMPLES}",
                cpu.len()
            ),
        ));
    }
    Ok((cpu, mem, clamped))
}

/// One line summing up what was clamped, for a warning (`None` when nothing was).
pub fn clamp_warning(trace: &Trace) -> Option<String> {
    let first = trace.clamped.first()?;
    let samples: usize = trace.clamped.iter().map(|c| c.samples).sum();
    Some(format!(
        "{samples} memory samples above 100 % in {} files clamped to 100 % (first: {} line {}, {} %)",
        trace.clamped.len(),
        first.path.display(),
        first.first_line,
        first.first_value
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;

    /// `n` lines of `cpu mem`.
    fn file(n: usize, f: impl Fn(usize) -> (f64, f64)) -> String {
        (0..n)
            .map(|i| {
                let (c, m) = f(i);
                format!("{c} {m}\n")
            })
            .collect()
    }

    fn dir(files: &[(&str, String)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).expect("write");
        }
        std::fs::write(d.path().join("README.md"), "not a VM").expect("write");
        d
    }

    #[test]
    fn reads_cpu_and_memory_in_name_order_and_is_told_apart_from_planetlab() {
        let d = dir(&[
            ("vm_2_1", file(300, |i| (10.0 + i as f64 / 10.0, 20.0))),
            ("vm_1_1", file(288, |_| (7.117, 5.1209999999999996))),
        ]);
        let t = Trace::load(d.path()).expect("load");
        assert_eq!(t.names, ["vm_1_1", "vm_2_1"]);
        assert_eq!(t.sample_count(), 288, "only the first 288 lines");
        assert_eq!(t.samples[0][0], 0.07117);
        // Sample 287 of vm_2_1: 10 + 28.7 = 38.7 %, repeated as the tail.
        assert!((t.samples[1][287] - 0.387).abs() < 1e-12);
        assert_eq!(t.samples[1][288], t.samples[1][287]);
        let mem = t.memory.as_ref().expect("memory series");
        assert!((mem[0][5] - 0.05121).abs() < 1e-15, "{}", mem[0][5]);
        assert_eq!(mem[1].len(), 289);
        // Interpolated like the CPU: halfway between two equal samples is the same value.
        assert_eq!(t.memory_at(1, &t.instant(150.0)), Some(0.2));
        assert!(t.clamped.is_empty());
        assert_eq!(clamp_warning(&t), None);

        // A PlanetLab directory has no memory series.
        let p = dir(&[("a", file(288, |_| (1.0, 0.0)).replace(" 0\n", "\n"))]);
        let t = Trace::load(p.path()).expect("planetlab");
        assert!(t.memory.is_none());
        assert_eq!(t.memory_at(0, &t.instant(0.0)), None);
    }

    #[test]
    fn memory_above_100_percent_is_clamped_and_reported() {
        // Lines 3 and 10 say 215 % and 150 %: both become 100 %, reported with the first.
        let d = dir(&[
            (
                "vm_a",
                file(288, |i| match i {
                    2 => (5.0, 215.0),
                    9 => (5.0, 150.0),
                    _ => (5.0, 50.0),
                }),
            ),
            ("vm_b", file(288, |_| (5.0, 99.5))),
        ]);
        let t = Trace::load(d.path()).expect("load");
        let mem = t.memory.as_ref().expect("memory");
        assert_eq!(mem[0][2], 1.0);
        assert_eq!(mem[0][9], 1.0);
        assert_eq!(mem[0][3], 0.5);
        assert_eq!(mem[1][0], 0.995);
        assert_eq!(t.clamped.len(), 1);
        let c = &t.clamped[0];
        assert!(c.path.ends_with("vm_a"));
        assert_eq!((c.samples, c.first_line, c.first_value), (2, 3, 215.0));
        let w = clamp_warning(&t).expect("warning");
        assert!(
            w.starts_with("2 memory samples above 100 % in 1 files"),
            "{w}"
        );
        assert!(w.contains("line 3, 215 %"), "{w}");
    }

    #[test]
    fn other_bad_values_are_refused_with_file_and_line() {
        for (line, bad, want) in [
            ("101 5", 4, "CPU 101"),
            ("5 -1", 4, "memory \"-1\""),
            ("5 x", 4, "memory \"x\""),
            ("5 5 5", 4, "expected `CPU_PERCENT MEMORY_PERCENT`"),
            ("NaN 5", 4, "CPU \"NaN\""),
        ] {
            let mut text = file(3, |_| (5.0, 5.0));
            text.push_str(line);
            text.push('\n');
            text.push_str(&file(290, |_| (5.0, 5.0)));
            let d = dir(&[("vm_x", text)]);
            match load_dir(d.path()) {
                Err(SimError::TraceFormat { path, line, msg }) => {
                    assert!(path.ends_with("vm_x"));
                    assert_eq!(line, bad, "{msg}");
                    assert!(msg.contains(want), "{msg} should say {want}");
                }
                other => panic!("{line:?}: {other:?}"),
            }
        }
        let short = dir(&[("vm_s", file(100, |_| (5.0, 5.0)))]);
        assert!(matches!(
            load_dir(short.path()),
            Err(SimError::TraceFormat { line: 101, .. })
        ));
    }
}
