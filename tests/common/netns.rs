//! Network namespaces for the root-only lab tests (`deploy_netns`, `deploy_lab`): a namespace
//! deleted on drop, `ip -batch` runs, and a hub namespace of bridges that the others plug into
//! with veth pairs. The test's own (root) namespace is never touched.
//!
//! ```text
//!   hub namespace: bridges (no addresses, no rules)
//!     ├── vN ── veth ── eth0 of node namespace A
//!     └── vM ── veth ── eth1 of node namespace B ...
//! ```

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{TempDir, run_bounded};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A number unique within this test process (for names of namespaces and files).
pub fn seq() -> usize {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Runs a command to completion (bounded) and returns its output, or the failure with it.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let (status, out) = run_bounded(cmd, Duration::from_secs(20));
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{cmd:?}: {status}\n{out}"))
    }
}

/// A network namespace, deleted on drop (which also takes its interfaces with it).
pub struct Netns(pub String);

impl Netns {
    /// Creates namespace `name` (replacing a leftover of the same name).
    pub fn create(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name])).expect("create network namespace");
        Netns(name)
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `program` run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `ip [-6] -n NS -batch FILE` with `lines` (written in `dir`).
    pub fn ip_batch(&self, v6: bool, lines: &[String], dir: &TempDir) {
        if lines.is_empty() {
            return;
        }
        let file = dir.write(&format!("ip-batch-{}", seq()), &(lines.join("\n") + "\n"));
        let mut c = Command::new("ip");
        if v6 {
            c.arg("-6");
        }
        c.args(["-n", &self.0, "-batch"]).arg(&file);
        run(&mut c).unwrap_or_else(|e| panic!("{e}\nbatch:\n{}", lines.join("\n")));
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) {
        run(self.cmd("sysctl").arg("-qw").args(settings)).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in the namespace (a daemon's forked workers) would keep it alive.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if !pids.is_empty() {
                let _ = Command::new("kill").arg("-KILL").args(&pids).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A namespace that holds only bridges; other namespaces plug into them with veth pairs.
pub struct Hub {
    pub ns: Netns,
    links: AtomicUsize,
}

impl Hub {
    /// Creates the hub namespace `name` with the given bridges, up (multicast snooping off, so
    /// IPv6 neighbour discovery reaches every port at once).
    pub fn create(name: String, bridges: &[&str], dir: &TempDir) -> Hub {
        let ns = Netns::create(name);
        let mut lines = vec!["link set lo up".to_string()];
        for b in bridges {
            lines.push(format!("link add {b} type bridge mcast_snooping 0"));
            lines.push(format!("link set {b} up"));
        }
        ns.ip_batch(false, &lines, dir);
        Hub {
            ns,
            links: AtomicUsize::new(0),
        }
    }

    /// Plugs `node` into `bridge`: a veth pair whose node end is `ifname` inside `node` (left
    /// down: the node's own setup brings it up with its addresses).
    pub fn plug(&self, bridge: &str, node: &Netns, ifname: &str, dir: &TempDir) {
        let i = self.links.fetch_add(1, Ordering::Relaxed);
        self.ns.ip_batch(
            false,
            &[
                format!(
                    "link add v{i} type veth peer name {ifname} netns {}",
                    node.0
                ),
                format!("link set v{i} master {bridge}"),
                format!("link set v{i} up"),
            ],
            dir,
        );
    }
}
