//! Soak (bounded, a few minutes, `#[ignore]`d: run it on its own):
//!
//!   cargo test -p fastmig-cli --test hardening_soak -- --ignored --nocapture
//!
//! 50 migrations of one VM back and forth between two `fastmig` processes (the side that
//! holds the VM and a fresh destination), each with a random fault at a random time: the
//! destination killed or stopped and continued, the connection cut, a byte corrupted (through
//! a proxy), or none. After each, the VM runs on exactly one side and `verify-memory` is
//! clean there. Seeded (`FASTMIG_SOAK_SEED`, default 15); prints the faults survived.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MEM: &str = "32M";
const MEM_BYTES: u64 = 32 << 20;
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";
const MIGRATIONS: usize = 50;

/// xorshift64*: enough randomness for choosing faults, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Inject {
    Nothing,
    KillDestination,
    StopContinueDestination,
    CutConnection,
    CorruptByte,
}

/// Waits until the source has sent `bytes`, or its migration is over (then `false`).
fn reached(src: &Proc, bytes: u64) -> bool {
    wait_until("bytes sent or the migration over", PATIENCE, || {
        let m = api(&src.api, "query-migrate", json!({})).ok()?;
        match m["status"].as_str()? {
            "active" => (m["progress"]["bytes_sent"].as_u64()? >= bytes).then_some(true),
            "none" => None,
            _ => Some(false),
        }
    })
}

#[test]
#[ignore = "soak: minutes of KVM migrations; CI runs it as its own step"]
fn soak_50_migrations_with_random_faults() {
    require_kvm();
    let seed = std::env::var("FASTMIG_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15u64);
    let mut rng = Rng(seed.max(1));
    let dir = workdir();
    let mut holder = Proc::run_with(dir.path(), "v0", MEM, WORKLOAD, &["--prefill"]);
    let (mut survived, mut moved) = (0u32, 0u32);
    for i in 1..=MIGRATIONS {
        let inject = match rng.below(5) {
            0 => Inject::Nothing,
            1 => Inject::KillDestination,
            2 => Inject::StopContinueDestination,
            3 => Inject::CutConnection,
            _ => Inject::CorruptByte,
        };
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let name = format!("v{i}");
        let mut dst = Proc::incoming(dir.path(), &name, &listen, MEM, &["--timeout", "1s"]);
        let at = rng.below(MEM_BYTES);
        let proxy = match inject {
            Inject::CutConnection => Some(FaultProxy::start(port, Fault::TruncateAt(at))),
            Inject::CorruptByte => Some(FaultProxy::start(port, Fault::CorruptAt(at))),
            _ => None,
        };
        let to = match &proxy {
            Some(p) => format!("127.0.0.1:{}", p.port),
            None => listen.clone(),
        };
        let transport = if proxy.is_none() && rng.below(2) == 0 {
            "multi-tcp"
        } else {
            "classic"
        };
        let client = migrate_spawn(
            dir.path(),
            &holder,
            &to,
            &[
                "--transport",
                transport,
                "--timeout",
                "1s",
                "--max-bandwidth",
                "32M",
            ],
        );
        let mut injected = match inject {
            Inject::KillDestination if reached(&holder, at) => {
                let _ = dst.child.kill();
                true
            }
            Inject::StopContinueDestination if reached(&holder, at) => {
                send_signal(dst.child.id(), libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(100 + rng.below(2000)));
                send_signal(dst.child.id(), libc::SIGCONT);
                true
            }
            _ => false,
        };
        let out = client.finish(PATIENCE);
        if let Some(p) = &proxy {
            injected = match inject {
                Inject::CutConnection => {
                    p.forwarded.load(std::sync::atomic::Ordering::Relaxed) >= at
                }
                _ => p.corrupted.load(std::sync::atomic::Ordering::Relaxed),
            };
        }
        // Where does the VM run now? Exactly one side, memory intact there.
        let dst_runs =
            dst.is_alive() && dst.try_status().is_some_and(|st| st["status"] == "running");
        if dst_runs {
            // Completed, or in doubt (stopped after Commit): the source must not run it.
            let st = holder.status();
            assert_ne!(
                st["status"], "running",
                "#{i} {inject:?}: VM on both sides: {st}"
            );
            dst.assert_memory_intact();
            holder = dst;
            moved += 1;
        } else {
            assert_ne!(
                out.code,
                Some(0),
                "#{i} {inject:?}: migrate says done but the destination does not run the VM"
            );
            holder.assert_still_runs_here();
            // A destination cut off before the handshake still waits for a source: it must
            // not run the VM; it is not needed any more.
            if let Some(st) = dst.try_status() {
                assert_ne!(st["status"], "running", "#{i} {inject:?}: {}", dst.log());
            }
            let _ = dst.child.kill();
            let _ = dst.child.wait();
            assert!(!dst.log().contains("VM running"), "#{i}: {}", dst.log());
        }
        drop(proxy);
        if injected {
            survived += 1;
        }
        println!(
            "soak #{i}: {inject:?} (injected: {injected}, {transport}) -> VM on {}",
            if holder.api.ends_with(format!("{name}.sock")) {
                "the destination"
            } else {
                "the source"
            }
        );
    }
    holder.assert_memory_intact();
    println!(
        "soak: {MIGRATIONS} migrations (seed {seed}), {moved} moved the VM, {survived} faults survived"
    );
    assert!(moved > 0, "no migration ever completed");
}
