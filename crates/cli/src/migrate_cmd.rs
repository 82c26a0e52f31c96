//! Migration subcommands: `incoming` (the destination), `migrate` and `migrate-cancel` (drive
//! the source through its control socket), and `demo` (both ends on loopback).
//!
//! ```text
//!  fastmig migrate ──ControlClient──► source process ──migrate()──► destination process
//!     polls query-migrate, shows progress                          (fastmig incoming)
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fastmig_host::run::IncomingConfig;
use fastmig_host::{ControlClient, MigrateState, MigrationRequest};
use fastmig_migration::{Endpoint, MigrationStatus, MigrationSummary, OnNoConverge, TransportKind};
use serde_json::json;

use crate::daemon::{self, Readiness};
use crate::migrate_predict;
use crate::units;
use crate::vm_cmd::ApiTarget;

/// Migration subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MigrateCommand {
    /// Wait for one incoming migration, check it, and only then run the VM.
    ///
    /// The VM is resumed only after every batch checksum and the whole-memory digest match;
    /// on any failure it is never started and the process exits 1. Once the VM runs, the
    /// process serves it (status `running`) until `quit` or Ctrl-C.
    Incoming(IncomingArgs),
    /// Live-migrate the VM of a running `fastmig run` to a destination.
    ///
    /// Shows progress on a terminal (round, pages left, dirty pages/s, bandwidth) and ends
    /// with a summary. A failed migration exits 1 with one line saying what failed; the VM
    /// keeps running on the source. After success the source stays paused (`postmigrate`)
    /// until `quit`, unless `--quit-source` is given.
    Migrate(MigrateArgs),
    /// Cancel the migration in flight; the VM keeps running on the source.
    MigrateCancel {
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Start a source and a destination on loopback, live-migrate a `verify` VM that dirties
    /// memory, check every page on the destination, and print the summary.
    Demo(DemoArgs),
}

/// Arguments of `fastmig incoming`.
#[derive(clap::Args, Debug)]
pub struct IncomingArgs {
    /// Where to listen: `HOST:PORT` (TCP) or `unix:PATH` (same host; needed by shm and
    /// handover).
    #[arg(long, value_parser = units::parse_endpoint)]
    pub listen: Endpoint,
    /// Control socket path (status shows `inmigrate` until the VM runs).
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Guest memory size. With it, the VM and its memory are prepared (pre-faulted) before
    /// the migration begins, and a source of another size is refused. Without it, the VM is
    /// built to the source's size during setup (counted in the setup time).
    #[arg(long, value_parser = units::parse_mem, allow_hyphen_values = true)]
    pub mem: Option<u64>,
    /// Number of vCPUs the source must have.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Give up if no source connects within this time (default: wait forever).
    #[arg(long, value_parser = units::parse_timeout, allow_hyphen_values = true)]
    pub accept_timeout: Option<Duration>,
    /// A source silent for this long fails the migration (also the wait for `Commit`).
    #[arg(long, default_value = "10s", value_parser = units::parse_timeout, allow_hyphen_values = true)]
    pub timeout: Duration,
    /// Largest guest memory a source may announce; a larger one is refused before any memory
    /// is allocated. Default: the memory this machine has available now.
    #[arg(long, value_parser = units::parse_mem, allow_hyphen_values = true)]
    pub max_mem: Option<u64>,
    /// Print the destination's summary as JSON on stdout once the VM runs.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub ready: Readiness,
    /// Mutual TLS 1.3: only a source whose certificate the cluster CA signed gets in.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `--tls-cert`, `--tls-key`, `--tls-ca`: all three or none (classic and multi-tcp over TCP).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This end's certificate chain (PEM).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): the peer's certificate must be signed by it.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, made absolute (the source process may run in another directory).
    fn files(&self) -> Result<Option<fastmig_migration::tls::TlsFiles>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let abs = |p: &PathBuf| {
            std::path::absolute(p).map_err(|e| crate::usage!("--tls path {}: {e}", p.display()))
        };
        Ok(Some(fastmig_migration::tls::TlsFiles {
            cert: abs(cert)?,
            key: abs(key)?,
            ca: abs(ca)?,
        }))
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes: the default cap on an incoming VM's memory.
fn available_memory() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no MemAvailable line in /proc/meminfo; give --max-mem")
}

