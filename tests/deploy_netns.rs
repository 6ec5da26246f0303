//! The rendered firewall, applied for real (root only): `ringmail deploy render` writes one
//! nftables ruleset per host; here every ruleset of the example topology
//! (deploy/examples/example.com.toml) is checked by `nft -c`, loaded twice next to a foreign
//! table, and then loaded into network namespaces that stand for the seed's hosts, where TCP
//! connects over IPv4 and IPv6 are compared with what the seed's firewall table says must pass.
//!
//! ```text
//!   hub namespace: bridge br0 (no addresses, no rules; the test's own root namespace is never touched)
//!     ├── veth ── 20 hosts (lb/msa/mx/mda/mta, two of each per site), topology addresses,
//!     │            their rendered nftables.conf loaded; LBs hold the anycast addresses on lo
//!     ├── veth ── 4 routers (rt-a1 ... rt-b2), topology addresses, no firewall
//!     ├── veth ── "the Internet" 198.51.100.7, 2001:db8:eeee::7 (outside every prefix we use)
//!     └── veth ── a management host 203.0.113.10, 2001:db8:ffff::10
//! ```
//!
//! All 20 hosts are started, not one per role: namespaces are cheap, the whole run takes a few
//! seconds, and this covers every role on both sites and all four LBs. Every namespace has its
//! address on-link (/24, /64) and an on-link default route, so everyone reaches everyone
//! directly over the bridge; IPv6 works only if the rulesets let neighbour discovery through.
//! Each namespace listens on 22, 24, 25, 179, 465, 587 and 993; each probes every other
//! namespace's address on those ports, and (except the LBs, which hold them locally) each LB's
//! anycast addresses, steered to that LB by a firewall mark and a routing table per LB, as a
//! router would. The expected result is computed from the topology by rules written here, from
//! the seed's table, independently of the renderer.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Hub, Netns, run, seq};
use common::*;
use ringmail_deploy::topology::{Role, ServiceKind, Topology};

/// The ports that matter to the seed's firewall.
const PORTS: [u16; 7] = [22, 24, 25, 179, 465, 587, 993];

/// How long one probe waits for its connection (a dropped SYN is retransmitted after 1 s, so a
/// single loss on an allowed path still connects).
const PROBE_TIMEOUT_SECS: f64 = 3.0;

const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xeeee, 0, 0, 0, 0, 7);
const MGMT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const MGMT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);

fn example() -> Topology {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/example.com.toml");
    ringmail_deploy::load_file(&path).unwrap_or_else(|e| panic!("example topology: {e}"))
}

/// `(host name, ruleset)` for every host, from the full render.
fn rulesets(t: &Topology) -> Vec<(String, String)> {
    let files = ringmail_deploy::render(t);
    t.hosts
        .iter()
        .map(|h| {
            let path = format!("hosts/{}/nftables.conf", h.name);
            let f = files
                .iter()
                .find(|f| f.path == Path::new(&path))
                .unwrap_or_else(|| panic!("render wrote no {path}"));
            (h.name.to_string(), f.contents.clone())
        })
        .collect()
}

