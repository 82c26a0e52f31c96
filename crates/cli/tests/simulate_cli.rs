//! `fastmig simulate` end to end: JSON output on a tiny CSV trace, and bad input exits with 2.

use std::process::Command;

fn fastmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fastmig"))
}

fn tiny_csv(dir: &std::path::Path) -> std::path::PathBuf {
    // 12 VMs over 2 hours of 5-minute samples, loads between 5 and 95 %.
    let mut s = String::from("vm,samples...\n");
    for i in 0..12 {
        let row: Vec<String> = (0..24)
            .map(|k| (5 + (i * 17 + k * 7) % 90).to_string())
            .collect();
        s.push_str(&format!("vm{i},{}\n", row.join(",")));
    }
    let p = dir.join("tiny.csv");
    std::fs::write(&p, s).expect("write csv");
    p
}

#[test]
fn json_has_the_documented_fields_as_fractions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = tiny_csv(dir.path());
    let out = fastmig()
        .args(["simulate", "--trace"])
        .arg(&csv)
        .args(["--policy", "thr-mmt", "--param", "0.7", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for k in [
        "hosts",
        "vms",
        "energy_kwh",
        "slatah",
        "pdm",
        "slav",
        "esv",
        "migrations",
        "host_shutdowns",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["vms"], 12);
    assert_eq!(v["policy"], "thr-mmt");
    assert_eq!(v["param"], 0.7);
    let slatah = v["slatah"].as_f64().expect("number");
    let pdm = v["pdm"].as_f64().expect("number");
    assert!((0.0..=1.0).contains(&slatah) && (0.0..=1.0).contains(&pdm));
    let slav = v["slav"].as_f64().expect("number");
    assert!((slav - slatah * pdm).abs() <= 1e-15);
    assert!(v["energy_kwh"].as_f64().expect("number") > 0.0);
}

#[test]
fn bad_input_is_one_line_and_exit_code_two() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = tiny_csv(dir.path());
    let cases: Vec<Vec<String>> = vec![
        vec!["--trace".into(), "/nonexistent/day".into()],
        vec![
            "--trace".into(),
            csv.display().to_string(),
            "--policy".into(),
            "foo-mmt".into(),
        ],
        vec![
            "--trace".into(),
            csv.display().to_string(),
            "--migration".into(),
            "gbit=zero".into(),
        ],
        vec![
            "--trace".into(),
            csv.display().to_string(),
            "--scale".into(),
            "0".into(),
        ],
        vec![
            "--trace".into(),
            csv.display().to_string(),
            "--migration".into(),
            "model:/nonexistent/model.json".into(),
        ],
        vec![
            "--trace".into(),
            csv.display().to_string(),
            "--migration".into(),
            "model:m.json,transport=udp".into(),
        ],
        vec![
            "--trace".into(),
            csv.display().to_string(),
            "--model".into(),
            "m.json".into(),
        ],
    ];
    for args in cases {
        let out = fastmig().arg("simulate").args(&args).output().expect("run");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    // A malformed trace file names the file and line.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "a,1,2,3\nb,1,x,3\n").expect("write");
    let out = fastmig()
        .arg("simulate")
        .arg("--trace")
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.csv:2"));
}

#[test]
fn migration_sweep_writes_table_csv_and_chart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = tiny_csv(dir.path());
    let out_dir = dir.path().join("out");
    let out = fastmig()
        .args([
            "simulate",
            "--migration-sweep",
            "--policy",
            "thr-mmt",
            "--trace",
        ])
        .arg(&csv)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = std::fs::read_to_string(out_dir.join("migration-speed.csv")).expect("csv");
    // Header + cloudsim + 4 speeds.
    assert_eq!(table.lines().count(), 6, "{table}");
    let svg = std::fs::read_to_string(out_dir.join("migration-speed.svg")).expect("svg");
    assert!(svg.contains("<svg"));
}

#[test]
fn absurd_scale_is_refused_before_allocating() {
    // 800e9 hosts and 12e9 VMs: more than any machine has (once this aborted on a failed
    // allocation of 6.4 TB with exit code 134).
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = tiny_csv(dir.path());
    for extra in [&[][..], &["--sweep", "--out"][..]] {
        let mut cmd = fastmig();
        cmd.args(["simulate", "--scale", "1e9", "--trace"])
            .arg(&csv);
        cmd.args(extra);
        if !extra.is_empty() {
            cmd.arg(dir.path().join("out"));
        }
        let out = cmd.output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains("--scale") && err.contains("GiB"), "{err}");
    }
}

