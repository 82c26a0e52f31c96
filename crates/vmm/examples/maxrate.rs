//! Measures the highest write rate the `dirty` guest reaches on this machine (unpaced, so the
//! guest runs flat out) for each pattern: `cargo run --release -p fastmig-vmm --example maxrate`.

use std::time::{Duration, Instant};

use fastmig_vmm::{Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The working set is larger than a second's worth of writes, so distinct dirty pages per
    // second (what the dirty log sees) can match the write rate.
    let secs = 1.0;
    for (vcpus, spec) in [
        (1, "dirty:rate=0,wss=256M,pattern=seq"),
        (1, "dirty:rate=0,wss=256M,pattern=random"),
        (1, "dirty:rate=0,wss=256M,pattern=hotcold"),
        (2, "dirty:rate=0,wss=256M,pattern=seq"),
    ] {
        let vm = Vm::new(VmConfig {
            mem_size: 320 << 20,
            vcpus,
            workload: spec.parse()?,
        })?;
        let log = vm.dirty_log()?;
        vm.start()?;
        // Warm up until the working set has been written about twice: the first touch of
        // each page (shmem allocation plus KVM's mapping fault) costs far more than a write.
        let wss_pages = vm.config().workload.wss / 4096;
        let warm = Instant::now();
        while vm.status().pages_written < 2 * wss_pages && warm.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
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
