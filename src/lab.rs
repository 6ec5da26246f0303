//! `ringmail deploy lab`: one site of a topology stood up for real, from the files `deploy render`
//! writes, in network namespaces on this machine (root only), until Ctrl-C or SIGTERM; then
//! everything it started is killed and every namespace deleted.
//!
//! ```text
//!   "the Internet" (bridge brinet, 198.51.100.0/24)      the site (bridge brsite, its addresses)
//!   client .7 ───┐                                     ┌── every LB of the site: ringmail lb with
//!   remote .25 ──┼── each router of the site (.1, .2…) ┤     its rendered config + BIRD (bird.conf)
//!                │   BIRD with its rendered bird.conf  ├── the first MSA, MX, MDA, MTA of the site:
//!                                                      │     ringmail ROLE --config <rendered>
//!                                                      └── the site's name server: NSD with the
//!                                                            rendered zones (nsd-zones.conf)
//! ```
//!
//! Each host loads its rendered nftables.conf. The namespaces are `<name>-<host>` (`rmlab-lb-a1`),
//! `<name>-<router>`, `<name>-client`, `<name>-remote` and `<name>-hub` (the bridges). The
//! name server also serves remote.test (MX: the remote host, SPF: the Internet segment) and the
//! Internet segment's reverse zone (the client is mail.remote.test), so mail can leave and
//! arrive; nothing runs on the Internet hosts: that is the user's (or a test's) side.
//!
//! What the lab changes, each where it is done (the topology: [`lab_topology`]), and why:
//! - the account store is a SQLite file under the root (the topology may name PostgreSQL or
//!   LDAP, which the lab does not run), seeded with every topology domain and the `--user`s;
//! - `[dns] resolver` is the site's name server (authoritative only; enough for the lab's names);
//! - the DKIM keys are generated afresh at the topology's private_key paths under the root, and
//!   their public halves replace the topology's (so the rendered zone publishes them);
//! - rendering uses `RenderOptions::root` (`deploy render --root`) = DIR/root, where the
//!   certificates (one lab CA, DIR/lab-ca.pem) go at the paths the configs name;
//! - BIRD logs to stderr (the lab's log files) instead of syslog;
//! - the roles run with their configs where they were rendered (two LBs would both install
//!   theirs as lb.toml); one host per mail role, so one root serves them all;
//! - the routers get the sysctls their rendered config asks for (forwarding, L4 ECMP hash), and
//!   every namespace a default route through the site's first router (the topology has no
//!   notion of the uplink).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ringmail_deploy::RenderOptions;
use ringmail_deploy::topology::{DkimAlgorithm, Host, Role, ServiceKind, Topology};
use ringmail_mx::dkim::{self, DkimAlgo};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Args)]
pub struct LabArgs {
    /// The topology file.
    #[arg(long)]
    topology: PathBuf,
    /// The lab's directory (created; must be empty): rendered/ (the rendered tree), root/ (what
    /// the configs name: TLS and DKIM keys, state, the account store), logs/, lab-ca.pem.
    #[arg(long)]
    dir: PathBuf,
    /// The site to stand up [default: the topology's first].
    #[arg(long)]
    site: Option<String>,
    /// An account to create, as ADDRESS:PASSWORD (repeatable); the domain must be a topology
    /// domain.
    #[arg(long = "user", value_name = "ADDRESS:PASSWORD")]
    users: Vec<String>,
    /// Prefix of the namespace names (<NAME>-lb-a1, <NAME>-client, ...).
    #[arg(long, default_value = "rmlab")]
    name: String,
    /// Seconds to wait for everything to come up.
    #[arg(long, default_value_t = 90)]
    timeout: u64,
}

/// The Internet segment (TEST-NET-2): router `i` of the site is .(i+1), then these two.
const INET: [u8; 3] = [198, 51, 100];
const CLIENT: u8 = 7;
const REMOTE: u8 = 25;
const REMOTE_DOMAIN: &str = "remote.test";
/// The lab's account store, under the root.
const LAB_ACCOUNTS: &str = "/var/lib/ringmail/accounts.db";

