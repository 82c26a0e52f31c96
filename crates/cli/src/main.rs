//! `fastmig`: the one binary. Each subcommand lives in its own module; this file only parses
//! the command line, sets up logging and maps errors to exit codes.
//!
//! Exit codes (see `error.rs`): 0 success; 2 the command line or the request must be changed
//! (a bad flag or value, a request the VM process refuses, a missing `/dev/kvm`); 1 a failure
//! while running (no VM answers at the socket, a failed migration, a failed guest). Every
//! error is one line on stderr, clap's own included.

mod agent_cmd;
mod bench_cmd;
mod charts;
mod cluster_cmd;
mod controller_cmd;
mod daemon;
mod error;
mod experiment_cmd;
mod migrate_cmd;
mod migrate_predict;
mod model_cmd;
mod netns;
mod procs;
mod shell_cmd;
mod sim_cmd;
mod sweep_charts;
mod sweep_cmd;
mod sweep_row;
mod testbed_cmd;
mod units;
mod vm_cmd;

use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Fast live migration of KVM virtual machines, and consolidation built on it.
///
/// Figures in the output: `progress` is the guest's own counter (pages its workload wrote
/// plus idle heartbeats); "dirty pages/s" counts distinct pages per second from KVM's dirty
/// log, at most the workload's requested write `rate`; "pages sent" counts over all
/// pre-copy rounds, so it can exceed the pages of memory.
///
/// Exit codes: 0 success; 2 the command line or the request must be changed; 1 a failure
/// while running (no VM answers at the socket, a failed migration).
#[derive(Parser, Debug)]
#[command(name = "fastmig", version, about, long_about)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `fastmig_migration=debug`.
    /// `RUST_LOG` is used when this is not given.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Log lines as text, or as one JSON object per line (for log collectors; the agent and
    /// the controller's fields, such as `host`, `vm` and `migration`, become JSON fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands: one variant and one dispatch arm each.
#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Vm(vm_cmd::VmCommand),
    #[command(flatten)]
    Migrate(migrate_cmd::MigrateCommand),
    /// Benchmarks (results go to bench/RESULTS.md by hand, with the command line).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Run the trace-driven data-centre simulator.
    Simulate(sim_cmd::SimulateArgs),
    #[command(flatten)]
    Shell(shell_cmd::ShellCommand),
    /// Fit or check the analytic migration model.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Predict a migration's time, downtime, bytes and CPU, and whether it converges.
    Predict(model_cmd::PredictArgs),
    /// Run the host agent of the consolidation system.
    Agent(agent_cmd::AgentArgs),
    /// An emulated cluster: network namespaces, shaped links, an agent in each.
    #[command(subcommand)]
    Testbed(testbed_cmd::TestbedCommand),
    /// Run the consolidation controller over a cluster's agents (serves an HTTP API).
    Controller(controller_cmd::ControllerArgs),
    /// Look at a running cluster through its controller.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    /// Experiments on a testbed (results go to bench/RESULTS.md by hand, with the command).
    #[command(subcommand)]
    Experiment(experiment_cmd::ExperimentCommand),
}

/// `NO_COLOR` set to anything non-empty turns colour off (https://no-color.org).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// The clap command, with colour off under `NO_COLOR`.
pub fn cli_command() -> clap::Command {
    let cmd = Cli::command();
    if no_color() {
        cmd.color(clap::ColorChoice::Never)
    } else {
        cmd
    }
}

fn parse() -> Cli {
    let parsed = cli_command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other error: clap's message and hints (possible values,
            // tips) joined, without the usage block.
            let text = e.to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .map(|l| l.strip_prefix("error: ").unwrap_or(l))
                .collect();
            eprintln!("fastmig: {} (see --help)", parts.join("; "));
            std::process::exit(2);
        }
    }
}

fn main() {
    let cli = parse();
    init_logging(cli.log.as_deref(), cli.log_format);
    let result = match cli.command {
        Command::Vm(cmd) => vm_cmd::main(cmd),
        Command::Migrate(cmd) => migrate_cmd::main(cmd),
        Command::Bench(cmd) => bench_cmd::main(cmd),
        Command::Simulate(args) => sim_cmd::main(args),
        Command::Shell(cmd) => shell_cmd::main(cmd),
        Command::Model(cmd) => model_cmd::main(cmd),
        Command::Predict(args) => model_cmd::predict_main(args),
        Command::Agent(args) => agent_cmd::main(args),
        Command::Testbed(cmd) => testbed_cmd::main(cmd),
        Command::Controller(args) => controller_cmd::main(args),
        Command::Cluster(cmd) => cluster_cmd::main(cmd),
        Command::Experiment(cmd) => experiment_cmd::main(cmd),
    };
    if let Err(err) = result {
        eprintln!("fastmig: {}", error::one_line(&err));
        std::process::exit(error::exit_code(&err));
    }
}

fn init_logging(filter: Option<&str>, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new("warn")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(!no_color() && std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => fmt.json().init(),
    }
}
