//! BGP daemon configs: the LB side of the kernel-table mode and the site routers' ECMP side.
//!
//! ```text
//! mode bird:    hosts/<lb>/bird.conf     learns kernel table N, announces the VIP host routes
//! mode frr:     hosts/<lb>/frr.conf      `ip import-table N` + `redistribute table N` (IPv4 only:
//!                                        FRR 8.4 has no `ipv6 import-table`)
//! mode speaker: nothing on the LBs       ringmail's own speaker ([announce.bgp], see `units`)
//! every mode:   routers/<r>/bird.conf    one session per LB and address family, only the VIP
//!               routers/<r>/frr.conf     host routes accepted, GRACEFUL_SHUTDOWN -> local pref 0,
//!                                        ECMP over the LBs (`merge paths` / `maximum-paths`)
//! ```
//!
//! The configs follow `deploy/examples/bird/*.conf` and `deploy/examples/frr/*.conf` (run for
//! real by `tests/anycast_bird.rs`), with the placeholders filled from the topology. The VIP
//! filters list the services' addresses exactly (a /32 or /128 each), not a covering range.
//! IPv4 and IPv6 use separate sessions (each over its own family), so `next hop self` needs no
//! extended next hop; a family is left out where either end has no address of it or no service
//! has a VIP of it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::RenderedFile;
use crate::topology::{BgpMode, Host, Role, Router, Topology};

/// Route protocol number of ringmail's kernel-table routes (RTPROT_RINGMAIL in
/// bgp-glue/speaker/src/netlink.rs).
pub const RINGMAIL_PROTO: u32 = 114;
/// The metric ringmail's drain sequence re-installs each route with (GRACEFUL_METRIC).
pub const GRACEFUL_METRIC: u32 = 2000;
/// BGP hold time towards the routers, seconds (keepalive a third of it).
pub const HOLD_TIME: u32 = 9;
/// The most ECMP paths a router merges (one per LB).
pub const MAX_PATHS: u32 = 16;

const HEADER_NOTE: &str = "Rendered by `ringmail deploy render` from the topology file: change the topology, not this file.";

pub fn render(t: &Topology) -> Vec<RenderedFile> {
    let mut out = Vec::new();
    for h in t.hosts_with(Role::Lb) {
        let Some(b) = &h.bgp else { continue };
        match t.bgp.mode {
            BgpMode::Speaker => {}
            BgpMode::Bird => out.push(RenderedFile::new(
                format!("hosts/{}/bird.conf", h.name),
                lb_bird(t, h, b.router_id, &b.neighbors),
            )),
            BgpMode::Frr => out.push(RenderedFile::new(
                format!("hosts/{}/frr.conf", h.name),
                lb_frr(t, h, b.router_id, &b.neighbors),
            )),
        }
    }
    for (i, r) in t.routers.iter().enumerate() {
        out.push(RenderedFile::new(
            format!("routers/{}/bird.conf", r.name),
            router_bird(t, i),
        ));
        out.push(RenderedFile::new(
            format!("routers/{}/frr.conf", r.name),
            router_frr(t, i),
        ));
    }
    out
}

/// The services' IPv4 anycast addresses, sorted, without duplicates.
pub fn vips4(t: &Topology) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = t.services.iter().filter_map(|s| s.ipv4).collect();
    v.sort();
    v.dedup();
    v
}

/// The services' IPv6 anycast addresses, sorted, without duplicates.
pub fn vips6(t: &Topology) -> Vec<Ipv6Addr> {
    let mut v: Vec<Ipv6Addr> = t.services.iter().filter_map(|s| s.ipv6).collect();
    v.sort();
    v.dedup();
    v
}

/// The LB hosts that peer with router `r` (those listing it among their neighbors), in topology
/// order.
pub fn lbs_of_router(t: &Topology, r: usize) -> Vec<&Host> {
    t.hosts_with(Role::Lb)
        .filter(|h| h.bgp.as_ref().is_some_and(|b| b.neighbors.contains(&r)))
        .collect()
}

/// A BIRD symbol from a name (`rt-a1` -> `rt_a1`): letters, digits and underscores, starting
/// with a letter.
fn symbol(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        s
    } else {
        format!("n_{s}")
    }
}