#[test]
fn bad_reference_is_refused_before_the_sweep_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = tiny_csv(dir.path());
    let bad = dir.path().join("ref.csv");
    std::fs::write(
        &bad,
        "day,policy,energy_kwh,slatah,pdm,migrations\nd,thr_mmt,x,0,0,0\n",
    )
    .expect("write");
    for reference in [bad, dir.path().join("missing.csv")] {
        let out_dir = dir.path().join("out");
        let out = fastmig()
            .args(["simulate", "--sweep", "--trace"])
            .arg(&csv)
            .arg("--reference")
            .arg(&reference)
            .arg("--out")
            .arg(&out_dir)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("--reference"), "{err}");
        // Refused before anything ran: the output directory was not even created.
        assert!(!out_dir.exists(), "{err}");
    }
    // Without --sweep it would be ignored: refused instead.
    let out = fastmig()
        .args(["simulate", "--trace"])
        .arg(&csv)
        .arg("--reference")
        .arg(dir.path().join("missing.csv"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

fn shared() -> std::path::PathBuf {
    match std::env::var_os("FASTMIG_SHARED") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

/// `simulate --json` on the reference day with `extra` arguments, without the wall time.
fn reference_day_json(extra: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    let day = shared().join("data/planetlab/20110303");
    assert!(day.is_dir(), "PlanetLab day {} is required", day.display());
    let out = fastmig()
        .args(["simulate", "--json", "--trace"])
        .arg(&day)
        .args(extra)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut m = v.as_object().expect("object").clone();
    assert!(m.remove("wall_s").is_some());
    m
}

#[test]
fn fitted_model_migration_is_deterministic() {
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench/characterisation/model.json");
    let spec = format!("model:{},transport=multi-tcp,link=10gbit", model.display());
    let a = reference_day_json(&["--migration", &spec]);
    let b = reference_day_json(&["--migration", &spec]);
    assert_eq!(a, b);
    assert!(a["migration_model"]
        .as_str()
        .expect("str")
        .contains("multi-tcp"));
    assert!(
        a["migration_downtime_s"].as_f64().expect("number") > 0.0,
        "{a:?}"
    );
    assert!(a["migrations"].as_u64().expect("number") > 0);
}

#[test]
fn model_reduced_to_cloudsims_formula_reproduces_the_cloudsim_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cloudsim-equivalent.json");
    fastmig_sim::model_cost::cloudsim_equivalent_model(fastmig_model::Transport::Classic)
        .save(&path)
        .expect("save model");
    let mut ours = reference_day_json(&["--migration", &format!("model:{}", path.display())]);
    let mut cloudsim = reference_day_json(&[]);
    assert!(ours
        .remove("migration_model")
        .is_some_and(|m| m.as_str().is_some_and(|s| s.starts_with("model"))));
    cloudsim.remove("migration_model");
    // Every metric identical to the default run (CloudSim's own formula), to the bit.
    assert_eq!(ours, cloudsim);
    // And the reference CSV's LR-MMT 1.2 row: the same migrations and shutdowns, and the same
    // energy to its two decimals.
    let csv = std::fs::read_to_string(shared().join("reference/cloudsim-3.0.3-20110303.csv"))
        .expect("reference CSV");
    let row: Vec<&str> = csv
        .lines()
        .find(|l| l.split(',').nth(1) == Some("lr_mmt"))
        .expect("lr_mmt row")
        .split(',')
        .collect();
    assert_eq!(
        ours["migrations"]
            .as_u64()
            .map(|m| m.to_string())
            .as_deref(),
        Some(row[9])
    );
    assert_eq!(
        ours["host_shutdowns"]
            .as_u64()
            .map(|m| m.to_string())
            .as_deref(),
        Some(row[10])
    );
    assert_eq!(
        ours["energy_kwh"]
            .as_f64()
            .map(|e| format!("{e:.2}"))
            .as_deref(),
        Some(row[5])
    );
}

#[test]
fn migration_sweep_with_a_model_adds_its_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = tiny_csv(dir.path());
    let out_dir = dir.path().join("out");
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench/characterisation/model.json");
    let out = fastmig()
        .args([
            "simulate",
            "--migration-sweep",
            "--policy",
            "thr-mmt",
            "--trace",
        ])
        .arg(&csv)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = std::fs::read_to_string(out_dir.join("migration-speed.csv")).expect("csv");
    // Header + cloudsim + 4 speeds + classic at 32 MiB/s + 3 transports x 2 links.
    assert_eq!(table.lines().count(), 13, "{table}");
    for label in [
        "model classic 32mib",
        "model classic 10gbit",
        "model multi-tcp 1gbit",
        "model shm 10gbit",
    ] {
        assert!(table.contains(label), "{label}: {table}");
    }
    // The 10 Gbit/s rows carry their link speed in the gbit column.
    let row = table
        .lines()
        .find(|l| l.contains("model multi-tcp 10gbit"))
        .expect("row");
    assert!(row.contains(",10,"), "{row}");
    let svg = std::fs::read_to_string(out_dir.join("migration-speed.svg")).expect("svg");
    assert!(svg.contains("model multi-tcp"), "legend missing");
}

/// The Google slice of the sim crate's tests (ten real VM files, two with memory samples
/// above 100 %): `simulate` reads it, warns once about the clamped samples, and gives the
/// same JSON twice with the fitted model (the memory series sets each VM's working set).
#[test]
fn google_trace_is_read_with_one_warning_and_is_deterministic() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let slice = root.join("crates/sim/tests/data/google-slice");
    let model = root.join("bench/characterisation/model.json");
    let run = || {
        let out = fastmig()
            .args(["simulate", "--trace"])
            .arg(&slice)
            .args(["--policy", "lr-mmt", "--json", "--migration"])
            .arg(format!("model:{},link=1gbit", model.display()))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let a = run();
    let stderr = String::from_utf8_lossy(&a.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("107 memory samples above 100 % in 2 files clamped to 100 %"),
        "{stderr}"
    );
    // Everything but the wall time is the same on a second run.
    let json = |o: &std::process::Output| {
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
        v.as_object_mut().expect("object").remove("wall_s");
        v
    };
    let v = json(&a);
    assert_eq!(v["vms"], 10);
    assert!(v["migrations"].as_u64().expect("migrations") > 0, "{v}");
    assert_eq!(v, json(&run()));
}

/// `--frontier` on the Google slice with the LR detector: one curve per migration cost
/// (CloudSim's and the fitted model's seven), six parameters each, Pareto frontiers sorted by
/// SLAV with falling energy, and the files written.
#[test]
fn frontier_draws_one_curve_per_cost_and_reads_energy_at_the_target() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = fastmig()
        .args([
            "simulate",
            "--frontier",
            "--frontier-detectors",
            "lr",
            "--json",
        ])
        .arg("--trace")
        .arg(root.join("crates/sim/tests/data/google-slice"))
        .arg("--model")
        .arg(root.join("bench/characterisation/model.json"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let target = &v["target"];
    assert_eq!(target["policy"], "lr-mmt");
    assert_eq!(target["param"], 1.2);
    let (t_slav, t_energy) = (
        target["slav"].as_f64().expect("slav"),
        target["energy_kwh"].as_f64().expect("energy"),
    );
    let curves = v["curves"].as_array().expect("curves");
    let names: Vec<&str> = curves
        .iter()
        .map(|c| c["migration"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "cloudsim",
            "model classic 32mib",
            "model classic 1gbit",
            "model classic 10gbit",
            "model multi-tcp 1gbit",
            "model multi-tcp 10gbit",
            "model shm 1gbit",
            "model shm 10gbit"
        ]
    );
    for c in curves {
        assert_eq!(c["points"].as_array().expect("points").len(), 6, "{c}");
        let f = c["frontier"].as_array().expect("frontier");
        assert!(!f.is_empty());
        for w in f.windows(2) {
            assert!(w[0]["slav"].as_f64() <= w[1]["slav"].as_f64(), "{c}");
            assert!(
                w[0]["energy_kwh"].as_f64() > w[1]["energy_kwh"].as_f64(),
                "{c}"
            );
        }
    }
    // CloudSim's curve contains the reference run itself (LR 1.2 is on the grid), so at the
    // reference's SLAV it needs at most the reference's energy.
    let cloudsim = &curves[0];
    let (_, cloudsim_ref) = cloudsim["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| (p["param"].as_f64().expect("param"), p))
        .find(|(param, _)| *param == 1.2)
        .expect("the reference point");
    assert_eq!(cloudsim_ref["slav"].as_f64(), Some(t_slav));
    let at = cloudsim["energy_at_target_kwh"].as_f64().expect("reached");
    assert!(at <= t_energy + 1e-9, "{at} vs {t_energy}");
    assert_eq!(cloudsim["saved_vs_cloudsim_curve"].as_f64(), Some(0.0));
    for f in ["frontier.csv", "frontier.md", "frontier.svg"] {
        let p = dir.path().join(f);
        assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 0), "{f}");
    }
    let csv = std::fs::read_to_string(dir.path().join("frontier.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 8 * 6, "{csv}");
}
