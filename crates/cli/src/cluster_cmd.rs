//! `fastmig cluster status`: the controller's view of the cluster (hosts, VMs, migrations in
//! flight) as a table or JSON, read from its HTTP API.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::usage;

/// `fastmig cluster ...`.
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Hosts, VMs and migrations in flight, as the controller sees them.
    Status(StatusArgs),
}

/// `fastmig cluster status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The controller's API.
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    pub controller: String,
    /// File holding the controller's token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Print JSON (`{"hosts": [...], "vms": [...], "migrations": [...]}`) instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn get(http: &ureq::Agent, base: &str, path: &str, token: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut resp = http
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    let body: Value =
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))?;
    if !(200..300).contains(&status) {
        let error = body["error"].as_str().unwrap_or("?");
        if (400..500).contains(&status) {
            return Err(usage!("{url}: {status}: {error}"));
        }
        anyhow::bail!("{url}: {status}: {error}");
    }
    Ok(body)
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Prints the three tables.
fn print_tables(hosts: &Value, vms: &Value, migrations: &Value) {
    println!(
        "{:<16} {:<8} {:<9} {:>6} {:>4} {:>9}",
        "HOST", "STATE", "REACHABLE", "UTIL%", "VMS", "IN-FLIGHT"
    );
    for h in rows(hosts) {
        println!(
            "{:<16} {:<8} {:<9} {:>6.1} {:>4} {:>9}",
            s(&h["name"]),
            s(&h["state"]),
            if h["reachable"] == true { "yes" } else { "NO" },
            h["utilization"].as_f64().unwrap_or(0.0) * 100.0,
            rows(&h["vms"]).len(),
            s(&h["in_flight"]),
        );
    }
    println!();
    println!(
        "{:<16} {:<16} {:<12} {:>7} {:>8}",
        "VM", "HOST", "STATUS", "DEMAND%", "MEM MiB"
    );
    for v in rows(vms) {
        let r = &v["report"];
        println!(
            "{:<16} {:<16} {:<12} {:>7.1} {:>8}",
            s(&v["vm"]),
            s(&v["host"]),
            s(&r["status"]),
            r["demand"].as_f64().unwrap_or(0.0) * 100.0,
            r["mem_bytes"].as_u64().unwrap_or(0) >> 20,
        );
    }
    println!();
    let open = rows(migrations);
    if open.is_empty() {
        println!("no migration in flight");
        return;
    }
    println!(
        "{:>6} {:<16} {:<16} {:<16} {:<9} {:>11}",
        "ID", "VM", "SOURCE", "DESTINATION", "STATE", "PREDICTED s"
    );
    for m in open {
        println!(
            "{:>6} {:<16} {:<16} {:<16} {:<9} {:>11}",
            s(&m["id"]),
            s(&m["vm"]),
            s(&m["source"]),
            s(&m["destination"]),
            s(&m["state"]),
            m["predicted_s"]
                .as_f64()
                .map_or("-".into(), |p| format!("{p:.2}")),
        );
    }
}

/// `fastmig cluster ...`.
pub fn main(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status(args) => {
            let token = crate::controller_cmd::read_token(&args.token_file)?;
            let http = ureq::Agent::new_with_config(
                ureq::config::Config::builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(std::time::Duration::from_secs(10)))
                    .build(),
            );
            let hosts = get(&http, &args.controller, "/hosts", &token)?;
            let vms = get(&http, &args.controller, "/vms", &token)?;
            let migrations = get(&http, &args.controller, "/migrations?open=true", &token)?;
            if args.json {
                let all = json!({"hosts": hosts, "vms": vms, "migrations": migrations});
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_tables(&hosts, &vms, &migrations);
            }
            Ok(())
        }
    }
}