/// Short names of the LB hosts for session names: the first label, or the whole name where two
/// LBs share a first label.
fn lb_label(lbs: &[&Host], h: &Host) -> String {
    let clash = lbs
        .iter()
        .filter(|o| o.name.short() == h.name.short())
        .count()
        > 1;
    if clash {
        symbol(h.name.as_str())
    } else {
        symbol(h.name.short())
    }
}

fn bird_set4(v: &[Ipv4Addr]) -> String {
    let items: Vec<String> = v.iter().map(|a| format!("{a}/32")).collect();
    format!("[ {} ]", items.join(", "))
}

fn bird_set6(v: &[Ipv6Addr]) -> String {
    let items: Vec<String> = v.iter().map(|a| format!("{a}/128")).collect();
    format!("[ {} ]", items.join(", "))
}

fn router_list(t: &Topology, neighbors: &[usize]) -> String {
    neighbors
        .iter()
        .map(|&i| t.routers[i].name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// (family digit, BIRD channel, router address, LB address, family announced).
type Session<'a> = (&'a str, &'a str, Option<IpAddr>, Option<IpAddr>, bool);

/// BIRD 2 on an LB host, kernel-table mode (deploy/examples/bird/bird-lb-kernel-table.conf).
fn lb_bird(t: &Topology, h: &Host, router_id: Ipv4Addr, neighbors: &[usize]) -> String {
    let v4 = vips4(t);
    let v6 = vips6(t);
    let asn = t.bgp.lb_asn;
    let table = t.bgp.kernel_table;
    let fam4 = !v4.is_empty() && h.ipv4.is_some();
    let fam6 = !v6.is_empty() && h.ipv6.is_some();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# BIRD 2 on {} (site {}), kernel-table mode: learns the VIP host routes ringmail\n\
         # writes into kernel table {table} and announces them to {} with itself as next hop.\n\
         # {HEADER_NOTE}\n\
         # Install as /etc/bird/bird.conf; `bird -p -c /etc/bird/bird.conf` checks it.\n\
         # ringmail on this host: [announce] mode = \"kernel-table\", kernel_table = {table}\n\
         # (ringmail-lb.toml). ringmail owns table {table}: put nothing else in it.\n\
         # A crashed or stopped ringmail takes its routes with it (they go through a TUN device\n\
         # that dies with the process), and BIRD withdraws them at once.",
        h.name,
        t.sites[h.site].name,
        router_list(t, neighbors)
    );
    let _ = writeln!(s, "\nlog syslog all;\n\nrouter id {router_id};\n");
    s.push_str(
        "# The services' anycast addresses, as host routes: nothing else is ever announced.\n",
    );
    if fam4 {
        let _ = writeln!(s, "define VIP4 = {};", bird_set4(&v4));
    }
    if fam6 {
        let _ = writeln!(s, "define VIP6 = {};", bird_set6(&v6));
    }
    let _ = writeln!(
        s,
        "\n# Route protocol number ringmail gives its routes; BIRD shows it as `krt_source`.\n\
         define RINGMAIL_PROTO = {RINGMAIL_PROTO};\n\
         \n\
         # Set to 1 and `birdc configure` to drain this LB by hand: the routes stay announced with\n\
         # GRACEFUL_SHUTDOWN (RFC 8326) and the routers prefer the other LBs.\n\
         define DRAIN = 0;\n\
         \n\
         # ringmail's drain sequence (SIGTERM, or POST /api/announce/drain on its admin listener)\n\
         # re-installs each route with this metric for announce.graceful_wait, then deletes it.\n\
         define RINGMAIL_GRACEFUL_METRIC = {GRACEFUL_METRIC};\n\
         \n\
         # Required: BIRD drops kernel routes on interfaces it does not know.\n\
         protocol device {{\n\
         \tscan time 10;\n\
         }}"
    );
    let fams: Vec<(&str, &str, bool)> = vec![("4", "ipv4", fam4), ("6", "ipv6", fam6)];
    for (n, fam, on) in &fams {
        if !on {
            continue;
        }
        let _ = writeln!(
            s,
            "\n{fam} table ringmail{n};\n\
             \n\
             # Learn kernel table {table}: `learn` imports routes BIRD did not install (ringmail's).\n\
             protocol kernel ringmail_k{n} {{\n\
             \tkernel table {table};\n\
             \tlearn;\n\
             \tscan time 10;\n\
             \t{fam} {{\n\
             \t\ttable ringmail{n};\n\
             \t\timport where net ~ VIP{n} && krt_source = RINGMAIL_PROTO;\n\
             \t\texport none;\n\
             \t}};\n\
             }}\n\
             \n\
             filter ringmail_out{n} {{\n\
             \tif source != RTS_INHERIT then reject;\n\
             \tif net !~ VIP{n} then reject;\n\
             \tif DRAIN = 1 || krt_metric = RINGMAIL_GRACEFUL_METRIC then {{\n\
             \t\tbgp_community.add((65535, 0));  # GRACEFUL_SHUTDOWN (RFC 8326)\n\
             \t\tbgp_path.prepend({asn});        # and a longer path for routers without\n\
             \t\tbgp_path.prepend({asn});        # a graceful-shutdown policy\n\
             \t}}\n\
             \taccept;\n\
             }}"
        );
    }
    let _ = writeln!(
        s,
        "\n# One eBGP session per router and address family.\n\
         template bgp site_router {{\n\
         \tlocal as {asn};\n\
         \thold time {HOLD_TIME};\n\
         \tkeepalive time {};\n\
         }}",
        HOLD_TIME / 3
    );
    if !fam4 && !fam6 {
        s.push_str("\n# No VIP of a family this host has an address of: no sessions.\n");
    }
    for &ri in neighbors {
        let r = &t.routers[ri];
        let sessions: [Session; 2] = [
            (
                "4",
                "ipv4",
                r.ipv4.map(IpAddr::V4),
                h.ipv4.map(IpAddr::V4),
                fam4,
            ),
            (
                "6",
                "ipv6",
                r.ipv6.map(IpAddr::V6),
                h.ipv6.map(IpAddr::V6),
                fam6,
            ),
        ];
        for (n, fam, peer, local, on) in sessions {
            let (Some(peer), Some(local), true) = (peer, local, on) else {
                continue;
            };
            let _ = writeln!(
                s,
                "\nprotocol bgp {}_v{n} from site_router {{\n\
                 \tneighbor {peer} as {};\n\
                 \tsource address {local};\n\
                 \t{fam} {{\n\
                 \t\ttable ringmail{n};\n\
                 \t\timport none;\n\
                 \t\texport filter ringmail_out{n};\n\
                 \t\tnext hop self;\n\
                 \t}};\n\
                 }}",
                symbol(&r.name),
                r.asn
            );
        }
    }
    s
}

/// FRR on an LB host, kernel-table mode (deploy/examples/frr/frr-lb-kernel-table.conf).
fn lb_frr(t: &Topology, h: &Host, router_id: Ipv4Addr, neighbors: &[usize]) -> String {
    let v4 = vips4(t);
    let v6 = vips6(t);
    let asn = t.bgp.lb_asn;
    let table = t.bgp.kernel_table;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "! FRR 8.4 (integrated frr.conf: zebra + bgpd) on {} (site {}), kernel-table mode:\n\
         ! zebra imports ringmail's kernel table {table}, bgpd announces the VIP host routes to {}.\n\
         ! {HEADER_NOTE}\n\
         ! Install as /etc/frr/frr.conf (with zebra and bgpd enabled in /etc/frr/daemons);\n\
         ! `vtysh --dryrun -f /etc/frr/frr.conf` checks it.\n\
         ! ringmail on this host: [announce] mode = \"kernel-table\", kernel_table = {table},\n\
         ! loopback = \"local-route\" (zebra's connected routes for addresses on lo would shadow the\n\
         ! imported table routes). FRR imports tables 1-252 only.",
        h.name,
        t.sites[h.site].name,
        router_list(t, neighbors)
    );
    if !v6.is_empty() {
        let list: Vec<String> = v6.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            s,
            "!\n! IPv6: FRR 8.4 has no `ipv6 import-table`, so the IPv6 VIPs ({}) are NOT\n\
             ! announced from this host. With FRR 10 or later, see the commented block at the end;\n\
             ! with 8.4 use the bird or speaker mode for IPv6.",
            list.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "!\nfrr version 8.4\nfrr defaults traditional\nhostname {}\nlog syslog informational\n!",
        h.name.short()
    );
    let fam4 = !v4.is_empty() && h.ipv4.is_some();
    let peers: Vec<&Router> = neighbors
        .iter()
        .map(|&i| &t.routers[i])
        .filter(|r| r.ipv4.is_some())
        .collect();
    if fam4 {
        s.push_str("! Only the services' IPv4 anycast addresses are imported and announced.\n");
        for (i, a) in v4.iter().enumerate() {
            let _ = writeln!(
                s,
                "ip prefix-list RINGMAIL-VIP4 seq {} permit {a}/32",
                (i + 1) * 10
            );
        }
        let _ = writeln!(
            s,
            "ip prefix-list RINGMAIL-VIP4 seq {} deny any\n!",
            (v4.len() + 1) * 10
        );
        let _ = writeln!(
            s,
            "! zebra: import kernel table {table} (filtered) into the RIB.\n\
             route-map RINGMAIL-IMPORT permit 10\n \
             match ip address prefix-list RINGMAIL-VIP4\n\
             exit\n\
             !\n\
             ip import-table {table} route-map RINGMAIL-IMPORT\n\
             !\n\
             ! bgpd: ringmail's drain sequence re-installs each route with metric {GRACEFUL_METRIC} for\n\
             ! announce.graceful_wait before deleting it: GRACEFUL_SHUTDOWN (RFC 8326) and prepends.\n\
             route-map RINGMAIL-REDIST4 permit 5\n \
             match ip address prefix-list RINGMAIL-VIP4\n \
             match metric {GRACEFUL_METRIC}\n \
             set community graceful-shutdown additive\n \
             set as-path prepend {asn} {asn}\n \
             set metric 0\n\
             exit\n\
             route-map RINGMAIL-REDIST4 permit 10\n \
             match ip address prefix-list RINGMAIL-VIP4\n \
             ! The kernel metric would otherwise become the MED.\n \
             set metric 0\n\
             exit\n\
             !\n\
             route-map RINGMAIL-OUT4 permit 10\n \
             match ip address prefix-list RINGMAIL-VIP4\n\
             exit\n\
             !\n\
             ! To drain this LB by hand add `set community graceful-shutdown additive` to\n\
             ! RINGMAIL-OUT4 (or `bgp graceful-shutdown` under router bgp).\n\
             !\n\
             route-map DENY-ALL deny 10\n\
             exit\n\
             !"
        );
    } else {
        s.push_str("! No IPv4 VIP (or no IPv4 address on this host): nothing to announce.\n!\n");
    }
    let _ = writeln!(
        s,
        "router bgp {asn}\n \
         bgp router-id {router_id}\n \
         bgp log-neighbor-changes\n \
         no bgp default ipv4-unicast\n \
         bgp ebgp-requires-policy"
    );
    if fam4 && !peers.is_empty() {
        let mut asns: Vec<u32> = peers.iter().map(|r| r.asn).collect();
        asns.sort_unstable();
        asns.dedup();
        for asn_r in &asns {
            let _ = writeln!(
                s,
                " neighbor SITE{asn_r} peer-group\n \
                 neighbor SITE{asn_r} remote-as {asn_r}\n \
                 neighbor SITE{asn_r} timers {} {HOLD_TIME}",
                HOLD_TIME / 3
            );
            if let Some(a) = h.ipv4 {
                let _ = writeln!(s, " neighbor SITE{asn_r} update-source {a}");
            }
        }
        for r in &peers {
            if let Some(a) = r.ipv4 {
                let _ = writeln!(s, " neighbor {a} peer-group SITE{}", r.asn);
                let _ = writeln!(s, " neighbor {a} description {}", r.name);
            }
        }
        let _ = writeln!(
            s,
            " !\n address-family ipv4 unicast\n  \
             redistribute table {table} route-map RINGMAIL-REDIST4"
        );
        for asn_r in &asns {
            let _ = writeln!(
                s,
                "  neighbor SITE{asn_r} activate\n  \
                 neighbor SITE{asn_r} next-hop-self\n  \
                 neighbor SITE{asn_r} route-map DENY-ALL in\n  \
                 neighbor SITE{asn_r} route-map RINGMAIL-OUT4 out"
            );
        }
        s.push_str(" exit-address-family\n");
    }
    s.push_str("exit\n!\n");
    let peers6: Vec<&Router> = neighbors
        .iter()
        .map(|&i| &t.routers[i])
        .filter(|r| r.ipv6.is_some())
        .collect();
    if !v6.is_empty() && h.ipv6.is_some() && !peers6.is_empty() {
        s.push_str("! FRR 10.x and later only (not 8.4) - IPv6 the same way:\n");
        for (i, a) in v6.iter().enumerate() {
            let _ = writeln!(
                s,
                "! ipv6 prefix-list RINGMAIL-VIP6 seq {} permit {a}/128",
                (i + 1) * 10
            );
        }
        let _ = writeln!(
            s,
            "! route-map RINGMAIL-IMPORT6 permit 10\n\
             !  match ipv6 address prefix-list RINGMAIL-VIP6\n\
             ! exit\n\
             ! ipv6 import-table {table} route-map RINGMAIL-IMPORT6\n\
             ! router bgp {asn}\n\
             !  neighbor SITE6 peer-group"
        );
        for r in &peers6 {
            if let Some(a) = r.ipv6 {
                let _ = writeln!(s, "!  neighbor {a} remote-as {}", r.asn);
                let _ = writeln!(s, "!  neighbor {a} peer-group SITE6");
            }
        }
        let _ = writeln!(
            s,
            "!  address-family ipv6 unicast\n\
             !   redistribute table {table} route-map RINGMAIL-IMPORT6\n\
             !   neighbor SITE6 activate\n\
             !   neighbor SITE6 next-hop-self\n\
             !   neighbor SITE6 route-map DENY-ALL in\n\
             !   neighbor SITE6 route-map RINGMAIL-IMPORT6 out\n\
             !  exit-address-family\n\
             ! exit\n\
             !"
        );
    }
    s.push_str("end\n");
    s
}

