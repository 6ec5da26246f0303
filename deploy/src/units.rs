//! Role configs and systemd units: `hosts/<fqdn>/ringmail-<role>.toml` and
//! `hosts/<fqdn>/ringmail-<role>.service` for every role of every host.
//!
//! ```text
//! lb   listeners on the services' VIPs: 993 -> the MDAs of its site, 587/465 -> the MSAs of its
//!      site (PROXY v2, TLS / smtp-starttls health checks); [announce] with the VIPs: bgp
//!      (speaker mode: one session per neighbor router and family) or kernel-table (bird, frr)
//! mx   25 on the host's addresses, every topology domain, LMTP to an MDA of its site, bounces to
//!      an MTA of its site
//! msa  587 + 465 on the host's addresses, relay to an MTA of its site, PROXY from the LBs
//! mta  25 on the host's addresses, relaying only for the MSA and MX hosts, every DKIM key
//! mda  LMTP 24 for the MX and MSA hosts, IMAPS 993 (PROXY from the LBs)
//! ```
//!
//! The configs use the roles' own schemas (checked by `ringmail ROLE --check --config` in
//! `tests/deploy_render.rs`). Next hops are lists: every MDA (or MTA) of the host's own site
//! (every one in the topology when the site has none), one address each (IPv4 preferred); the
//! relay spreads connections over them and fails over. Fixed paths: the config at /etc/ringmail/<role>.toml, TLS at
//! /etc/ringmail/tls/<fqdn>.crt|.key, state (spool, mail) under /var/lib/ringmail/<role>/; with
//! [`RenderOptions::root`] all of them (and the DKIM keys and a SQLite account store) move under
//! that directory, for a lab or a staging copy that runs unprivileged from one place.
//!
//! The topology's `[dns] resolver`, when set, is the MTA's `resolver` and the MX's
//! `[mx.checks] dns`; otherwise both use the host's /etc/resolv.conf.
//!
//! The units run each role as its own static system user (`ringmail-<role>`, group `ringmail`)
//! rather than with `DynamicUser=`: the spool and the mailboxes are long-lived data that backups,
//! restores and the `ringmail queue`/`accounts` tools handle under a stable owner, and the TLS and
//! DKIM private keys in /etc/ringmail are shared with the services through the `ringmail` group;
//! a dynamic UID would change those files' owner on every reallocation. `StateDirectory=` still
//! creates /var/lib/ringmail/<role> with the right owner, and is the only writable place under
//! `ProtectSystem=strict`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use crate::topology::{BgpMode, Host, Role, ServiceKind, Topology, ports};
use crate::{RenderOptions, RenderedFile};

/// Admin (metrics, queue API) listener ports on 127.0.0.1, per role.
pub fn admin_port(role: Role) -> Option<u16> {
    match role {
        Role::Lb => Some(9100),
        Role::Mx => Some(9110),
        Role::Msa => Some(9111),
        Role::Mta => Some(9112),
        Role::Mda => None,
    }
}

/// Where the rendered config is installed (the unit's ExecStart names it).
pub fn config_path(role: Role) -> String {
    format!("/etc/ringmail/{role}.toml")
}

/// The role's state directory (the unit's StateDirectory).
pub fn state_dir(role: Role) -> String {
    format!("/var/lib/ringmail/{role}")
}

/// The paths the configs and units name: as installed, or under [`RenderOptions::root`].
#[derive(Clone, Copy)]
struct Paths<'a> {
    root: Option<&'a Path>,
}

impl Paths<'_> {
    /// `path` (absolute) under the root.
    fn at(&self, path: &str) -> String {
        match self.root {
            None => path.to_string(),
            Some(root) => {
                let root = root.display().to_string();
                format!("{}{path}", root.trim_end_matches('/'))
            }
        }
    }

    fn config(&self, role: Role) -> String {
        self.at(&config_path(role))
    }

    fn state(&self, role: Role) -> String {
        self.at(&state_dir(role))
    }

    /// The account store URL; a SQLite file moves under the root like every other path.
    fn accounts(&self, url: &str) -> String {
        match url.strip_prefix("sqlite:") {
            Some(path) if path.starts_with('/') => format!("sqlite:{}", self.at(path)),
            _ => url.to_string(),
        }
    }

    fn tls_line(&self, h: &Host) -> String {
        format!(
            "tls = {{ cert = {}, key = {} }}",
            q(&self.at(&format!("/etc/ringmail/tls/{}.crt", h.name))),
            q(&self.at(&format!("/etc/ringmail/tls/{}.key", h.name)))
        )
    }
}

/// How long the LB keeps draining sessions on SIGTERM.
const LB_DRAIN_TIMEOUT_S: u64 = 60;
/// How long the LB announces GRACEFUL_SHUTDOWN before it withdraws the VIPs.
const LB_GRACEFUL_WAIT_S: u64 = 15;

