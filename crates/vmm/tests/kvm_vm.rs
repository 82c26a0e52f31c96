//! End-to-end tests on a real KVM VM. They need `/dev/kvm` and fail loudly without it.

use std::time::{Duration, Instant};

use fastmig_vmm::{
    KvmDirtyLog, Vm, VmConfig, VmRunState, VmState, VmmError, WorkloadSpec, PAGE_SIZE,
};

fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm; it is missing on this machine"
    );
}

fn config(mem_mib: u64, vcpus: u8, spec: &str) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        workload: spec.parse().expect("test spec parses"),
    }
}

fn started(cfg: VmConfig) -> Vm {
    require_kvm();
    let vm = Vm::new(cfg).expect("VM builds");
    vm.start().expect("VM starts");
    vm
}

/// Polls until `cond` holds, failing after a generous deadline (this is not a timing test).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_progress_grows(vm: &Vm) {
    let p0 = vm.status().progress;
    wait_for("progress to grow", || vm.status().progress > p0 + 5);
    assert_eq!(vm.status().state, VmRunState::Running);
}

#[test]
fn every_workload_runs_and_its_progress_grows() {
    for (vcpus, spec) in [
        (1, "idle"),
        (2, "idle"),
        (1, "dirty:rate=2000,wss=4M,pattern=random"),
        (2, "dirty:rate=2000,wss=4M,pattern=hotcold"),
        (1, "verify:rate=2000,wss=4M,pattern=seq"),
        (1, "fill"),
    ] {
        let vm = started(config(16, vcpus, spec));
        assert_progress_grows(&vm);
        let st = vm.status();
        if spec.starts_with("idle") {
            assert_eq!(st.pages_written, 0);
            assert!(st.heartbeats > 0);
        } else {
            assert!(st.pages_written > 0, "{spec}: {st:?}");
        }
        vm.shutdown();
        assert_eq!(vm.status().state, VmRunState::Stopped);
    }
}

#[test]
fn fill_writes_every_page_then_idles() {
    let vm = started(config(8, 2, "fill"));
    let data_pages = ((8 << 20) - fastmig_vmm::guest::DATA_BASE) / PAGE_SIZE as u64;
    wait_for("fill to finish and heartbeats to start", || {
        let s = vm.status();
        s.pages_written == data_pages && s.heartbeats > 3
    });
    vm.pause().expect("pause");
    let mut page = vec![0u8; PAGE_SIZE];
    for gpa in (0..8u64 << 20).step_by(PAGE_SIZE) {
        vm.read_memory(gpa, &mut page).expect("read");
        assert!(page.iter().any(|&b| b != 0), "page {gpa:#x} is all zero");
    }
    assert_eq!(
        vm.status().pages_written,
        data_pages,
        "fill writes each page once"
    );
}

#[test]
fn dirty_rate_measured_by_the_dirty_log_is_near_the_target() {
    // seq over 4096 pages at 2000 pages/s: every write in a 1 s window hits a distinct page,
    // so distinct dirty pages per second should equal the write rate.
    let target = 2000.0;
    let vm = started(config(32, 1, "dirty:rate=2000,wss=16M,pattern=seq"));
    let log = vm.dirty_log().expect("subscribe");
    std::thread::sleep(Duration::from_millis(300));
    log.fetch().expect("fetch");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let bitmap = log.fetch().expect("fetch");
    let measured = bitmap.count() as f64 / t0.elapsed().as_secs_f64();
    assert!(
        (measured - target).abs() < 0.2 * target,
        "dirty log saw {measured:.0} pages/s, target {target}"
    );
    // Every dirty page lies in the working set.
    let first = fastmig_vmm::guest::DATA_BASE / PAGE_SIZE as u64;
    assert!(bitmap.iter_set().all(|p| p >= first && p < first + 4096));
    wait_for("the monitor's rate to settle", || {
        (vm.status().dirty_rate_pps - target).abs() < 0.2 * target
    });
}