/// The sessions of router `ri`: (LB, family digit, LB address, router address).
fn router_sessions(t: &Topology, ri: usize) -> Vec<(&Host, char, IpAddr, IpAddr)> {
    let r = &t.routers[ri];
    let v4 = !vips4(t).is_empty();
    // FRR 8.4 on the LBs announces IPv4 only: no IPv6 sessions that would never come up.
    let v6 = !vips6(t).is_empty() && t.bgp.mode != BgpMode::Frr;
    let mut out = Vec::new();
    for lb in lbs_of_router(t, ri) {
        if let (true, Some(l), Some(me)) = (v4, lb.ipv4, r.ipv4) {
            out.push((lb, '4', IpAddr::V4(l), IpAddr::V4(me)));
        }
        if let (true, Some(l), Some(me)) = (v6, lb.ipv6, r.ipv6) {
            out.push((lb, '6', IpAddr::V6(l), IpAddr::V6(me)));
        }
    }
    out
}

fn router_header(t: &Topology, r: &Router, comment: &str, lbs: &[&Host]) -> String {
    let names: Vec<&str> = lbs.iter().map(|h| h.name.as_str()).collect();
    let mut s = format!(
        "{comment} Site router {} (site {}, AS {}) peering with the ringmail LBs {}: every LB that\n\
         {comment} announces a VIP is one path of an ECMP route.\n\
         {comment} {HEADER_NOTE}\n\
         {comment} Also set (e.g. /etc/sysctl.d/90-ecmp.conf) so flows hash on the L4 5-tuple and a TCP\n\
         {comment} connection sticks to one LB:\n\
         {comment}     net.ipv4.fib_multipath_hash_policy = 1\n\
         {comment}     net.ipv6.fib_multipath_hash_policy = 1\n",
        r.name,
        t.sites[r.site].name,
        r.asn,
        if names.is_empty() {
            "(none list this router)".to_string()
        } else {
            names.join(", ")
        },
    );
    if t.bgp.mode == BgpMode::Frr && !vips6(t).is_empty() {
        let _ = writeln!(
            s,
            "{comment} bgp.mode is frr: the LBs' FRR 8.4 announces IPv4 only, so there are no IPv6 sessions."
        );
    }
    s
}

