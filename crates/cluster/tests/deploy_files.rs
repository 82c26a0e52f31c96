//! `deploy/`: the Grafana dashboard is valid JSON whose every query names only metrics the
//! agent and the controller export (and uses each of them), and the Prometheus scrape config
//! targets the testbed's addresses with the bearer token.

use std::path::PathBuf;

use fastmig_cluster::metrics::EXPORTED;
use serde_json::Value;

fn deploy(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `fastmig_...` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("fastmig_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The exported family a sample name belongs to.
fn family(name: &str) -> Option<&'static str> {
    EXPORTED.iter().copied().find(|f| {
        *f == name
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(f))
    })
}

#[test]
fn every_grafana_query_names_an_exported_metric() {
    let dash: Value = serde_json::from_str(&deploy("grafana/fastmig-dashboard.json"))
        .expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut used = std::collections::BTreeSet::new();
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel ids unique"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} names no metric");
            for n in names {
                let f = family(&n).unwrap_or_else(|| panic!("{expr}: {n} is not exported"));
                used.insert(f);
            }
        }
    }
    let unused: Vec<_> = EXPORTED.iter().filter(|f| !used.contains(*f)).collect();
    // A job named in a query is a job of deploy/prometheus.yml.
    let cfg = deploy("prometheus.yml");
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for part in expr.split("job=\"").skip(1) {
                let job = part.split('"').next().unwrap_or_default();
                assert!(
                    cfg.contains(&format!("job_name: {job}\n")),
                    "{expr}: no job {job}"
                );
            }
        }
    }
    assert!(unused.is_empty(), "no panel shows {unused:?}");
}

#[test]
fn the_scrape_config_targets_the_testbed_with_the_token() {
    let cfg = deploy("prometheus.yml");
    let targets: Vec<std::net::SocketAddr> = cfg
        .lines()
        .map(str::trim)
        .filter_map(|l| {
            let l = l
                .trim_start_matches("- targets:")
                .trim_start_matches('-')
                .trim();
            let l = l.trim_start_matches('[').trim_end_matches(']');
            l.trim_matches('"').parse().ok()
        })
        .collect();
    // The testbed: agent i on 10.232.0.(10+i):7070; the controller on the bridge, 10.232.0.1.
    let mut want: Vec<std::net::SocketAddr> = vec!["10.232.0.1:7400".parse().expect("addr")];
    want.extend((1..=4).map(|i| {
        format!("10.232.0.{}:7070", 10 + i)
            .parse::<std::net::SocketAddr>()
            .expect("addr")
    }));
    assert_eq!(targets, want);
    assert_eq!(
        cfg.matches("credentials_file: /tmp/fastmig-testbed/token")
            .count(),
        2
    );
    assert_eq!(cfg.matches("type: Bearer").count(), 2);
}