#[test]
fn a_new_workload_rate_is_followed_carried_in_the_state_and_still_verifies() {
    // seq over 4096 pages: distinct dirty pages/s equal the write rate, as above.
    let vm = started(config(32, 1, "verify:rate=2000,wss=16M,pattern=seq"));
    wait_for("the first rate", || {
        (vm.status().dirty_rate_pps - 2000.0).abs() < 400.0
    });
    vm.set_workload_rate(500)
        .expect("a paced workload takes a new rate");
    assert_eq!(vm.config().workload.rate, 500);
    // A whole second at the new rate, not a burst or a stall.
    wait_for("the monitor to see the new rate", || {
        (vm.status().dirty_rate_pps - 500.0).abs() < 100.0
    });
    vm.pause().expect("pause");
    assert_eq!(vm.save_state().expect("save").workload.rate, 500);
    assert!(vm.verify_memory().expect("verify").is_clean());
    assert!(matches!(
        vm.set_workload_rate(0),
        Err(VmmError::NotPaced(_))
    ));
    let idle = started(config(16, 1, "idle"));
    assert!(matches!(
        idle.set_workload_rate(100),
        Err(VmmError::NotPaced(_))
    ));
}

#[test]
fn the_working_set_is_the_distinct_pages_of_the_last_seconds() {
    // 1,024 pages written in order at 2,000 pages/s: every page within a second, again and
    // again. The rate stays near 2,000/s while the working set stops at the 1,024 pages
    // (plus the few the guest's own code touches).
    let vm = started(config(32, 1, "dirty:rate=2000,wss=4M,pattern=seq"));
    wait_for("the working set to cover the 1,024 pages", || {
        vm.status().working_set_pages.is_some_and(|w| w >= 1024)
    });
    let ws = vm.status().working_set_pages.unwrap_or(0);
    assert!(
        ws <= 1024 + 64,
        "working set {ws} pages of a 1,024-page sweep"
    );
    assert!(vm.status().dirty_rate_pps > 1.2 * 1024.0 / 2.0);
}

#[test]
fn two_dirty_log_subscribers_each_see_every_page() {
    let vm = started(config(16, 1, "dirty:rate=3000,wss=4M,pattern=random"));
    let a = vm.dirty_log().expect("a");
    let b = vm.dirty_log().expect("b");
    std::thread::sleep(Duration::from_millis(300));
    let a1 = a.fetch().expect("a fetch");
    std::thread::sleep(Duration::from_millis(200));
    // Paused, so that no page is written between a's second fetch and b's.
    vm.pause().expect("pause");
    let a2 = a.fetch().expect("a fetch");
    let b_all = b.fetch().expect("b fetch");
    assert!(a1.count() > 0 && a2.count() > 0);
    // b's single fetch covers both of a's intervals.
    let mut union = KvmDirtyLog {
        words: a1.words.clone(),
    };
    for (u, w) in union.words.iter_mut().zip(&a2.words) {
        *u |= *w;
    }
    assert_eq!(b_all, union);
    let _ = a.fetch().expect("drain");
    assert_eq!(
        a.fetch().expect("paused fetch").count(),
        0,
        "a paused guest dirties nothing"
    );
}

#[test]
fn stop_freezes_progress_and_cont_resumes_it() {
    let vm = started(config(16, 2, "dirty:rate=5000,wss=8M,pattern=random"));
    assert_progress_grows(&vm);
    vm.pause().expect("pause");
    assert_eq!(vm.status().state, VmRunState::Paused);
    let frozen = vm.status().progress;
    let log = vm.dirty_log().expect("subscribe");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.status().progress, frozen, "progress moved while paused");
    assert_eq!(
        log.fetch().expect("fetch").count(),
        0,
        "pages dirtied while paused"
    );
    assert_eq!(vm.status().dirty_rate_pps, 0.0);
    vm.resume().expect("resume");
    wait_for("progress after cont", || vm.status().progress > frozen);
    // Idle guests park too.
    let idle = started(config(16, 1, "idle"));
    assert_progress_grows(&idle);
    idle.pause().expect("pause idle");
    let beats = idle.status().heartbeats;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(idle.status().heartbeats, beats);
}

