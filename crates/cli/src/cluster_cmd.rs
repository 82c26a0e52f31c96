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

fn get(
    http: &ureq::Agent,
    base: &str,
    path: &str,
    token: &fastmig_cluster::auth::Token,
) -> anyhow::Result<Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut resp = http
        .get(&url)
        .header("Authorization", &token.bearer())
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

/// The three tables.
fn tables(hosts: &Value, vms: &Value, migrations: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // `writeln!` to a String cannot fail.
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<9} {:>6} {:>4} {:>9}",
        "HOST", "STATE", "REACHABLE", "UTIL%", "VMS", "IN-FLIGHT"
    );
    for h in rows(hosts) {
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<9} {:>6.1} {:>4} {:>9}",
            s(&h["name"]),
            s(&h["state"]),
            if h["reachable"] == true { "yes" } else { "NO" },
            h["utilization"].as_f64().unwrap_or(0.0) * 100.0,
            rows(&h["vms"]).len(),
            s(&h["in_flight"]),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:<16} {:<12} {:>7} {:>8}",
        "VM", "HOST", "STATUS", "DEMAND%", "MEM MiB"
    );
    for v in rows(vms) {
        let r = &v["report"];
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<12} {:>7.1} {:>8}",
            s(&v["vm"]),
            s(&v["host"]),
            s(&r["status"]),
            r["demand"].as_f64().unwrap_or(0.0) * 100.0,
            r["mem_bytes"].as_u64().unwrap_or(0) >> 20,
        );
    }
    let _ = writeln!(out);
    let open = rows(migrations);
    if open.is_empty() {
        let _ = writeln!(out, "no migration in flight");
        return out;
    }
    let _ = writeln!(
        out,
        "{:>6} {:<16} {:<16} {:<16} {:<9} {:>11}",
        "ID", "VM", "SOURCE", "DESTINATION", "STATE", "PREDICTED s"
    );
    for m in open {
        let _ = writeln!(
            out,
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
    out
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
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
                emit(&format!("{}\n", serde_json::to_string_pretty(&all)?))?;
            } else {
                emit(&tables(&hosts, &vms, &migrations))?;
            }
            Ok(())
        }
    }
}