/// Arguments of `fastmig migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub target: ApiTarget,
    /// Destination: `HOST:PORT` or `unix:PATH` (same host; needed by shm and handover).
    #[arg(long, value_parser = units::parse_endpoint)]
    pub to: Endpoint,
    /// Transport: classic (one TCP stream, a header per page: the baseline), multi-tcp
    /// (parallel streams, batched runs, zero-copy; `multi-tcp:N` for N streams), shm
    /// (one-sided writes into the destination's memory, same host), handover (pass the
    /// memory itself, same host), rdma (RDMA writes into the destination's registered
    /// memory over 2 queue pairs; `rdma:MIB` or `rdma:pin=MIB` caps its pinned memory,
    /// `rdma:qps=N` sets the queue pairs (1..=16), e.g. `rdma:qps=4,pin=256`; needs a build
    /// with the feature `rdma`).
    #[arg(long, default_value = "classic", value_parser = units::parse_transport)]
    pub transport: TransportKind,
    /// Streams for multi-tcp, 1..=64 (default: number of cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(fastmig_host::command::MAX_STREAMS)))]
    pub streams: Option<u32>,
    /// Bandwidth cap for page data, bytes/s (`1G`) or bits/s (`10gbit`). Default: none.
    #[arg(long, value_parser = units::parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Largest acceptable downtime (pause on the source to resume on the destination).
    /// Default: the engine's.
    #[arg(long, value_parser = units::parse_duration, allow_hyphen_values = true)]
    pub downtime_limit: Option<Duration>,
    /// Most pre-copy rounds, including the first full pass. Default: the engine's (30).
    #[arg(long)]
    pub max_rounds: Option<u32>,
    /// When rounds stop converging: `wait` (keep going up to --max-rounds, then fail),
    /// `force` (stop and copy now, whatever the downtime) or `abort` (fail at once).
    #[arg(long, value_parser = units::parse_on_no_converge)]
    pub on_no_converge: Option<OnNoConverge>,
    /// A destination silent for this long fails the migration. Default: the engine's (10s).
    #[arg(long, value_parser = units::parse_timeout, allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
    /// Once the destination runs the VM, tell the source process to quit (it would
    /// otherwise stay, paused in `postmigrate`, until `quit`).
    #[arg(long)]
    pub quit_source: bool,
    /// Print one JSON object (the summary, or `{"status":"failed",...}`) on stdout. With
    /// `--model`, the summary carries `prediction`: the model's prediction made at the start,
    /// its measured inputs and its relative errors.
    #[arg(long)]
    pub json: bool,
    /// Mutual TLS 1.3 with the destination (classic and multi-tcp).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Do not migrate: measure the VM (write rate, working set, memory) and print the
    /// model's prediction for these settings. Needs `--model`.
    #[arg(long, requires = "model")]
    pub dry_run: bool,
    /// The fitted model (`fastmig model fit`; the project's own is
    /// bench/characterisation/current/model.json). With it, a migration is predicted before it starts
    /// (shown with the summary; in `prediction` under `--json`). There is no default model:
    /// one fitted on another machine would mislead.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The link's bandwidth between source and destination, for the prediction only
    /// (bytes/s, `1G`, or bits/s, `10gbit`). Default: unlimited (the transport's CPU rate
    /// bounds it).
    #[arg(long, value_parser = units::parse_bandwidth, requires = "model")]
    pub link: Option<u64>,
    /// How long the VM is observed for its write rate before a prediction.
    #[arg(long, default_value = "1s", value_parser = units::parse_duration, requires = "model")]
    pub sample: Duration,
    /// Fraction of the CPU the migration will get, in (0, 1], for the prediction only (as
    /// `fastmig predict --cpu-share`; the model's CPU-bound rate is scaled by it).
    #[arg(long, default_value = "1", value_parser = crate::model_cmd::share_arg, requires = "model")]
    pub cpu_share: f64,
}

impl MigrateArgs {
    /// The `migrate` request these flags ask for; what is not given keeps the one default.
    pub fn request(&self) -> Result<MigrationRequest> {
        let d = MigrationRequest::default();
        let mut transport = self.transport;
        if let Some(n) = self.streams {
            match &mut transport {
                TransportKind::MultiTcp { streams } => *streams = n,
                _ => {
                    return Err(crate::usage!(
                        "--streams applies only to --transport multi-tcp"
                    ))
                }
            }
        }
        Ok(MigrationRequest {
            uri: self.to.to_string(),
            transport,
            downtime_limit: self.downtime_limit.unwrap_or(d.downtime_limit),
            max_bandwidth: self.max_bandwidth.or(d.max_bandwidth),
            max_rounds: self.max_rounds.unwrap_or(d.max_rounds),
            on_no_converge: self.on_no_converge.unwrap_or(d.on_no_converge),
            timeout: self.timeout.unwrap_or(d.timeout),
            tls: self.tls.files()?,
        })
    }
}

