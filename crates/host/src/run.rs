//! The two lives of a VM process: [`run`] (boot a VM and serve it until `quit`) and
//! [`incoming`] (wait for a migration, check it, then run the VM it brought), both with an
//! optional control socket and a ready file written once a client can rely on them.
//!
//! ```text
//!  run:      build VM ─► [prefill] ─► bind control socket ─► start vCPUs ─► READY ─► serve
//!  incoming: bind control socket ─► [build + pre-fault VM] ─► bind listener ─► READY
//!            ─► receive (checked) ─► resume ─► serve
//! ```
//!
//! Both end on `quit`, SIGINT/SIGTERM, or a failed guest. A source whose VM migrated away
//! stays alive, paused in `postmigrate`, until one of those.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fastmig_migration::{
    Endpoint, HandoverRegion, IncomingVm, Listener, ReceiveOptions, ReceiveSummary, VmError,
    VmLayout,
};
use fastmig_vmm::{Vm, VmConfig, VmRunState, WorkloadKind, WorkloadSpec};

use crate::error::HostError;
use crate::kvm_adapter::KvmMigratable;
use crate::process::VmProcess;
use crate::server::ApiServer;

/// How to run a VM (`fastmig run`).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The VM.
    pub vm: VmConfig,
    /// Control socket path.
    pub api: Option<PathBuf>,
    /// Fill every guest page the workload does not own with non-zero data first (benchmarks).
    pub prefill: bool,
    /// Written (atomically, holding the process id) once the VM runs and the control socket
    /// answers; removed when the process ends.
    pub ready_file: Option<PathBuf>,
}

/// How to wait for an incoming migration (`fastmig incoming`).
#[derive(Debug, Clone)]
pub struct IncomingConfig {
    /// Where to listen for the source.
    pub listen: Endpoint,
    /// Control socket path.
    pub api: Option<PathBuf>,
    /// Guest memory size: with it the VM is built and pre-faulted before the source
    /// connects, and a source of another size is refused.
    pub mem_size: Option<u64>,
    /// vCPUs the source must have.
    pub vcpus: u8,
    /// Give up when no source connects within this time (`None`: wait forever).
    pub accept_timeout: Option<Duration>,
    /// A source silent this long fails the migration (also the wait for `Commit`).
    pub io_timeout: Duration,
    /// Largest guest memory a source may announce, in bytes: a larger one is refused
    /// before anything is allocated.
    pub max_mem: u64,
    /// Mutual TLS 1.3: only a source whose certificate the cluster CA signed gets in
    /// (TCP `listen` only).
    pub tls: Option<fastmig_migration::tls::TlsFiles>,
    /// Written once the listener is bound (a source may connect); removed at the end.
    pub ready_file: Option<PathBuf>,
}

/// What a process reports to its caller on the way (the CLI prints these).
#[derive(Debug)]
pub enum Event<'a> {
    /// The VM runs.
    Running {
        /// Its configuration.
        config: &'a VmConfig,
    },
    /// An incoming process waits for a source.
    Listening {
        /// Where.
        endpoint: &'a Endpoint,
    },
    /// The incoming migration was received and checked; the VM runs.
    Received(&'a ReceiveSummary),
}

/// Set once SIGINT or SIGTERM arrived; the handlers are installed by the first call.
pub fn termination_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&flag)) {
                tracing::warn!("cannot install a handler for signal {sig}: {e}");
            }
        }
        flag
    })
}

/// Writes the ready file: the process id, written to a temporary name and renamed, so that
/// a reader never sees it half-written.
fn write_ready_file(path: &Path) -> Result<(), HostError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let io = |source| HostError::Io {
        what: "writing the ready file",
        source,
    };
    std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Removes the ready file on every way out.
struct ReadyFile(Option<PathBuf>);