const HEADER_NOTE: &str = "Rendered by `ringmail deploy render` from the topology file: change the topology, not this file.";

pub fn render(t: &Topology, opts: &RenderOptions) -> Vec<RenderedFile> {
    let p = Paths {
        root: opts.root.as_deref(),
    };
    let mut out = Vec::new();
    for h in &t.hosts {
        for &role in &h.roles {
            let config = match role {
                Role::Lb => lb_config(t, h, p),
                Role::Mx => mx_config(t, h, p),
                Role::Msa => msa_config(t, h, p),
                Role::Mta => mta_config(t, h, p),
                Role::Mda => mda_config(t, h, p),
            };
            out.push(RenderedFile::new(
                format!("hosts/{}/ringmail-{role}.toml", h.name),
                config,
            ));
            out.push(RenderedFile::new(
                format!("hosts/{}/ringmail-{role}.service", h.name),
                unit(t, h, role, p),
            ));
        }
    }
    out
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn sock(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A TOML array of strings on one line.
fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The host's listen addresses on `port`; a host without addresses in the topology listens on
/// the wildcards.
fn listen(h: &Host, port: u16) -> Vec<String> {
    let v: Vec<String> = h.addrs().map(|a| sock(a, port)).collect();
    if v.is_empty() {
        vec![format!("0.0.0.0:{port}"), format!("[::]:{port}")]
    } else {
        v
    }
}

/// Hosts with `role` in `site`; all hosts with `role` when the site has none.
fn site_hosts(t: &Topology, role: Role, site: usize) -> (Vec<&Host>, bool) {
    let own: Vec<&Host> = t.hosts_with(role).filter(|h| h.site == site).collect();
    if own.is_empty() {
        (t.hosts_with(role).collect(), false)
    } else {
        (own, true)
    }
}

/// A host's address for connecting to it: IPv4 if it has one.
fn primary_addr(h: &Host) -> Option<IpAddr> {
    h.addrs().next()
}

/// The next hops of `role` for a host of `site` (every such host of the site, tried in turn
/// from a rotating start, the next one when one is down), with the comment that says so.
fn next_hops(t: &Topology, role: Role, site: usize, port: u16) -> (Vec<String>, String) {
    let (hosts, own) = site_hosts(t, role, site);
    let chosen: Vec<&Host> = hosts
        .into_iter()
        .filter(|h| primary_addr(h).is_some())
        .collect();
    let names = chosen
        .iter()
        .map(|h| h.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let addrs: Vec<String> = chosen
        .iter()
        .filter_map(|h| primary_addr(h))
        .map(|a| sock(a, port))
        .collect();
    let upper = role.name().to_uppercase();
    if addrs.is_empty() {
        return (
            vec![format!("127.0.0.1:{port}")],
            format!("no {upper} host with an address in the topology: loopback placeholder"),
        );
    }
    let why = if own {
        format!(
            "the {upper}s of site {} ({names}), spread over and failed over in turn",
            t.sites[site].name
        )
    } else {
        format!(
            "site {} has no {upper}: every {upper} of the topology ({names}), failed over in turn",
            t.sites[site].name
        )
    };
    (addrs, why)
}

/// Every address of the hosts with one of `roles`, in topology order.
fn addrs_of(t: &Topology, roles: &[Role]) -> Vec<String> {
    t.hosts
        .iter()
        .filter(|h| roles.iter().any(|&r| h.has(r)))
        .flat_map(|h| h.addrs())
        .map(|a| a.to_string())
        .collect()
}

fn header(h: &Host, role: Role, what: &str, p: Paths<'_>) -> String {
    format!(
        "# ringmail {role} on {} ({what}).\n\
         # {HEADER_NOTE}\n\
         # Install as {}; ringmail-{role}.service runs it.\n\
         # The TLS certificate must also name the client-facing service names this host serves.\n",
        h.name,
        p.config(role)
    )
}

fn lb_config(t: &Topology, h: &Host, p: Paths<'_>) -> String {
    let mut s = header(h, Role::Lb, "anycast load balancer", p);
    let site = &t.sites[h.site].name;
    let _ = writeln!(
        s,
        "\n[global]\n\
         maxconn = 200000\n\
         drain_timeout = \"{LB_DRAIN_TIMEOUT_S}s\"   # on SIGTERM, sessions get this long to finish\n\
         admin = \"127.0.0.1:{}\"   # /metrics, backend and announce API; never on the VIPs",
        admin_port(Role::Lb).expect("lb has admin")
    );
    // Pools: one per backend role and port, used by the listeners of every service of that kind.
    let mut pools: Vec<(String, ServiceKind, u16)> = Vec::new();
    for svc in &t.services {
        for &port in svc.kind.ports() {
            let pool = format!("{}-{port}", svc.kind.backend_role());
            if !pools.iter().any(|p| p.0 == pool) {
                pools.push((pool.clone(), svc.kind, port));
            }
        }
    }
    for svc in &t.services {
        let _ = writeln!(s, "\n# --- {} ({}) ---", svc.name, svc.kind.name());
        for &port in svc.kind.ports() {
            let pool = format!("{}-{port}", svc.kind.backend_role());
            for a in svc.addrs() {
                let fam = if a.is_ipv4() { "v4" } else { "v6" };
                let _ = writeln!(
                    s,
                    "\n[[listener]]\nname = {}\nbind = {}\npool = {}",
                    q(&format!("{}-{port}-{fam}", svc.name)),
                    q(&sock(a, port)),
                    q(&pool)
                );
            }
        }
    }
    for (pool, kind, port) in &pools {
        let role = kind.backend_role();
        let (backends, own) = site_hosts(t, role, h.site);
        let server_name = t
            .services
            .iter()
            .find(|x| x.kind == *kind)
            .map(|x| x.name.to_string())
            .unwrap_or_default();
        let (check, idle) = match (kind, *port) {
            (ServiceKind::Imap, _) => ("tls", "35m"),
            (ServiceKind::Submission, ports::SUBMISSION) => ("smtp-starttls", "10m"),
            (ServiceKind::Submission, _) => ("tls", "10m"),
        };
        let algorithm = if *kind == ServiceKind::Imap {
            "leastconn" // IMAP sessions are long-lived
        } else {
            "roundrobin"
        };
        let _ = writeln!(
            s,
            "\n# The {}s of {} on {port}, with the client's address in a PROXY v2 header.",
            role.name().to_uppercase(),
            if own {
                format!("site {site}")
            } else {
                format!("every site (site {site} has none)")
            }
        );
        let mut health = format!(
            "{{ check = {}, interval = \"2s\", timeout = \"1s\", rise = 2, fall = 3, tls_server_name = {}",
            q(check),
            q(&server_name)
        );
        if check == "smtp-starttls" {
            let _ = write!(health, ", ehlo_name = {}", q(h.name.as_str()));
        }
        health.push_str(" }");
        let _ = writeln!(
            s,
            "[pool.{pool}]\n\
             algorithm = {}\n\
             proxy_protocol = \"v2\"\n\
             connect_timeout = \"3s\"\n\
             idle_timeout = {}\n\
             connect_retries = 2\n\
             health = {health}\n\
             backends = [",
            q(algorithm),
            q(idle)
        );
        for b in backends {
            if let Some(a) = primary_addr(b) {
                let _ = writeln!(
                    s,
                    "  {{ addr = {}, name = {} }},",
                    q(&sock(a, *port)),
                    q(b.name.as_str())
                );
            }
        }
        s.push_str("]\n");
    }
    let mut vips: Vec<IpAddr> = t.services.iter().flat_map(|x| x.addrs()).collect();
    vips.sort();
    vips.dedup();
    let speaker = t.bgp.mode == BgpMode::Speaker;
    let bgp = h.bgp.as_ref().filter(|_| speaker);
    if vips.is_empty() || (speaker && bgp.is_none()) {
        s.push_str("\n# No VIPs to announce from this host: no [announce].\n");
        return s;
    }
    s.push_str(
        "\n# --- Anycast announcement ---\n\
         # The VIPs are announced while their pools have a healthy backend; on SIGTERM (or POST\n\
         # /api/announce/drain) they carry GRACEFUL_SHUTDOWN for graceful_wait, then are withdrawn.\n\
         [announce]\n",
    );
    match t.bgp.mode {
        BgpMode::Speaker => s.push_str(
            "mode = \"bgp\"            # ringmail's own BGP speaker talks to the routers\n",
        ),
        BgpMode::Bird => {
            let _ = writeln!(
                s,
                "mode = \"kernel-table\"   # BIRD on this host announces table {} (bird.conf)\n\
                 kernel_table = {}",
                t.bgp.kernel_table, t.bgp.kernel_table
            );
        }
        BgpMode::Frr => {
            let _ = writeln!(
                s,
                "mode = \"kernel-table\"   # FRR on this host announces table {} (frr.conf)\n\
                 kernel_table = {}\n\
                 # zebra's connected routes for VIPs on lo would shadow the imported table routes:\n\
                 # accept the VIPs' traffic through `local` routes instead.\n\
                 loopback = \"local-route\"",
                t.bgp.kernel_table, t.bgp.kernel_table
            );
            if vips.iter().any(|a| a.is_ipv6()) {
                s.push_str(
                    "# FRR 8.4 cannot import IPv6 tables: the IPv6 VIPs are served but not announced.\n",
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "min_healthy = 1\ngraceful_wait = \"{LB_GRACEFUL_WAIT_S}s\""
    );
    for a in &vips {
        let _ = writeln!(s, "\n[[announce.vip]]\naddress = {}", q(&a.to_string()));
    }
    if let Some(device) = &t.bgp.handoff_device {
        // The other LBs of this site, in the families that have VIPs.
        let peers: Vec<IpAddr> = t
            .hosts
            .iter()
            .filter(|o| o.has(Role::Lb) && o.site == h.site && o.name != h.name)
            .flat_map(Host::addrs)
            .filter(|a| vips.iter().any(|v| v.is_ipv4() == a.is_ipv4()))
            .collect();
        let covered = [true, false].iter().all(|&v4| {
            !vips.iter().any(|v| v.is_ipv4() == v4) || peers.iter().any(|p| p.is_ipv4() == v4)
        });
        if covered {
            let list: Vec<String> = peers.iter().map(|a| q(&a.to_string())).collect();
            let _ = writeln!(
                s,
                "\n# A draining LB keeps its connections: when the routers move them here, their\n\
                 # packets are passed back to it over {device} (the other LBs of site {site}).\n\
                 [announce.handoff]\n\
                 peers = [{}]\n\
                 device = {}",
                list.join(", "),
                q(device)
            );
        } else {
            s.push_str(
                "\n# No [announce.handoff]: no other LB in this site has an address of each VIP family.\n",
            );
        }
    }
    if let Some(b) = bgp {
        let _ = writeln!(
            s,
            "\n[announce.bgp]\n\
             local_as = {}\n\
             router_id = {}\n\
             hold_time = \"9s\"",
            t.bgp.lb_asn,
            q(&b.router_id.to_string())
        );
        let has4 = vips.iter().any(|a| a.is_ipv4());
        let has6 = vips.iter().any(|a| a.is_ipv6());
        // One session per router and family, over that family: the routers' configs
        // (routers/<r>/bird.conf, frr.conf) expect exactly these.
        for &ri in &b.neighbors {
            let r = &t.routers[ri];
            if let (true, Some(peer), Some(me)) = (has4, r.ipv4, h.ipv4) {
                let _ = writeln!(
                    s,
                    "\n[[announce.bgp.neighbor]]\n\
                     name = {}\n\
                     address = {}\n\
                     remote_as = {}\n\
                     local_address = {}\n\
                     families = [\"ipv4\"]",
                    q(&format!("{}-v4", r.name)),
                    q(&peer.to_string()),
                    r.asn,
                    q(&me.to_string())
                );
            }
            if let (true, Some(peer), Some(me)) = (has6, r.ipv6, h.ipv6) {
                let _ = writeln!(
                    s,
                    "\n[[announce.bgp.neighbor]]\n\
                     name = {}\n\
                     address = {}\n\
                     remote_as = {}\n\
                     local_address = {}\n\
                     families = [\"ipv6\"]\n\
                     next_hop_v6 = {}",
                    q(&format!("{}-v6", r.name)),
                    q(&peer.to_string()),
                    r.asn,
                    q(&me.to_string()),
                    q(&me.to_string())
                );
            }
        }
    }
    s
}

fn mx_config(t: &Topology, h: &Host, p: Paths<'_>) -> String {
    let mut s = header(h, Role::Mx, "inbound SMTP for our domains", p);
    let domains: Vec<String> = t.domains.iter().map(|d| d.name.to_string()).collect();
    let (mda, mda_why) = next_hops(t, Role::Mda, h.site, ports::LMTP);
    let (mta, mta_why) = next_hops(t, Role::Mta, h.site, ports::SMTP);
    let _ = writeln!(
        s,
        "\n[mx]\n\
         hostname = {}\n\
         listen = {}\n\
         domains = {}\n\
         spool = {}\n\
         accounts = {}   # unknown users get 550 at RCPT\n\
         admin = \"127.0.0.1:{}\"\n\
         {}\n\
         \n\
         [mx.relay]\n\
         # {mda_why}.\n\
         next_hop = {}\n\
         protocol = \"lmtp\"\n\
         # Bounces go out through an MTA; {mta_why}.\n\
         bounce_next_hop = {}",
        q(h.name.as_str()),
        list(&listen(h, ports::SMTP)),
        list(&domains),
        q(&format!("{}/spool", p.state(Role::Mx))),
        q(&p.accounts(&t.accounts)),
        admin_port(Role::Mx).expect("mx has admin"),
        p.tls_line(h),
        list(&mda),
        list(&mta)
    );
    if let Some(r) = t.dns.resolver {
        let _ = writeln!(
            s,
            "\n[mx.checks]\n\
             # The sender checks (iprev, SPF, DKIM, DMARC) ask the topology's resolver.\n\
             dns = {}",
            q(&r.to_string())
        );
    }
    s
}

fn msa_config(t: &Topology, h: &Host, p: Paths<'_>) -> String {
    let mut s = header(h, Role::Msa, "authenticated submission", p);
    let (mta, why) = next_hops(t, Role::Mta, h.site, ports::SMTP);
    let lbs = addrs_of(t, &[Role::Lb]);
    let _ = writeln!(
        s,
        "\n[msa]\n\
         hostname = {}\n\
         listen = {}       # STARTTLS\n\
         listen_tls = {}   # implicit TLS\n\
         accounts = {}\n\
         spool = {}\n\
         # {why}.\n\
         relay = {}\n\
         # Mail for our own domains goes out through the MTA too (DKIM-signed) and comes back in\n\
         # through the MXs: `local_relay` speaks SMTP, and the MDAs take LMTP only.\n\
         local_route = \"mta\"\n\
         # The LBs: PROXY v2 headers accepted (and required) from them only.\n\
         trusted_proxies = {}\n\
         admin = \"127.0.0.1:{}\"\n\
         {}",
        q(h.name.as_str()),
        list(&listen(h, ports::SUBMISSION)),
        list(&listen(h, ports::SUBMISSIONS)),
        q(&p.accounts(&t.accounts)),
        q(&format!("{}/spool", p.state(Role::Msa))),
        list(&mta),
        list(&lbs),
        admin_port(Role::Msa).expect("msa has admin"),
        p.tls_line(h)
    );
    s
}

fn mta_config(t: &Topology, h: &Host, p: Paths<'_>) -> String {
    let mut s = header(h, Role::Mta, "outbound SMTP", p);
    let clients = addrs_of(t, &[Role::Msa, Role::Mx]);
    let _ = writeln!(
        s,
        "\n[mta]\n\
         hostname = {}   # the name its PTR and SPF records give\n\
         listen = {}\n\
         spool = {}\n\
         # Relaying only for our MSAs and MXs (bounces); nobody else may hand mail over.\n\
         trusted_clients = {}\n\
         admin = \"127.0.0.1:{}\"\n\
         {}",
        q(h.name.as_str()),
        list(&listen(h, ports::SMTP)),
        q(&format!("{}/spool", p.state(Role::Mta))),
        list(&clients),
        admin_port(Role::Mta).expect("mta has admin"),
        p.tls_line(h)
    );
    if let Some(r) = t.dns.resolver {
        let _ = writeln!(
            s,
            "resolver = {}   # MX lookups: the topology's resolver",
            q(&r.to_string())
        );
    }
    let keys: Vec<String> = t
        .domains
        .iter()
        .flat_map(|d| {
            d.dkim.iter().map(move |k| {
                format!(
                    "  {{ domain = {}, selector = {}, key = {} }},",
                    q(d.name.as_str()),
                    q(&k.selector),
                    q(&p.at(&k.private_key_path.display().to_string()))
                )
            })
        })
        .collect();
    if keys.is_empty() {
        s.push_str("# No DKIM keys in the topology: mail leaves unsigned.\n");
    } else {
        s.push_str("# Every domain's keys; a domain with several keys is signed with each.\n");
        let _ = writeln!(s, "dkim = [\n{}\n]", keys.join("\n"));
    }
    s
}

fn mda_config(t: &Topology, h: &Host, p: Paths<'_>) -> String {
    let mut s = header(h, Role::Mda, "LMTP delivery and IMAPS", p);
    let _ = writeln!(
        s,
        "\n[mda]\n\
         hostname = {}\n\
         lmtp = {}\n\
         imaps = {}\n\
         maildir = {}\n\
         accounts = {}\n\
         # LMTP from our MXs and MSAs only.\n\
         trusted_clients = {}\n\
         # The LBs: their PROXY v2 headers give the IMAP clients' addresses.\n\
         trusted_proxies = {}\n\
         {}",
        q(h.name.as_str()),
        list(&listen(h, ports::LMTP)),
        list(&listen(h, ports::IMAPS)),
        q(&format!("{}/mail", p.state(Role::Mda))),
        q(&p.accounts(&t.accounts)),
        list(&addrs_of(t, &[Role::Mx, Role::Msa])),
        list(&addrs_of(t, &[Role::Lb])),
        p.tls_line(h)
    );
    s
}

fn describe(role: Role) -> &'static str {
    match role {
        Role::Lb => "anycast load balancer (IMAPS, submission)",
        Role::Msa => "submission (587, 465)",
        Role::Mx => "inbound SMTP",
        Role::Mta => "outbound SMTP",
        Role::Mda => "LMTP delivery and IMAPS",
    }
}

/// The hardened systemd unit of `role` on `h`.
fn unit(t: &Topology, h: &Host, role: Role, p: Paths<'_>) -> String {
    let lb = role == Role::Lb;
    let mut s = format!(
        "# ringmail-{role}.service on {}.\n\
         # {HEADER_NOTE}\n\
         # Install as /etc/systemd/system/ringmail-{role}.service, with ringmail-{role}.toml as\n\
         # {}. Create the user first:\n\
         #     groupadd --system ringmail\n\
         #     useradd --system --gid ringmail --home-dir {} --shell /usr/sbin/nologin ringmail-{role}\n\
         # A static user per role (not DynamicUser=): the state outlives the service (backups,\n\
         # restores, the queue tools) and the TLS/DKIM keys in /etc/ringmail are shared with it\n\
         # through group ringmail (mode 0640 root:ringmail).\n\
         \n\
         [Unit]\n\
         Description=ringmail {} on {}\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         User=ringmail-{role}\n\
         Group=ringmail\n\
         ExecStart=/usr/bin/ringmail {role} --config {}\n",
        h.name,
        p.config(role),
        p.state(role),
        describe(role),
        h.name,
        p.config(role),
    );
    match role {
        Role::Lb => s.push_str(
            "# SIGHUP re-reads the configuration (listeners, pools; [announce] at the next restart).\n\
             ExecReload=/bin/kill -HUP $MAINPID\n",
        ),
        Role::Mx | Role::Msa | Role::Mta => s.push_str(
            "# SIGHUP re-reads the TLS certificate and key.\n\
             ExecReload=/bin/kill -HUP $MAINPID\n",
        ),
        Role::Mda => s.push_str(
            "# No ExecReload: the MDA does not reload anything on SIGHUP (restart it for new certificates).\n",
        ),
    }
    s.push_str("Restart=on-failure\nRestartSec=2s\n");
    if lb {
        let _ = writeln!(
            s,
            "# SIGTERM: GRACEFUL_SHUTDOWN for {LB_GRACEFUL_WAIT_S}s, withdrawal, then up to {LB_DRAIN_TIMEOUT_S}s for sessions to finish.\n\
             TimeoutStopSec={}s",
            LB_GRACEFUL_WAIT_S + LB_DRAIN_TIMEOUT_S + 15
        );
    }
    if p.root.is_some() {
        // StateDirectory= is always under /var/lib: under a root the directory is made by hand.
        let _ = writeln!(
            s,
            "# The state directory (create it, owned by ringmail-{role}, mode 0750).\n\
             ReadWritePaths={}\n\
             UMask=0027",
            p.state(role)
        );
    } else {
        let _ = writeln!(
            s,
            "StateDirectory=ringmail/{role}\n\
             StateDirectoryMode=0750\n\
             UMask=0027"
        );
    }
    let accounts = p.accounts(&t.accounts);
    if accounts.starts_with("sqlite:") && matches!(role, Role::Msa | Role::Mda | Role::Mx) {
        let path = accounts.trim_start_matches("sqlite:");
        if let Some(dir) = std::path::Path::new(path).parent() {
            let _ = writeln!(
                s,
                "# The SQLite account store needs its directory writable (journal).\n\
                 ReadWritePaths=-{}",
                dir.display()
            );
        }
    }
    s.push_str("\n# Hardening.\nNoNewPrivileges=yes\n");
    if lb {
        s.push_str(
            "# Ports below 1024; NET_ADMIN: VIPs on lo, kernel-table routes, the route TUN device,\n# the connection hand-off's nftables rules (it runs nft, which inherits the capability).\n\
             CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN\n\
             AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_ADMIN\n",
        );
    } else {
        s.push_str(
            "# Ports below 1024, nothing else.\n\
             CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n\
             AmbientCapabilities=CAP_NET_BIND_SERVICE\n",
        );
    }
    s.push_str(
        "ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n",
    );
    if lb {
        s.push_str(
            "# The kernel-table routes go through a TUN device that dies with the process: only\n\
             # /dev/net/tun (PrivateDevices=yes would hide it).\n\
             PrivateDevices=no\n\
             DevicePolicy=closed\n\
             DeviceAllow=/dev/net/tun rw\n",
        );
    } else {
        s.push_str("PrivateDevices=yes\n");
    }
    s.push_str(
        "ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         ProtectProc=invisible\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         RemoveIPC=yes\n",
    );
    if role == Role::Mda {
        s.push_str(
            "# No MemoryDenyWriteExecute: [mda.programs] may run interpreters with a JIT.\n",
        );
    } else {
        s.push_str("MemoryDenyWriteExecute=yes\n");
    }
    if lb {
        s.push_str(
            "# AF_NETLINK: addresses on lo and the kernel-table routes.\n\
             RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK\n",
        );
    } else {
        s.push_str("RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n");
    }
    s.push_str("SystemCallArchitectures=native\n");
    if lb {
        s.push_str(
            "# The io_uring engine (systemd 250 and later include these in @system-service's @aio;\n\
             # listed for older ones).\n\
             SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register\n",
        );
    } else {
        s.push_str("SystemCallFilter=@system-service\n");
    }
    s.push_str("SystemCallErrorNumber=EPERM\n");
    if lb {
        s.push_str(
            "# One descriptor per client plus one per backend connection (maxconn 200000).\n\
             LimitNOFILE=1048576\n\
             # io_uring buffer rings count against RLIMIT_MEMLOCK on kernels before 5.12.\n\
             LimitMEMLOCK=infinity\n",
        );
    } else {
        s.push_str("LimitNOFILE=65536\n");
    }
    s.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{example, file};

    fn has(text: &str, wants: &[&str]) {
        for w in wants {
            assert!(text.contains(w), "{w:?} missing from\n{text}");
        }
    }

    #[test]
    fn one_config_and_unit_per_host_role() {
        let t = example();
        let files = render(&t, &RenderOptions::default());
        assert_eq!(files.len(), 2 * t.hosts.len());
        assert_eq!(
            render(&t, &RenderOptions::default()),
            files,
            "deterministic"
        );
        has(
            file(&files, "hosts/mx-b1.example.com/ringmail-mx.toml"),
            &[
                "hostname = \"mx-b1.example.com\"",
                "listen = [\"192.0.2.40:25\", \"[2001:db8:b::40]:25\"]",
                "domains = [\"example.com\"]",
                "accounts = \"postgres://ringmail@db.example.com/ringmail\"",
                "# the MDAs of site b (mda-b1.example.com, mda-b2.example.com), spread over and failed over in turn.",
                "next_hop = [\"192.0.2.42:24\", \"192.0.2.43:24\"]",
                "protocol = \"lmtp\"",
                "bounce_next_hop = [\"192.0.2.44:25\", \"192.0.2.45:25\"]",
                "tls = { cert = \"/etc/ringmail/tls/mx-b1.example.com.crt\", key = \"/etc/ringmail/tls/mx-b1.example.com.key\" }",
            ],
        );
        has(
            file(&files, "hosts/msa-a2.example.com/ringmail-msa.toml"),
            &[
                "listen = [\"192.0.2.22:587\", \"[2001:db8:a::22]:587\"]",
                "listen_tls = [\"192.0.2.22:465\", \"[2001:db8:a::22]:465\"]",
                "relay = [\"192.0.2.28:25\", \"192.0.2.29:25\"]",
                "trusted_proxies = [\"192.0.2.19\", \"2001:db8:a::19\", \"192.0.2.20\"",
                "admin = \"127.0.0.1:9111\"",
            ],
        );
        let mta = file(&files, "hosts/mta-a1.example.com/ringmail-mta.toml");
        has(
            mta,
            &[
                "trusted_clients = [\"192.0.2.21\", \"2001:db8:a::21\", \"192.0.2.22\"",
                "{ domain = \"example.com\", selector = \"202401\", key = \"/etc/ringmail/dkim/202401._domainkey.example.com.key\" }",
            ],
        );
        // Only MSAs and MXs relay through the MTA.
        assert!(!mta.contains("192.0.2.26"), "{mta}");
        has(
            file(&files, "hosts/mda-a1.example.com/ringmail-mda.toml"),
            &[
                "lmtp = [\"192.0.2.26:24\", \"[2001:db8:a::26]:24\"]",
                "imaps = [\"192.0.2.26:993\", \"[2001:db8:a::26]:993\"]",
                "trusted_clients = [\"192.0.2.21\", \"2001:db8:a::21\"",
                "maildir = \"/var/lib/ringmail/mda/mail\"",
            ],
        );
        let lb = file(&files, "hosts/lb-b2.example.com/ringmail-lb.toml");
        has(
            lb,
            &[
                "bind = \"[2001:db8::1]:993\"\npool = \"mda-993\"",
                "bind = \"192.0.2.2:465\"\npool = \"msa-465\"",
                "[pool.msa-587]",
                "check = \"smtp-starttls\"",
                "ehlo_name = \"lb-b2.example.com\"",
                "{ addr = \"192.0.2.42:993\", name = \"mda-b1.example.com\" }",
                "{ addr = \"192.0.2.38:465\", name = \"msa-b2.example.com\" }",
                "proxy_protocol = \"v2\"",
                "mode = \"kernel-table\"",
                "kernel_table = 100",
                "address = \"2001:db8::2\"",
            ],
        );
        // Own site's backends only.
        assert!(!lb.contains("192.0.2.26:993"), "{lb}");
        assert!(!lb.contains("[announce.bgp]"), "{lb}");
        assert!(!lb.contains("loopback"), "{lb}");
    }

    #[test]
    fn announce_per_mode() {
        let mut t = example();
        t.bgp.mode = BgpMode::Speaker;
        let files = render(&t, &RenderOptions::default());
        has(
            file(&files, "hosts/lb-a1.example.com/ringmail-lb.toml"),
            &[
                "mode = \"bgp\"",
                "local_as = 65010",
                "router_id = \"192.0.2.19\"",
                "name = \"rt-a2-v6\"\naddress = \"2001:db8:a::18\"\nremote_as = 65000\nlocal_address = \"2001:db8:a::19\"\nfamilies = [\"ipv6\"]\nnext_hop_v6 = \"2001:db8:a::19\"",
                "name = \"rt-a1-v4\"\naddress = \"192.0.2.17\"",
            ],
        );
        t.bgp.mode = BgpMode::Frr;
        let files = render(&t, &RenderOptions::default());
        has(
            file(&files, "hosts/lb-a1.example.com/ringmail-lb.toml"),
            &["mode = \"kernel-table\"", "loopback = \"local-route\""],
        );
    }

    #[test]
    fn units_are_hardened() {
        let t = example();
        let files = render(&t, &RenderOptions::default());
        let lb = file(&files, "hosts/lb-a1.example.com/ringmail-lb.service");
        has(
            lb,
            &[
                "User=ringmail-lb\nGroup=ringmail",
                "ExecStart=/usr/bin/ringmail lb --config /etc/ringmail/lb.toml",
                "ExecReload=/bin/kill -HUP $MAINPID",
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN",
                "DeviceAllow=/dev/net/tun rw",
                "AF_NETLINK",
                "io_uring_setup io_uring_enter io_uring_register",
                "LimitNOFILE=1048576",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "Restart=on-failure",
            ],
        );
        let mda = file(&files, "hosts/mda-b2.example.com/ringmail-mda.service");
        has(
            mda,
            &[
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
                "PrivateDevices=yes",
                "StateDirectory=ringmail/mda",
                "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n",
            ],
        );
        assert!(!mda.contains("ExecReload="), "{mda}");
        assert!(!mda.contains("NET_ADMIN"), "{mda}");
        assert!(
            file(&files, "hosts/mta-b1.example.com/ringmail-mta.service")
                .contains("ExecReload=/bin/kill -HUP $MAINPID")
        );
    }

    #[test]
    fn root_moves_every_path_and_resolver_reaches_mx_and_mta() {
        let mut t = example();
        t.accounts = crate::topology::DEFAULT_ACCOUNTS.to_string();
        t.dns.resolver = Some("192.0.2.30:53".parse().unwrap());
        let opts = RenderOptions {
            root: Some("/srv/lab/root/".into()),
        };
        let files = render(&t, &opts);
        let r = "/srv/lab/root";
        has(
            file(&files, "hosts/mta-a1.example.com/ringmail-mta.toml"),
            &[
                &format!("spool = \"{r}/var/lib/ringmail/mta/spool\""),
                &format!("cert = \"{r}/etc/ringmail/tls/mta-a1.example.com.crt\""),
                &format!("key = \"{r}/etc/ringmail/dkim/202401._domainkey.example.com.key\""),
                "resolver = \"192.0.2.30:53\"",
            ],
        );
        has(
            file(&files, "hosts/mx-a1.example.com/ringmail-mx.toml"),
            &[
                &format!("accounts = \"sqlite:{r}/var/lib/ringmail/accounts.db\""),
                "[mx.checks]\n# The sender checks (iprev, SPF, DKIM, DMARC) ask the topology's resolver.\ndns = \"192.0.2.30:53\"",
            ],
        );
        has(
            file(&files, "hosts/mda-a1.example.com/ringmail-mda.toml"),
            &[&format!("maildir = \"{r}/var/lib/ringmail/mda/mail\"")],
        );
        let unit = file(&files, "hosts/msa-a1.example.com/ringmail-msa.service");
        has(
            unit,
            &[
                &format!("--config {r}/etc/ringmail/msa.toml"),
                &format!("ReadWritePaths={r}/var/lib/ringmail/msa\n"),
                &format!("ReadWritePaths=-{r}/var/lib/ringmail\n"),
            ],
        );
        assert!(!unit.contains("StateDirectory="), "{unit}");
        for f in &files {
            for line in f.contents.lines().filter(|l| !l.starts_with('#')) {
                for fixed in ["\"/etc/ringmail", "\"/var/lib/ringmail", " /etc/ringmail"] {
                    assert!(!line.contains(fixed), "{}: {line}", f.path.display());
                }
            }
        }
        // Without a resolver in the topology, the hosts' own resolv.conf (nothing rendered).
        let plain = render(&example(), &RenderOptions::default());
        let mx = file(&plain, "hosts/mx-a1.example.com/ringmail-mx.toml");
        assert!(!mx.contains("[mx.checks]"), "{mx}");
    }

    #[test]
    fn toml_strings() {
        assert_eq!(q("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }
}
