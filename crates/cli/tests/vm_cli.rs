//! End-to-end tests of `fastmig run`/`status`/`ctl`/`demo` and the control socket, running the
//! built binary. They start real KVM guests and fail loudly without /dev/kvm.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fastmig")
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm; it is missing on this machine"
    );
}

fn fastmig(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("the fastmig binary runs")
}

fn socket_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    (dir, path)
}

/// A `fastmig run` child, killed on drop if still alive.
struct RunningVm {
    child: Child,
}

impl RunningVm {
    fn start(api: &Path, extra: &[&str]) -> RunningVm {
        require_kvm();
        let mut args = vec!["run", "--api", api.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        let child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fastmig run");
        let vm = RunningVm { child };
        wait_for("the control socket", || UnixStream::connect(api).is_ok());
        vm
    }

    fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "fastmig run did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw control-socket session: one line out, one line back.
struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Session {
    fn open(path: &Path) -> Session {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Session {
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
        }
    }

    fn send_raw(&mut self, line: &str) -> Value {
        writeln!(self.writer, "{line}").expect("send");
        let mut reply = String::new();
        self.reader.read_line(&mut reply).expect("reply");
        serde_json::from_str(&reply).expect("reply is JSON")
    }

    fn execute(&mut self, cmd: &str) -> Value {
        self.send_raw(&format!(r#"{{"execute": "{cmd}"}}"#))
    }

    fn ok(&mut self, cmd: &str) -> Value {
        let reply = self.execute(cmd);
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{cmd} failed: {reply}"))
    }

    fn progress(&mut self) -> u64 {
        self.ok("query-status")["progress"]
            .as_u64()
            .expect("progress")
    }
}

fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
}

#[test]
fn bad_run_input_is_one_line_and_exit_code_two() {
    assert_usage_error(
        &fastmig(&["run", "--workload", "bogus"]),
        "unknown workload",
    );
    assert_usage_error(&fastmig(&["run", "--workload", "dirty:rate=fast"]), "rate");
    assert_usage_error(&fastmig(&["run", "--workload", "dirty:wss"]), "key=value");
    assert_usage_error(&fastmig(&["run", "--mem", "64Q"]), "size `64Q`");
    assert_usage_error(
        &fastmig(&["run", "--mem", "2M", "--workload", "verify:wss=8M"]),
        "too small",
    );
    assert_usage_error(&fastmig(&["run", "--vcpus", "0"]), "vcpus");
    // clap's own errors use exit code 2 as well.
    assert_eq!(fastmig(&["run", "--vcpus", "many"]).status.code(), Some(2));
}

#[test]
fn a_missing_dev_kvm_is_a_usage_error() {
    // Hide /dev/kvm in a private mount namespace (we are root on the test machines).
    let unshare = Path::new("/usr/bin/unshare");
    assert!(unshare.exists(), "this test needs util-linux unshare");
    let out = Command::new(unshare)
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {} run --mem 16M --workload idle",
            bin()
        ))
        .output()
        .expect("unshare runs");
    assert_usage_error(&out, "/dev/kvm");
}

#[test]
fn status_of_a_socket_nobody_serves_fails() {
    let (_dir, path) = socket_path("none.sock");
    let out = fastmig(&["status", "--api", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn control_socket_drives_stop_cont_status_and_quit() {
    let (_dir, path) = socket_path("vm.sock");
    let mut vm = RunningVm::start(
        &path,
        &[
            "--mem",
            "32M",
            "--vcpus",
            "2",
            "--workload",
            "dirty:rate=4000,wss=8M,pattern=random",
        ],
    );
    let api = path.to_str().expect("utf-8");
    let mut s = Session::open(&path);
    let info = s.ok("query-vm");
    assert_eq!(info["mem_size"], 32 << 20);
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["workload"], "dirty:rate=4000,wss=8M,pattern=random");

    let p0 = s.progress();
    wait_for("progress", || s.progress() > p0 + 100);
    let out = fastmig(&["status", "--api", api, "--json"]);
    assert!(out.status.success());
    let st: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(st["status"], "running");
    assert!(st["dirty_rate_pps"].as_f64().is_some());
    let human = String::from_utf8_lossy(&fastmig(&["status", "--api", api]).stdout).to_string();
    assert!(human.contains("status: running"), "{human}");

    assert_eq!(s.ok("stop"), serde_json::json!({}));
    let frozen = s.progress();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.progress(), frozen);
    assert_eq!(s.ok("query-status")["status"], "paused");
    s.ok("cont");
    wait_for("progress after cont", || s.progress() > frozen);

    // Malformed requests get error replies and the session keeps working.
    for (line, class) in [
        ("this is not json", "GenericError"),
        ("[1, 2]", "GenericError"),
        (r#"{"arguments": {}}"#, "GenericError"),
        (r#"{"execute": 5}"#, "GenericError"),
        (r#"{"execute": "stop", "arguments": 3}"#, "GenericError"),
        (
            r#"{"execute": "stop", "arguments": {"now": true}}"#,
            "GenericError",
        ),
        (r#"{"execute": "self-destruct"}"#, "CommandNotFound"),
        (r#"{"execute": "verify-memory"}"#, "GenericError"),
    ] {
        let reply = s.send_raw(line);
        assert_eq!(reply["error"]["class"], class, "{line} -> {reply}");
        assert!(reply["error"]["desc"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
    }
    let reply = s.send_raw(r#"{"execute": "query-status", "id": "abc"}"#);
    assert_eq!(reply["id"], "abc");
    assert_eq!(reply["return"]["status"], "running");
    // An oversized line is refused without crashing the server.
    let mut big = Session::open(&path);
    let reply = big.send_raw(&"x".repeat(100_000));
    assert!(reply.get("error").is_some());
    assert!(
        big.ok("query-status").is_object(),
        "the session goes on after an overlong line"
    );
    assert!(Session::open(&path).ok("query-status").is_object());

    assert_eq!(s.ok("quit"), serde_json::json!({}));
    assert_eq!(vm.exit_code(), 0);
    assert!(!path.exists(), "the socket is removed on quit");
}

#[test]
fn verify_memory_over_the_socket_reports_no_errors() {
    let (_dir, path) = socket_path("verify.sock");
    let _vm = RunningVm::start(
        &path,
        &[
            "--mem",
            "16M",
            "--workload",
            "verify:rate=5000,wss=4M,pattern=hotcold",
        ],
    );
    let mut s = Session::open(&path);
    wait_for("writes", || s.progress() > 2000);
    let report = s.ok("verify-memory");
    assert_eq!(report["pages_checked"], 1024);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(s.ok("query-status")["status"], "running");
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly_and_remove_the_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (_dir, path) = socket_path("sig.sock");
        let mut vm = RunningVm::start(&path, &["--mem", "16M", "--workload", "idle"]);
        let pid = libc::pid_t::try_from(vm.child.id()).expect("pid fits");
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        assert_eq!(vm.exit_code(), 0, "signal {sig}");
        assert!(!path.exists(), "socket left behind after signal {sig}");
    }
}

#[test]
fn a_second_vm_cannot_take_a_live_socket() {
    let (_dir, path) = socket_path("busy.sock");
    let _vm = RunningVm::start(&path, &["--mem", "16M", "--workload", "idle"]);
    let out = fastmig(&[
        "run",
        "--mem",
        "16M",
        "--api",
        path.to_str().expect("utf-8"),
    ]);
    assert_usage_error(&out, "in use");
    assert!(Session::open(&path).ok("query-status").is_object());
}

#[test]
fn demo_migrates_a_verify_vm_and_checks_it_on_the_destination() {
    require_kvm();
    let out = fastmig(&["demo", "--json", "--warmup-s", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout} {stderr}");
    // Under --json, stdout is exactly the migration summary; the narration goes to stderr.
    let summary: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["digest_match"], true, "{summary}");
    assert!(summary["pages_sent"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(
        stderr.contains("verify-memory on the destination") && stderr.contains(" 0 errors"),
        "{stderr}"
    );
}
