//! The CLI's conventions across every subcommand: one exit-code rule (2: the command line or
//! the request must change; 1: a failure while running), one stderr line per error,
//! readiness for scripts (`--ready-file`, `--daemonize`, `--wait`), `ctl --arg`, shell
//! completions and the man page, and the control socket's path rules seen from the binary.
//!
//! The `run`, `demo` and readiness cases start KVM guests and fail (never skip) without
//! /dev/kvm.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// One subcommand invocation and the exit code it must give.
struct Case<'a> {
    what: &'a str,
    args: Vec<String>,
    code: i32,
    /// A word the stderr line must contain.
    needle: &'a str,
    /// Environment overrides.
    env: &'a [(&'a str, &'a str)],
    /// Send stdout to /dev/full (a write that fails at run time).
    stdout_full: bool,
}

fn case<'a>(what: &'a str, args: &[&str], code: i32, needle: &'a str) -> Case<'a> {
    Case {
        what,
        args: args.iter().map(|s| s.to_string()).collect(),
        code,
        needle,
        env: &[],
        stdout_full: false,
    }
}

fn run_case(c: &Case) {
    let mut cmd = Command::new(bin());
    cmd.args(&c.args).stdin(Stdio::null());
    for (k, v) in c.env {
        cmd.env(k, v);
    }
    if c.stdout_full {
        cmd.stdout(std::fs::File::create("/dev/full").expect("/dev/full"));
    }
    let out = cmd.output().expect("fastmig runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        // `run` and `incoming` report progress before they fail; the error is the last line.
        .filter(|l| !l.contains("VM running:") && !l.contains("waiting for an incoming"))
        .collect();
    assert_eq!(
        out.status.code(),
        Some(c.code),
        "{}: {:?} stderr: {stderr}",
        c.what,
        c.args
    );
    assert_eq!(
        lines.len(),
        1,
        "{}: one error line expected: {stderr:?}",
        c.what
    );
    assert!(
        lines[0].to_lowercase().contains(&c.needle.to_lowercase()),
        "{}: {:?} should mention {:?}",
        c.what,
        lines[0],
        c.needle
    );
}

#[test]
fn every_subcommand_follows_the_exit_code_rule() {
    require_kvm();
    let dir = workdir();
    let d = dir.path();
    let missing = d.join("nobody.sock");
    let missing = path_str(&missing);
    let unready = d.join("no-such-dir").join("ready");
    let results = d.join("results.json");
    std::fs::write(
        &results,
        r#"{"medians": {"classic": {"total_ms": 1.0, "downtime_ms": 1.0, "cpu_s_per_gib": 1.0}},
            "mem_bytes": 16777216, "workload": "idle"}"#,
    )
    .expect("results");
    let trace = d.join("tiny.csv");
    std::fs::write(&trace, "vm0,10,20,30\nvm1,50,50,50\n").expect("trace");
    let chart_out = d.join("no-such-dir").join("chart.svg");
    let bench_out = "/proc/fastmig-not-writable";
    let open_token = d.join("open-token");
    std::fs::write(&open_token, "t0ken").expect("token");
    std::fs::set_permissions(&open_token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let token = d.join("token");
    std::fs::write(&token, "t0ken").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let agent_data = d.join("agent-data");
    let agent = |listen: &'static str, token: &Path| -> Vec<String> {
        [
            "agent",
            "--listen",
            listen,
            "--host-id",
            "h1",
            "--host-type",
            "G4",
            "--data-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            agent_data.display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
        ])
        .collect()
    };
    let agent_open = agent("127.0.0.1:0", &open_token);
    // 192.0.2.0/24 is reserved for documentation: no interface has it.
    let agent_unbindable = agent("192.0.2.1:7070", &token);
    let agent_open: Vec<&str> = agent_open.iter().map(String::as_str).collect();
    let agent_unbindable: Vec<&str> = agent_unbindable.iter().map(String::as_str).collect();
    let cases = vec![
        // run
        case("run: usage", &["run", "--bogus"], 2, "bogus"),
        case("run: bad input", &["run", "--mem", "-64M"], 2, "negative"),
        case(
            "run: runtime",
            &["run", "--mem", "16M", "--ready-file", path_str(&unready)],
            1,
            "ready file",
        ),
        // status
        case("status: usage", &["status"], 2, "--api"),
        // agent
        case("agent: usage", &["agent", "--bogus"], 2, "bogus"),
        case(
            "testbed: usage",
            &["testbed", "up", "--hosts", "0", "--link", "1gbit"],
            2,
            "hosts",
        ),
        case("agent: bad input", &agent_open, 2, "group or others"),
        case(
            "agent: runtime",
            &agent_unbindable,
            1,
            "listening on 192.0.2.1:7070",
        ),
        case(
            "status: bad input",
            &["status", "--api", missing, "--wait", "soon"],
            2,
            "soon",
        ),
        case(
            "status: runtime",
            &["status", "--api", missing, "--wait", "0"],
            1,
            "cannot connect",
        ),
        // ctl
        case("ctl: usage", &["ctl", "--api", missing], 2, "command"),
        case(
            "ctl: bad input",
            &["ctl", "--api", missing, "self-destruct"],
            2,
            "self-destruct",
        ),
        case(
            "ctl: bad argument",
            &["ctl", "--api", missing, "stop", "--arg", "now"],
            2,
            "key=value",
        ),
        case(
            "ctl: runtime",
            &["ctl", "--api", missing, "--wait", "0", "query-status"],
            1,
            "cannot connect",
        ),
        // incoming
        case("incoming: usage", &["incoming"], 2, "--listen"),
        case(
            "incoming: bad input",
            &["incoming", "--listen", "nowhere"],
            2,
            "nowhere",
        ),
        case(
            "incoming: zero timeout",
            &["incoming", "--listen", "127.0.0.1:0", "--timeout", "0"],
            2,
            "positive",
        ),
        case(
            "incoming: runtime",
            &[
                "incoming",
                "--listen",
                "127.0.0.1:0",
                "--accept-timeout",
                "200ms",
            ],
            1,
            "not started",
        ),
        // migrate
        case("migrate: usage", &["migrate", "--api", missing], 2, "--to"),
        case(
            "migrate: bad input",
            &["migrate", "--api", missing, "--to", "nowhere"],
            2,
            "nowhere",
        ),
        case(
            "migrate: runtime",
            &[
                "migrate",
                "--api",
                missing,
                "--wait",
                "0",
                "--to",
                "127.0.0.1:1",
            ],
            1,
            "cannot connect",
        ),
        // migrate-cancel
        case("migrate-cancel: usage", &["migrate-cancel"], 2, "--api"),
        case(
            "migrate-cancel: bad input",
            &["migrate-cancel", "--api", missing, "--wait", "-1s"],
            2,
            "-1s",
        ),
        case(
            "migrate-cancel: runtime",
            &["migrate-cancel", "--api", missing, "--wait", "0"],
            1,
            "cannot connect",
        ),
        // demo: the source's own reason is surfaced, and its bad input stays bad input.
        case("demo: usage", &["demo", "--bogus"], 2, "bogus"),
        case("demo: bad input", &["demo", "--mem", "16M"], 2, "too small"),
        Case {
            env: &[("TMPDIR", "/proc/fastmig-no-tmp")],
            ..case("demo: runtime", &["demo"], 1, "scratch")
        },
        // bench
        case(
            "bench migration: usage",
            &["bench", "migration", "--bogus"],
            2,
            "bogus",
        ),
        case(
            "bench migration: bad input",
            &["bench", "migration", "--transports", "pigeon"],
            2,
            "pigeon",
        ),
        case(
            "bench migration: runtime",
            &[
                "bench",
                "migration",
                "--mem",
                "16M",
                "--repeat",
                "1",
                "--out",
                bench_out,
            ],
            1,
            "fastmig-not-writable",
        ),
        case("bench chart: usage", &["bench", "chart"], 2, "results"),
        case(
            "bench chart: bad input",
            &["bench", "chart", missing],
            2,
            "nobody.sock",
        ),
        case(
            "bench chart: runtime",
            &[
                "bench",
                "chart",
                path_str(&results),
                "--out",
                path_str(&chart_out),
            ],
            1,
            "chart",
        ),
        // simulate
        case("simulate: usage", &["simulate"], 2, "--trace"),
        case(
            "simulate: bad input",
            &["simulate", "--trace", missing],
            2,
            "nobody.sock",
        ),
        case(
            "simulate: runtime",
            &[
                "simulate",
                "--trace",
                path_str(&trace),
                "--sweep",
                "--out",
                bench_out,
            ],
            1,
            "fastmig-not-writable",
        ),
        // experiment: refused before any testbed is brought up
        case(
            "experiment: usage",
            &["experiment", "consolidation", "--hosts", "0"],
            2,
            "--hosts",
        ),
        case(
            "experiment: bad input",
            &["experiment", "consolidation", "--trace", missing],
            2,
            "nobody.sock",
        ),
        case(
            "experiment: runtime",
            &["experiment", "consolidation", "--out", bench_out],
            1,
            "fastmig-not-writable",
        ),
        // completions and man
        case("completions: usage", &["completions"], 2, "shell"),
        case(
            "completions: bad input",
            &["completions", "tcsh"],
            2,
            "tcsh",
        ),
        Case {
            stdout_full: true,
            ..case(
                "completions: runtime",
                &["completions", "bash"],
                1,
                "stdout",
            )
        },
        case("man: usage", &["man", "--bogus"], 2, "bogus"),
        case("man: bad input", &["man", "extra"], 2, "extra"),
        Case {
            stdout_full: true,
            ..case("man: runtime", &["man"], 1, "stdout")
        },
    ];
    for c in &cases {
        run_case(c);
    }
}

