//! Migration subcommands: `incoming` (the destination), `migrate` and `migrate-cancel` (drive
//! the source through its control socket), and `demo` (both ends on loopback).
//!
//! ```text
//!  fastmig migrate ──control socket──► source process ──migrate()──► destination process
//!     polls query-migrate, shows progress                          (fastmig incoming)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fastmig_migration::{
    Endpoint, HandoverRegion, IncomingVm, Listener, ReceiveOptions, ReceiveSummary, VmError,
    VmLayout,
};
use fastmig_vmm::{Vm, VmConfig};
use serde_json::{json, Value};

use crate::host::Host;
use crate::kvm_adapter::KvmMigratable;
use crate::{api, units, usage};

/// Migration subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MigrateCommand {
    /// Wait for one incoming migration, check it, and only then run the VM.
    ///
    /// The VM is resumed only after every batch checksum and the whole-memory digest match;
    /// on any failure it is never started and the process exits 1.
    Incoming(IncomingArgs),
    /// Live-migrate the VM of a running `fastmig run` to a destination.
    ///
    /// Shows progress (round, pages remaining, rate) and ends with a summary. A failed
    /// migration exits 1 with one line saying what failed; the VM keeps running on the source.
    Migrate(MigrateArgs),
    /// Cancel the migration in flight; the VM keeps running on the source.
    MigrateCancel {
        /// Control socket of the source VM.
        #[arg(long)]
        api: PathBuf,
    },
    /// Start a source and a destination on loopback, live-migrate a `verify` VM that dirties
    /// memory, check every page on the destination, and print the summary.
    Demo(DemoArgs),
}

/// Arguments of `fastmig incoming`.
#[derive(clap::Args, Debug)]
pub struct IncomingArgs {
    /// Where to listen: `HOST:PORT` (TCP; classic, multi-tcp) or `unix:PATH` (shm, handover).
    #[arg(long)]
    pub listen: String,
    /// Control socket path (status shows `inmigrate` until the VM runs).
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Guest memory size. With it, the VM and its memory are prepared (pre-faulted) before
    /// the migration begins, and a source of another size is refused. Without it, the VM is
    /// built to the source's size during setup (counted in the setup time).
    #[arg(long)]
    pub mem: Option<String>,
    /// Number of vCPUs the source must have.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Give up if no source connects within this time (default: wait forever).
    #[arg(long)]
    pub accept_timeout: Option<String>,
    /// A source silent for this long fails the migration.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// Print the destination's summary as JSON on stdout once the VM runs.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fastmig migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Control socket of the source VM (`fastmig run --api`).
    #[arg(long)]
    pub api: PathBuf,
    /// Destination: `HOST:PORT` or `unix:PATH` (same host; needed by shm and handover).
    #[arg(long)]
    pub to: String,
    /// Transport: classic (one TCP stream, a header per page: the baseline), multi-tcp
    /// (parallel streams, batched runs, zero-copy), shm (one-sided writes into the
    /// destination's memory, same host), handover (pass the memory itself, same host).
    #[arg(long, default_value = "classic")]
    pub transport: String,
    /// Streams for multi-tcp (default: number of cores).
    #[arg(long)]
    pub streams: Option<u32>,
    /// Bandwidth cap for page data, bytes/s (`1G`) or bits/s (`10gbit`). Default: none.
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// Largest acceptable downtime (pause on the source to resume on the destination).
    #[arg(long, default_value = "30ms")]
    pub downtime_limit: String,
    /// Most pre-copy rounds, including the first full pass.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// When rounds stop converging: `wait` (keep going up to --max-rounds, then fail),
    /// `force` (stop and copy now, whatever the downtime) or `abort` (fail at once).
    #[arg(long, default_value = "wait")]
    pub on_no_converge: String,
    /// A destination silent for this long fails the migration.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// Print one JSON object (the summary, or `{"status":"failed",...}`) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fastmig demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Workload of the migrated VM (a `verify` workload is checked page by page).
    #[arg(long, default_value = "verify:rate=5000,wss=32M,pattern=random")]
    pub workload: String,
    /// Transport.
    #[arg(long, default_value = "classic")]
    pub transport: String,
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
        MigrateCommand::Incoming(args) => incoming(&args),
        MigrateCommand::Migrate(args) => {
            let summary = migrate(&args)?;
            if !args.json {
                print_summary(&summary);
            }
            Ok(())
        }
        MigrateCommand::MigrateCancel { api } => {
            api::call(&api, "migrate-cancel", None)?;
            eprintln!("fastmig: cancel requested; the VM keeps running on the source");
            Ok(())
        }
        MigrateCommand::Demo(args) => demo(&args),
    }
}