/// Why this test cannot run here, if it cannot.
fn prerequisites() -> Result<(), String> {
    if !is_root() {
        return Err("needs root (network namespaces, nftables)".into());
    }
    for (prog, arg) in [("ip", "-V"), ("nft", "--version"), ("python3", "--version")] {
        let ok = Command::new(prog)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("needs {prog} installed"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rulesets: nft -c, and loading twice next to another table

#[test]
fn rendered_rulesets_pass_nft_check_and_reload_cleanly() {
    skip_unless!(prerequisites());
    let t = example();
    let dir = TempDir::new("deploy-nft");
    let ns = Netns::create(format!("rmdc{}", std::process::id()));
    let mut failures = Vec::new();
    for (name, text) in rulesets(&t) {
        let file = dir.write(&format!("{name}.nft"), &text);
        if let Err(e) = run(ns.cmd("nft").arg("-c").arg("-f").arg(&file)) {
            failures.push(format!("{name}: nft -c failed: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // One ruleset of each role, loaded twice into a namespace that has a table of its own.
    for name in [
        "lb-a1.example.com",
        "msa-a1.example.com",
        "mx-a1.example.com",
        "mda-a1.example.com",
        "mta-a1.example.com",
    ] {
        run(ns.cmd("nft").args(["flush", "ruleset"])).unwrap();
        run(ns.cmd("nft").args([
            "add table inet other; add chain inet other c { type filter hook input priority 10; }; add rule inet other c counter",
        ]))
        .unwrap();
        let file = dir.path().join(format!("{name}.nft"));
        run(ns.cmd("nft").arg("-f").arg(&file)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let first = run(ns.cmd("nft").args(["list", "table", "inet", "ringmail"])).unwrap();
        run(ns.cmd("nft").arg("-f").arg(&file))
            .unwrap_or_else(|e| panic!("{name}: second load: {e}"));
        let second = run(ns.cmd("nft").args(["list", "table", "inet", "ringmail"])).unwrap();
        assert_eq!(first, second, "{name}: loading twice changed the table");
        let tables = run(ns.cmd("nft").args(["list", "tables"])).unwrap();
        assert!(
            tables.contains("table inet other") && tables.contains("table inet ringmail"),
            "{name}: the other table went away:\n{tables}"
        );
        let other = run(ns.cmd("nft").args(["list", "table", "inet", "other"])).unwrap();
        assert!(
            other.contains("counter"),
            "{name}: other table changed:\n{other}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The reachability matrix

#[derive(Clone, Debug)]
enum Kind {
    /// Index into `Topology::hosts`.
    Host(usize),
    /// Index into `Topology::routers`.
    Router(usize),
    Internet,
    Management,
}

#[derive(Clone, Debug)]
struct Node {
    label: String,
    kind: Kind,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// What a probe connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// A node's own address.
    Node(usize),
    /// An anycast address of a service, steered to the LB node `lb`.
    Vip { lb: usize, service: usize },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Probe {
    src: usize,
    target: Target,
    port: u16,
    v6: bool,
}

fn nodes(t: &Topology) -> Vec<Node> {
    let mut out = Vec::new();
    for (i, h) in t.hosts.iter().enumerate() {
        out.push(Node {
            label: h.name.short().to_string(),
            kind: Kind::Host(i),
            v4: h.ipv4.expect("example hosts have IPv4"),
            v6: h.ipv6.expect("example hosts have IPv6"),
        });
    }
    for (i, r) in t.routers.iter().enumerate() {
        out.push(Node {
            label: r.name.clone(),
            kind: Kind::Router(i),
            v4: r.ipv4.expect("example routers have IPv4"),
            v6: r.ipv6.expect("example routers have IPv6"),
        });
    }
    out.push(Node {
        label: "internet".into(),
        kind: Kind::Internet,
        v4: INTERNET_V4,
        v6: INTERNET_V6,
    });
    out.push(Node {
        label: "mgmt".into(),
        kind: Kind::Management,
        v4: MGMT_V4,
        v6: MGMT_V6,
    });
    out
}

fn lb_nodes(t: &Topology, nodes: &[Node]) -> Vec<usize> {
    (0..nodes.len())
        .filter(|&i| matches!(nodes[i].kind, Kind::Host(h) if t.hosts[h].has(Role::Lb)))
        .collect()
}

fn probes(t: &Topology, nodes: &[Node]) -> Vec<Probe> {
    let lbs = lb_nodes(t, nodes);
    let mut out = Vec::new();
    for src in 0..nodes.len() {
        let mut targets: Vec<Target> = (0..nodes.len())
            .filter(|&d| d != src)
            .map(Target::Node)
            .collect();
        // An LB holds the anycast addresses itself: its connects to them never leave it.
        if !lbs.contains(&src) {
            for &lb in &lbs {
                for service in 0..t.services.len() {
                    targets.push(Target::Vip { lb, service });
                }
            }
        }
        for target in targets {
            for port in PORTS {
                for v6 in [false, true] {
                    out.push(Probe {
                        src,
                        target,
                        port,
                        v6,
                    });
                }
            }
        }
    }
    out
}

fn target_addr(t: &Topology, nodes: &[Node], target: Target, v6: bool) -> IpAddr {
    match target {
        Target::Node(d) if v6 => nodes[d].v6.into(),
        Target::Node(d) => nodes[d].v4.into(),
        Target::Vip { service, .. } => {
            let s = &t.services[service];
            if v6 {
                s.ipv6.expect("example services have IPv6").into()
            } else {
                s.ipv4.expect("example services have IPv4").into()
            }
        }
    }
}

fn describe(t: &Topology, nodes: &[Node], p: &Probe) -> String {
    let target = match p.target {
        Target::Node(d) => nodes[d].label.clone(),
        Target::Vip { lb, service } => {
            format!("{}@{}", t.services[service].name.short(), nodes[lb].label)
        }
    };
    let fam = if p.v6 { "v6" } else { "v4" };
    format!(
        "{} -> {target}:{} ({fam}, {})",
        nodes[p.src].label,
        p.port,
        target_addr(t, nodes, p.target, p.v6)
    )
}

/// The seed's firewall table, as this test reads it (written independently of the renderer):
/// whether a TCP connection from `p.src` to `p.target` on `p.port` must succeed.
fn expected(t: &Topology, nodes: &[Node], p: &Probe) -> bool {
    let src = &nodes[p.src];
    let src_host = match src.kind {
        Kind::Host(h) => Some(&t.hosts[h]),
        _ => None,
    };
    let (dst_node, vip_kind) = match p.target {
        Target::Node(d) => (d, None),
        Target::Vip { lb, service } => (lb, Some(t.services[service].kind)),
    };
    // Roles of the host owning the destination address (a VIP belongs to no role's host
    // address: mail is never sent to it).
    let dst_host = match nodes[dst_node].kind {
        Kind::Host(h) => Some(&t.hosts[h]),
        _ => None,
    };
    let dst_addr_is = |role: Role| vip_kind.is_none() && dst_host.is_some_and(|h| h.has(role));
    let src_is = |role: Role| src_host.is_some_and(|h| h.has(role));
    let relay_src = src_is(Role::Msa) || src_is(Role::Mx);

    // Outbound, at the source: mail ports only where the roles send mail.
    let out_ok = match (src_host, p.port) {
        (None, _) => true, // routers, the Internet, management: no rendered firewall
        (Some(_), 25) => src_is(Role::Mta) || (relay_src && dst_addr_is(Role::Mta)),
        (Some(_), 24) => relay_src && dst_addr_is(Role::Mda),
        (Some(_), _) => true,
    };

    // Inbound, at the destination.
    let in_ok = match dst_host {
        None => true,
        Some(h) => {
            let from_mgmt = matches!(src.kind, Kind::Management);
            let from_neighbor = match src.kind {
                Kind::Router(r) => h.bgp.as_ref().is_some_and(|b| b.neighbors.contains(&r)),
                _ => false,
            };
            (p.port == 22 && from_mgmt)
                || (h.has(Role::Mx) && p.port == 25)
                || (h.has(Role::Msa) && (p.port == 587 || p.port == 465))
                || (h.has(Role::Mda) && p.port == 993)
                || (h.has(Role::Mda) && p.port == 24 && relay_src)
                || (h.has(Role::Mta) && p.port == 25 && relay_src)
                || (h.has(Role::Lb) && p.port == 179 && from_neighbor)
                || vip_kind.is_some_and(|k| {
                    h.has(Role::Lb)
                        && match k {
                            ServiceKind::Imap => p.port == 993,
                            ServiceKind::Submission => p.port == 587 || p.port == 465,
                        }
                })
        }
    };
    out_ok && in_ok
}

/// Listens on the given ports (dual stack) and closes whatever connects.
const LISTENER: &str = r#"
import selectors, socket, sys
sel = selectors.DefaultSelector()
for p in sys.argv[1].split(","):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(p)))
    s.listen(1024)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            c, _ = key.fileobj.accept()
            c.close()
        except OSError:
            pass
"#;

/// Connects in parallel to every `id family address port mark` line of a file; prints
/// `R id result` per probe (`open`, `timeout` or the errno name).
const PROBER: &str = r#"
import errno, selectors, socket, sys, time
timeout = float(sys.argv[1])
probes = [l.split() for l in open(sys.argv[2]) if l.strip()]
sel = selectors.DefaultSelector()
res = {}
for pid, fam, addr, port, mark in probes:
    s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET, socket.SOCK_STREAM)
    if mark != "0":
        s.setsockopt(socket.SOL_SOCKET, 36, int(mark))  # SO_MARK
    s.setblocking(False)
    e = s.connect_ex((addr, int(port)))
    if e == errno.EINPROGRESS:
        sel.register(s, selectors.EVENT_WRITE, pid)
        continue
    res[pid] = "open" if e == 0 else errno.errorcode.get(e, str(e))
    s.close()
deadline = time.monotonic() + timeout
while sel.get_map() and time.monotonic() < deadline:
    for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
        e = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        res[key.data] = "open" if e == 0 else errno.errorcode.get(e, str(e))
        sel.unregister(key.fileobj)
        key.fileobj.close()
for key in list(sel.get_map().values()):
    res[key.data] = "timeout"
    key.fileobj.close()
for p in probes:
    print("R", p[0], res[p[0]])
"#;

/// Everything the matrix test starts; dropped in field order: the processes first, then the
/// namespaces, then the files.
struct Lab {
    listeners: Vec<ChildGuard>,
    nodes_ns: Vec<Netns>,
    hub: Hub,
    dir: TempDir,
}

impl Lab {
    fn build(t: &Topology, nodes: &[Node]) -> Lab {
        let prefix = format!("rmdn{}x{}", std::process::id(), seq());
        let dir = TempDir::new("deploy-netns");
        let hub = Hub::create(format!("{prefix}-hub"), &["br0"], &dir);
        let mut lab = Lab {
            listeners: Vec::new(),
            nodes_ns: Vec::new(),
            hub,
            dir,
        };
        let lbs = lb_nodes(t, nodes);
        for (i, node) in nodes.iter().enumerate() {
            let ns = Netns::create(format!("{prefix}-{}", node.label));
            lab.hub.plug("br0", &ns, "eth0", &lab.dir);
            let mut v4 = vec![
                "link set lo up".to_string(),
                "link set eth0 up".into(),
                format!("addr add {}/24 dev eth0", node.v4),
                "route add default dev eth0".into(),
            ];
            let mut v6 = vec![
                format!("addr add {}/64 dev eth0 nodad", node.v6),
                "route add default dev eth0".into(),
            ];
            if lbs.contains(&i) {
                for s in &t.services {
                    v4.extend(s.ipv4.map(|a| format!("addr add {a}/32 dev lo")));
                    v6.extend(s.ipv6.map(|a| format!("addr add {a}/128 dev lo nodad")));
                }
            } else {
                // Connects marked k go to the k-th LB's anycast addresses (a router's choice).
                for (k, &lb) in lbs.iter().enumerate() {
                    let (mark, table) = (k + 1, 100 + k);
                    v4.push(format!("rule add fwmark {mark} table {table}"));
                    v6.push(format!("rule add fwmark {mark} table {table}"));
                    for s in &t.services {
                        v4.extend(s.ipv4.map(|a| {
                            format!(
                                "route add {a}/32 via {} dev eth0 onlink table {table}",
                                nodes[lb].v4
                            )
                        }));
                        v6.extend(s.ipv6.map(|a| {
                            format!(
                                "route add {a}/128 via {} dev eth0 onlink table {table}",
                                nodes[lb].v6
                            )
                        }));
                    }
                }
            }
            ns.ip_batch(false, &v4, &lab.dir);
            ns.ip_batch(true, &v6, &lab.dir);
            lab.nodes_ns.push(ns);
        }
        lab
    }
}

/// Runs the probes of one source namespace and returns `probe index -> result`.
fn run_probes(
    lab: &Lab,
    t: &Topology,
    nodes: &[Node],
    lbs: &[usize],
    all: &[Probe],
    src: usize,
) -> BTreeMap<usize, String> {
    let mut lines = String::new();
    for (i, p) in all.iter().enumerate().filter(|(_, p)| p.src == src) {
        let mark = match p.target {
            Target::Node(_) => 0,
            Target::Vip { lb, .. } => lbs.iter().position(|&l| l == lb).unwrap() + 1,
        };
        let addr = target_addr(t, nodes, p.target, p.v6);
        let fam = if p.v6 { 6 } else { 4 };
        lines.push_str(&format!("{i} {fam} {addr} {} {mark}\n", p.port));
    }
    let file = lab
        .dir
        .write(&format!("probes-{}", nodes[src].label), &lines);
    let (status, out) = run_bounded(
        lab.nodes_ns[src]
            .cmd("python3")
            .args(["-c", PROBER, &PROBE_TIMEOUT_SECS.to_string()])
            .arg(&file),
        Duration::from_secs(30),
    );
    assert!(
        status.success(),
        "prober in {} failed: {status}\n{out}",
        nodes[src].label
    );
    out.lines()
        .filter_map(|l| l.strip_prefix("R "))
        .filter_map(|l| l.split_once(' '))
        .map(|(i, r)| (i.parse().expect("probe id"), r.to_string()))
        .collect()
}

#[test]
fn rendered_firewall_enforces_the_seed_matrix_over_ipv4_and_ipv6() {
    skip_unless!(prerequisites());
    let started = Instant::now();
    let t = example();
    let nodes = nodes(&t);
    let lbs = lb_nodes(&t, &nodes);
    let mut lab = Lab::build(&t, &nodes);

    // Load each host's rendered ruleset into its namespace.
    for (name, text) in rulesets(&t) {
        let i = nodes
            .iter()
            .position(|n| matches!(n.kind, Kind::Host(h) if t.hosts[h].name.as_str() == name))
            .unwrap();
        let file = lab.dir.write(&format!("{name}.nft"), &text);
        run(lab.nodes_ns[i].cmd("nft").arg("-f").arg(&file))
            .unwrap_or_else(|e| panic!("loading {name}'s ruleset: {e}"));
    }

    // Listeners everywhere, on every port that matters.
    let ports = PORTS.map(|p| p.to_string()).join(",");
    for (i, node) in nodes.iter().enumerate() {
        let g = ChildGuard::spawn(
            &format!("listener {}", node.label),
            lab.nodes_ns[i]
                .cmd("python3")
                .args(["-c", LISTENER, &ports]),
            lab.dir.path().join(format!("listener-{}.log", node.label)),
        )
        .expect("start listener");
        lab.listeners.push(g);
    }
    for g in &lab.listeners {
        let ready = wait_for(Duration::from_secs(10), || {
            g.log_text().contains("ready").then_some(())
        });
        assert!(ready.is_some(), "listener not ready:\n{}", g.log_text());
    }
    eprintln!(
        "{} namespaces set up, rulesets loaded, listeners up in {:?}",
        nodes.len() + 1,
        started.elapsed()
    );

    let all = probes(&t, &nodes);
    let results: BTreeMap<usize, String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nodes.len())
            .map(|src| {
                let (lab, t, nodes, lbs, all) = (&lab, &t, &nodes, &lbs, &all);
                s.spawn(move || run_probes(lab, t, nodes, lbs, all, src))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("prober thread"))
            .collect()
    });
    assert_eq!(results.len(), all.len(), "some probes printed no result");

    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results.values() {
        *tally.entry(r.as_str()).or_default() += 1;
    }
    let observed: BTreeSet<usize> = results
        .iter()
        .filter(|(_, r)| *r == "open")
        .map(|(&i, _)| i)
        .collect();
    let expect: BTreeSet<usize> = (0..all.len())
        .filter(|&i| expected(&t, &nodes, &all[i]))
        .collect();
    let fmt = |set: &BTreeSet<usize>| -> String {
        set.iter()
            .map(|&i| format!("  {} [{}]", describe(&t, &nodes, &all[i]), results[&i]))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let missing: BTreeSet<usize> = expect.difference(&observed).copied().collect();
    let extra: BTreeSet<usize> = observed.difference(&expect).copied().collect();
    eprintln!(
        "{} probes ({} expected open, {} observed open), results {tally:?}, in {:?}",
        all.len(),
        expect.len(),
        observed.len(),
        started.elapsed()
    );
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the firewall differs from the seed's matrix\n\
         blocked but should pass ({}):\n{}\n\
         passed but should be blocked ({}):\n{}",
        missing.len(),
        fmt(&missing),
        extra.len(),
        fmt(&extra)
    );

    // Spot checks that the matrix holds what the seed's table says, by name.
    let find = |src: &str, dst: &str, port: u16, v6: bool| -> &str {
        let s = nodes.iter().position(|n| n.label == src).unwrap();
        let d = nodes.iter().position(|n| n.label == dst).unwrap();
        let i = all
            .iter()
            .position(|p| p.src == s && p.target == Target::Node(d) && p.port == port && p.v6 == v6)
            .unwrap();
        results[&i].as_str()
    };
    for v6 in [false, true] {
        assert_eq!(find("internet", "mx-a1", 25, v6), "open");
        assert_ne!(find("internet", "mta-a1", 25, v6), "open");
        assert_ne!(find("internet", "msa-b1", 25, v6), "open");
        assert_ne!(find("internet", "mda-a2", 24, v6), "open");
        assert_ne!(find("internet", "mx-b1", 22, v6), "open");
        assert_eq!(find("mgmt", "mta-b2", 22, v6), "open");
        assert_eq!(find("msa-a1", "mta-b1", 25, v6), "open");
        assert_eq!(find("mx-b2", "mda-a1", 24, v6), "open");
        assert_ne!(find("msa-a1", "internet", 25, v6), "open");
        assert_eq!(find("mta-a1", "internet", 25, v6), "open");
        assert_ne!(find("mda-a1", "internet", 25, v6), "open");
        assert_ne!(find("lb-a1", "mta-a1", 25, v6), "open");
        assert_eq!(find("rt-a1", "lb-a2", 179, v6), "open");
        assert_ne!(find("rt-b1", "lb-a2", 179, v6), "open");
    }

    // What the output chains refused was counted.
    for label in ["mda-a1", "lb-a1", "msa-a1"] {
        let i = nodes.iter().position(|n| n.label == label).unwrap();
        let chain = run(lab.nodes_ns[i]
            .cmd("nft")
            .args(["list", "chain", "inet", "ringmail", "output"]))
        .unwrap();
        let counted = chain
            .lines()
            .find(|l| l.contains("dport { 24, 25 } counter"))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        assert!(
            counted.is_some_and(|n| n > 0),
            "{label}: refused mail connections not counted:\n{chain}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
}