#[test]
fn a_negative_memory_size_is_named_as_such() {
    for sub in [
        &["run"][..],
        &["incoming", "--listen", "127.0.0.1:0"],
        &["demo"],
    ] {
        let mut args = sub.to_vec();
        args.extend(["--mem", "-64M"]);
        let out = fastmig(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot be negative: `-64M`"), "{stderr}");
        assert!(!stderr.contains("unexpected argument"), "{stderr}");
    }
}

#[test]
fn completions_and_man_page_come_from_the_clap_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = fastmig(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        for sub in ["migrate-cancel", "incoming", "completions"] {
            assert!(text.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let out = fastmig(&["man"]);
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH fastmig"),
        "{man}"
    );
    assert!(man.contains("migrate"), "{man}");
}

#[test]
fn no_color_keeps_escape_codes_out_of_errors_and_help() {
    let out = Command::new(bin())
        .args(["run", "--bogus"])
        .env("NO_COLOR", "1")
        .output()
        .expect("runs");
    assert!(
        !out.stderr.contains(&0x1b),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new(bin())
        .args(["migrate", "--help"])
        .env("NO_COLOR", "1")
        .output()
        .expect("runs");
    assert!(help.status.success());
    assert!(!help.stdout.contains(&0x1b));
}

/// Runs a `--daemonize` command: its stderr goes to a file, since the background process
/// keeps the stderr it inherited open (a pipe would never reach end of file).
fn fastmig_daemonize(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let log = dir.join("daemonize.stderr");
    let st = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .status()
        .expect("runs");
    (st.code(), std::fs::read_to_string(&log).unwrap_or_default())
}

/// Kills background processes a failed test would otherwise leave behind.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            send_signal(*pid, 9);
        }
    }
}