#[test]
fn save_state_needs_a_paused_vm_and_restore_a_fresh_one() {
    let vm = started(config(16, 1, "verify:rate=1000,wss=4M,pattern=seq"));
    assert!(matches!(vm.save_state(), Err(VmmError::InvalidState(_))));
    vm.pause().expect("pause");
    let st = vm.save_state().expect("save");
    assert!(matches!(
        vm.restore_state(&st),
        Err(VmmError::InvalidState(_))
    ));
    // A destination of another memory size must refuse the state.
    let other =
        Vm::new_incoming(config(32, 1, "verify:rate=1000,wss=4M,pattern=seq")).expect("incoming");
    assert!(matches!(
        other.restore_state(&st),
        Err(VmmError::InvalidState(_))
    ));
    assert!(
        other.start().is_err(),
        "an incoming VM must not start without state"
    );
    // A state whose XSAVE area has the wrong size is refused, not truncated or padded.
    let same =
        Vm::new_incoming(config(16, 1, "verify:rate=1000,wss=4M,pattern=seq")).expect("incoming");
    let mut short = st.clone();
    short.vcpus[0].xsave.pop();
    assert!(matches!(
        same.restore_state(&short),
        Err(VmmError::StateDecode(
            fastmig_vmm::DecodeError::Field { .. }
        ))
    ));
    same.restore_state(&st).expect("the intact state restores");
}

/// The canonical text of a workload spec.
fn spec_of(spec: &str) -> String {
    spec.parse::<fastmig_vmm::WorkloadSpec>()
        .expect("spec")
        .to_string()
}

/// Copies all guest memory from `src` to `dst` through the public memory API.
fn copy_memory(src: &Vm, dst: &Vm) {
    let mut buf = vec![0u8; 1 << 20];
    let size = src.config().mem_size;
    for gpa in (0..size).step_by(buf.len()) {
        let len = buf.len().min((size - gpa) as usize);
        src.read_memory(gpa, &mut buf[..len]).expect("read");
        dst.write_memory(gpa, &buf[..len]).expect("write");
    }
}

#[test]
fn snapshot_round_trip_continues_where_it_stopped_with_no_lost_write() {
    for (vcpus, spec) in [
        (1, "verify:rate=5000,wss=4M,pattern=random"),
        (
            2,
            "verify:rate=6000,wss=4M,pattern=hotcold,hot=0.2,hotw=0.8",
        ),
    ] {
        let cfg = config(16, vcpus, spec);
        let src = started(cfg.clone());
        wait_for("some writes", || src.status().pages_written > 500);
        src.pause().expect("pause");
        let report = src.verify_memory().expect("verify source");
        assert_eq!(report.errors, 0, "{:?}", report.first_errors);
        assert!(report.writes_replayed > 500);
        let at_pause = src.status().progress;
        let state =
            VmState::from_bytes(&src.save_state().expect("save").to_bytes().expect("encode"))
                .expect("decode");
        // Saving twice gives the same state, except the TSC, which counts even while paused.
        let without_tsc = |mut st: VmState| {
            for v in &mut st.vcpus {
                v.msrs.retain(|&(index, _)| index != 0x10);
            }
            st
        };
        assert_eq!(
            without_tsc(state.clone()),
            without_tsc(src.save_state().expect("save twice")),
            "save has no side effects"
        );

        // The destination is built before it knows the workload (as `fastmig incoming`
        // does): restoring adopts the source's.
        let dst = Vm::new_incoming(config(16, vcpus, "idle")).expect("incoming");
        assert_eq!(dst.status().state, VmRunState::Incoming);
        copy_memory(&src, &dst);
        src.shutdown();
        dst.restore_state(&state).expect("restore");
        assert_eq!(dst.config().workload.to_string(), spec_of(spec));
        assert_eq!(
            dst.status().progress,
            at_pause,
            "progress restored, not reset"
        );
        dst.start().expect("start restored");
        wait_for("progress past the snapshot", || {
            dst.status().progress > at_pause + 1000
        });
        let report = dst.verify_memory().expect("verify destination");
        assert_eq!(report.errors, 0, "{:?}", report.first_errors);
        assert!(report.writes_replayed > at_pause + 1000);
        assert_eq!(report.pages_checked, 1024);
        assert_eq!(
            dst.status().state,
            VmRunState::Running,
            "verify resumes a running VM"
        );
    }
}

