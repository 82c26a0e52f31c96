//! The VMs' demand trace, in one directory that both the testbed's agents and the simulator
//! read: the first VM files of a PlanetLab day (copied, so that READMEs or extra files of
//! the source directory can never shift which VM follows which file), or a generated one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fastmig_sim::rng::SplitMix64;

use crate::usage;

/// Samples in a PlanetLab file (one day of 5-minute samples).
const SAMPLES: usize = 288;

/// Fills `work/trace` with `vms` files; returns the directory, a description of where they
/// came from, and how many files it holds.
pub fn prepare(source: Option<&Path>, vms: usize, work: &Path) -> Result<(PathBuf, String, usize)> {
    let dir = work.join("trace");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match source {
        Some(src) => {
            let files = vm_files(src)?;
            let used = &files[..vms.min(files.len())];
            for (i, f) in used.iter().enumerate() {
                // Numbered so that the copies sort as the originals do.
                let name = f.file_name().map(|n| n.to_string_lossy().to_string());
                let to = dir.join(format!("{i:04}-{}", name.unwrap_or_default()));
                std::fs::copy(f, &to).with_context(|| format!("copying {}", f.display()))?;
            }
            // Checked as the simulator reads them: a file that is not a PlanetLab file is the
            // user's to fix.
            fastmig_sim::trace::load_planetlab_dir(&dir)
                .map_err(|e| usage!("--trace {}: {e}", src.display()))?;
            Ok((
                dir,
                format!(
                    "{} (first {} files in name order)",
                    src.display(),
                    used.len()
                ),
                used.len(),
            ))
        }
        None => {
            for i in 0..vms {
                let text: String = generated(i as u64)
                    .iter()
                    .map(|p| format!("{p}\n"))
                    .collect();
                std::fs::write(dir.join(format!("gen{i:04}")), text)
                    .context("writing the generated trace")?;
            }
            Ok((
                dir,
                "generated (seeded; PlanetLab format, see `experiment_cmd/trace.rs`)".into(),
                vms,
            ))
        }
    }
}

/// A directory's VM files in name order (READMEs and hidden files are not VMs).
fn vm_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| usage!("--trace {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            !n.starts_with('.') && !n.starts_with("readme")
        })
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        return Err(usage!("--trace {}: no trace files", dir.display()));
    }
    Ok(files)
}

/// A uniform draw in [0, 1).
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// One VM's day of CPU percentages: a base load (5-30 %) with a slow wave (period 2-6 hours)
/// and noise, and now and then a burst of 15-40 minutes at 70-95 %, so that hosts both empty
/// out and overload. Seeded by the VM's index: the same trace every run.
pub fn generated(vm: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(0x5EED ^ (vm.wrapping_mul(0x9E37_79B9)));
    let base = 5.0 + 25.0 * unit(&mut rng);
    let amplitude = 3.0 + 12.0 * unit(&mut rng);
    let period = 24.0 + 48.0 * unit(&mut rng);
    let phase = std::f64::consts::TAU * unit(&mut rng);
    let mut burst = 0u32;
    let mut burst_level = 0.0;
    (0..SAMPLES)
        .map(|k| {
            if burst == 0 && unit(&mut rng) < 0.03 {
                burst = 3 + (unit(&mut rng) * 6.0) as u32;
                burst_level = 70.0 + 25.0 * unit(&mut rng);
            }
            let v = if burst > 0 {
                burst -= 1;
                burst_level
            } else {
                let wave = (std::f64::consts::TAU * k as f64 / period + phase).sin();
                base + amplitude * wave + 8.0 * (unit(&mut rng) - 0.5)
            };
            v.round().clamp(0.0, 100.0) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_days_are_seeded_percentages_with_bursts() {
        let a = generated(3);
        assert_eq!(a.len(), SAMPLES);
        assert_eq!(a, generated(3));
        assert_ne!(a, generated(4));
        assert!(a.iter().all(|&p| p <= 100));
        // Over a dozen VMs, some samples burst above 70 % and most stay below 40 %.
        let all: Vec<u32> = (0..12).flat_map(generated).collect();
        let high = all.iter().filter(|&&p| p >= 70).count();
        let low = all.iter().filter(|&&p| p < 40).count();
        assert!(high > 0, "no burst");
        assert!(low > all.len() / 2, "{low} of {}", all.len());
    }

    #[test]
    fn a_trace_directory_is_copied_in_order_without_its_readme() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("README"), "not a VM\n").unwrap();
        for (name, p) in [("b", 20), ("a", 10), ("c", 30)] {
            std::fs::write(src.path().join(name), format!("{p}\n").repeat(SAMPLES)).unwrap();
        }
        let work = tempfile::tempdir().unwrap();
        let (dir, _, n) = prepare(Some(src.path()), 2, work.path()).unwrap();
        assert_eq!(n, 2);
        let trace = fastmig_sim::trace::load_planetlab_dir(&dir).unwrap();
        assert_eq!(trace.len(), 2);
        // VM 0 follows "a" (10 %), VM 1 "b" (20 %).
        assert!((trace.utilization(0, 0.0) - 0.1).abs() < 1e-9);
        assert!((trace.utilization(1, 0.0) - 0.2).abs() < 1e-9);
        // An empty directory is the user's to fix.
        let empty = tempfile::tempdir().unwrap();
        let e = prepare(Some(empty.path()), 2, work.path()).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
    }
}