/// Arguments of `fastmig demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "64M", value_parser = units::parse_mem, allow_hyphen_values = true)]
    pub mem: u64,
    /// Workload of the migrated VM (a `verify` workload is checked page by page).
    #[arg(long, default_value = "verify:rate=5000,wss=32M,pattern=random", value_parser = units::parse_workload)]
    pub workload: fastmig_vmm::WorkloadSpec,
    /// Transport.
    #[arg(long, default_value = "classic", value_parser = units::parse_transport)]
    pub transport: TransportKind,
    /// Seconds the VM runs on the source before it migrates.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Print the migration summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Show the child processes' logs.
    #[arg(long)]
    pub verbose: bool,
}

/// Runs a migration subcommand.
pub fn main(cmd: MigrateCommand) -> Result<()> {
    match cmd {
        MigrateCommand::Incoming(args) => incoming(args),
        MigrateCommand::Migrate(args) => {
            let client = args.target.connect()?;
            let model = args
                .model
                .as_deref()
                .map(crate::model_cmd::load_model)
                .transpose()?;
            let forecast = match &model {
                Some(m) => Some(migrate_predict::forecast(&client, m, &args)?),
                None => None,
            };
            if args.dry_run {
                let Some(f) = &forecast else {
                    return Err(crate::usage!(
                        "--dry-run needs --model FILE (fit one with `fastmig model fit SWEEP.csv`; the project's is bench/characterisation/current/model.json)"
                    ));
                };
                return migrate_predict::print(f, args.json);
            }
            let mem_pages = client
                .query_vm()
                .ok()
                .map(|v| v.mem_size / fastmig_vmm::PAGE_SIZE as u64);
            let summary = migrate_with(&client, &args, forecast.as_ref())?;
            if !args.json {
                print_summary(&summary, mem_pages);
                if let Some(f) = &forecast {
                    let p = &f.prediction;
                    println!(
                        "  predicted    {:>10.1} ms total, {:.1} ms downtime, {:.1} MiB, {} rounds ({})",
                        p.total_ms,
                        p.downtime_ms,
                        p.bytes as f64 / (1u64 << 20) as f64,
                        p.rounds,
                        if p.converges { "converges" } else { "does not converge" }
                    );
                }
            }
            Ok(())
        }
        MigrateCommand::MigrateCancel { target } => {
            target.connect()?.migrate_cancel()?;
            eprintln!("fastmig: cancel requested; the VM keeps running on the source");
            Ok(())
        }
        MigrateCommand::Demo(args) => demo(&args),
    }
}

fn incoming(args: IncomingArgs) -> Result<()> {
    let max_mem = match args.max_mem {
        Some(m) => m,
        None => available_memory()?,
    };
    if let Some(m) = args.mem.filter(|&m| m > max_mem) {
        return Err(crate::usage!(
            "--mem {m} bytes is more than --max-mem {max_mem} bytes (default: available memory)"
        ));
    }
    let tls = args.tls.files()?;
    daemon::maybe_daemonize(&args.ready)?;
    let cfg = IncomingConfig {
        max_mem,
        tls,
        listen: args.listen,
        api: args.api,
        mem_size: args.mem,
        vcpus: args.vcpus,
        accept_timeout: args.accept_timeout,
        io_timeout: args.timeout,
        ready_file: args.ready.ready_file,
    };
    let as_json = args.json;
    fastmig_host::run::incoming(&cfg, &mut |ev| {
        if let (true, fastmig_host::run::Event::Received(s)) = (as_json, &ev) {
            match serde_json::to_string(s) {
                Ok(line) => println!("{line}"),
                Err(e) => tracing::warn!("cannot print the summary: {e}"),
            }
        }
        crate::vm_cmd::print_event(&ev, cfg.api.as_deref());
    })?;
    Ok(())
}

/// Starts a migration on the source and follows it to the end; returns the summary of a
/// completed migration, or an error saying what failed (the VM then runs on the source).
pub fn migrate(client: &ControlClient, args: &MigrateArgs) -> Result<MigrationSummary> {
    migrate_with(client, args, None)
}

