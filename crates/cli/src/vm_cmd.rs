//! VM subcommands: `run` (a VM with a control socket), `status`, `ctl` (send one control
//! command) and `demo`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fastmig_vmm::{Vm, VmConfig, VmRunState, VmmError, WorkloadSpec};
use serde_json::Value;

use crate::api;
use crate::host::Host;

/// VM subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum VmCommand {
    /// Run a VM with a built-in workload until `quit` or Ctrl-C.
    Run(RunArgs),
    /// Print the status of a running VM.
    Status {
        /// Control socket of the VM.
        #[arg(long)]
        api: PathBuf,
        /// Print the raw JSON reply.
        #[arg(long)]
        json: bool,
    },
    /// Send one control command (`stop`, `cont`, `quit`, `verify-memory`, `query-vm`, ...)
    /// and print the JSON reply.
    Ctl {
        /// Control socket of the VM.
        #[arg(long)]
        api: PathBuf,
        /// The command name.
        command: String,
    },
}

/// Arguments of `fastmig run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Guest memory size (K/M/G suffixes).
    #[arg(long, default_value = "64M")]
    mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Workload spec `NAME[:key=value,...]`, e.g. `dirty:rate=20000,wss=32M,pattern=random`.
    ///
    /// Workloads: `idle` (halts; a heartbeat every ~10 ms), `dirty` and `verify` (write the
    /// working set at a paced rate; `verify` stamps pages so `verify-memory` can check them),
    /// `fill` (writes every page once, then idles). Keys for dirty/verify: `rate` pages/s
    /// (1000; 0 = unpaced), `wss` (16M), `pattern` seq|random|hotcold (random), `hot` hot
    /// fraction of the working set (0.1), `hotw` fraction of writes that go hot (0.9), `seed`
    /// (1). Key for fill: `rate` (0).
    #[arg(long, default_value = "idle")]
    workload: String,
    /// Control socket path (newline-delimited JSON, QMP-like).
    #[arg(long)]
    api: Option<PathBuf>,
    /// Before the workload starts, write non-zero data into every guest page the workload
    /// does not own, from the VMM (fast), so that all memory is touched: for benchmarks.
    #[arg(long)]
    prefill: bool,
}

/// Runs a VM subcommand.
pub fn main(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Run(args) => run(&args),
        VmCommand::Status { api, json } => status(&api, json),
        VmCommand::Ctl { api, command } => {
            let reply = api::call(&api, &command, None)?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(())
        }
    }
}

/// Maps VMM errors that are the user's fault (spec, size, missing KVM) to usage errors.
pub fn vmm_error(e: VmmError) -> anyhow::Error {
    if e.is_usage() {
        crate::usage!("{e}")
    } else {
        anyhow::Error::new(e)
    }
}

fn parse_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let mem_size = fastmig_vmm::parse_size(&args.mem).map_err(vmm_error)?;
    let workload: WorkloadSpec = args.workload.parse().map_err(vmm_error)?;
    let cfg = VmConfig {
        mem_size,
        vcpus: args.vcpus,
        workload,
    };
    cfg.validate().map_err(vmm_error)?;
    Ok(cfg)
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// True once SIGINT or SIGTERM arrived (after [`install_termination_handlers`]).
pub fn signalled() -> bool {
    SIGNALLED.load(Ordering::SeqCst)
}

extern "C" fn on_terminate(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

pub fn install_termination_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); an all-zero
        // sigaction with the handler set is a valid argument.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_terminate as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let cfg = parse_config(args)?;
    let vm = Arc::new(Vm::new(cfg.clone()).map_err(vmm_error)?);
    if args.prefill {
        prefill(&vm)?;
    }
    let host = Host::running(Arc::clone(&vm));
    install_termination_handlers();
    let server = match &args.api {
        Some(path) => Some(api::ApiServer::start(Arc::clone(&host), path)?),
        None => None,
    };
    let result = vm.start().map_err(vmm_error).and_then(|()| {
        eprintln!(
            "fastmig: VM running: {} memory, {} vCPU(s), workload {}{}",
            fastmig_vmm::format_size(cfg.mem_size),
            cfg.vcpus,
            cfg.workload,
            args.api
                .as_ref()
                .map(|p| format!(", control socket {}", p.display()))
                .unwrap_or_default()
        );
        wait_for_exit(&host)
    });
    if let Some(server) = &server {
        server.close();
    }
    vm.shutdown();
    result
}

/// Serves until `quit`, a signal, or a VM failure. A VM that migrated away stays paused here
/// (like QEMU's `postmigrate`) until `quit`.
pub fn wait_for_exit(host: &Host) -> anyhow::Result<()> {
    loop {
        if host.quit.load(Ordering::SeqCst) {
            tracing::info!("quit requested over the control socket");
            return Ok(());
        }
        if SIGNALLED.load(Ordering::SeqCst) {
            tracing::info!("signal received, shutting down");
            return Ok(());
        }
        if let Some(vm) = host.vm() {
            if let VmRunState::Failed(why) = vm.status().state {
                anyhow::bail!("VM failed: {why}");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a non-zero, page-unique pattern into every guest page from the end of the
/// workload's own pages to the end of memory. `verify` pages are left alone (its check knows
/// what each must hold); for the other workloads the whole data area is filled.
fn prefill(vm: &Vm) -> anyhow::Result<()> {
    let cfg = vm.config();
    let mut start = fastmig_vmm::guest::DATA_BASE;
    if cfg.workload.kind == fastmig_vmm::WorkloadKind::Verify {
        start += cfg.workload.wss;
    }
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut gpa = start;
    while gpa < cfg.mem_size {
        let len = CHUNK.min(cfg.mem_size - gpa) as usize;
        for (i, page) in buf[..len]
            .chunks_mut(fastmig_vmm::PAGE_SIZE as usize)
            .enumerate()
        {
            let tag = (gpa / fastmig_vmm::PAGE_SIZE + i as u64) | 0x5a00_0000_0000_0000;
            for word in page.chunks_exact_mut(8) {
                word.copy_from_slice(&tag.to_le_bytes());
            }
        }
        vm.write_memory(gpa, &buf[..len])
            .context("prefilling guest memory")?;
        gpa += len as u64;
    }
    Ok(())
}

fn status(path: &Path, as_json: bool) -> anyhow::Result<()> {
    let reply = api::call(path, "query-status", None)?;
    if as_json {
        println!("{reply}");
        return Ok(());
    }
    let field = |k: &str| reply.get(k).cloned().unwrap_or(Value::Null);
    println!("status: {}", field("status").as_str().unwrap_or("?"));
    println!("progress: {}", field("progress"));
    println!(
        "dirty_rate_pps: {:.0}",
        field("dirty_rate_pps").as_f64().unwrap_or(0.0)
    );
    println!("pages_written: {}", field("pages_written"));
    println!("heartbeats: {}", field("heartbeats"));
    if let Some(err) = reply.get("error").and_then(Value::as_str) {
        println!("error: {err}");
    }
    Ok(())
}