pub fn cmd_lab(a: LabArgs) -> Result<ExitCode> {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        bail!("deploy lab needs root (network namespaces, nftables, BIRD, NSD)");
    }
    for (prog, arg) in [
        ("ip", "-V"),
        ("nft", "--version"),
        ("bird", "--version"),
        ("nsd", "-v"),
        ("ss", "-V"),
    ] {
        let found = Command::new(prog)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            bail!("deploy lab needs `{prog}` installed");
        }
    }
    // Before anything starts, so a Ctrl-C during the start-up still tears down.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let started = Instant::now();
    let t = match ringmail_deploy::load_file(&a.topology) {
        Ok(t) => t,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    let dir = std::path::absolute(&a.dir).context("--dir")?;
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty: a lab's keys, spools and mailboxes are its own; give a new directory",
            dir.display()
        );
    }
    let plan = Plan::new(&t, a.site.as_deref())?;
    let root = dir.join("root");
    for sub in ["logs", "bird", "nsd", "rendered"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let t = lab_topology(t, &plan, &root)?;
    let rendered = dir.join("rendered");
    let files = ringmail_deploy::render_with(
        &t,
        &RenderOptions {
            root: Some(root.clone()),
        },
    );
    ringmail_deploy::write_tree(&rendered, &files)?;
    let hosts = plan.hosts(&t);
    certificates(&t, &hosts, &root, &dir.join("lab-ca.pem"))?;
    for h in &hosts {
        for &role in &h.roles {
            if role != Role::Lb {
                std::fs::create_dir_all(root.join(format!("var/lib/ringmail/{role}")))?;
            }
        }
    }
    seed_accounts(
        &format!("sqlite:{}{LAB_ACCOUNTS}", root.display()),
        &t,
        &a.users,
    )?;

    let mut lab = Lab {
        prefix: a.name.clone(),
        namespaces: Vec::new(),
        procs: Vec::new(),
        logs: dir.join("logs"),
        links: 0,
    };
    lab.network(&t, &plan, &hosts)?;
    for h in &hosts {
        let file = rendered.join(format!("hosts/{}/nftables.conf", h.name));
        run(lab.exec(&label(h), "nft").arg("-f").arg(&file))?;
    }
    lab.start(&t, &plan, &hosts, &dir)?;
    let timeout = Duration::from_secs(a.timeout);
    if !lab.wait_ready(&t, &plan, &hosts, timeout, &mut signals)? {
        eprintln!("ringmail: interrupted; tearing the lab down");
        return Ok(ExitCode::from(130));
    }
    summary(&t, &plan, &hosts, &lab, &dir, started.elapsed());

    'run: loop {
        if signals.pending().next().is_some() {
            break 'run;
        }
        for (name, child) in &mut lab.procs {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "ringmail: {name} exited ({status}); see {}",
                    lab.logs.join(format!("{name}.log")).display()
                );
                *name = format!("{name} (exited)");
            }
        }
        lab.procs.retain(|(n, _)| !n.ends_with("(exited)"));
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("ringmail: tearing the lab down");
    drop(lab);
    eprintln!("ringmail: lab torn down");
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// What runs where

/// The site's part of the topology that the lab stands up.
struct Plan {
    site: usize,
    /// Indexes into `Topology::routers`.
    routers: Vec<usize>,
    /// Index into `Topology::dns.nameservers`.
    nameserver: usize,
    lan4: u8,
    lan6: u8,
}

