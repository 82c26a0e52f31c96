//! `fastmig model fit` and `fastmig predict` as processes: a fit on a hand-made sweep, its
//! prediction checked by hand, the non-convergence hint, and bad input (exit code 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fastmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fastmig"))
}

const HEADER: &str = "key,split,rep,mem_bytes,pattern,target_write_pps,guest_write_pps,guest_dirty_pps,wss_bytes,link_bytes_s,cap_bytes_s,transport,streams,cpu_share,downtime_limit_ms,max_rounds,on_no_converge,status,error,total_ms,downtime_ms,setup_ms,dst_setup_ms,rounds,bytes_sent,pages_sent,zero_pages_skipped,throughput_mib_s,src_cpu_s,dst_cpu_s,digest_match,round_ms,round_bytes";

const MIB: f64 = 1048576.0;

/// Idle VMs of 64..512 MiB migrated by a "classic" transport that sends 500 MiB/s with a
/// 16-byte header per page, 20 ms setup, 5 ms fixed downtime; each run is a full pass plus an
/// empty stop-and-copy (idle runs have no later round, so no per-round cost is measurable).
/// One held-out run at 768 MiB.
fn sweep(dir: &Path) -> PathBuf {
    let mut s = format!("{HEADER}\n");
    for (i, mib) in [64u64, 128, 256, 384, 512, 768].into_iter().enumerate() {
        let pages = mib * 256;
        let bytes = pages * (4096 + 16);
        let round1 = bytes as f64 / (500.0 * MIB) * 1e3;
        let downtime = 5.0;
        let total = 20.0 + round1 + downtime;
        let split = if mib == 768 { "test" } else { "train" };
        s.push_str(&format!(
            "k{i},{split},0,{},random,0,0,0,{},,,classic,1,1,30,30,force,completed,,{total},{downtime},20,1,2,{bytes},{pages},0,500,{},{},true,{round1};0,{bytes};0\n",
            mib << 20,
            mib << 20,
            0.01 + bytes as f64 * 1e-9,
            0.02 + bytes as f64 * 0.5e-9,
        ));
    }
    let p = dir.join("sweep.csv");
    std::fs::write(&p, s).expect("write sweep");
    p
}

fn fitted(dir: &Path) -> PathBuf {
    let csv = sweep(dir);
    let model = dir.join("model.json");
    let out = fastmig()
        .args(["model", "fit"])
        .arg(&csv)
        .arg("-o")
        .arg(&model)
        .arg("--json")
        .output()
        .expect("run fit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fit json");
    // The sweep follows the model's law exactly: its errors are rounding only.
    assert!(
        v["fit"]["classic"]["total_p90"].as_f64().expect("p90") < 1e-3,
        "{v}"
    );
    assert_eq!(v["fit"]["classic"]["runs"], 5);
    assert_eq!(v["held_out"]["classic"]["runs"], 1);
    assert!(
        v["held_out"]["classic"]["total_median"]
            .as_f64()
            .expect("held")
            < 1e-3,
        "{v}"
    );
    model
}

fn predict(model: &Path, extra: &[&str]) -> Output {
    fastmig()
        .arg("predict")
        .arg("--model")
        .arg(model)
        .args(extra)
        .output()
        .expect("run predict")
}

#[test]
fn fit_then_predict_an_idle_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fitted(dir.path());
    let out = predict(&model, &["--mem", "1G", "--transport", "classic", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // 1 GiB = 262144 pages × 4112 bytes = 1,077,936,128 bytes at 500 MiB/s = 2055.97 ms,
    // + 20 ms setup + 5 ms fixed downtime = 2080.97 ms.
    let total = v["total_ms"].as_f64().expect("total_ms");
    assert!((total - 2080.97).abs() < 0.5, "{v}");
    assert_eq!(v["bytes"], 1_077_936_128u64);
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["converges"], true);
    assert!((v["downtime_ms"].as_f64().expect("downtime") - 5.0).abs() < 0.01);
    // CPU: 0.01 s + 1 ns/byte × 1,077,936,128 = 1.088 s; dst 0.02 + 0.539 = 0.559 s.
    assert!(
        (v["src_cpu_s"].as_f64().expect("src") - 1.0879).abs() < 1e-3,
        "{v}"
    );
    assert!(
        (v["dst_cpu_s"].as_f64().expect("dst") - 0.5590).abs() < 1e-3,
        "{v}"
    );
    assert!(v["converge_hint"].is_null());
}