/// Reads the pid a ready file holds.
fn ready_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .expect("ready file")
        .trim()
        .parse()
        .expect("a pid")
}

#[test]
fn daemonize_returns_once_the_socket_answers_and_the_listener_is_bound() {
    require_kvm();
    let dir = workdir();
    let d = dir.path();
    let src = d.join("src.sock");
    let dst = d.join("dst.sock");
    let ready = d.join("src.ready");
    let dst_ready = d.join("dst.ready");
    let mig = format!("unix:{}", d.join("mig.sock").display());
    // Each command returns only when the next one can rely on it: no sleeps between them.
    let out = fastmig_daemonize(
        d,
        &[
            "run",
            "--mem",
            "16M",
            "--workload",
            "verify:rate=2000,wss=4M",
            "--api",
            path_str(&src),
            "--ready-file",
            path_str(&ready),
            "--daemonize",
        ],
    );
    assert_eq!(out.0, Some(0), "{}", out.1);
    let src_pid = ready_pid(&ready);
    let _cleanup = KillOnDrop(vec![src_pid]);
    let out = fastmig_daemonize(
        d,
        &[
            "incoming",
            "--listen",
            &mig,
            "--mem",
            "16M",
            "--api",
            path_str(&dst),
            "--ready-file",
            path_str(&dst_ready),
            "--daemonize",
        ],
    );
    assert_eq!(out.0, Some(0), "{}", out.1);
    let _cleanup_dst = KillOnDrop(vec![ready_pid(&dst_ready)]);
    let st = fastmig(&["status", "--api", path_str(&src), "--wait", "0"]);
    assert!(st.status.success(), "{st:?}");
    assert!(String::from_utf8_lossy(&st.stdout).contains("status: running"));
    let m = fastmig(&[
        "migrate",
        "--api",
        path_str(&src),
        "--to",
        &mig,
        "--transport",
        "shm",
        "--quit-source",
    ]);
    assert!(m.status.success(), "{m:?}");
    let text = String::from_utf8_lossy(&m.stdout);
    assert!(
        text.contains("over all rounds"),
        "figures are named: {text}"
    );
    // --quit-source: the source process ends, removing its socket and its ready file.
    wait_until("the source to exit", PATIENCE, || {
        (!ready.exists() && !src.exists()).then_some(())
    });
    wait_until("the source process to be gone", PATIENCE, || {
        let stat = std::fs::read_to_string(format!("/proc/{src_pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its reaper.
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
    let v = fastmig(&["ctl", "--api", path_str(&dst), "verify-memory"]);
    assert!(v.status.success(), "{v:?}");
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).expect("JSON");
    assert_eq!(report["errors"], 0, "{report}");
    let q = fastmig(&["ctl", "--api", path_str(&dst), "quit"]);
    assert!(q.status.success(), "{q:?}");
    wait_until("the destination to remove its socket", PATIENCE, || {
        (!dst.exists()).then_some(())
    });
}

#[test]
fn a_failing_daemon_reports_its_own_error_and_code() {
    let dir = workdir();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep").expect("write");
    let out = fastmig(&[
        "run",
        "--mem",
        "16M",
        "--api",
        path_str(&file),
        "--daemonize",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep");
}

#[test]
fn clients_wait_for_a_socket_that_is_about_to_appear() {
    require_kvm();
    let dir = workdir();
    let sock = dir.path().join("late.sock");
    let mut vm = Command::new(bin())
        .args(["run", "--mem", "16M", "--api", path_str(&sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Right after `run ... &`: no sleep, the default wait covers the start-up.
    let st = fastmig(&["status", "--api", path_str(&sock), "--wait", "60s"]);
    let code = st.status.code();
    let q = fastmig(&["ctl", "--api", path_str(&sock), "quit"]);
    let _ = vm.wait();
    assert_eq!(code, Some(0), "{st:?}");
    assert!(q.status.success(), "{q:?}");
}

#[test]
fn ctl_passes_typed_arguments() {
    require_kvm();
    let dir = workdir();
    let src = Proc::run(dir.path(), "src", "16M", "verify:rate=2000,wss=4M");
    let api = path_str(&src.api);
    // Arguments are checked by the command's type: an unknown one is refused by the VM.
    let out = fastmig(&[
        "ctl",
        "--api",
        api,
        "migrate",
        "--arg",
        "uri=127.0.0.1:1",
        "--arg",
        "bogus=1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    // A typed transport object and a number, to a port nobody listens on: it starts, then
    // fails, and the VM stays here.
    let out = fastmig(&[
        "ctl",
        "--api",
        api,
        "migrate",
        "--arg",
        "uri=127.0.0.1:1",
        "--arg",
        r#"transport={"kind":"multi-tcp","streams":2}"#,
        "--arg",
        "timeout_ms=500",
    ]);
    assert!(out.status.success(), "{out:?}");
    let state = wait_until("the migration to fail", PATIENCE, || {
        let m = api_call(&src.api, "query-migrate");
        (m["status"] != "active").then_some(m)
    });
    assert_eq!(state["status"], "failed", "{state}");
    src.assert_still_runs_here();
}

fn api_call(path: &Path, cmd: &str) -> serde_json::Value {
    api(path, cmd, serde_json::json!({})).unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

#[test]
fn control_socket_input_does_not_grow_the_process() {
    require_kvm();
    let dir = workdir();
    let vm = Proc::run(dir.path(), "vm", "16M", "idle");
    let pid = vm.child.id();
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    };
    let before = rss();
    // Ten clients each send 8 MiB without a newline and keep their connection open.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = std::os::unix::net::UnixStream::connect(&vm.api).expect("connect");
        std::io::Write::write_all(&mut s, &vec![b'x'; 8 << 20]).expect("send");
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss();
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} kB to {after} kB for 80 MiB of unterminated lines"
    );
    // The socket still serves a well-behaved client.
    assert_eq!(vm.status()["status"], "running");
    drop(held);
}

#[test]
fn run_and_incoming_refuse_an_api_path_that_is_not_a_socket() {
    let dir = workdir();
    let file = dir.path().join("x.txt");
    std::fs::write(&file, "precious").expect("write");
    for args in [
        vec!["run", "--mem", "16M", "--api", path_str(&file)],
        vec![
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--api",
            path_str(&file),
        ],
    ] {
        let out = fastmig(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("not a socket"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), "precious");
    }
}