impl Plan {
    fn new(t: &Topology, site: Option<&str>) -> Result<Plan> {
        let site = match site {
            None => 0,
            Some(s) => t
                .sites
                .iter()
                .position(|x| x.name == s)
                .ok_or_else(|| anyhow!("no site `{s}` in the topology"))?,
        };
        let routers: Vec<usize> = (0..t.routers.len())
            .filter(|&i| t.routers[i].site == site)
            .collect();
        let Some(&first) = routers.first() else {
            bail!("site {} has no router", t.sites[site].name);
        };
        if t.routers[first].ipv4.is_none() {
            bail!("the lab needs the site's first router to have an IPv4 address");
        }
        let mut addrs: Vec<IpAddr> = t
            .hosts
            .iter()
            .filter(|h| h.site == site)
            .flat_map(|h| h.addrs())
            .chain(routers.iter().flat_map(|&r| {
                let r = &t.routers[r];
                r.ipv4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(r.ipv6.map(IpAddr::V6))
            }))
            .collect();
        // The site's name server: the first one inside the site's addresses, else the first.
        let (p4, _) = covering(&addrs);
        let inside = |a: Ipv4Addr| {
            addrs.iter().any(|b| match b {
                IpAddr::V4(b) => u32::from(a) >> (32 - p4) == u32::from(*b) >> (32 - p4),
                IpAddr::V6(_) => false,
            })
        };
        let nameserver = t
            .dns
            .nameservers
            .iter()
            .position(|n| n.ipv4.is_some_and(inside))
            .or_else(|| t.dns.nameservers.iter().position(|n| n.ipv4.is_some()))
            .ok_or_else(|| anyhow!("the lab needs a name server with an IPv4 address"))?;
        let ns = &t.dns.nameservers[nameserver];
        addrs.extend(ns.ipv4.map(IpAddr::V4));
        addrs.extend(ns.ipv6.map(IpAddr::V6));
        let internet = Ipv4Addr::new(INET[0], INET[1], INET[2], 0);
        if addrs
            .iter()
            .any(|a| matches!(a, IpAddr::V4(v) if v.octets()[..3] == internet.octets()[..3]))
        {
            bail!("the topology uses {internet}/24, the lab's Internet");
        }
        let (lan4, lan6) = covering(&addrs);
        Ok(Plan {
            site,
            routers,
            nameserver,
            lan4,
            lan6,
        })
    }

    /// Every LB of the site, then the first host of each mail role in it: the one the site's
    /// rendered next hops name.
    fn hosts<'t>(&self, t: &'t Topology) -> Vec<&'t Host> {
        let mut hosts: Vec<&Host> = t
            .hosts_with(Role::Lb)
            .filter(|h| h.site == self.site && h.ipv4.is_some())
            .collect();
        for role in [Role::Msa, Role::Mx, Role::Mda, Role::Mta] {
            if let Some(h) = t
                .hosts_with(role)
                .find(|h| h.site == self.site && h.ipv4.is_some())
                && !hosts.iter().any(|x| x.name == h.name)
            {
                hosts.push(h);
            }
        }
        hosts
    }

    fn gateway(&self, t: &Topology) -> (Ipv4Addr, Option<Ipv6Addr>) {
        let r = &t.routers[self.routers[0]];
        (r.ipv4.expect("checked in Plan::new"), r.ipv6)
    }
}

/// The longest IPv4 and IPv6 prefixes holding all of `addrs` (at most /30 and /126, so a
/// lone address still has a link).
fn covering(addrs: &[IpAddr]) -> (u8, u8) {
    let v4: Vec<u32> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(u32::from(*v)),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<u128> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(v) => Some(u128::from(*v)),
            IpAddr::V4(_) => None,
        })
        .collect();
    let p4 = match (v4.iter().min(), v4.iter().max()) {
        (Some(lo), Some(hi)) => ((lo ^ hi).leading_zeros() as u8).min(30),
        _ => 30,
    };
    let p6 = match (v6.iter().min(), v6.iter().max()) {
        (Some(lo), Some(hi)) => ((lo ^ hi).leading_zeros() as u8).min(126),
        _ => 126,
    };
    (p4, p6)
}

fn label(h: &Host) -> String {
    h.name.short().to_string()
}

fn inet(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(INET[0], INET[1], INET[2], host)
}

