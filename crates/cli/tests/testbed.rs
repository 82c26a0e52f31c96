//! `fastmig testbed up|down`: agents in network namespaces behind shaped links carry out a
//! migration ordered through `HttpAgent`; a host's link cut during another leaves that VM on
//! its source; `down` removes everything, also after `up` was killed half-way. Needs root
//! (namespaces, a bridge, `tc`) and `/dev/kvm`; without them the test says so and returns.
//! One test: a testbed uses fixed names (bridge `fmtb0`).

mod common;
mod testbed_lock;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fastmig_cluster::auth::Token;
use fastmig_cluster::http_client::HttpAgent;
use fastmig_cluster::proto::{
    HostName, MigrationId, MigrationPhase, PrepareIncoming, StartOutgoing, VmName,
};
use fastmig_cluster::AgentApi;
use fastmig_host::MigrationRequest;
use fastmig_migration::TransportKind;

/// The testbed needs root (namespaces, a bridge, `tc`) and `/dev/kvm`: without them this test
/// fails, loudly, rather than skip.
fn require_root_and_kvm() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let kvm = Path::new("/dev/kvm").exists();
    assert!(
        root && kvm,
        "the testbed test needs root and /dev/kvm (root {root}, kvm {kvm})"
    );
}

/// Brings the testbed down when the test ends, also when an assertion failed half-way (a
/// testbed left up would make every later testbed test fail).
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if self.0.join("testbed.json").exists() {
            let _ = testbed(&["down", "--dir", &self.0.to_string_lossy()]);
        }
    }
}

/// Namespaces and links named like a testbed's.
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let o = Command::new("ip").args(args).output().expect("ip");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if line.contains("fmtb") {
                out.push(line.to_string());
            }
        }
    }
    out
}

fn testbed(args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .arg("testbed")
        .args(args)
        .output()
        .expect("fastmig testbed")
}

fn agent(dir: &Path, host: &str, ip: &str) -> HttpAgent {
    let token = std::fs::read_to_string(dir.join("token")).expect("token");
    HttpAgent::new(
        HostName(host.into()),
        &format!("http://{ip}:7070"),
        &Token::new(token.trim()).expect("token"),
        Duration::from_secs(30),
    )
}

fn vm_count(a: &HttpAgent) -> usize {
    a.report().expect("report").vms.len()
}

