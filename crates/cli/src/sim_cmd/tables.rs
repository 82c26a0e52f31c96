//! The file formats of `fastmig simulate`: the CloudSim reference CSV it reads and the CSV
//! tables it writes (through the `csv` crate and serde).

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Row;
use crate::usage;

/// Reference rows keyed by (day, policy).
pub(super) type Reference = Vec<(String, String, SimResultRef)>;

/// The columns of a CloudSim reference CSV that the comparison reads (matched by header name;
/// other columns such as `param`, `hosts` or `slav` are ignored).
#[derive(Debug, Clone, Deserialize)]
pub(super) struct ReferenceRow {
    day: String,
    /// CloudSim's spelling (`thr_mmt`); ours is `thr-mmt`.
    policy: String,
    energy_kwh: f64,
    slatah: f64,
    pdm: f64,
    migrations: f64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct SimResultRef {
    pub(super) energy_kwh: f64,
    pub(super) slatah: f64,
    pub(super) pdm: f64,
    pub(super) migrations: f64,
}

pub(super) fn read_reference(path: &Path) -> Result<Reference> {
    let mut reader =
        csv::Reader::from_path(path).map_err(|e| usage!("--reference {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for row in reader.deserialize::<ReferenceRow>() {
        let r = row.map_err(|e| usage!("--reference {}: {e}", path.display()))?;
        let metrics = SimResultRef {
            energy_kwh: r.energy_kwh,
            slatah: r.slatah,
            pdm: r.pdm,
            migrations: r.migrations,
        };
        out.push((r.day, r.policy.replace('_', "-"), metrics));
    }
    if out.is_empty() {
        return Err(usage!("--reference {}: no rows", path.display()));
    }
    Ok(out)
}

/// A number written with a fixed count of decimals (`{:.N}`), as the CSV outputs carry it.
pub(super) struct Fixed<const N: usize>(pub(super) f64);

impl<const N: usize> Serialize for Fixed<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:.*}", N, self.0))
    }
}

/// An optional number written as Rust displays it (`1`, `0.25`), empty when absent.
pub(super) struct Shown(pub(super) Option<f64>);

impl Serialize for Shown {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => s.collect_str(&v),
            None => s.serialize_none(),
        }
    }
}

/// One line of `policies.csv`.
#[derive(Serialize)]
pub(super) struct PolicyCsvRow<'a> {
    pub(super) day: &'a str,
    pub(super) policy: &'a str,
    /// Empty for NPA and DVFS.
    pub(super) param: Shown,
    pub(super) hosts: usize,
    pub(super) vms: usize,
    pub(super) energy_kwh: Fixed<4>,
    pub(super) slatah: Fixed<7>,
    pub(super) pdm: Fixed<7>,
    pub(super) slav: Fixed<9>,
    pub(super) esv: Fixed<9>,
    pub(super) migrations: u64,
    pub(super) host_shutdowns: u64,
    pub(super) wall_s: Fixed<3>,
}

/// One line of `migration-speed.csv`.
#[derive(Serialize)]
pub(super) struct SpeedCsvRow<'a> {
    pub(super) day: &'a str,
    pub(super) policy: &'a str,
    pub(super) migration: &'a str,
    /// Empty for CloudSim's model; the link's speed for a fitted-model row.
    pub(super) gbit: Shown,
    pub(super) energy_kwh: Fixed<4>,
    pub(super) slatah: Fixed<7>,
    pub(super) pdm: Fixed<7>,
    pub(super) slav: Fixed<9>,
    pub(super) esv: Fixed<9>,
    pub(super) migrations: u64,
    pub(super) host_shutdowns: u64,
}

