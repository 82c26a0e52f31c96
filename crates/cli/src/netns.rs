//! An emulated link for `bench sweep`: two network namespaces joined by a veth pair, the
//! source side shaped with `tc tbf`. [`Link`] is an RAII guard: dropping it (at the end, on
//! an error, on a panic, or after Ctrl-C has made the sweep return) deletes both namespaces,
//! which takes the veth pair and its qdisc with them.
//!
//! ```text
//!   netns fmsw-<pid>-src             netns fmsw-<pid>-dst
//!   fastmig run (source VM)           fastmig incoming
//!   veth fmswS<pid> 10.231.0.1 ────── veth fmswD<pid> 10.231.0.2
//!   root qdisc tbf (rate = link)
//! ```
//!
//! The names carry the sweep's pid, so that two sweeps do not meet and a leftover is
//! attributable. Only these namespaces (and loopback) carry the sweep's traffic.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Prefix of every namespace and interface a sweep creates.
pub const PREFIX: &str = "fmsw";

/// Address of the destination side.
pub const DST_ADDR: &str = "10.231.0.2";

/// Two namespaces and a veth pair; removed on drop.
pub struct Link {
    /// Source namespace.
    pub src_ns: String,
    /// Destination namespace.
    pub dst_ns: String,
    src_if: String,
    dst_if: String,
    /// What was created, so that drop removes exactly that.
    created: Vec<String>,
}

/// Runs a command (`ip`, `tc`), failing with its stderr.
pub fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Link {
    /// Creates the namespaces and the veth pair, addresses them and brings them up.
    pub fn create() -> Result<Link> {
        let pid = std::process::id();
        let mut link = Link {
            src_ns: format!("{PREFIX}-{pid}-src"),
            dst_ns: format!("{PREFIX}-{pid}-dst"),
            // IFNAMSIZ: 15 characters at most.
            src_if: format!("{PREFIX}S{pid}"),
            dst_if: format!("{PREFIX}D{pid}"),
            created: Vec::new(),
        };
        for ns in [link.src_ns.clone(), link.dst_ns.clone()] {
            run(&["ip", "netns", "add", &ns])
                .context("creating a network namespace (root needed)")?;
            link.created.push(ns);
        }
        let (s, d) = (link.src_if.clone(), link.dst_if.clone());
        run(&["ip", "link", "add", &s, "type", "veth", "peer", "name", &d])?;
        link.created.push(format!("link:{s}"));
        run(&["ip", "link", "set", &s, "netns", &link.src_ns])?;
        run(&["ip", "link", "set", &d, "netns", &link.dst_ns])?;
        for (ns, dev, addr) in [
            (&link.src_ns, &s, "10.231.0.1/24"),
            (&link.dst_ns, &d, "10.231.0.2/24"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }

    /// Shapes the source side to `rate` bytes/s (`None`: no qdisc, the veth's own speed).
    pub fn shape(&self, rate: Option<f64>) -> Result<()> {
        // Replacing by deleting first: a `replace` from tbf to nothing does not exist.
        let _ = run(&[
            "ip",
            "netns",
            "exec",
            &self.src_ns,
            "tc",
            "qdisc",
            "del",
            "dev",
            &self.src_if,
            "root",
        ]);
        let Some(rate) = rate else { return Ok(()) };
        let bits = (rate * 8.0).round() as u64;
        // The bucket must hold at least one timer tick of data (rate / HZ, HZ up to 1000) or
        // tbf caps below its rate; 64 KiB is the floor for TSO-sized packets.
        let burst = ((rate / 250.0) as u64).max(64 << 10);
        run(&[
            "ip",
            "netns",
            "exec",
            &self.src_ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.src_if,
            "root",
            "tbf",
            "rate",
            &format!("{bits}bit"),
            "burst",
            &burst.to_string(),
            "latency",
            "100ms",
        ])
    }

    /// The prefix that runs a command in the source namespace.
    pub fn in_src(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.src_ns.clone(),
        ]
    }

    /// The prefix that runs a command in the destination namespace.
    pub fn in_dst(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.dst_ns.clone(),
        ]
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace destroys its interfaces (the veth pair goes with either end)
        // and their qdiscs. A veth never moved out of the root namespace is deleted itself.
        for what in self.created.iter().rev() {
            let r = match what.strip_prefix("link:") {
                Some(dev) => {
                    let listed = Command::new("ip")
                        .args(["link", "show", dev])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if listed {
                        run(&["ip", "link", "del", dev])
                    } else {
                        Ok(())
                    }
                }
                None => run(&["ip", "netns", "del", what]),
            };
            if let Err(e) = r {
                eprintln!("fastmig: cleaning up the emulated link: {e:#}");
            }
        }
    }
}

/// Namespaces and interfaces whose name starts with [`PREFIX`] (what a sweep would leave).
pub fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        if let Ok(o) = Command::new("ip").args(args).output() {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if line.contains(PREFIX) {
                    out.push(line.trim().to_string());
                }
            }
        }
    }
    out
}