// ---------------------------------------------------------------------------------------------
// The lab's changes to the topology, keys, certificates, accounts

/// The one place the lab departs from the topology (see the module documentation).
fn lab_topology(mut t: Topology, plan: &Plan, root: &Path) -> Result<Topology> {
    // Only the hosts the lab runs stay in its site, so the rendered next hops (every MDA or
    // MTA of the site) name running hosts only.
    let keep: Vec<String> = plan.hosts(&t).iter().map(|h| h.name.to_string()).collect();
    t.hosts
        .retain(|h| h.site != plan.site || keep.contains(&h.name.to_string()));
    // A SQLite account store, under the root like every other path once rendered.
    t.accounts = format!("sqlite:{LAB_ACCOUNTS}");
    // The MX and MTA hosts ask the site's name server.
    let ns = &t.dns.nameservers[plan.nameserver];
    t.dns.resolver = ns.ipv4.map(|a| (IpAddr::V4(a), 53).into());
    // Fresh DKIM keys at the private_key paths (under the root); the zone publishes them.
    for d in &mut t.domains {
        for k in &mut d.dkim {
            let path = root.join(
                k.private_key_path
                    .strip_prefix("/")
                    .unwrap_or(&k.private_key_path),
            );
            std::fs::create_dir_all(path.parent().unwrap_or(root))?;
            let algo = match k.algorithm {
                DkimAlgorithm::Rsa => DkimAlgo::Rsa,
                DkimAlgorithm::Ed25519 => DkimAlgo::Ed25519,
            };
            let record = dkim::keygen(
                algo,
                dkim::RSA_DEFAULT_BITS,
                d.name.as_str(),
                &k.selector,
                &path,
            )
            .with_context(|| format!("a DKIM key for {} ({})", d.name, k.selector))?;
            k.public_key = record_p(&record)
                .ok_or_else(|| anyhow!("no p= in the generated record: {record}"))?;
        }
    }
    Ok(t)
}

/// The `p=` value of a DKIM TXT record as a zone-file line (the quoted strings joined).
fn record_p(record: &str) -> Option<String> {
    let data: String = record
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    data.split(';')
        .find_map(|tag| tag.trim().strip_prefix("p="))
        .map(|p| p.trim().to_string())
}

/// A lab CA (`ca_file`) and, for each host, a certificate for its name and the service names
/// (the LBs pass TLS through to the MSAs and MDAs) where the rendered configs look for it.
fn certificates(t: &Topology, hosts: &[&Host], root: &Path, ca_file: &Path) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ringmail lab CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key)?;
    let tls = root.join("etc/ringmail/tls");
    std::fs::create_dir_all(&tls)?;
    for h in hosts {
        let mut names = vec![h.name.to_string()];
        names.extend(t.services.iter().map(|s| s.name.to_string()));
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, h.name.as_str());
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(tls.join(format!("{}.crt", h.name)), cert.pem())?;
        std::fs::write(tls.join(format!("{}.key", h.name)), key.serialize_pem())?;
    }
    std::fs::write(ca_file, ca.pem())?;
    Ok(())
}

/// Every topology domain and the `--user`s, with `ringmail accounts` on the lab's store.
fn seed_accounts(url: &str, t: &Topology, users: &[String]) -> Result<()> {
    let exe = std::env::current_exe()?;
    let accounts = |args: &[&str], stdin: Option<&str>| -> Result<()> {
        let mut child = Command::new(&exe)
            .args(["accounts", "--db", url])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut input = child.stdin.take().expect("piped");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes())?;
        }
        drop(input);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ringmail accounts {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    for d in &t.domains {
        accounts(&["domain", "add", d.name.as_str()], None)?;
    }
    for u in users {
        let (address, password) = u
            .split_once(':')
            .ok_or_else(|| anyhow!("--user {u}: not ADDRESS:PASSWORD"))?;
        accounts(&["add", address, "--password-stdin"], Some(password))?;
    }
    Ok(())
}