#[test]
fn a_testbed_migrates_over_its_shaped_links_and_leaves_nothing_behind() {
    require_root_and_kvm();
    let _lock = testbed_lock::lock();
    assert!(
        leftovers().is_empty(),
        "a testbed is already up: {:?}",
        leftovers()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tb");
    let d = dir.to_str().expect("utf-8 path");
    let _down = DownOnDrop(dir.clone());

    let out = testbed(&[
        "up",
        "--hosts",
        "2",
        "--link",
        "100mbit",
        "--vms-per-host",
        "1",
        // The agents alone: this test orders migrations itself (the controller's part is in
        // `testbed_reliability.rs`).
        "--no-controller",
        "--dir",
        d,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("http://10.232.0.11:7070"), "{text}");
    let (h1, h2) = (
        agent(&dir, "h1", "10.232.0.11"),
        agent(&dir, "h2", "10.232.0.12"),
    );
    assert_eq!((vm_count(&h1), vm_count(&h2)), (1, 1));
    // A second testbed is refused and leaves the first alone.
    let other = tmp.path().join("other");
    let out = testbed(&[
        "up",
        "--hosts",
        "1",
        "--link",
        "1gbit",
        "--dir",
        other.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already up"));
    assert_eq!((vm_count(&h1), vm_count(&h2)), (1, 1));

    // vm1 from h1 to h2 over the shaped links (100 Mbit/s = 11.9 MiB/s).
    let report = h1.report().expect("report");
    let vm = report.vms[0].start_vm();
    assert_eq!(vm.vm, VmName("vm1".into()));
    let ready = h2
        .prepare_incoming(&PrepareIncoming {
            migration: MigrationId(1),
            vm,
            transport: TransportKind::Classic,
            source: HostName("h1".into()),
        })
        .expect("prepare");
    assert!(ready.uri.starts_with("10.232.0.12:"), "{}", ready.uri);
    h1.start_outgoing(&StartOutgoing {
        migration: MigrationId(1),
        vm: VmName("vm1".into()),
        destination: HostName("h2".into()),
        request: MigrationRequest::to(&ready.uri),
    })
    .expect("start");
    let start = Instant::now();
    let rec = loop {
        let r = h1.migration(MigrationId(1)).expect("record");
        if !matches!(
            r.phase,
            MigrationPhase::Running { .. } | MigrationPhase::Prepared
        ) {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{:?}", r.phase);
        std::thread::sleep(Duration::from_millis(100));
    };
    let MigrationPhase::Completed { summary: Some(s) } = rec.phase else {
        panic!("{:?}", rec.phase);
    };
    // The shaping holds: never faster than the link (with a margin for the bucket).
    assert!(
        s.throughput_mib_s < 13.0,
        "{} MiB/s over 100 Mbit/s",
        s.throughput_mib_s
    );
    assert_eq!((vm_count(&h1), vm_count(&h2)), (0, 2));

    // h1's link cut while vm2 moves from h2 to h1: the migration fails on both sides and
    // vm2 runs on h2 only. Capped below its dirty rate, it is still copying when the link
    // goes down.
    let v2 = h2
        .report()
        .expect("report")
        .vms
        .into_iter()
        .find(|v| v.vm.0 == "vm2")
        .expect("vm2 on h2");
    let ready = h1
        .prepare_incoming(&PrepareIncoming {
            migration: MigrationId(2),
            vm: v2.start_vm(),
            transport: TransportKind::Classic,
            source: HostName("h2".into()),
        })
        .expect("prepare");
    h2.start_outgoing(&StartOutgoing {
        migration: MigrationId(2),
        vm: VmName("vm2".into()),
        destination: HostName("h1".into()),
        request: MigrationRequest {
            max_bandwidth: Some(2_000_000),
            timeout: Duration::from_secs(3),
            ..MigrationRequest::to(&ready.uri)
        },
    })
    .expect("start");
    let start = Instant::now();
    while !matches!(
        h2.migration(MigrationId(2)).expect("record").phase,
        MigrationPhase::Running { progress: Some(_) }
    ) {
        assert!(start.elapsed() < Duration::from_secs(20), "not sending");
        std::thread::sleep(Duration::from_millis(20));
    }
    let link = |state: &str| {
        let st = Command::new("ip")
            .args(["-n", "fmtb-h1", "link", "set", "fmtbh1", state])
            .status()
            .expect("ip");
        assert!(st.success());
    };
    link("down");
    let ended = |a: &HttpAgent| {
        let start = Instant::now();
        loop {
            let r = a.migration(MigrationId(2)).expect("record");
            if !matches!(
                r.phase,
                MigrationPhase::Running { .. } | MigrationPhase::Prepared
            ) {
                break r.phase;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{:?}", r.phase);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let on_src = ended(&h2);
    assert!(
        matches!(on_src, MigrationPhase::Failed { .. }),
        "{on_src:?}"
    );
    link("up");
    let on_dst = ended(&h1);
    assert!(
        matches!(on_dst, MigrationPhase::Failed { .. }),
        "{on_dst:?}"
    );
    let r2 = h2.report().expect("report");
    let vm2 = r2
        .vms
        .iter()
        .find(|v| v.vm.0 == "vm2")
        .expect("vm2 still on h2");
    assert_eq!(vm2.status, fastmig_host::RunStatus::Running);
    assert_eq!(vm_count(&h1), 0);

    let out = testbed(&["down", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    assert!(!dir.exists());

    // `up` killed while it builds: `down` still removes what it had created.
    let mut up = Command::new(common::bin())
        .args([
            "testbed", "up", "--hosts", "12", "--link", "1gbit", "--dir", d,
        ])
        .spawn()
        .expect("up");
    let start = Instant::now();
    while !leftovers().iter().any(|l| l.contains("fmtb-h2")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "up made no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    up.kill().expect("kill up");
    up.wait().expect("reap");
    assert!(!leftovers().is_empty());
    let out = testbed(&["down", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    // Nothing of the testbed is left running.
    let ps = Command::new("pgrep")
        .args(["-f", d])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ps.stdout)
    );
}