/// Writes `rows` as a CSV file with a header line (the field names).
pub(super) fn write_csv<T: Serialize>(
    path: &Path,
    rows: impl IntoIterator<Item = T>,
) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for row in rows {
        w.serialize(row)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One run as text (`fastmig simulate` without `--json`).
pub(super) fn print_text(row: &Row) {
    let r = &row.result;
    let param = r.param.map(|p| format!(" (param {p})")).unwrap_or_default();
    println!("day              {}", row.day);
    println!("policy           {}{param}", r.policy);
    println!("hosts / VMs      {} / {}", r.hosts, r.vms);
    println!("migration model  {}", r.migration_model);
    println!("energy           {:.2} kWh", r.energy_kwh);
    println!(
        "SLATAH           {:.5} ({:.2} %)",
        r.slatah,
        r.slatah * 100.0
    );
    println!("PDM              {:.6} ({:.4} %)", r.pdm, r.pdm * 100.0);
    println!("SLAV             {:.8}", r.slav);
    println!("ESV              {:.8}", r.esv);
    println!("migrations       {}", r.migrations);
    println!("host shutdowns   {}", r.host_shutdowns);
    println!("wall time        {:.3} s", row.wall_s);
}

/// `a` relative to `b` as a signed percentage (`n/a` against 0).
pub(super) fn rel(a: f64, b: f64) -> String {
    if b == 0.0 {
        if a == 0.0 {
            "0.0%".into()
        } else {
            "n/a".into()
        }
    } else {
        format!("{:+.1}%", (a - b) / b * 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_keep_the_fixed_decimals_and_display_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.csv");
        let row = |gbit: Option<f64>| SpeedCsvRow {
            day: "d,1",
            policy: "lr-mmt",
            migration: "x",
            gbit: Shown(gbit),
            energy_kwh: Fixed(163.47721709836688),
            slatah: Fixed(0.05857947786187033),
            pdm: Fixed(0.0),
            slav: Fixed(1.0 / 3.0),
            esv: Fixed(2.5e-10),
            migrations: 27859,
            host_shutdowns: 5,
        };
        write_csv(&path, [row(None), row(Some(1.0)), row(Some(0.25))]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "day,policy,migration,gbit,energy_kwh,slatah,pdm,slav,esv,migrations,host_shutdowns",
                // {:.4} rounds 163.4772|17 down, {:.7} 0.0585794|77 up; a comma in a name is
                // quoted; no model speed is an empty field, 1 Gbit/s is "1" (not "1.0").
                "\"d,1\",lr-mmt,x,,163.4772,0.0585795,0.0000000,0.333333333,0.000000000,27859,5",
                "\"d,1\",lr-mmt,x,1,163.4772,0.0585795,0.0000000,0.333333333,0.000000000,27859,5",
                "\"d,1\",lr-mmt,x,0.25,163.4772,0.0585795,0.0000000,0.333333333,0.000000000,27859,5",
            ]
        );
    }

    #[test]
    fn reference_is_read_by_column_name_and_bad_ones_are_usage_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("ref.csv");
        std::fs::write(
            &good,
            "day,policy,param,hosts,vms,energy_kwh,slatah,pdm,slav,migrations,host_shutdowns\n\
             20110303,thr_mmt,0.8,800,1052,192.62,0.0491,0.0006,0.0000318,26711,5885\n",
        )
        .expect("write");
        let r = read_reference(&good).expect("parses");
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0.as_str(), r[0].1.as_str()), ("20110303", "thr-mmt"));
        assert_eq!(r[0].2.energy_kwh, 192.62);
        assert_eq!(r[0].2.migrations, 26711.0);
        let bad = dir.path().join("bad.csv");
        std::fs::write(
            &bad,
            "day,policy,energy_kwh,slatah,pdm,migrations\nd,p,x,1,1,1\n",
        )
        .expect("write");
        let empty = dir.path().join("empty.csv");
        std::fs::write(&empty, "day,policy,energy_kwh,slatah,pdm,migrations\n").expect("write");
        for p in [bad, empty, dir.path().join("missing.csv")] {
            let e = read_reference(&p)
                .err()
                .map(|e| crate::error::exit_code(&e));
            assert_eq!(e, Some(2), "{}", p.display());
        }
    }
}