#[test]
fn verify_catches_a_lost_and_a_misplaced_write() {
    let vm = started(config(16, 1, "verify:rate=4000,wss=4M,pattern=seq"));
    wait_for("a full sweep", || vm.status().pages_written > 1100);
    vm.pause().expect("pause");
    assert_eq!(vm.verify_memory().expect("verify").errors, 0);
    let base = fastmig_vmm::guest::DATA_BASE;
    // A lost write: page 3 goes back to an older sequence number.
    let mut stamp = [0u8; 16];
    vm.read_memory(base + 3 * PAGE_SIZE as u64, &mut stamp)
        .expect("read");
    let seq = u64::from_le_bytes(stamp[..8].try_into().expect("8 bytes"));
    vm.write_memory(base + 3 * PAGE_SIZE as u64, &(seq - 1024).to_le_bytes())
        .expect("write");
    // A misplaced write: page 5's frame number points elsewhere.
    vm.write_memory(base + 5 * PAGE_SIZE as u64 + 8, &7u64.to_le_bytes())
        .expect("write");
    let report = vm.verify_memory().expect("verify");
    assert_eq!(report.errors, 2, "{:?}", report.first_errors);
    let dirty = Vm::new(config(16, 1, "dirty:wss=4M")).expect("dirty vm");
    assert!(matches!(
        dirty.verify_memory(),
        Err(VmmError::NotVerifiable(_))
    ));
}

#[test]
fn memory_is_a_shared_memfd_that_can_be_adopted() {
    require_kvm();
    let cfg = config(16, 1, "verify:rate=3000,wss=4M,pattern=random");
    let src = Vm::new(cfg.clone()).expect("vm");
    src.start().expect("start");
    wait_for("writes", || src.status().pages_written > 300);
    src.pause().expect("pause");
    let state = src.save_state().expect("save");
    let region = src.memory_regions()[0];
    assert_eq!(
        (region.guest_addr, region.size, region.fd_offset),
        (0, 16 << 20, 0)
    );
    // SAFETY: dup of the VM's live memfd; the result is checked.
    let dup = unsafe { libc::dup(region.fd) };
    assert!(dup >= 0);
    // SAFETY: `dup` is a fresh fd nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    src.shutdown();
    drop(src);
    let adopted = Vm::from_memory_fd(cfg, fd).expect("adopt");
    adopted.restore_state(&state).expect("restore");
    adopted.start().expect("start");
    wait_for("progress", || {
        adopted.status().pages_written > state.vcpus[0].workload.pages_done + 300
    });
    let report = adopted.verify_memory().expect("verify");
    assert_eq!(report.errors, 0, "{report:?}");
}

#[test]
fn bad_configs_are_clear_errors() {
    require_kvm();
    for cfg in [
        config(1, 1, "dirty:wss=4M"),
        config(16, 0, "idle"),
        config(16, 17, "idle"),
        config(4096, 1, "idle"),
        config(16, 4, "dirty:wss=8K"),
    ] {
        match Vm::new(cfg.clone()) {
            Err(e @ VmmError::InvalidConfig(_)) => assert!(e.is_usage()),
            Err(e) => panic!("{cfg:?}: wrong error {e}"),
            Ok(_) => panic!("{cfg:?} was accepted"),
        }
    }
    let odd = VmConfig {
        mem_size: (16 << 20) + 1,
        vcpus: 1,
        workload: WorkloadSpec::new(fastmig_vmm::WorkloadKind::Idle),
    };
    assert!(Vm::new(odd).is_err());
}

