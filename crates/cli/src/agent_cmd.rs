//! `fastmig agent`: parses the agent's flags and runs `fastmig_cluster::agent`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use fastmig_cluster::agent::{self, AgentConfig};
use fastmig_cluster::auth::Token;
use fastmig_cluster::proto::HostName;
use fastmig_sim::setup::{reference_host_types, HostType};

use crate::units;

/// Run the host agent: start, stop, report and migrate this host's VMs for the controller.
///
/// Each VM is its own `fastmig run`/`incoming` process (in DATA_DIR/vms/NAME/) that outlives
/// the agent: a restarted agent adopts the VMs still running. On SIGTERM the agent stops
/// taking requests, lets outgoing migrations finish for up to --shutdown-grace, cancels the
/// rest (their VMs stay on this host) and exits, leaving the VM processes running.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Where the HTTP API listens, `IP:PORT`.
    #[arg(long)]
    listen: SocketAddr,
    /// This host's name in the cluster.
    #[arg(long)]
    host_id: String,
    /// Declared host type: `G4`, `G5` (CloudSim's HP ProLiant ML110 G4/G5) or a JSON file
    /// holding a host type. Capacity is declared, not measured: hosts emulated by namespaces
    /// on one machine share its cores.
    #[arg(long, value_parser = parse_host_type)]
    host_type: HostType,
    /// Directory of this agent's VMs (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// File holding the controller's shared token (mode 600 or stricter).
    #[arg(long)]
    token_file: PathBuf,
    /// Address incoming migrations listen on (default: the --listen address's IP).
    #[arg(long)]
    migration_address: Option<IpAddr>,
    /// The `fastmig` binary VM processes are started from (default: this one).
    #[arg(long)]
    fastmig_bin: Option<PathBuf>,
    /// On SIGTERM, how long outgoing migrations may take to finish before they are cancelled.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    shutdown_grace: Duration,
    /// How long an incoming VM process waits for its source before it gives up.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
    accept_timeout: Duration,
}

fn parse_host_type(s: &str) -> Result<HostType, String> {
    let types = reference_host_types();
    match s.to_ascii_uppercase().as_str() {
        "G4" => return types.first().cloned().ok_or_else(|| "no G4 type".into()),
        "G5" => return types.get(1).cloned().ok_or_else(|| "no G5 type".into()),
        _ => {}
    }
    let text = std::fs::read_to_string(s)
        .map_err(|e| format!("`{s}` is neither G4, G5 nor a readable host-type file: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{s}: not a host type: {e}"))
}

/// Runs the agent until SIGTERM/SIGINT.
pub fn main(a: AgentArgs) -> Result<()> {
    let token = Token::from_file(&a.token_file).map_err(|e| crate::usage!("{e}"))?;
    let fastmig_bin = match a.fastmig_bin {
        Some(p) => p,
        None => std::env::current_exe().context("locating the fastmig binary")?,
    };
    agent::run(AgentConfig {
        listen: a.listen,
        host: HostName(a.host_id),
        host_type: a.host_type,
        data_dir: a.data_dir,
        token,
        migration_address: a.migration_address.unwrap_or(a.listen.ip()),
        fastmig_bin,
        shutdown_grace: a.shutdown_grace,
        accept_timeout: a.accept_timeout,
    })
    .context("running the agent")
}