#[test]
fn a_non_converging_prediction_says_what_would_converge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fitted(dir.path());
    // 100k writes/s over 1 GiB at 10 MiB/s: 390 MiB/s of dirtying against a 10 MiB/s link.
    let args = [
        "--mem",
        "1G",
        "--dirty-rate",
        "100000",
        "--wss",
        "1G",
        "--pattern",
        "random",
        "--bandwidth",
        "10M",
        "--transport",
        "classic",
        "--downtime-limit",
        "30ms",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = predict(&model, &json_args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["converges"], false, "{v}");
    assert_eq!(v["outcome"], "not-converged");
    // The link that would do it is faster than the guest dirties (100k × 4 KiB = 410 MB/s)
    // and no faster than the transport's 500 MiB/s.
    let link = v["converge_hint"]["link_bytes_s"]
        .as_f64()
        .expect("link hint");
    assert!(link > 409.6e6 && link <= 500.0 * MIB, "{v}");
    assert!(
        v["converge_hint"]["downtime_limit_s"]
            .as_f64()
            .expect("limit")
            > 0.03
    );
    let text = predict(&model, &args);
    let s = String::from_utf8_lossy(&text.stdout);
    assert!(
        s.contains("converges") && s.contains("would converge"),
        "{s}"
    );
}

fn assert_usage(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.to_lowercase().contains(needle),
        "expected `{needle}` in: {err}"
    );
}

#[test]
fn bad_model_files_exit_with_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fitted(dir.path());
    let ok = ["--mem", "1G", "--transport", "classic"];
    assert_usage(&predict(&dir.path().join("nope.json"), &ok), "nope.json");
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "not json").expect("write");
    assert_usage(&predict(&junk, &ok), "parsing");
    let text = std::fs::read_to_string(&model).expect("read model");
    let tampered = dir.path().join("tampered.json");
    std::fs::write(
        &tampered,
        text.replace("\"setup_s\": 0.0", "\"setup_s\": 1.0"),
    )
    .expect("write");
    assert_ne!(
        std::fs::read_to_string(&tampered).expect("read"),
        text,
        "setup_s edited"
    );
    assert_usage(&predict(&tampered, &ok), "checksum");
    let other = dir.path().join("other.json");
    std::fs::write(&other, text.replace("\"version\": 1", "\"version\": 9")).expect("write");
    assert_usage(&predict(&other, &ok), "version");
    // The model knows classic only.
    assert_usage(
        &predict(&model, &["--mem", "1G", "--transport", "shm"]),
        "shm",
    );
}

#[test]
fn bad_flags_exit_with_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fitted(dir.path());
    for (args, needle) in [
        (vec!["--mem", "12X"], "12x"),
        (vec!["--mem", "1G", "--pattern", "zigzag"], "zigzag"),
        (vec!["--mem", "1G", "--dirty-rate", "-5"], "-5"),
        (vec!["--mem", "1G", "--transport", "pigeon"], "pigeon"),
        (vec!["--mem", "1G", "--downtime-limit", "soon"], "soon"),
        (vec!["--mem", "1G", "--bandwidth", "0"], "bandwidth"),
        (vec!["--mem", "1G", "--cpu-share", "2"], "cpu share"),
        (vec!["--dirty-rate", "5"], "--mem"),
    ] {
        assert_usage(&predict(&model, &args), needle);
    }
    let out = fastmig()
        .args(["model", "fit"])
        .arg(dir.path().join("missing.csv"))
        .output()
        .expect("run");
    assert_usage(&out, "missing.csv");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, format!("{HEADER}\nk,train,0,lots\n")).expect("write");
    let out = fastmig()
        .args(["model", "fit"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_usage(&out, "row 1");
}