fn parse_endpoint(s: &str) -> Result<Endpoint> {
    s.parse()
        .map_err(|e: fastmig_migration::BadEndpoint| usage!("{e}"))
}

fn incoming(args: &IncomingArgs) -> Result<()> {
    let endpoint = parse_endpoint(&args.listen)?;
    let accept_timeout = args
        .accept_timeout
        .as_deref()
        .map(units::parse_duration)
        .transpose()?;
    let io_timeout = units::parse_duration(&args.timeout)?;
    let mem_size = args.mem.as_deref().map(units::parse_size).transpose()?;
    let vcpus = args.vcpus;
    let host = Host::incoming();
    let server = match &args.api {
        Some(path) => Some(api::ApiServer::start(Arc::clone(&host), path)?),
        None => None,
    };
    let result = (|| -> Result<()> {
        let idle: fastmig_vmm::WorkloadSpec = "idle".parse().map_err(crate::vm_cmd::vmm_error)?;
        let config = |mem_size: u64, vcpus: u8| VmConfig {
            mem_size,
            vcpus,
            // Replaced by the source's workload when its state is restored.
            workload: idle.clone(),
        };
        // With --mem the VM is built and pre-faulted before anyone connects, as a hypervisor
        // creates the destination VM first: first-touch faults cost 2.5-14 us a page here and
        // must not land in the migration. Without it, the same happens during setup.
        let prepared = match mem_size {
            Some(mem_size) => {
                let t = Instant::now();
                let vm = Arc::new(
                    Vm::new_incoming(config(mem_size, vcpus)).map_err(crate::vm_cmd::vmm_error)?,
                );
                tracing::info!(
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "destination memory prepared"
                );
                host.set_vm(Arc::clone(&vm));
                Some(KvmMigratable::new(vm))
            }
            None => None,
        };
        let listener = Listener::bind(&endpoint).map_err(|e| {
            usage!(
                "cannot listen on {}: {}",
                args.listen,
                crate::error::one_line(&e.into())
            )
        })?;
        host.set_listening();
        eprintln!("fastmig: waiting for an incoming migration on {endpoint}");
        let opts = ReceiveOptions {
            accept_timeout,
            io_timeout,
            ..ReceiveOptions::default()
        };
        let make_vm = |layout: &VmLayout, regions: Option<Vec<HandoverRegion>>| {
            build_destination_vm(layout, regions, &config)
        };
        let incoming = match prepared {
            Some(vm) => IncomingVm::Prepared(vm, Box::new(make_vm)),
            None => IncomingVm::OnDemand(Box::new(make_vm)),
        };
        let (vm, summary) =
            fastmig_migration::receive(&listener, &opts, incoming).map_err(|e| {
                anyhow::Error::new(e).context("incoming migration failed; the VM was not started")
            })?;
        host.set_vm(Arc::clone(vm.vm()));
        host.incoming_done();
        report_incoming(&summary, args.json)?;
        crate::vm_cmd::install_termination_handlers();
        crate::vm_cmd::wait_for_exit(&host)
    })();
    if let Some(server) = &server {
        server.close();
    }
    if let Some(vm) = host.vm() {
        vm.shutdown();
    }
    result
}

/// Builds the destination VM during setup: on fresh, pre-faulted memory of the source's size,
/// or (handover) on the source's own memfd, so that nothing is copied.
fn build_destination_vm(
    layout: &VmLayout,
    regions: Option<Vec<HandoverRegion>>,
    config: &dyn Fn(u64, u8) -> VmConfig,
) -> Result<KvmMigratable, VmError> {
    let vcpus = u8::try_from(layout.vcpus)
        .map_err(|_| VmError::msg(format!("{} vCPUs is more than this VMM runs", layout.vcpus)))?;
    let cfg = config(layout.memory_bytes(), vcpus);
    let vm = match regions {
        None => Vm::new_incoming(cfg),
        Some(mut regions) => {
            // This VMM maps all guest memory as one memfd region at GPA 0.
            let single = regions.len() == 1 && regions[0].gpa == 0 && regions[0].fd_offset == 0;
            let Some(region) = regions.pop().filter(|_| single) else {
                return Err(VmError::msg(
                    "handover: this VMM takes one memory region at GPA 0, offset 0",
                ));
            };
            Vm::from_memory_fd(cfg, region.fd)
        }
    }
    .map_err(|e| VmError::with_source("building the destination VM", e))?;
    Ok(KvmMigratable::new(Arc::new(vm)))
}