/// [`migrate`], with the prediction made at the start added to `--json`'s summary.
fn migrate_with(
    client: &ControlClient,
    args: &MigrateArgs,
    forecast: Option<&migrate_predict::Forecast>,
) -> Result<MigrationSummary> {
    let request = args.request()?;
    client.migrate(&request).map_err(|e| {
        // Refusals at this point (bad transport, VM not running) are the user's to fix.
        crate::usage!(
            "migration not started: {}",
            crate::error::one_line(&e.into())
        )
    })?;
    let signalled = fastmig_host::run::termination_flag();
    let bar = if args.json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    };
    let mut cancel_sent = false;
    let result = loop {
        if signalled.load(std::sync::atomic::Ordering::SeqCst) && !cancel_sent {
            cancel_sent = true;
            bar.set_message("cancelling...");
            let _ = client.migrate_cancel();
        }
        let state = client
            .query_migrate()
            .context("asking the source how the migration goes")?;
        match state {
            MigrateState::Active { progress: Some(p) } => bar.set_message(format!(
                "round {} | {} dirty pages left | {:.0} dirty pages/s | {:.0} MiB/s | {:.1} MiB sent",
                p.round,
                p.remaining_pages,
                p.dirty_rate_pages_s,
                p.bandwidth_mib_s,
                p.bytes_sent as f64 / (1u64 << 20) as f64
            )),
            MigrateState::Active { progress: None } => bar.set_message("setting up"),
            MigrateState::Completed { summary } => break Ok(summary),
            MigrateState::Failed { error } => break Err(("failed", error)),
            MigrateState::Cancelled { error } => break Err(("cancelled", error)),
            MigrateState::InDoubt { error } => break Err(("in-doubt", error)),
            MigrateState::None => {
                break Err(("failed", "the source reports no migration".to_string()))
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    match result {
        Ok(summary) => {
            if args.json {
                let v = summary_json(&summary);
                let v = match forecast {
                    Some(f) => migrate_predict::with_summary(v, f, &summary),
                    None => v,
                };
                println!("{v}");
            }
            if args.quit_source {
                client.quit().context("telling the source to quit")?;
            }
            Ok(summary)
        }
        Err((state, error)) => {
            // `--json` keeps `failed` for a cancelled migration too: the VM runs here either way.
            let in_doubt = state == "in-doubt";
            let status = if in_doubt { "in-doubt" } else { "failed" };
            if args.json {
                println!(
                    "{}",
                    json!({"status": status, "error": error, "transport": request.transport.name()})
                );
            }
            if in_doubt {
                // The source committed: the VM is paused here and may run there. Saying "still
                // runs on the source" would invite a second copy of the VM.
                bail!(
                    "migration in doubt: {error}; the VM is paused on the source and may run on \
                     the destination: check the destination before resuming it here (`fastmig ctl --api {} cont`)",
                    args.target.api.display()
                )
            }
            bail!("migration failed: {error}; the VM still runs on the source")
        }
    }
}

/// The summary as `migrate --json` prints it: `status` is `completed` and `forced` says
/// whether stop-and-copy was forced.
fn summary_json(s: &MigrationSummary) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["forced"] = json!(s.status == MigrationStatus::CompletedForced);
    v["status"] = json!("completed");
    v
}

fn print_summary(s: &MigrationSummary, mem_pages: Option<u64>) {
    let forced = if s.status == MigrationStatus::CompletedForced {
        ", stop-and-copy forced"
    } else {
        ""
    };
    println!("migration completed ({}{forced})", s.transport);
    println!("  total        {:>10.1} ms", s.total_ms);
    println!(
        "  downtime     {:>10.1} ms   (paused on the source until running on the destination)",
        s.downtime_ms
    );
    println!("  setup        {:>10.1} ms", s.setup_ms);
    println!(
        "  rounds       {:>10}      (passes over memory; the last with the VM paused)",
        s.rounds
    );
    let of_memory = mem_pages
        .map(|n| format!("; the VM has {n} pages"))
        .unwrap_or_default();
    println!(
        "  pages sent   {:>10}      (over all rounds, re-sent pages counted{of_memory})",
        s.pages_sent
    );
    println!(
        "  zero pages   {:>10}      (all-zero pages sent as a flag only, over all rounds)",
        s.zero_pages_skipped
    );
    println!(
        "  bytes sent   {:>10.1} MiB",
        s.bytes_sent as f64 / (1u64 << 20) as f64
    );
    println!("  throughput   {:>10.1} MiB/s", s.throughput_mib_s);
    println!(
        "  CPU          {:>10.3} s source, {:.3} s destination",
        s.src_cpu_s, s.dst_cpu_s
    );
    println!("  digest match {:>10}", s.digest_match);
}

/// Demo narration: stdout normally, stderr under `--json` (stdout then holds only JSON).
macro_rules! say {
    ($args:expr, $($fmt:tt)*) => {
        if $args.json {
            eprintln!($($fmt)*);
        } else {
            println!($($fmt)*);
        }
    };
}

fn demo(args: &DemoArgs) -> Result<()> {
    use crate::procs::{free_loopback_port, ChildVm};
    let work = tempfile::Builder::new()
        .prefix("fastmig-demo")
        .tempdir()
        .context("creating a scratch directory")?;
    let src_api = work.path().join("src.sock");
    let dst_api = work.path().join("dst.sock");
    let to = match args.transport {
        TransportKind::Shm | TransportKind::Handover => {
            format!("unix:{}", work.path().join("mig.sock").display())
        }
        _ => format!("127.0.0.1:{}", free_loopback_port()?),
    };
    let boot = Duration::from_secs(60);
    let s = |x: &str| x.to_string();
    let mem = args.mem.to_string();
    say!(
        args,
        "demo: source VM {} running `{}`",
        fastmig_vmm::format_size(args.mem),
        args.workload
    );
    let mut src = ChildVm::spawn(
        "source",
        &[
            s("run"),
            s("--mem"),
            mem.clone(),
            s("--workload"),
            args.workload.to_string(),
            s("--api"),
            src_api.display().to_string(),
        ],
        work.path(),
        args.verbose,
        boot,
    )?;
    src.wait_status("running", boot, |st| {
        st.status == fastmig_host::RunStatus::Running
    })?;
    let mut dst = ChildVm::spawn(
        "destination",
        &[
            s("incoming"),
            s("--listen"),
            to.clone(),
            s("--mem"),
            mem,
            s("--api"),
            dst_api.display().to_string(),
        ],
        work.path(),
        args.verbose,
        boot,
    )?;
    dst.wait_status("listening", boot, |st| st.listening == Some(true))?;
    std::thread::sleep(Duration::from_secs_f64(args.warmup_s.max(0.0)));
    let before = src.client.query_status()?;
    say!(
        args,
        "demo: source progress {} (guest counter), {:.0} distinct dirty pages/s (the workload's requested write rate is an upper bound); migrating to {to} with {}",
        before.progress,
        before.dirty_rate_pps,
        args.transport.name()
    );
    let summary = migrate(
        &src.client,
        &MigrateArgs {
            target: ApiTarget {
                api: src_api.clone(),
                wait: Duration::ZERO,
            },
            to: units::parse_endpoint(&to).map_err(|e| anyhow::anyhow!(e))?,
            transport: args.transport,
            streams: None,
            max_bandwidth: None,
            downtime_limit: None,
            max_rounds: None,
            on_no_converge: Some(OnNoConverge::Force),
            timeout: None,
            quit_source: false,
            json: args.json,
            tls: TlsArgs::default(),
            dry_run: false,
            model: None,
            link: None,
            sample: Duration::from_secs(1),
            cpu_share: 1.0,
        },
    )?;
    let src_last = src.client.query_status()?;
    let after = dst.wait_status("running on the destination", boot, |st| {
        st.status == fastmig_host::RunStatus::Running
    })?;
    if after.progress < src_last.progress {
        bail!(
            "destination progress {} is behind the source's last {}",
            after.progress,
            src_last.progress
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let later = dst.client.query_status()?.progress;
    let verified = if args.workload.kind == fastmig_vmm::WorkloadKind::Verify {
        let report = dst.client.verify_memory()?;
        if report.errors != 0 {
            bail!(
                "verify-memory on the destination found {} errors: {:?}",
                report.errors,
                report.first_errors
            );
        }
        Some(report.pages_checked)
    } else {
        None
    };
    if !args.json {
        print_summary(&summary, Some(args.mem / fastmig_vmm::PAGE_SIZE as u64));
    }
    say!(
        args,
        "demo: source paused at progress {} ({}); destination continued from {} to {later}",
        src_last.progress,
        src_last.status,
        after.progress
    );
    if let Some(pages) = verified {
        say!(
            args,
            "demo: verify-memory on the destination: {pages} pages checked, 0 errors"
        );
    }
    if later <= after.progress && args.workload.kind != fastmig_vmm::WorkloadKind::Idle {
        bail!("the VM did not make progress on the destination");
    }
    dst.quit().ok();
    src.quit().ok();
    Ok(())
}