#[test]
fn an_unexpected_exit_fails_the_vm_with_a_clear_error() {
    let code = fastmig_vmm::guest::CODE_ADDR;
    // `out 0x99, al` where the mailbox `in` was: a port nobody handles.
    // `ud2` with no IDT: the #UD escalates to a triple fault, i.e. KVM_EXIT_SHUTDOWN.
    for (patch, needle) in [
        (&[0xe6u8, 0x99][..], "IoOut"),
        (&[0x0f, 0x0b][..], "Shutdown"),
    ] {
        let vm = started(config(16, 1, "dirty:rate=2000,wss=4M,pattern=seq"));
        assert_progress_grows(&vm);
        vm.pause().expect("pause");
        vm.write_memory(code, patch).expect("patch the program");
        vm.resume().expect("resume");
        wait_for("the VM to fail", || {
            matches!(vm.status().state, VmRunState::Failed(_))
        });
        let VmRunState::Failed(why) = vm.status().state else {
            unreachable!("checked above")
        };
        assert!(why.contains(needle) && why.contains("rip"), "{why}");
        assert!(matches!(vm.pause(), Err(VmmError::VcpuFailed(_))));
        assert!(matches!(vm.resume(), Err(VmmError::VcpuFailed(_))));
        vm.shutdown();
    }
}

/// One page of a paused `verify` VM, tampered with in one of three ways, is the one error
/// the checker reports, by address.
#[test]
fn verify_names_the_one_tampered_page() {
    let spec = "verify:rate=4000,wss=1M,pattern=random,seed=5";
    let base = fastmig_vmm::guest::DATA_BASE;
    let read_stamp = |vm: &Vm, gpa: u64| {
        let mut stamp = [0u8; 16];
        vm.read_memory(gpa, &mut stamp).expect("read");
        stamp
    };
    let expect_only = |vm: &Vm, gpa: u64, how: &str| {
        let report = vm.verify_memory().expect("verify");
        assert_eq!(report.errors, 1, "{how}: {:?}", report.first_errors);
        let needle = format!("page {gpa:#x}:");
        assert!(
            report.first_errors[0].contains(&needle),
            "{how}: {:?} does not name {gpa:#x}",
            report.first_errors
        );
    };
    // A second guest with another seed writes the same slice in another order.
    let other = started(config(
        16,
        1,
        "verify:rate=4000,wss=1M,pattern=random,seed=6",
    ));
    let vm = started(config(16, 1, spec));
    wait_for("every page written at least twice", || {
        vm.status().pages_written > 1500 && other.status().pages_written > 1500
    });
    vm.pause().expect("pause");
    other.pause().expect("pause");
    assert_eq!(vm.verify_memory().expect("verify").errors, 0);

    // A stale stamp: the page holds an older sequence number (same frame number).
    let gpa = base + 17 * PAGE_SIZE as u64;
    let good = read_stamp(&vm, gpa);
    let seq = u64::from_le_bytes(good[..8].try_into().expect("8 bytes"));
    assert!(seq > 0, "page 17 was written");
    vm.write_memory(gpa, &(seq - 1).to_le_bytes())
        .expect("write");
    expect_only(&vm, gpa, "stale stamp");
    vm.write_memory(gpa, &good).expect("restore");

    // A lost write: the page is zero again, as if the destination never received it.
    let gpa = base + 100 * PAGE_SIZE as u64;
    let good = read_stamp(&vm, gpa);
    vm.write_memory(gpa, &[0u8; 16]).expect("write");
    expect_only(&vm, gpa, "lost write");
    vm.write_memory(gpa, &good).expect("restore");

    // A page from the wrong guest: same frame number, the other seed's sequence number.
    let gpa = (0..256)
        .map(|p| base + p * PAGE_SIZE as u64)
        .find(|&gpa| read_stamp(&vm, gpa) != read_stamp(&other, gpa))
        .expect("two seeds leave some page different");
    let good = read_stamp(&vm, gpa);
    vm.write_memory(gpa, &read_stamp(&other, gpa))
        .expect("write");
    expect_only(&vm, gpa, "page from another seed");
    vm.write_memory(gpa, &good).expect("restore");
    assert_eq!(vm.verify_memory().expect("verify").errors, 0);
}