fn report_incoming(summary: &ReceiveSummary, as_json: bool) -> Result<()> {
    if as_json {
        println!("{}", serde_json::to_string(summary)?);
    }
    eprintln!(
        "fastmig: migration received ({}, {} pages, {:.1} ms, digest {:#018x}); VM running",
        summary.transport, summary.pages_received, summary.total_ms, summary.digest
    );
    Ok(())
}

/// Starts a migration on the source and follows it to the end; returns the summary of a
/// completed migration, or an error saying what failed (the VM then runs on the source).
pub fn migrate(args: &MigrateArgs) -> Result<Value> {
    parse_endpoint(&args.to)?;
    if !["wait", "force", "abort"].contains(&args.on_no_converge.as_str()) {
        return Err(usage!(
            "--on-no-converge `{}`: expected wait, force or abort",
            args.on_no_converge
        ));
    }
    let mut req = json!({
        "uri": args.to,
        "transport": args.transport,
        "downtime_limit_ms": units::parse_duration(&args.downtime_limit)?.as_millis() as u64,
        "max_rounds": args.max_rounds,
        "on_no_converge": args.on_no_converge,
        "timeout_ms": units::parse_duration(&args.timeout)?.as_millis() as u64,
    });
    if let Some(n) = args.streams {
        req["streams"] = json!(n);
    }
    if let Some(bw) = &args.max_bandwidth {
        req["max_bandwidth"] = json!(units::parse_bandwidth(bw)?);
    }
    api::call(&args.api, "migrate", Some(req)).map_err(|e| {
        // Refusals at this point (bad transport, VM not running) are the user's to fix.
        usage!("migration not started: {}", crate::error::one_line(&e))
    })?;
    crate::vm_cmd::install_termination_handlers();
    let bar = if args.json {
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
        if crate::vm_cmd::signalled() && !cancel_sent {
            cancel_sent = true;
            bar.set_message("cancelling...");
            let _ = api::call(&args.api, "migrate-cancel", None);
        }
        let st = api::call(&args.api, "query-migrate", None)
            .context("asking the source how the migration goes")?;
        match st["status"].as_str().unwrap_or("") {
            "active" => {
                let p = &st["progress"];
                if p.is_object() {
                    bar.set_message(format!(
                        "round {} | {} pages left | dirty {:.0} pages/s | {:.0} MiB/s | {:.1} MiB sent",
                        p["round"],
                        p["remaining_pages"],
                        p["dirty_rate_pages_s"].as_f64().unwrap_or(0.0),
                        p["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
                        p["bytes_sent"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64
                    ));
                } else {
                    bar.set_message("setting up");
                }
            }
            "completed" => break Ok(st["summary"].clone()),
            "failed" | "cancelled" => {
                break Err(st["error"].as_str().unwrap_or("unknown error").to_string())
            }
            other => break Err(format!("unexpected migration status `{other}`")),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    match result {
        Ok(summary) => {
            if args.json {
                println!("{summary}");
            }
            Ok(summary)
        }
        Err(error) => {
            if args.json {
                println!(
                    "{}",
                    json!({"status": "failed", "error": error, "transport": args.transport})
                );
            }
            bail!("migration failed: {error}; the VM still runs on the source")
        }
    }
}

fn print_summary(s: &Value) {
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    println!(
        "migration {} ({})",
        s["status"].as_str().unwrap_or("?"),
        s["transport"].as_str().unwrap_or("?")
    );
    println!("  total        {:>10.1} ms", f("total_ms"));
    println!("  downtime     {:>10.1} ms", f("downtime_ms"));
    println!("  setup        {:>10.1} ms", f("setup_ms"));
    println!("  rounds       {:>10}", s["rounds"]);
    println!(
        "  pages sent   {:>10}   (zero pages skipped: {})",
        s["pages_sent"], s["zero_pages_skipped"]
    );
    println!(
        "  bytes sent   {:>10.1} MiB",
        f("bytes_sent") / (1u64 << 20) as f64
    );
    println!("  throughput   {:>10.1} MiB/s", f("throughput_mib_s"));
    println!(
        "  CPU          {:>10.3} s source, {:.3} s destination",
        f("src_cpu_s"),
        f("dst_cpu_s")
    );
    println!("  digest match {:>10}", s["digest_match"]);
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
    let work = tempfile::Builder::new().prefix("fastmig-demo").tempdir()?;
    let src_api = work.path().join("src.sock");
    let dst_api = work.path().join("dst.sock");
    let mem_size = units::parse_size(&args.mem)?;
    let to = match args.transport.as_str() {
        "shm" | "handover" => format!("unix:{}", work.path().join("mig.sock").display()),
        _ => format!("127.0.0.1:{}", free_loopback_port()?),
    };
    let boot = Duration::from_secs(60);
    let s = |x: &str| x.to_string();
    say!(
        args,
        "demo: source VM {} running `{}`",
        args.mem,
        args.workload
    );
    let mut src = ChildVm::spawn(
        "source",
        &[
            s("run"),
            s("--mem"),
            args.mem.clone(),
            s("--workload"),
            args.workload.clone(),
            s("--api"),
            src_api.display().to_string(),
        ],
        &src_api,
        args.verbose,
        boot,
    )?;
    src.wait_status("running", boot, |st| st["status"] == "running")?;
    let dst = ChildVm::spawn(
        "destination",
        &[
            s("incoming"),
            s("--listen"),
            to.clone(),
            s("--mem"),
            mem_size.to_string(),
            s("--api"),
            dst_api.display().to_string(),
        ],
        &dst_api,
        args.verbose,
        boot,
    )?;
    let mut dst = dst;
    dst.wait_status("listening", boot, |st| st["listening"] == true)?;
    std::thread::sleep(Duration::from_secs_f64(args.warmup_s.max(0.0)));
    let before = src.call("query-status", json!({}))?;
    say!(
        args,
        "demo: source progress {} at {:.0} dirty pages/s; migrating to {to} with {}",
        before["progress"],
        before["dirty_rate_pps"].as_f64().unwrap_or(0.0),
        args.transport
    );
    let summary = migrate(&MigrateArgs {
        api: src_api.clone(),
        to,
        transport: args.transport.clone(),
        streams: None,
        max_bandwidth: None,
        downtime_limit: "30ms".into(),
        max_rounds: 30,
        on_no_converge: "force".into(),
        timeout: "10s".into(),
        json: args.json,
    })?;
    let src_last = src.call("query-status", json!({}))?;
    let after = dst.wait_status("running on the destination", boot, |st| {
        st["status"] == "running"
    })?;
    let src_progress = src_last["progress"].as_u64().unwrap_or(0);
    let dst_progress = after["progress"].as_u64().unwrap_or(0);
    if dst_progress < src_progress {
        bail!("destination progress {dst_progress} is behind the source's last {src_progress}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let later = dst.call("query-status", json!({}))?["progress"]
        .as_u64()
        .unwrap_or(0);
    let verified = if args.workload.starts_with("verify") {
        let report = dst.call("verify-memory", json!({}))?;
        if report["errors"].as_u64() != Some(0) {
            bail!("verify-memory on the destination found errors: {report}");
        }
        Some(report["pages_checked"].as_u64().unwrap_or(0))
    } else {
        None
    };
    if !args.json {
        print_summary(&summary);
    }
    say!(
        args,
        "demo: source paused at progress {src_progress} ({}); destination continued from {dst_progress} to {later}",
        src_last["status"].as_str().unwrap_or("?")
    );
    if let Some(pages) = verified {
        say!(
            args,
            "demo: verify-memory on the destination: {pages} pages checked, 0 errors"
        );
    }
    if later <= dst_progress && args.workload != "idle" {
        bail!("the VM did not make progress on the destination");
    }
    dst.quit().ok();
    src.quit().ok();
    Ok(())
}
