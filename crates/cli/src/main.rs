//! `fastmig`: the one binary. Each subcommand lives in its own module; this file only parses
//! the command line, sets up logging and maps errors to exit codes.
//!
//! Exit codes: 0 success, 1 a runtime failure (for example a failed migration), 2 bad input
//! (a malformed spec, a missing `/dev/kvm`, a size that does not fit).

mod api;
mod bench_cmd;
mod charts;
mod error;
mod host;
mod kvm_adapter;
mod migrate_cmd;
mod model_cmd;
mod netns;
mod procs;
mod sim_cmd;
mod sweep_charts;
mod sweep_cmd;
mod sweep_row;
mod units;
mod vm_cmd;

use clap::{Parser, Subcommand};

/// Fast live migration of KVM virtual machines, and consolidation built on it.
#[derive(Parser, Debug)]
#[command(name = "fastmig", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `fastmig_migration=debug`.
    /// `RUST_LOG` is used when this is not given.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

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
    /// Fit or check the analytic migration model.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Predict a migration's time, downtime, bytes and CPU, and whether it converges.
    Predict(model_cmd::PredictArgs),
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());
    let result = match cli.command {
        Command::Vm(cmd) => vm_cmd::main(cmd),
        Command::Migrate(cmd) => migrate_cmd::main(cmd),
        Command::Bench(cmd) => bench_cmd::main(cmd),
        Command::Simulate(args) => sim_cmd::main(args),
        Command::Model(cmd) => model_cmd::main(cmd),
        Command::Predict(args) => model_cmd::predict_main(args),
    };
    if let Err(err) = result {
        eprintln!("fastmig: {}", error::one_line(&err));
        std::process::exit(error::exit_code(&err));
    }
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new("warn")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