/// BIRD 2 on a site router (deploy/examples/bird/bird-router-ecmp.conf).
fn router_bird(t: &Topology, ri: usize) -> String {
    let r = &t.routers[ri];
    let lbs = lbs_of_router(t, ri);
    let sessions = router_sessions(t, ri);
    let has4 = sessions.iter().any(|x| x.1 == '4');
    let has6 = sessions.iter().any(|x| x.1 == '6');
    let mut s = router_header(t, r, "#", &lbs);
    s.push_str("# Install as /etc/bird/bird.conf; `bird -p -c /etc/bird/bird.conf` checks it.\n");
    s.push_str("\nlog syslog all;\n\n");
    match r.ipv4 {
        Some(a) => {
            let _ = writeln!(s, "router id {a};\n");
        }
        None => s.push_str(
            "# No IPv4 address in the topology: BIRD picks the router id from an interface.\n\n",
        ),
    }
    s.push_str("# The only routes accepted from the LBs: the services' anycast host routes.\n");
    if has4 {
        let _ = writeln!(s, "define VIP4 = {};", bird_set4(&vips4(t)));
    }
    if has6 {
        let _ = writeln!(s, "define VIP6 = {};", bird_set6(&vips6(t)));
    }
    s.push_str(
        "\nprotocol device {\n\tscan time 10;\n}\n\
         \n\
         # `merge paths yes`: the best route and the equally good others become one multipath\n\
         # route in the kernel, one next hop per LB. The master tables hold nothing but the\n\
         # filtered LB routes, so `export all` is safe (restrict it if you add other protocols).\n",
    );
    for (n, fam, on) in [('4', "ipv4", has4), ('6', "ipv6", has6)] {
        if !on {
            continue;
        }
        let _ = writeln!(
            s,
            "protocol kernel kernel{n} {{\n\
             \tmerge paths yes limit {MAX_PATHS};\n\
             \t{fam} {{\n\
             \t\timport none;\n\
             \t\texport all;\n\
             \t}};\n\
             }}\n"
        );
    }
    s.push_str(
        "# GRACEFUL_SHUTDOWN (RFC 8326): a draining LB tags its routes 65535:0; local preference 0\n\
         # takes it out of the ECMP group (paths merge only at equal preference) before the\n\
         # withdrawal.\n",
    );
    for (n, on) in [('4', has4), ('6', has6)] {
        if !on {
            continue;
        }
        let _ = writeln!(
            s,
            "filter from_lb{n} {{\n\
             \tif net !~ VIP{n} then reject;\n\
             \tif (65535, 0) ~ bgp_community then bgp_local_pref = 0;\n\
             \taccept;\n\
             }}\n"
        );
    }
    let _ = writeln!(
        s,
        "template bgp lb {{\n\
         \tlocal as {};\n\
         \thold time {HOLD_TIME};\n\
         \tkeepalive time {};\n\
         }}",
        r.asn,
        HOLD_TIME / 3
    );
    if sessions.is_empty() {
        s.push_str("\n# No LB peers with this router.\n");
    }
    for (lb, n, peer, me) in &sessions {
        let fam = if *n == '4' { "ipv4" } else { "ipv6" };
        let _ = writeln!(
            s,
            "\n# {}\n\
             protocol bgp {}_v{n} from lb {{\n\
             \tneighbor {peer} as {};\n\
             \tsource address {me};\n\
             \t{fam} {{\n\
             \t\timport filter from_lb{n};\n\
             \t\timport limit 1024 action block;   # a broken LB cannot flood the table\n\
             \t\texport none;                      # the LBs need no routes from us\n\
             \t}};\n\
             }}",
            lb.name,
            lb_label(&lbs, lb),
            t.bgp.lb_asn
        );
    }
    s
}