/// The rendered BIRD config with its log on stderr (the lab's log files).
fn bird_config(rendered: &Path) -> Result<String> {
    let text = std::fs::read_to_string(rendered)
        .with_context(|| format!("reading {}", rendered.display()))?;
    Ok(text.replace("log syslog all;", "log stderr all;"))
}

// ---------------------------------------------------------------------------------------------
// Namespaces and processes

struct Lab {
    prefix: String,
    /// In creation order; deleted in reverse.
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    logs: PathBuf,
    links: usize,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lab {
    fn ns(&self, label: &str) -> String {
        format!("{}-{label}", self.prefix)
    }

    fn add_ns(&mut self, label: &str) -> Result<()> {
        let name = self.ns(label);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name);
        Ok(())
    }

    /// `program` inside namespace `label`.
    fn exec(&self, label: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(label)]).arg(program);
        c
    }

    /// `ip [-6] -n NS -batch -` with `lines`.
    fn ip(&self, label: &str, v6: bool, lines: &[String]) -> Result<()> {
        let mut c = Command::new("ip");
        if v6 {
            c.arg("-6");
        }
        let mut child = c
            .args(["-n", &self.ns(label), "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut input = child.stdin.take().expect("piped");
        input.write_all((lines.join("\n") + "\n").as_bytes())?;
        drop(input);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ip -n {} -batch: {}\n{}",
                self.ns(label),
                String::from_utf8_lossy(&out.stderr),
                lines.join("\n")
            );
        }
        Ok(())
    }

    /// A veth pair from the hub's `bridge` to `ifname` in namespace `label`.
    fn plug(&mut self, bridge: &str, label: &str, ifname: &str) -> Result<()> {
        let i = self.links;
        self.links += 1;
        let node = self.ns(label);
        self.ip(
            "hub",
            false,
            &[
                format!("link add v{i} type veth peer name {ifname} netns {node}"),
                format!("link set v{i} master {bridge}"),
                format!("link set v{i} up"),
            ],
        )
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<()> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    fn network(&mut self, t: &Topology, plan: &Plan, hosts: &[&Host]) -> Result<()> {
        self.add_ns("hub")?;
        self.ip(
            "hub",
            false,
            &[
                "link set lo up".into(),
                "link add brsite type bridge mcast_snooping 0".into(),
                "link set brsite up".into(),
                "link add brinet type bridge mcast_snooping 0".into(),
                "link set brinet up".into(),
            ],
        )?;
        let (gw4, gw6) = plan.gateway(t);
        let ns = &t.dns.nameservers[plan.nameserver];
        let mut lan: Vec<(String, Option<Ipv4Addr>, Option<Ipv6Addr>)> =
            hosts.iter().map(|h| (label(h), h.ipv4, h.ipv6)).collect();
        lan.push((ns.name.short().to_string(), ns.ipv4, ns.ipv6));
        for (label, v4, v6) in &lan {
            self.add_ns(label)?;
            self.plug("brsite", label, "eth0")?;
            let mut l4 = vec!["link set lo up".to_string(), "link set eth0 up".into()];
            l4.extend(v4.map(|a| format!("addr add {a}/{} dev eth0", plan.lan4)));
            l4.push(format!("route add default via {gw4}"));
            self.ip(label, false, &l4)?;
            if let Some(a) = v6 {
                let mut l6 = vec![format!("addr add {a}/{} dev eth0 nodad", plan.lan6)];
                l6.extend(gw6.map(|g| format!("route add default via {g}")));
                self.ip(label, true, &l6)?;
            }
        }
        for (i, &r) in plan.routers.iter().enumerate() {
            let r = &t.routers[r];
            self.add_ns(&r.name)?;
            self.plug("brsite", &r.name, "eth0")?;
            self.plug("brinet", &r.name, "eth1")?;
            // What the rendered router config asks for ("Also set ..."), and forwarding.
            run(self.exec(&r.name, "sysctl").args([
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
            ]))?;
            let mut l4 = vec![
                "link set lo up".to_string(),
                "link set eth0 up".into(),
                "link set eth1 up".into(),
                format!("addr add {}/24 dev eth1", inet(i as u8 + 1)),
            ];
            l4.extend(
                r.ipv4
                    .map(|a| format!("addr add {a}/{} dev eth0", plan.lan4)),
            );
            self.ip(&r.name, false, &l4)?;
            if let Some(a) = r.ipv6 {
                self.ip(
                    &r.name,
                    true,
                    &[format!("addr add {a}/{} dev eth0 nodad", plan.lan6)],
                )?;
            }
        }
        for (label, host) in [("client", CLIENT), ("remote", REMOTE)] {
            self.add_ns(label)?;
            self.plug("brinet", label, "eth0")?;
            self.ip(
                label,
                false,
                &[
                    "link set lo up".into(),
                    "link set eth0 up".into(),
                    format!("addr add {}/24 dev eth0", inet(host)),
                    format!("route add default via {}", inet(1)),
                ],
            )?;
        }
        Ok(())
    }

    /// NSD, the mail roles, BIRD on the routers and LBs, the LBs.
    fn start(&mut self, t: &Topology, plan: &Plan, hosts: &[&Host], dir: &Path) -> Result<()> {
        let rendered = dir.join("rendered");
        let exe = std::env::current_exe()?;
        // The name server: the rendered zones through their include file, and the Internet's.
        let ns = &t.dns.nameservers[plan.nameserver];
        let nsd = dir.join("nsd");
        let mut zones = String::new();
        for (origin, text) in internet_zones() {
            let file = nsd.join(format!("{origin}.zone"));
            std::fs::write(&file, text)?;
            zones.push_str(&format!(
                "zone:\n  name: \"{origin}\"\n  zonefile: \"{}\"\n",
                file.display()
            ));
        }
        let listen: String = ns
            .ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(ns.ipv6.map(IpAddr::V6))
            .map(|a| format!("  ip-address: {a}\n"))
            .collect();
        let d = nsd.display();
        let conf = format!(
            "server:\n{listen}  port: 53\n  username: \"\"\n  chroot: \"\"\n  \
             zonesdir: \"{}\"\n  database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  \
             pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  \
             logfile: \"{d}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n\n\
             remote-control:\n  control-enable: no\n\n\
             include: \"{}\"\n\n{zones}",
            rendered.join("dns").display(),
            rendered.join("dns/nsd-zones.conf").display(),
        );
        std::fs::write(nsd.join("nsd.conf"), conf)?;
        let mut cmd = self.exec(ns.name.short(), "nsd");
        cmd.arg("-d").arg("-c").arg(nsd.join("nsd.conf"));
        self.spawn("nsd", cmd)?;

        for h in hosts {
            for &role in h.roles.iter().filter(|&&r| r != Role::Lb) {
                let mut cmd = self.exec(&label(h), &exe);
                cmd.env("RUST_LOG", "info")
                    .arg(role.name())
                    .arg("--config")
                    .arg(rendered.join(format!("hosts/{}/ringmail-{role}.toml", h.name)));
                self.spawn(&format!("{}-{role}", label(h)), cmd)?;
            }
        }
        for &r in &plan.routers {
            let name = t.routers[r].name.clone();
            self.bird(
                &name,
                &rendered.join(format!("routers/{name}/bird.conf")),
                dir,
            )?;
        }
        for h in hosts.iter().filter(|h| h.has(Role::Lb)) {
            let l = label(h);
            let bird = rendered.join(format!("hosts/{}/bird.conf", h.name));
            if bird.exists() {
                self.bird(&l, &bird, dir)?;
            }
            let mut cmd = self.exec(&l, &exe);
            cmd.env("RUST_LOG", "info")
                .args(["lb", "--config"])
                .arg(rendered.join(format!("hosts/{}/ringmail-lb.toml", h.name)));
            self.spawn(&format!("{l}-lb"), cmd)?;
        }
        Ok(())
    }

    fn bird(&mut self, label: &str, rendered: &Path, dir: &Path) -> Result<()> {
        let conf = dir.join(format!("bird/{label}.conf"));
        std::fs::write(&conf, bird_config(rendered)?)?;
        let mut cmd = self.exec(label, "bird");
        cmd.args(["-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(dir.join(format!("bird/{label}.ctl")))
            .arg("-P")
            .arg(dir.join(format!("bird/{label}.pid")));
        self.spawn(&format!("bird-{label}"), cmd)
    }

    /// Whether something listens on `port` (TCP, or UDP with `udp`) in namespace `label`.
    fn listening(&self, label: &str, port: u16, udp: bool) -> bool {
        let flags = if udp { "-Hlun" } else { "-Hltn" };
        run(self.exec(label, "ss").arg(flags))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
    }

    /// The next hops of the kernel route to `dst` in namespace `label`, sorted.
    fn nexthops(&self, label: &str, dst: IpAddr) -> Vec<IpAddr> {
        let family = if dst.is_ipv6() { "-6" } else { "-4" };
        let out = run(self
            .exec(label, "ip")
            .args([family, "route", "show", &dst.to_string()]))
        .unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut hops: Vec<IpAddr> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        hops
    }

    /// Waits until the name server answers, every role listens and every router routes every
    /// VIP to every LB (ECMP; IPv6 too when the routers have IPv6). `Ok(false)` when a signal
    /// came first.
    fn wait_ready(
        &mut self,
        t: &Topology,
        plan: &Plan,
        hosts: &[&Host],
        timeout: Duration,
        signals: &mut Signals,
    ) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let lbs = |v6: bool| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = hosts
                .iter()
                .filter(|h| h.has(Role::Lb))
                .flat_map(|h| h.addrs())
                .filter(|a| a.is_ipv6() == v6)
                .collect();
            v.sort();
            v
        };
        let v6 = plan.routers.iter().all(|&r| t.routers[r].ipv6.is_some());
        let vips: Vec<IpAddr> = t
            .services
            .iter()
            .flat_map(|s| s.addrs())
            .filter(|a| a.is_ipv4() || v6)
            .collect();
        let ns = t.dns.nameservers[plan.nameserver].name.short().to_string();
        loop {
            if signals.pending().next().is_some() {
                return Ok(false);
            }
            for (name, child) in &mut self.procs {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited ({status}); see {}",
                        self.logs.join(format!("{name}.log")).display()
                    );
                }
            }
            let mut waiting = Vec::new();
            if !self.listening(&ns, 53, true) {
                waiting.push(format!("NSD on {ns}"));
            }
            for h in hosts {
                for &role in &h.roles {
                    let port = match role {
                        Role::Msa => 587,
                        Role::Mx | Role::Mta => 25,
                        Role::Mda => 993,
                        Role::Lb => continue,
                    };
                    if !self.listening(&label(h), port, false) {
                        waiting.push(format!("{role} on {}", label(h)));
                    }
                }
            }
            for &r in &plan.routers {
                let r = &t.routers[r].name;
                for &v in &vips {
                    let (hops, want) = (self.nexthops(r, v), lbs(v.is_ipv6()));
                    if hops != want {
                        waiting.push(format!("{r}: {v} via {hops:?}, not {want:?}"));
                    }
                }
            }
            if waiting.is_empty() {
                return Ok(true);
            }
            if Instant::now() > deadline {
                bail!(
                    "not up after {timeout:?}: {}; logs in {}",
                    waiting.join("; "),
                    self.logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn teardown(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.procs.clear();
        while let Some(ns) = self.namespaces.pop() {
            // Whatever still runs in it (a daemon's forked workers) would keep it alive.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if !pids.is_empty() {
                    let _ = Command::new("kill").arg("-KILL").args(&pids).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The Internet's zones the name server also serves, as (origin, zone file): remote.test (MX
/// at the remote host, SPF for the segment, the client as mail.remote.test) and the segment's
/// reverse zone (the client's PTR, so iprev passes).
fn internet_zones() -> [(String, String); 2] {
    let soa = format!(
        "$TTL 300\n@ IN SOA ns.{REMOTE_DOMAIN}. hostmaster.{REMOTE_DOMAIN}. 1 3600 600 86400 300\n\
         @ IN NS ns.{REMOTE_DOMAIN}.\n"
    );
    let [a, b, c] = INET;
    [
        (
            REMOTE_DOMAIN.to_string(),
            format!(
                "{soa}@ IN MX 10 mx\n\
                 @ IN TXT \"v=spf1 ip4:{a}.{b}.{c}.0/24 -all\"\n\
                 ns IN A {}\n\
                 mx IN A {}\n\
                 mail IN A {}\n",
                inet(REMOTE),
                inet(REMOTE),
                inet(CLIENT)
            ),
        ),
        (
            format!("{c}.{b}.{a}.in-addr.arpa"),
            format!("{soa}{CLIENT} IN PTR mail.{REMOTE_DOMAIN}.\n"),
        ),
    ]
}

fn summary(t: &Topology, plan: &Plan, hosts: &[&Host], lab: &Lab, dir: &Path, took: Duration) {
    let mut out = format!(
        "ringmail: site {} of the topology is up after {:.1}s; files under {}\n",
        t.sites[plan.site].name,
        took.as_secs_f64(),
        dir.display()
    );
    let row = |out: &mut String, what: &str, addr: String, label: &str, runs: String| {
        out.push_str(&format!(
            "  {what:<26} {addr:<15} {:<20} {runs}\n",
            lab.ns(label)
        ));
    };
    for h in hosts {
        let roles: Vec<String> = h
            .roles
            .iter()
            .map(|r| match r {
                Role::Lb => "ringmail lb + BIRD".to_string(),
                r => format!("ringmail {r}"),
            })
            .collect();
        row(
            &mut out,
            h.name.as_str(),
            h.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            &label(h),
            roles.join(", "),
        );
    }
    for (i, &r) in plan.routers.iter().enumerate() {
        let r = &t.routers[r];
        row(
            &mut out,
            &r.name,
            r.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            &r.name,
            format!(
                "BIRD, ECMP to the LBs; {} to the Internet",
                inet(i as u8 + 1)
            ),
        );
    }
    let ns = &t.dns.nameservers[plan.nameserver];
    row(
        &mut out,
        ns.name.as_str(),
        ns.ipv4.map(|a| a.to_string()).unwrap_or_default(),
        ns.name.short(),
        format!("NSD: the rendered zones, {REMOTE_DOMAIN}; the MX/MTA resolver"),
    );
    row(
        &mut out,
        &format!("client (mail.{REMOTE_DOMAIN})"),
        inet(CLIENT).to_string(),
        "client",
        "nothing: the Internet's client".into(),
    );
    row(
        &mut out,
        &format!("remote (mx.{REMOTE_DOMAIN})"),
        inet(REMOTE).to_string(),
        "remote",
        format!("nothing: {REMOTE_DOMAIN}'s MX; mail sent there needs a listener on 25"),
    );
    out.push_str(&format!(
        "  TLS: every certificate is signed by {}\n  accounts: ringmail accounts --db sqlite:{}/root/var/lib/ringmail/accounts.db\n  logs: {}\n  e.g. ip netns exec {} swaks --server {}:587 --tls ...\n",
        dir.join("lab-ca.pem").display(),
        dir.display(),
        lab.logs.display(),
        lab.ns("client"),
        t.services
            .iter()
            .find_map(|s| s.ipv4.filter(|_| s.kind == ServiceKind::Submission))
            .map(|a| a.to_string())
            .unwrap_or_default(),
    ));
    print!("{out}");
    let _ = std::io::stdout().flush();
    eprintln!("ringmail: lab ready; Ctrl-C (or SIGTERM) tears it down");
}
