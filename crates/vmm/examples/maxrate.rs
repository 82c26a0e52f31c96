//! Measures the highest write rate the `dirty` guest reaches on this machine (unpaced, so the
//! guest runs flat out) for each pattern: `cargo run --release -p fastmig-vmm --example maxrate`.

use std::time::{Duration, Instant};

use fastmig_vmm::{Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The working set is larger than a second's worth of writes, so distinct dirty pages per
    // second (what the dirty log sees) can match the write rate.
    let secs = 1.0;
    for (vcpus, spec) in [
        (1, "dirty:rate=0,wss=480M,pattern=seq"),
        (1, "dirty:rate=0,wss=480M,pattern=random"),
        (1, "dirty:rate=0,wss=480M,pattern=hotcold"),
        (2, "dirty:rate=0,wss=480M,pattern=seq"),
    ] {
        let vm = Vm::new(VmConfig {
            mem_size: 512 << 20,
            vcpus,
            workload: spec.parse()?,
        })?;
        let log = vm.dirty_log()?;
        vm.start()?;
        std::thread::sleep(Duration::from_millis(500));
        let p0 = vm.status().pages_written;
        log.fetch()?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let dirty = log.fetch()?.count();
        let p1 = vm.status().pages_written;
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "{spec} vcpus={vcpus}: {:.0} page writes/s, {:.0} distinct dirty pages/s (KVM dirty log)",
            (p1 - p0) as f64 / dt,
            dirty as f64 / dt
        );
        vm.shutdown();
    }
    Ok(())
}