/// FRR on a site router: the same policy as [`router_bird`].
fn router_frr(t: &Topology, ri: usize) -> String {
    let r = &t.routers[ri];
    let lbs = lbs_of_router(t, ri);
    let sessions = router_sessions(t, ri);
    let has4 = sessions.iter().any(|x| x.1 == '4');
    let has6 = sessions.iter().any(|x| x.1 == '6');
    let lb_asn = t.bgp.lb_asn;
    let mut s = router_header(t, r, "!", &lbs);
    s.push_str(
        "! Install as /etc/frr/frr.conf (bgpd enabled in /etc/frr/daemons);\n\
         ! `vtysh --dryrun -f /etc/frr/frr.conf` checks it.\n!\n",
    );
    let _ = writeln!(
        s,
        "frr version 8.4\nfrr defaults traditional\nhostname {}\nlog syslog informational\n!",
        r.name
    );
    s.push_str("! The only routes accepted from the LBs: the services' anycast host routes.\n");
    if has4 {
        let v4 = vips4(t);
        for (i, a) in v4.iter().enumerate() {
            let _ = writeln!(
                s,
                "ip prefix-list RINGMAIL-VIP4 seq {} permit {a}/32",
                (i + 1) * 10
            );
        }
        let _ = writeln!(
            s,
            "ip prefix-list RINGMAIL-VIP4 seq {} deny any",
            (v4.len() + 1) * 10
        );
    }
    if has6 {
        let v6 = vips6(t);
        for (i, a) in v6.iter().enumerate() {
            let _ = writeln!(
                s,
                "ipv6 prefix-list RINGMAIL-VIP6 seq {} permit {a}/128",
                (i + 1) * 10
            );
        }
        let _ = writeln!(
            s,
            "ipv6 prefix-list RINGMAIL-VIP6 seq {} deny any",
            (v6.len() + 1) * 10
        );
    }
    s.push_str(
        "!\n\
         ! GRACEFUL_SHUTDOWN (RFC 8326): a draining LB tags its routes 65535:0; local preference 0\n\
         ! takes it out of the ECMP group before the withdrawal.\n\
         bgp community-list standard GSHUT seq 5 permit graceful-shutdown\n!\n",
    );
    for (n, on, m) in [('4', has4, "ip"), ('6', has6, "ipv6")] {
        if !on {
            continue;
        }
        let _ = writeln!(
            s,
            "route-map FROM-LB{n} permit 10\n \
             match {m} address prefix-list RINGMAIL-VIP{n}\n \
             match community GSHUT\n \
             set local-preference 0\n\
             exit\n\
             route-map FROM-LB{n} permit 20\n \
             match {m} address prefix-list RINGMAIL-VIP{n}\n\
             exit\n!"
        );
    }
    s.push_str("route-map DENY-ALL deny 10\nexit\n!\n");
    let _ = writeln!(s, "router bgp {}", r.asn);
    if let Some(a) = r.ipv4 {
        let _ = writeln!(s, " bgp router-id {a}");
    }
    s.push_str(
        " bgp log-neighbor-changes\n \
         no bgp default ipv4-unicast\n \
         bgp ebgp-requires-policy\n",
    );
    for (n, on) in [('4', has4), ('6', has6)] {
        if !on {
            continue;
        }
        let _ = writeln!(
            s,
            " neighbor LB{n} peer-group\n \
             neighbor LB{n} remote-as {lb_asn}\n \
             neighbor LB{n} timers {} {HOLD_TIME}",
            HOLD_TIME / 3
        );
        if let Some(me) = sessions.iter().find(|x| x.1 == n).map(|x| x.3) {
            let _ = writeln!(s, " neighbor LB{n} update-source {me}");
        }
        for (lb, _, peer, _) in sessions.iter().filter(|x| x.1 == n) {
            let _ = writeln!(s, " neighbor {peer} peer-group LB{n}");
            let _ = writeln!(s, " neighbor {peer} description {}", lb.name);
        }
    }
    for (n, on, fam) in [('4', has4, "ipv4"), ('6', has6, "ipv6")] {
        if !on {
            continue;
        }
        let _ = writeln!(
            s,
            " !\n address-family {fam} unicast\n  \
             neighbor LB{n} activate\n  \
             neighbor LB{n} route-map FROM-LB{n} in\n  \
             neighbor LB{n} route-map DENY-ALL out\n  \
             neighbor LB{n} maximum-prefix 1024\n  \
             ! ECMP: one path per LB (all LBs share AS {lb_asn}).\n  \
             maximum-paths {MAX_PATHS}\n \
             exit-address-family"
        );
    }
    s.push_str("exit\n!\nend\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{example, file};

    #[test]
    fn bird_mode_lb_and_router_files() {
        let t = example();
        let files = render(&t);
        let mut paths: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "hosts/lb-a1.example.com/bird.conf",
                "hosts/lb-a2.example.com/bird.conf",
                "hosts/lb-b1.example.com/bird.conf",
                "hosts/lb-b2.example.com/bird.conf",
                "routers/rt-a1/bird.conf",
                "routers/rt-a1/frr.conf",
                "routers/rt-a2/bird.conf",
                "routers/rt-a2/frr.conf",
                "routers/rt-b1/bird.conf",
                "routers/rt-b1/frr.conf",
                "routers/rt-b2/bird.conf",
                "routers/rt-b2/frr.conf",
            ]
        );
        let lb = file(&files, "hosts/lb-a1.example.com/bird.conf");
        for want in [
            "router id 192.0.2.19;",
            "define VIP4 = [ 192.0.2.1/32, 192.0.2.2/32 ];",
            "define VIP6 = [ 2001:db8::1/128, 2001:db8::2/128 ];",
            "kernel table 100;",
            "local as 65010;",
            "protocol bgp rt_a1_v4 from site_router {\n\tneighbor 192.0.2.17 as 65000;\n\tsource address 192.0.2.19;",
            "protocol bgp rt_a2_v6 from site_router {\n\tneighbor 2001:db8:a::18 as 65000;",
            "krt_metric = RINGMAIL_GRACEFUL_METRIC",
            "define RINGMAIL_GRACEFUL_METRIC = 2000;",
            "bgp_path.prepend(65010);",
        ] {
            assert!(lb.contains(want), "{want:?} missing from\n{lb}");
        }
        assert!(!lb.contains("rt_b1"), "{lb}");
        let rt = file(&files, "routers/rt-b2/bird.conf");
        for want in [
            "router id 192.0.2.34;",
            "merge paths yes limit 16;",
            "protocol bgp lb_b1_v4 from lb {\n\tneighbor 192.0.2.35 as 65010;",
            "protocol bgp lb_b2_v6 from lb {\n\tneighbor 2001:db8:b::36 as 65010;",
            "bgp_local_pref = 0;",
        ] {
            assert!(rt.contains(want), "{want:?} missing from\n{rt}");
        }
        assert!(!rt.contains("lb_a1"), "{rt}");
        let frr = file(&files, "routers/rt-a1/frr.conf");
        for want in [
            "router bgp 65000\n bgp router-id 192.0.2.17",
            " neighbor 192.0.2.19 peer-group LB4",
            " neighbor 2001:db8:a::20 peer-group LB6",
            "ipv6 prefix-list RINGMAIL-VIP6 seq 20 permit 2001:db8::2/128",
            "  maximum-paths 16",
            " set local-preference 0",
        ] {
            assert!(frr.contains(want), "{want:?} missing from\n{frr}");
        }
        // Deterministic.
        assert_eq!(render(&t), files);
    }

    #[test]
    fn frr_and_speaker_modes() {
        let mut t = example();
        t.bgp.mode = BgpMode::Frr;
        let files = render(&t);
        assert!(
            files
                .iter()
                .all(|f| !f.path.ends_with("bird.conf") || f.path.starts_with("routers"))
        );
        let lb = file(&files, "hosts/lb-b1.example.com/frr.conf");
        for want in [
            "ip prefix-list RINGMAIL-VIP4 seq 10 permit 192.0.2.1/32",
            "ip import-table 100 route-map RINGMAIL-IMPORT",
            "redistribute table 100 route-map RINGMAIL-REDIST4",
            "set as-path prepend 65010 65010",
            " neighbor 192.0.2.33 peer-group SITE65000",
            " bgp router-id 192.0.2.35",
            "are NOT\n! announced",
        ] {
            assert!(lb.contains(want), "{want:?} missing from\n{lb}");
        }
        // The routers open no IPv6 session the LBs' FRR 8.4 would never answer.
        let rt = file(&files, "routers/rt-a1/bird.conf");
        assert!(!rt.contains("_v6"), "{rt}");

        t.bgp.mode = BgpMode::Speaker;
        let files = render(&t);
        assert!(files.iter().all(|f| f.path.starts_with("routers")));
        assert!(file(&files, "routers/rt-a1/bird.conf").contains("lb_a2_v6"));
    }

    #[test]
    fn symbols() {
        assert_eq!(symbol("rt-a1"), "rt_a1");
        assert_eq!(symbol("1core"), "n_1core");
    }
}
