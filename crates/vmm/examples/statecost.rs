//! Measures the VMM-side pieces of a migration's downtime on this machine: how long `pause`
//! takes to park the vCPUs, how long `save_state`/`restore_state` take and how big the
//! encoded state is, and how long `Vm::new_incoming` spends pre-faulting memory.
//! `cargo run --release -p fastmig-vmm --example statecost`

use std::time::{Duration, Instant};

use fastmig_vmm::{Vm, VmConfig, VmState};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for vcpus in [1u8, 2] {
        let cfg = VmConfig {
            mem_size: 64 << 20,
            vcpus,
            workload: "verify:rate=20000,wss=32M,pattern=random".parse()?,
        };
        let vm = Vm::new(cfg.clone())?;
        vm.start()?;
        std::thread::sleep(Duration::from_millis(300));
        let (mut pause, mut save, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..20 {
            let t = Instant::now();
            vm.pause()?;
            pause.push(t.elapsed());
            let t = Instant::now();
            let st = vm.save_state()?;
            save.push(t.elapsed());
            let bytes = st.to_bytes()?;
            size = bytes.len();
            let dst = Vm::new(cfg.clone())?;
            let t = Instant::now();
            dst.restore_state(&VmState::from_bytes(&bytes)?)?;
            restore.push(t.elapsed());
            vm.resume()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "vcpus={vcpus}: pause {:?}, save_state {:?}, restore_state {:?} (medians of 20), encoded state {size} bytes",
            median(pause),
            median(save),
            median(restore)
        );
    }
    for mib in [64u64, 256] {
        let t = Instant::now();
        let _vm = Vm::new_incoming(VmConfig {
            mem_size: mib << 20,
            vcpus: 1,
            workload: "idle".parse()?,
        })?;
        println!("new_incoming {mib} MiB (pre-faulted): {:?}", t.elapsed());
    }
    Ok(())
}
