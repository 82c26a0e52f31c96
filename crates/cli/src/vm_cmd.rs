//! VM subcommands: `run` (a VM with a control socket), `status`, and `ctl` (send any control
//! command).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use fastmig_host::run::{Event, RunConfig};
use fastmig_host::{Command, ControlClient, StatusInfo};
use fastmig_vmm::{VmConfig, WorkloadSpec};
use serde_json::{Map, Value};

use crate::daemon::{self, Readiness};
use crate::units;

/// VM subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum VmCommand {
    /// Run a VM with a built-in workload until `quit` or Ctrl-C.
    ///
    /// After it migrates away the process stays, paused in `postmigrate`, until `quit` (or
    /// `fastmig migrate --quit-source`).
    Run(RunArgs),
    /// Print the status of a running VM.
    ///
    /// `progress` is the guest's own counter (pages its workload wrote plus idle heartbeats,
    /// since boot, carried over by a migration): it moves only while the guest runs.
    Status {
        #[command(flatten)]
        target: ApiTarget,
        /// Print the raw JSON reply.
        #[arg(long)]
        json: bool,
    },
    /// Send any control command and print its JSON reply.
    ///
    /// Examples: `fastmig ctl --api vm.sock verify-memory`,
    /// `fastmig ctl --api vm.sock migrate --arg uri=127.0.0.1:4444 --arg 'transport={"kind":"shm"}'`.
    Ctl(CtlArgs),
}

/// Which VM process to talk to, and how long to wait for it.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiTarget {
    /// Control socket of the VM (`fastmig run --api` / `fastmig incoming --api`).
    #[arg(long)]
    pub api: PathBuf,
    /// How long to wait for the control socket to appear and answer (a VM process started
    /// a moment ago binds it shortly). `0` tries once.
    #[arg(long, default_value = "5s", value_parser = units::parse_duration, allow_hyphen_values = true)]
    pub wait: Duration,
}

impl ApiTarget {
    /// Connects, waiting up to `--wait`.
    pub fn connect(&self) -> Result<ControlClient> {
        Ok(ControlClient::connect(&self.api, self.wait)?)
    }
}

/// Arguments of `fastmig run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Guest memory size (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = units::parse_mem, allow_hyphen_values = true)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Workload spec `NAME[:key=value,...]`, e.g. `dirty:rate=20000,wss=32M,pattern=random`.
    ///
    /// Workloads: `idle` (halts; a heartbeat every ~10 ms), `dirty` and `verify` (write the
    /// working set at a paced rate; `verify` stamps pages so `verify-memory` can check them),
    /// `fill` (writes every page once, then idles). Keys for dirty/verify: `rate` requested
    /// page writes/s (1000; 0 = unpaced; re-writes of a page count, so the distinct dirty
    /// pages/s that `status` shows can be lower), `wss` (16M), `pattern` seq|random|hotcold
    /// (random), `hot` hot fraction of the working set (0.1), `hotw` fraction of writes that
    /// go hot (0.9), `seed` (1). Key for fill: `rate` (0).
    #[arg(long, default_value = "idle", value_parser = units::parse_workload)]
    workload: WorkloadSpec,
    /// Control socket path (newline-delimited JSON, QMP-like). A path that exists and is not
    /// a socket is refused; a socket another live process serves is refused.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Before the workload starts, write non-zero data into every guest page the workload
    /// does not own, from the VMM (fast), so that all memory is touched: for benchmarks.
    #[arg(long)]
    prefill: bool,
    #[command(flatten)]
    ready: Readiness,
}

/// Arguments of `fastmig ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    #[command(flatten)]
    target: ApiTarget,
    /// The control command.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(Command::names().iter().copied()))]
    command: String,
    /// An argument of the command, `KEY=VALUE` (repeatable). VALUE is read as JSON when it
    /// parses (`50`, `true`, `{"kind":"shm"}`), else as a string.
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    args: Vec<(String, Value)>,
}

fn parse_key_value(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}`: empty key"));
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

/// Runs a VM subcommand.
pub fn main(cmd: VmCommand) -> Result<()> {
    match cmd {
        VmCommand::Run(args) => run(args),
        VmCommand::Status { target, json } => {
            let st = target.connect()?.query_status()?;
            if json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                print_status(&st);
            }
            Ok(())
        }
        VmCommand::Ctl(args) => ctl(&args),
    }
}

fn run(args: RunArgs) -> Result<()> {
    daemon::maybe_daemonize(&args.ready)?;
    let cfg = RunConfig {
        vm: VmConfig {
            mem_size: args.mem,
            vcpus: args.vcpus,
            workload: args.workload,
        },
        api: args.api,
        prefill: args.prefill,
        ready_file: args.ready.ready_file,
    };
    fastmig_host::run::run(&cfg, &mut |ev| print_event(&ev, cfg.api.as_deref()))?;
    Ok(())
}

/// One stderr line per process event.
pub fn print_event(ev: &Event<'_>, api: Option<&std::path::Path>) {
    let socket = api
        .map(|p| format!(", control socket {}", p.display()))
        .unwrap_or_default();
    match ev {
        Event::Running { config } => eprintln!(
            "fastmig: VM running: {} memory, {} vCPU(s), workload {}{socket}",
            fastmig_vmm::format_size(config.mem_size),
            config.vcpus,
            config.workload,
        ),
        Event::Listening { endpoint } => {
            eprintln!("fastmig: waiting for an incoming migration on {endpoint}{socket}")
        }
        Event::Received(s) => eprintln!(
            "fastmig: migration received ({}, {} pages, {:.1} ms, digest {:#018x}); VM running",
            s.transport, s.pages_received, s.total_ms, s.digest
        ),
    }
}

fn print_status(st: &StatusInfo) {
    println!("status: {}", st.status);
    println!(
        "progress: {}   (guest counter: pages written + idle heartbeats since boot)",
        st.progress
    );
    println!(
        "dirty pages/s: {:.0}   (distinct pages per second, last second, from the dirty log)",
        st.dirty_rate_pps
    );
    if let Some(n) = st.pages_written {
        println!("pages written: {n}   (page writes by the workload, re-writes counted)");
    }
    if let Some(n) = st.heartbeats {
        println!("heartbeats: {n}");
    }
    if st.migrating {
        println!("migrating: yes   (fastmig ctl --api ... query-migrate)");
    }
    if let Some(l) = st.listening {
        println!("listening: {}", if l { "yes" } else { "not yet" });
    }
    if let Some(err) = &st.error {
        println!("error: {err}");
    }
}

fn ctl(args: &CtlArgs) -> Result<()> {
    let arguments: Map<String, Value> = args.args.iter().cloned().collect();
    let command = Command::from_parts(&args.command, Some(Value::Object(arguments)))
        .map_err(|e| crate::usage!("{e}"))?;
    let reply = args
        .target
        .connect()?
        .execute(&command)
        .with_context(|| args.command.clone())?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}