impl ReadyFile {
    fn signal(&self) -> Result<(), HostError> {
        match &self.0 {
            Some(p) => write_ready_file(p),
            None => Ok(()),
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Boots a VM and serves it until `quit`, a signal, or a guest failure.
pub fn run(cfg: &RunConfig, on_event: &mut dyn FnMut(Event<'_>)) -> Result<(), HostError> {
    cfg.vm
        .validate()
        .map_err(HostError::vm("checking the VM configuration"))?;
    let ready = ReadyFile(cfg.ready_file.clone());
    let vm = Arc::new(Vm::new(cfg.vm.clone()).map_err(HostError::vm("building the VM"))?);
    if cfg.prefill {
        prefill(&vm)?;
    }
    let process = VmProcess::running(Arc::clone(&vm));
    let quit = termination_flag();
    let server = match &cfg.api {
        Some(path) => Some(ApiServer::start(path, process.clone())?),
        None => None,
    };
    let result = vm
        .start()
        .map_err(HostError::vm("starting the vCPUs"))
        .and_then(|()| {
            on_event(Event::Running { config: &cfg.vm });
            ready.signal()
        })
        .and_then(|()| wait_for_exit(&process, quit));
    drop(server);
    vm.shutdown();
    result
}

/// Serves until `quit`, a signal, or a VM failure.
fn wait_for_exit(process: &VmProcess, signalled: &AtomicBool) -> Result<(), HostError> {
    loop {
        if process.quit_requested() {
            tracing::info!("quit requested over the control socket");
            return Ok(());
        }
        if signalled.load(Ordering::SeqCst) {
            tracing::info!("signal received, shutting down");
            return Ok(());
        }
        if let Some(vm) = process.vm() {
            if let VmRunState::Failed(why) = vm.status().state {
                return Err(HostError::VmFailed(why));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for one incoming migration, checks it, runs the VM it brought and serves it.
pub fn incoming(
    cfg: &IncomingConfig,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<(), HostError> {
    let ready = ReadyFile(cfg.ready_file.clone());
    let process = VmProcess::incoming();
    let server = match &cfg.api {
        Some(path) => Some(ApiServer::start(path, process.clone())?),
        None => None,
    };
    let result = receive_and_serve(cfg, &process, &ready, on_event);
    drop(server);
    if let Some(vm) = process.vm() {
        vm.shutdown();
    }
    result
}

fn receive_and_serve(
    cfg: &IncomingConfig,
    process: &Arc<VmProcess>,
    ready: &ReadyFile,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<(), HostError> {
    let idle: WorkloadSpec = "idle".parse().map_err(HostError::vm("the idle workload"))?;
    let config = |mem_size: u64, vcpus: u8| VmConfig {
        mem_size,
        vcpus,
        // Replaced by the source's workload when its state is restored.
        workload: idle.clone(),
    };
    // With a size, the VM is built and pre-faulted before anyone connects, as a hypervisor
    // creates the destination VM first: first-touch faults cost 2.5-14 us a page here and
    // must not land in the migration. Without it, the same happens during setup.
    let prepared = match cfg.mem_size {
        Some(mem_size) => {
            let t = Instant::now();
            let vm = Arc::new(
                Vm::new_incoming(config(mem_size, cfg.vcpus))
                    .map_err(HostError::vm("building the destination VM"))?,
            );
            tracing::info!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                "destination memory prepared"
            );
            process.set_vm(Arc::clone(&vm));
            Some(KvmMigratable::new(vm))
        }
        None => None,
    };
    let listen_err = |source| HostError::Listen {
        endpoint: cfg.listen.to_string(),
        source,
    };
    // With TLS the receiver listens privately behind the tunnel, which owns the port.
    let (listener, _tunnel) = match (&cfg.tls, &cfg.listen) {
        (None, _) => (Listener::bind(&cfg.listen).map_err(listen_err)?, None),
        (Some(files), Endpoint::Tcp(addr)) => {
            let public = std::net::TcpListener::bind(addr).map_err(|e| {
                listen_err(fastmig_migration::MigrationError::Listen {
                    endpoint: cfg.listen.to_string(),
                    source: e,
                })
            })?;
            let config = fastmig_migration::tls::server_config(files).map_err(HostError::Tls)?;
            let (tunnel, inner) = fastmig_migration::tls::DestTunnel::start(public, config)
                .map_err(HostError::Tls)?;
            (inner, Some(tunnel))
        }
        (Some(_), Endpoint::Unix(_)) => return Err(HostError::TlsNeedsTcp),
    };
    process.set_listening();
    on_event(Event::Listening {
        endpoint: &cfg.listen,
    });
    ready.signal()?;
    let opts = ReceiveOptions {
        accept_timeout: cfg.accept_timeout,
        io_timeout: cfg.io_timeout,
        // A source stopped after `Ready` must not hold us longer than any other silence.
        commit_timeout: cfg.io_timeout,
        ..ReceiveOptions::default()
    };
    let max_mem = cfg.max_mem;
    let make_vm = |layout: &VmLayout, regions: Option<Vec<HandoverRegion>>| {
        // Checked before anything is allocated: a 100-byte Hello must not make us pre-fault
        // gigabytes.
        if layout.memory_bytes() > max_mem {
            return Err(VmError::msg(format!(
                "the source announces {} bytes of guest memory, more than this destination accepts (--max-mem {max_mem} bytes)",
                layout.memory_bytes()
            )));
        }
        build_destination_vm(layout, regions, &config)
    };
    let incoming = match prepared {
        Some(vm) => IncomingVm::Prepared(vm, Box::new(make_vm)),
        None => IncomingVm::OnDemand(Box::new(make_vm)),
    };
    let (vm, summary) =
        fastmig_migration::receive(&listener, &opts, incoming).map_err(HostError::Receive)?;
    process.set_vm(Arc::clone(vm.vm()));
    process.incoming_done();
    on_event(Event::Received(&summary));
    // Only now: until the VM runs here, Ctrl-C ends the process at once (the default).
    wait_for_exit(process, termination_flag())
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

/// Writes a non-zero, page-unique pattern into every guest page from the end of the
/// workload's own pages to the end of memory. `verify` pages are left alone (its check knows
/// what each must hold); for the other workloads the whole data area is filled.
fn prefill(vm: &Vm) -> Result<(), HostError> {
    let cfg = vm.config();
    let mut start = fastmig_vmm::guest::DATA_BASE;
    if cfg.workload.kind == WorkloadKind::Verify {
        start += cfg.workload.wss;
    }
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut gpa = start;
    while gpa < cfg.mem_size {
        let len = CHUNK.min(cfg.mem_size - gpa) as usize;
        for (i, page) in buf[..len].chunks_mut(fastmig_vmm::PAGE_SIZE).enumerate() {
            let tag = (gpa / fastmig_vmm::PAGE_SIZE as u64 + i as u64) | 0x5a00_0000_0000_0000;
            for word in page.chunks_exact_mut(8) {
                word.copy_from_slice(&tag.to_le_bytes());
            }
        }
        vm.write_memory(gpa, &buf[..len])
            .map_err(HostError::vm("prefilling guest memory"))?;
        gpa += len as u64;
    }
    Ok(())
}