#[test]
fn verify_is_exact_wherever_a_pause_lands() {
    // Unpaced, the guest is almost always inside its write loop, so the pauses land between
    // arbitrary instructions, including between the two stores of a stamp. A 16-page working
    // set makes every page's last stamp change constantly; a 16M one keeps many pages
    // never written, where a half-written stamp (frame number only) is visible.
    for spec in [
        "verify:rate=0,wss=64K,pattern=random",
        "verify:rate=0,wss=16M,pattern=random",
    ] {
        let vm = started(config(32, 2, spec));
        let mut last_replayed = 0;
        for round in 0..100 {
            vm.pause().expect("pause");
            let report = vm.verify_memory().expect("verify");
            assert_eq!(
                report.errors, 0,
                "{spec} round {round}: {:?}",
                report.first_errors
            );
            assert!(report.writes_replayed >= last_replayed);
            last_replayed = report.writes_replayed;
            vm.resume().expect("resume");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            last_replayed > 1000,
            "the guest barely ran: {last_replayed}"
        );
    }
}

#[test]
fn concurrent_callers_neither_deadlock_nor_corrupt_the_guest() {
    // The control socket, a migration and the rate monitor all use the VM at once.
    let vm = std::sync::Arc::new(started(config(
        16,
        2,
        "verify:rate=8000,wss=2M,pattern=random",
    )));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let vm = std::sync::Arc::clone(&vm);
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let log = vm.dirty_log().expect("subscribe");
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    match (w + i) % 4 {
                        // A pause can lose a race with another caller's resume; that is an
                        // error, not a hang.
                        0 => {
                            if vm.pause().is_ok() {
                                let _ = vm.save_state();
                            }
                            let _ = vm.resume();
                        }
                        1 => {
                            let report = vm.verify_memory();
                            if let Ok(r) = report {
                                assert_eq!(r.errors, 0, "{:?}", r.first_errors);
                            }
                        }
                        2 => {
                            log.fetch().expect("fetch");
                        }
                        _ => {
                            let _ = vm.status();
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker finished without panicking");
    }
    let _ = vm.resume();
    assert_progress_grows(&vm);
    vm.pause().expect("final pause");
    let report = vm.verify_memory().expect("final verify");
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
}

#[test]
fn another_process_sees_guest_writes_through_the_memfd() {
    let vm = started(config(16, 1, "verify:rate=3000,wss=4M,pattern=seq"));
    wait_for("a few writes", || vm.status().pages_written > 10);
    vm.pause().expect("pause");
    let region = vm.memory_regions()[0];
    let page = fastmig_vmm::guest::DATA_BASE / PAGE_SIZE as u64 + 3;
    // `dd` opens the memfd through /proc, i.e. an independent open of the same pages.
    let out = std::process::Command::new("dd")
        .arg(format!("if=/proc/{}/fd/{}", std::process::id(), region.fd))
        .args(["bs=4096", "count=1", "status=none"])
        .arg(format!("skip={page}"))
        .output()
        .expect("dd runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ours = vec![0u8; PAGE_SIZE];
    vm.read_memory(page * PAGE_SIZE as u64, &mut ours)
        .expect("read");
    assert_eq!(out.stdout, ours);
    assert_eq!(
        u64::from_le_bytes(out.stdout[8..16].try_into().expect("8 bytes")),
        page
    );
}
