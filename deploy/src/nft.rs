//! nftables: one ruleset per host, `hosts/<fqdn>/nftables.conf`.
//!
//! The seed's firewall table, per host (allow only what is needed; never SSH from outside; do
//! not block all ICMPv6):
//!
//! ```text
//! host  inbound                                         outbound port 25
//! MSA   TCP 587 (and 465, implicit TLS) from anywhere   to the MTAs only
//! MDA   TCP 993 from anywhere; LMTP 24 from MX/MSA      none
//! MX    TCP 25 from anywhere                            to the MTAs only (LMTP 24 to the MDAs)
//! MTA   nothing from the Internet; 25 from MSA/MX       to the Internet
//! LB    993/587/465 on the anycast addresses; BGP 179 from its neighbour routers
//! ```
//!
//! Every host also takes SSH (22) from the management networks only, the ICMPv6 that IPv6
//! needs (neighbour discovery, the RFC 4890 error messages, echo, MLD queries) and ICMPv4 echo
//! and errors. Inbound and forwarded traffic is dropped by policy; outbound traffic is accepted
//! except TCP 25 and 24 (SMTP and LMTP), which go only where the host's roles send mail, and
//! are otherwise dropped and counted. A host with several roles gets the union of their rules.
//!
//! The ruleset replaces only its own `table inet ringmail` (never `flush ruleset`): it declares
//! the table, deletes it and defines it again in one atomic `nft -f` transaction, so loading it
//! twice works and other tables (a distribution's, a container runtime's) are left alone.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::RenderedFile;
use crate::topology::{Host, Role, ServiceKind, Topology, ports};

/// The nftables table every rendered ruleset owns (family `inet`).
pub const TABLE: &str = "ringmail";

/// Every host's ruleset, `hosts/<fqdn>/nftables.conf`, in topology order.
pub fn render(t: &Topology) -> Vec<RenderedFile> {
    t.hosts
        .iter()
        .map(|h| RenderedFile::new(format!("hosts/{}/nftables.conf", h.name), ruleset(t, h)))
        .collect()
}

/// A named pair of address sets, `<name>_v4` and `<name>_v6`.
struct AddrSet {
    name: &'static str,
    comment: String,
    elements: Vec<IpNet>,
    /// Prefixes rather than single addresses (`flags interval`).
    interval: bool,
}

impl AddrSet {
    fn hosts<'a>(
        name: &'static str,
        comment: impl Into<String>,
        hosts: impl Iterator<Item = &'a Host>,
    ) -> AddrSet {
        AddrSet::addrs(name, comment, hosts.flat_map(|h| h.addrs()))
    }

    fn addrs(
        name: &'static str,
        comment: impl Into<String>,
        addrs: impl Iterator<Item = IpAddr>,
    ) -> AddrSet {
        let mut elements: Vec<IpNet> = Vec::new();
        for a in addrs.map(IpNet::from) {
            if !elements.contains(&a) {
                elements.push(a);
            }
        }
        AddrSet {
            name,
            comment: comment.into(),
            elements,
            interval: false,
        }
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "\t# {}", self.comment);
        for (suffix, ty, v4) in [("v4", "ipv4_addr", true), ("v6", "ipv6_addr", false)] {
            let elements: Vec<String> = self
                .elements
                .iter()
                .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                .map(|n| {
                    if self.interval {
                        n.trunc().to_string()
                    } else {
                        n.addr().to_string()
                    }
                })
                .collect();
            let _ = writeln!(out, "\tset {}_{suffix} {{", self.name);
            let _ = writeln!(out, "\t\ttype {ty}");
            if self.interval {
                let _ = writeln!(out, "\t\tflags interval");
            }
            if !elements.is_empty() {
                let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
    }
}

/// The ruleset text being built: sets first, then the chains.
struct Builder {
    sets: Vec<AddrSet>,
    input: String,
    output: String,
}

impl Builder {
    fn set(&mut self, set: AddrSet) -> &'static str {
        let name = set.name;
        if !self.sets.iter().any(|s| s.name == name) {
            self.sets.push(set);
        }
        name
    }

    fn comment(chain: &mut String, text: &str) {
        let _ = writeln!(chain, "\n\t\t# {text}");
    }

    fn rule(chain: &mut String, text: &str) {
        let _ = writeln!(chain, "\t\t{text}");
    }

    /// Two rules, one per family: `ip(6) <dir> @<set>_v4/_v6 <rest>`.
    fn both(chain: &mut String, dir: &str, set: &str, rest: &str) {
        Builder::rule(chain, &format!("ip {dir} @{set}_v4 {rest}"));
        Builder::rule(chain, &format!("ip6 {dir} @{set}_v6 {rest}"));
    }
}

