//! Migration over mutual TLS between real `fastmig` processes: a good pair migrates with
//! matching digests; a certificate of another CA, an expired one and a plain-TCP peer are
//! refused with a clear reason, the VM staying on the source.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;
#[path = "../../migration/tests/support/pki.rs"]
mod pki;

use common::*;
use fastmig_migration::tls::TlsFiles;
use pki::Ca;

const MEM: &str = "64M";
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";

fn tls_args(f: &TlsFiles) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        path_str(&f.cert).into(),
        "--tls-key".into(),
        path_str(&f.key).into(),
        "--tls-ca".into(),
        path_str(&f.ca).into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn source(dir: &std::path::Path) -> Proc {
    let src = Proc::run_with(dir, "src", MEM, WORKLOAD, &["--prefill"]);
    let p = src.progress();
    src.wait_progress_above(p);
    src
}

fn good_pair(transport: &str) {
    require_kvm();
    let dir = workdir();
    let ca = Ca::new(dir.path(), "cluster");
    let (a, b) = (
        ca.leaf(dir.path(), "a", false),
        ca.leaf(dir.path(), "b", false),
    );
    let to = format!("127.0.0.1:{}", free_port());
    let dst = Proc::incoming(dir.path(), "dst", &to, MEM, &strs(&tls_args(&b)));
    let src = source(dir.path());
    let mut extra = vec!["--transport".to_string(), transport.into(), "--json".into()];
    extra.extend(tls_args(&a));
    let out = migrate(dir.path(), &src, &to, &strs(&extra));
    assert_eq!(out.code, Some(0), "{out:?}; dst: {}", dst.log());
    let summary: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(summary["digest_match"], true, "{summary}");
    dst.wait_status("running", PATIENCE);
    dst.assert_memory_intact();
}

#[test]
fn a_good_pair_migrates_over_tls_classic() {
    good_pair("classic");
}

#[test]
fn a_good_pair_migrates_over_tls_multi_tcp() {
    good_pair("multi-tcp");
}

/// The source presents `src_tls` (or no TLS) to a destination with `dst_tls` (or none):
/// refused; returns the one line `migrate` printed. The source keeps the VM, the destination
/// is still waiting and never ran it.
fn refused(src_tls: Option<&TlsFiles>, dst_tls: Option<&TlsFiles>, needles: &[&str]) -> String {
    require_kvm();
    let dir = workdir();
    let to = format!("127.0.0.1:{}", free_port());
    let dst_args = dst_tls.map(tls_args).unwrap_or_default();
    let mut dst = Proc::incoming(dir.path(), "dst", &to, MEM, &strs(&dst_args));
    let src = source(dir.path());
    let mut extra = vec!["--timeout".to_string(), "3s".into()];
    extra.extend(src_tls.map(tls_args).unwrap_or_default());
    let out = migrate(dir.path(), &src, &to, &strs(&extra));
    let line = out.assert_failed_with(needles).to_string();
    src.assert_still_runs_here();
    assert!(dst.is_alive(), "the destination gave up: {}", dst.log());
    assert_ne!(dst.status()["status"], "running");
    let _ = dst.child.kill();
    assert!(!dst.log().contains("VM running"), "{}", dst.log());
    line
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    let dir = workdir();
    let ca = Ca::new(dir.path(), "cluster");
    let rogue = Ca::new(dir.path(), "rogue");
    let good = ca.leaf(dir.path(), "good", false);
    let mut bad = rogue.leaf(dir.path(), "bad", false);
    bad.ca = good.ca.clone();
    refused(Some(&bad), Some(&good), &["TLS", "UnknownCA"]);
}

#[test]
fn an_expired_certificate_is_refused() {
    let dir = workdir();
    let ca = Ca::new(dir.path(), "cluster");
    let good = ca.leaf(dir.path(), "good", false);
    let old = ca.leaf(dir.path(), "old", true);
    refused(Some(&old), Some(&good), &["TLS", "expired"]);
}

#[test]
fn a_plain_tcp_source_is_refused_by_a_tls_destination() {
    let dir = workdir();
    let ca = Ca::new(dir.path(), "cluster");
    let good = ca.leaf(dir.path(), "good", false);
    refused(None, Some(&good), &["still runs on the source"]);
}

#[test]
fn a_tls_source_is_refused_by_a_plain_destination() {
    let dir = workdir();
    let ca = Ca::new(dir.path(), "cluster");
    let good = ca.leaf(dir.path(), "good", false);
    refused(Some(&good), None, &["TLS"]);
}