fn port_list(ports: &[u16]) -> String {
    match ports {
        [p] => p.to_string(),
        ps => format!(
            "{{ {} }}",
            ps.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The MSA and MX hosts: they hand mail to the MTAs (25) and to the MDAs (LMTP 24).
fn relays(t: &Topology) -> AddrSet {
    AddrSet::hosts(
        "relays",
        "Our MSA and MX hosts: they relay to the MTAs (25) and deliver to the MDAs (LMTP 24).",
        t.hosts
            .iter()
            .filter(|h| h.has(Role::Msa) || h.has(Role::Mx)),
    )
}

fn mtas(t: &Topology) -> AddrSet {
    AddrSet::hosts(
        "mtas",
        "Our MTA hosts: the only way out for mail (SMTP 25).",
        t.hosts_with(Role::Mta),
    )
}

fn mdas(t: &Topology) -> AddrSet {
    AddrSet::hosts(
        "mdas",
        "Our MDA hosts: where mail is delivered (LMTP 24).",
        t.hosts_with(Role::Mda),
    )
}

/// The ruleset of one host.
pub fn ruleset(t: &Topology, h: &Host) -> String {
    let mut b = Builder {
        sets: Vec::new(),
        input: String::new(),
        output: String::new(),
    };
    let roles: BTreeSet<Role> = h.roles.iter().copied().collect();

    // ---- input ----
    let mgmt = b.set(AddrSet {
        name: "management",
        comment: "Management networks: SSH comes only from here.".into(),
        elements: t.management.clone(),
        interval: true,
    });
    let i = &mut b.input;
    Builder::rule(i, "type filter hook input priority filter; policy drop;");
    Builder::comment(
        i,
        "Seed: \"allow only what is needed\": what no rule below accepts is dropped (policy).",
    );
    Builder::rule(i, "iif \"lo\" accept");
    Builder::rule(i, "ct state established,related accept");
    Builder::rule(i, "ct state invalid drop");
    Builder::comment(
        i,
        "Seed: \"do not block all ICMPv6\". Neighbour discovery only from the link (hop limit 255),",
    );
    Builder::rule(
        i,
        "#   then the messages IPv6 cannot work without (RFC 4890), echo and MLD queries.",
    );
    Builder::rule(
        i,
        "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
    );
    Builder::rule(
        i,
        "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, echo-request, mld-listener-query } accept",
    );
    Builder::rule(
        i,
        "icmp type { echo-request, destination-unreachable, time-exceeded } accept",
    );
    Builder::comment(
        i,
        "Seed: \"never allow SSH from outside\": SSH only from the management networks.",
    );
    Builder::both(
        i,
        "saddr",
        mgmt,
        &format!("tcp dport {} accept", ports::SSH),
    );

    if roles.contains(&Role::Mx) {
        Builder::comment(
            &mut b.input,
            "Seed, MX: inbound TCP 25 only (from anywhere: the Internet's MTAs).",
        );
        Builder::rule(&mut b.input, &format!("tcp dport {} accept", ports::SMTP));
    }
    if roles.contains(&Role::Msa) {
        Builder::comment(
            &mut b.input,
            "Seed, MSA: inbound TCP 587 only (and 465, implicit TLS), from anywhere.",
        );
        Builder::rule(
            &mut b.input,
            &format!(
                "tcp dport {} accept",
                port_list(&[ports::SUBMISSION, ports::SUBMISSIONS])
            ),
        );
    }
    if roles.contains(&Role::Mda) {
        let relays = b.set(relays(t));
        Builder::comment(
            &mut b.input,
            "Seed, MDA: inbound TCP 993 only (from anywhere: clients, the LBs) ...",
        );
        Builder::rule(&mut b.input, &format!("tcp dport {} accept", ports::IMAPS));
        Builder::rule(
            &mut b.input,
            "# ... plus, implied by the flows, delivery (LMTP 24) from the MX and MSA hosts only.",
        );
        Builder::both(
            &mut b.input,
            "saddr",
            relays,
            &format!("tcp dport {} accept", ports::LMTP),
        );
    }
    if roles.contains(&Role::Mta) {
        let relays = b.set(relays(t));
        Builder::comment(
            &mut b.input,
            "Seed, MTA: inbound nothing from the Internet; SMTP 25 from our own MSAs and MXs only.",
        );
        Builder::both(
            &mut b.input,
            "saddr",
            relays,
            &format!("tcp dport {} accept", ports::SMTP),
        );
    }
    if roles.contains(&Role::Lb) {
        Builder::comment(
            &mut b.input,
            "Load balancer: the client services, on their anycast addresses only, from anywhere.",
        );
        for kind in [ServiceKind::Imap, ServiceKind::Submission] {
            let services: Vec<_> = t.services.iter().filter(|s| s.kind == kind).collect();
            if services.is_empty() {
                continue;
            }
            let (name, what) = match kind {
                ServiceKind::Imap => ("imap_vips", "IMAPS"),
                ServiceKind::Submission => ("submission_vips", "submission"),
            };
            let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
            let set = b.set(AddrSet::addrs(
                name,
                format!(
                    "Anycast addresses of the {what} service ({}).",
                    names.join(", ")
                ),
                services.iter().flat_map(|s| s.addrs()),
            ));
            Builder::both(
                &mut b.input,
                "daddr",
                set,
                &format!("tcp dport {} accept", port_list(kind.ports())),
            );
        }
        let neighbors = h.bgp.as_ref().map_or(&[][..], |b| &b.neighbors[..]);
        let routers: Vec<&str> = neighbors
            .iter()
            .map(|&r| t.routers[r].name.as_str())
            .collect();
        let set = b.set(AddrSet::addrs(
            "bgp_neighbors",
            format!("This LB's BGP neighbour routers ({}).", routers.join(", ")),
            neighbors.iter().flat_map(|&r| {
                let r = &t.routers[r];
                r.ipv4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(r.ipv6.map(IpAddr::V6))
            }),
        ));
        Builder::comment(
            &mut b.input,
            "Load balancer: BGP (179) from its neighbour routers only.",
        );
        Builder::both(
            &mut b.input,
            "saddr",
            set,
            &format!("tcp dport {} accept", ports::BGP),
        );
    }

    // ---- forward ----
    // (written below: policy drop, no rules)

    // ---- output ----
    let o = &mut b.output;
    Builder::rule(o, "type filter hook output priority filter; policy accept;");
    Builder::comment(
        o,
        "Outbound is open except SMTP (25) and LMTP (24): those go only where this host's roles",
    );
    Builder::rule(
        o,
        "#   send mail (seed: the \"outbound port 25\" column); the rest is counted and dropped.",
    );
    Builder::rule(o, "oif \"lo\" accept");
    if roles.contains(&Role::Mta) {
        Builder::comment(
            &mut b.output,
            "Seed, MTA: outbound 25 to the Internet (anywhere).",
        );
        Builder::rule(&mut b.output, &format!("tcp dport {} accept", ports::SMTP));
    }
    let relay = roles.contains(&Role::Msa) || roles.contains(&Role::Mx);
    if relay && !roles.contains(&Role::Mta) {
        let mtas = b.set(mtas(t));
        Builder::comment(
            &mut b.output,
            "Seed, MSA and MX: outbound 25 to our MTAs only.",
        );
        Builder::both(
            &mut b.output,
            "daddr",
            mtas,
            &format!("tcp dport {} accept", ports::SMTP),
        );
    }
    if relay {
        let mdas = b.set(mdas(t));
        Builder::comment(
            &mut b.output,
            "Seed, MX (and MSA, for local recipients): LMTP 24 to our MDAs only.",
        );
        Builder::both(
            &mut b.output,
            "daddr",
            mdas,
            &format!("tcp dport {} accept", ports::LMTP),
        );
    }
    Builder::comment(
        &mut b.output,
        "Seed: MDA and LB send no mail; nothing else may leave on 25 or 24.",
    );
    Builder::rule(
        &mut b.output,
        &format!(
            "tcp dport {} counter drop",
            port_list(&[ports::LMTP, ports::SMTP])
        ),
    );

    // ---- the file ----
    let role_names: Vec<&str> = h.roles.iter().map(|r| r.name()).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {}: nftables ruleset (roles: {}), rendered by `ringmail deploy render`.",
        h.name,
        role_names.join(", ")
    );
    let _ = writeln!(
        out,
        "# Load with `nft -f nftables.conf`. It replaces only `table inet {TABLE}`, so loading it again"
    );
    let _ = writeln!(
        out,
        "# is safe and other tables are left alone: the empty declaration makes the delete succeed"
    );
    let _ = writeln!(
        out,
        "# on the first load; all three apply as one transaction."
    );
    let _ = writeln!(out, "table inet {TABLE} {{}}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out);
    let _ = writeln!(out, "table inet {TABLE} {{");
    for s in &b.sets {
        s.write(&mut out);
        out.push('\n');
    }
    let _ = writeln!(out, "\tchain input {{");
    out.push_str(&b.input);
    let _ = writeln!(out, "\t}}\n");
    let _ = writeln!(out, "\t# Seed: the hosts route nothing.");
    let _ = writeln!(out, "\tchain forward {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook forward priority filter; policy drop;"
    );
    let _ = writeln!(out, "\t}}\n");
    let _ = writeln!(out, "\tchain output {{");
    out.push_str(&b.output);
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::testutil::example;

    fn host_rules(t: &Topology, name: &str) -> String {
        let h = t
            .hosts
            .iter()
            .find(|h| h.name.as_str() == name)
            .unwrap_or_else(|| panic!("no host {name}"));
        ruleset(t, h)
    }

    /// The rule lines of one chain (no comments, no blank lines).
    fn chain<'a>(rules: &'a str, name: &str) -> Vec<&'a str> {
        let start = format!("\tchain {name} {{");
        rules
            .lines()
            .skip_while(|l| *l != start)
            .skip(1)
            .take_while(|l| *l != "\t}")
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }

    /// The elements of a set, as written.
    fn elements(rules: &str, set: &str) -> Vec<String> {
        let start = format!("\tset {set} {{");
        rules
            .lines()
            .skip_while(|l| *l != start)
            .take_while(|l| *l != "\t}")
            .find_map(|l| l.trim().strip_prefix("elements = { "))
            .map(|e| {
                e.trim_end_matches(" }")
                    .split(", ")
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn one_file_per_host_replacing_only_its_own_table() {
        let t = example();
        let files = render(&t);
        assert_eq!(files.len(), t.hosts.len());
        for (f, h) in files.iter().zip(&t.hosts) {
            assert_eq!(
                f.path,
                Path::new(&format!("hosts/{}/nftables.conf", h.name))
            );
            let c = &f.contents;
            assert!(!c.contains("flush ruleset"), "{c}");
            let head: Vec<&str> = c.lines().filter(|l| !l.starts_with('#')).take(3).collect();
            assert_eq!(
                head,
                ["table inet ringmail {}", "delete table inet ringmail", ""]
            );
            assert_eq!(
                chain(c, "forward"),
                ["type filter hook forward priority filter; policy drop;"]
            );
        }
    }

    #[test]
    fn every_host_gets_the_common_input_rules() {
        let t = example();
        for h in &t.hosts {
            let r = ruleset(&t, h);
            let input = chain(&r, "input");
            assert_eq!(
                input[..4],
                [
                    "type filter hook input priority filter; policy drop;",
                    "iif \"lo\" accept",
                    "ct state established,related accept",
                    "ct state invalid drop",
                ],
                "{}",
                h.name
            );
            let nd = input
                .iter()
                .find(|l| l.contains("nd-neighbor-solicit"))
                .unwrap();
            assert!(nd.contains("nd-neighbor-advert") && nd.contains("ip6 hoplimit 255"));
            for ty in [
                "destination-unreachable",
                "packet-too-big",
                "time-exceeded",
                "parameter-problem",
                "echo-request",
                "mld-listener-query",
            ] {
                assert!(
                    input
                        .iter()
                        .any(|l| l.starts_with("icmpv6 type") && l.contains(ty)),
                    "{ty}"
                );
            }
            // SSH only from the management networks: no other rule mentions 22.
            let ssh: Vec<_> = input.iter().filter(|l| l.contains("dport 22 ")).collect();
            assert_eq!(
                ssh,
                [
                    &"ip saddr @management_v4 tcp dport 22 accept",
                    &"ip6 saddr @management_v6 tcp dport 22 accept"
                ]
            );
            assert_eq!(elements(&r, "management_v4"), ["203.0.113.0/24"]);
            assert_eq!(elements(&r, "management_v6"), ["2001:db8:ffff::/48"]);
        }
    }

    #[test]
    fn mta_takes_25_only_from_our_relays_and_sends_25_anywhere() {
        let t = example();
        let r = host_rules(&t, "mta-a1.example.com");
        let input = chain(&r, "input");
        assert!(!input.contains(&"tcp dport 25 accept"), "{r}");
        let smtp: Vec<_> = input.iter().filter(|l| l.contains("dport 25 ")).collect();
        assert_eq!(
            smtp,
            [
                &"ip saddr @relays_v4 tcp dport 25 accept",
                &"ip6 saddr @relays_v6 tcp dport 25 accept"
            ]
        );
        assert_eq!(
            elements(&r, "relays_v4"),
            [
                "192.0.2.21",
                "192.0.2.22",
                "192.0.2.24",
                "192.0.2.25",
                "192.0.2.37",
                "192.0.2.38",
                "192.0.2.40",
                "192.0.2.41"
            ]
        );
        assert_eq!(elements(&r, "relays_v6").len(), 8);
        for port in ["587", "465", "993", "24 ", "179"] {
            assert!(
                !input.iter().any(|l| l.contains(&format!("dport {port}"))),
                "MTA accepts {port}: {r}"
            );
        }
        let output = chain(&r, "output");
        assert_eq!(
            output,
            [
                "type filter hook output priority filter; policy accept;",
                "oif \"lo\" accept",
                "tcp dport 25 accept",
                "tcp dport { 24, 25 } counter drop",
            ]
        );
    }

    #[test]
    fn msa_and_mx_send_25_to_the_mtas_and_24_to_the_mdas_only() {
        let t = example();
        for name in ["msa-a1.example.com", "mx-b2.example.com"] {
            let r = host_rules(&t, name);
            let output = chain(&r, "output");
            assert_eq!(
                output[2..],
                [
                    "ip daddr @mtas_v4 tcp dport 25 accept",
                    "ip6 daddr @mtas_v6 tcp dport 25 accept",
                    "ip daddr @mdas_v4 tcp dport 24 accept",
                    "ip6 daddr @mdas_v6 tcp dport 24 accept",
                    "tcp dport { 24, 25 } counter drop",
                ],
                "{name}"
            );
            assert_eq!(
                elements(&r, "mtas_v4"),
                ["192.0.2.28", "192.0.2.29", "192.0.2.44", "192.0.2.45"]
            );
            assert_eq!(
                elements(&r, "mtas_v6"),
                [
                    "2001:db8:a::28",
                    "2001:db8:a::29",
                    "2001:db8:b::44",
                    "2001:db8:b::45"
                ]
            );
            assert_eq!(
                elements(&r, "mdas_v4"),
                ["192.0.2.26", "192.0.2.27", "192.0.2.42", "192.0.2.43"]
            );
        }
        let msa = host_rules(&t, "msa-a1.example.com");
        let msa = chain(&msa, "input");
        assert!(msa.contains(&"tcp dport { 587, 465 } accept"));
        assert!(!msa.iter().any(|l| l.contains("dport 25")), "{msa:?}");
        let mx = host_rules(&t, "mx-a1.example.com");
        let mx = chain(&mx, "input");
        assert!(mx.contains(&"tcp dport 25 accept"));
        assert!(!mx.iter().any(|l| l.contains("587")), "{mx:?}");
    }

    #[test]
    fn mda_takes_993_from_anywhere_and_lmtp_from_relays_and_sends_no_mail() {
        let t = example();
        let r = host_rules(&t, "mda-b1.example.com");
        let input = chain(&r, "input");
        assert!(input.contains(&"tcp dport 993 accept"));
        assert!(input.contains(&"ip saddr @relays_v4 tcp dport 24 accept"));
        assert!(input.contains(&"ip6 saddr @relays_v6 tcp dport 24 accept"));
        assert!(!input.iter().any(|l| l.contains("dport 25")), "{r}");
        assert_eq!(
            chain(&r, "output")[2..],
            ["tcp dport { 24, 25 } counter drop"]
        );
    }

    #[test]
    fn lb_takes_the_services_on_their_vips_and_bgp_from_its_neighbors() {
        let t = example();
        let r = host_rules(&t, "lb-b2.example.com");
        let input = chain(&r, "input");
        for rule in [
            "ip daddr @imap_vips_v4 tcp dport 993 accept",
            "ip6 daddr @imap_vips_v6 tcp dport 993 accept",
            "ip daddr @submission_vips_v4 tcp dport { 587, 465 } accept",
            "ip6 daddr @submission_vips_v6 tcp dport { 587, 465 } accept",
            "ip saddr @bgp_neighbors_v4 tcp dport 179 accept",
            "ip6 saddr @bgp_neighbors_v6 tcp dport 179 accept",
        ] {
            assert!(input.contains(&rule), "missing `{rule}`:\n{r}");
        }
        assert_eq!(elements(&r, "imap_vips_v4"), ["192.0.2.1"]);
        assert_eq!(elements(&r, "submission_vips_v6"), ["2001:db8::2"]);
        assert_eq!(
            elements(&r, "bgp_neighbors_v4"),
            ["192.0.2.33", "192.0.2.34"]
        );
        assert_eq!(
            elements(&r, "bgp_neighbors_v6"),
            ["2001:db8:b::33", "2001:db8:b::34"]
        );
        // No host port open to everyone, and no mail out.
        assert!(!input.iter().any(|l| l.starts_with("tcp dport")), "{r}");
        assert_eq!(
            chain(&r, "output")[2..],
            ["tcp dport { 24, 25 } counter drop"]
        );
    }

    #[test]
    fn several_roles_get_the_union() {
        let text = r#"
[dns]
serial = 1
hostmaster = "hostmaster@example.org"
nameserver = [{ name = "ns1.example.net" }, { name = "ns2.example.net" }]
reverse_zones = ["198.51.100.0/24"]

[management]
networks = ["203.0.113.0/24"]

[[domain]]
name = "example.org"
dmarc = { p = "reject" }

[[site]]
name = "x"

[[host]]
name = "mail.example.org"
site = "x"
roles = ["mx", "msa", "mda"]
ipv4 = "198.51.100.10"

[[host]]
name = "mx2.example.org"
site = "x"
roles = ["mx"]
ipv4 = "198.51.100.11"

[[host]]
name = "mta.example.org"
site = "x"
roles = ["mta", "mda"]
ipv4 = "198.51.100.12"
"#;
        let t = crate::topology::load_str(text, "inline.toml", Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
        let r = host_rules(&t, "mail.example.org");
        let input = chain(&r, "input");
        for rule in [
            "tcp dport 25 accept",
            "tcp dport { 587, 465 } accept",
            "tcp dport 993 accept",
            "ip saddr @relays_v4 tcp dport 24 accept",
        ] {
            assert!(input.contains(&rule), "missing `{rule}`:\n{r}");
        }
        assert_eq!(
            elements(&r, "relays_v4"),
            ["198.51.100.10", "198.51.100.11"]
        );
        assert!(elements(&r, "relays_v6").is_empty());
        // MX and MSA: 25 only to the MTAs, LMTP only to the MDAs (this host is one).
        assert_eq!(
            chain(&r, "output")[2..],
            [
                "ip daddr @mtas_v4 tcp dport 25 accept",
                "ip6 daddr @mtas_v6 tcp dport 25 accept",
                "ip daddr @mdas_v4 tcp dport 24 accept",
                "ip6 daddr @mdas_v6 tcp dport 24 accept",
                "tcp dport { 24, 25 } counter drop",
            ]
        );
        assert_eq!(elements(&r, "mdas_v4"), ["198.51.100.10", "198.51.100.12"]);
        // An empty set is declared without elements (nft refuses `elements = { }`).
        assert!(
            r.contains("\tset mdas_v6 {\n\t\ttype ipv6_addr\n\t}\n"),
            "{r}"
        );
        // MTA and MDA on one host: 25 from the relays, LMTP from the relays, 25 out anywhere.
        let mta = host_rules(&t, "mta.example.org");
        let input = chain(&mta, "input");
        for rule in [
            "ip saddr @relays_v4 tcp dport 25 accept",
            "ip saddr @relays_v4 tcp dport 24 accept",
            "tcp dport 993 accept",
        ] {
            assert!(input.contains(&rule), "missing `{rule}`:\n{mta}");
        }
        assert_eq!(
            chain(&mta, "output")[2..],
            ["tcp dport 25 accept", "tcp dport { 24, 25 } counter drop"]
        );
        let mx2 = host_rules(&t, "mx2.example.org");
        assert!(chain(&mx2, "output").contains(&"ip daddr @mtas_v4 tcp dport 25 accept"));
        assert_eq!(elements(&mx2, "mtas_v4"), ["198.51.100.12"]);
    }
}
