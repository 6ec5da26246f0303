//! DNS zones: one forward zone per domain, one reverse zone per `dns.reverse_zones` prefix.
//!
//! The records are the seed's: equal-priority MX records for every MX host, SPF as TXT only
//! (`redirect=` at each domain's apex to `_spf.<primary>`, which includes one record per site
//! listing that site's MTA addresses, all ending in `-all`), `v=spf1 a aaaa -all` on every MTA
//! host name (for bounces, whose MAIL FROM is empty), a wildcard `v=spf1 -all`, DKIM keys split
//! into 255-byte strings, DMARC and the `_report._dmarc` authorisation, A/AAAA for hosts, name
//! servers and anycast services, and PTR for every address (mandatory for MTAs). Names that exist
//! but send no mail get `v=spf1 -all` too (the wildcard does not cover names that exist).

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::RenderedFile;
use crate::topology::{Domain, Fqdn, Role, Topology};

/// One resource record, as the zone writer and the live-DNS check see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Absolute owner name, lower case, no trailing dot.
    pub name: String,
    pub data: RData,
    /// What this record is for, in the check's report and as a zone-file comment.
    pub purpose: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RData {
    Mx(u16, String),
    Txt(String),
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Ptr(String),
    Ns(String),
}

impl RData {
    pub fn type_name(&self) -> &'static str {
        match self {
            RData::Mx(..) => "MX",
            RData::Txt(_) => "TXT",
            RData::A(_) => "A",
            RData::Aaaa(_) => "AAAA",
            RData::Ptr(_) => "PTR",
            RData::Ns(_) => "NS",
        }
    }
}

const SPF_NONE: &str = "v=spf1 -all";
const SPF_HOST: &str = "v=spf1 a aaaa -all";

fn in_zone(t: &Topology, name: &Fqdn, domain: &Domain) -> bool {
    t.zone_of(name).is_some_and(|z| z.name == domain.name)
}

/// Every record ringmail publishes for `domain` (its forward zone, without SOA).
pub fn forward_records(t: &Topology, domain: &Domain) -> Vec<Record> {
    let d = domain.name.as_str();
    let mut out = Vec::new();
    let mut push = |name: String, data: RData, purpose: &'static str| {
        out.push(Record {
            name,
            data,
            purpose,
        })
    };
    for ns in &t.dns.nameservers {
        push(d.into(), RData::Ns(ns.name.to_string()), "name server");
    }
    for h in t.hosts_with(Role::Mx) {
        push(
            d.into(),
            RData::Mx(domain.mx_priority, h.name.to_string()),
            "MX (all equal priority)",
        );
    }
    let primary = &t.primary().name;
    push(
        d.into(),
        RData::Txt(format!("v=spf1 redirect=_spf.{primary}")),
        "SPF",
    );
    if &domain.name == primary {
        let includes: Vec<String> = (0..t.sites.len())
            .filter(|&s| t.hosts_with(Role::Mta).any(|h| h.site == s))
            .map(|s| format!("include:{}", t.site_spf_name(s)))
            .collect();
        push(
            format!("_spf.{d}"),
            RData::Txt(format!("v=spf1 {} -all", includes.join(" "))),
            "SPF: one include per site",
        );
        for s in 0..t.sites.len() {
            let mtas: Vec<_> = t.hosts_with(Role::Mta).filter(|h| h.site == s).collect();
            if mtas.is_empty() {
                continue;
            }
            let mut mechs: Vec<String> = mtas
                .iter()
                .filter_map(|h| h.ipv4.map(|a| format!("ip4:{a}")))
                .collect();
            mechs.extend(
                mtas.iter()
                    .filter_map(|h| h.ipv6.map(|a| format!("ip6:{a}"))),
            );
            push(
                t.site_spf_name(s),
                RData::Txt(format!("v=spf1 {} -all", mechs.join(" "))),
                "SPF: the site's MTA addresses",
            );
        }
    }
    for h in t
        .hosts_with(Role::Mta)
        .filter(|h| in_zone(t, &h.name, domain))
    {
        push(
            h.name.to_string(),
            RData::Txt(SPF_HOST.into()),
            "SPF of the MTA's host name (bounces have an empty MAIL FROM)",
        );
    }
    let silent = t
        .hosts
        .iter()
        .filter(|h| !h.has(Role::Mta))
        .map(|h| &h.name)
        .chain(t.dns.nameservers.iter().map(|n| &n.name))
        .chain(t.services.iter().map(|s| &s.name));
    for name in silent.filter(|n| in_zone(t, n, domain)) {
        push(
            name.to_string(),
            RData::Txt(SPF_NONE.into()),
            "SPF: this name sends no mail",
        );
    }
    push(
        format!("*.{d}"),
        RData::Txt(SPF_NONE.into()),
        "SPF: every other name sends no mail",
    );
    for k in &domain.dkim {
        push(
            format!("{}._domainkey.{d}", k.selector),
            RData::Txt(k.record()),
            "DKIM public key",
        );
    }
    if domain.adsp {
        push(
            format!("adsp._domainkey.{d}"),
            RData::Txt("dkim=all".into()),
            "ADSP (historic)",
        );
    }
    push(
        format!("_dmarc.{d}"),
        RData::Txt(domain.dmarc.record()),
        "DMARC",
    );
    // Report authorisation (RFC 7489 7.1): published by the domain receiving the reports.
    for other in &t.domains {
        if other.dmarc.report_domains().contains(&domain.name) {
            push(
                format!("{}._report._dmarc.{d}", other.name),
                RData::Txt("v=DMARC1;".into()),
                "DMARC report authorisation",
            );
        }
    }
    for (name, addr) in t.named_addresses() {
        if !in_zone(t, &name, domain) {
            continue;
        }
        let data = match addr {
            IpAddr::V4(a) => RData::A(a),
            IpAddr::V6(a) => RData::Aaaa(a),
        };
        push(name.to_string(), data, "address");
    }
    out
}

/// The PTR records of one reverse zone.
pub fn reverse_records(t: &Topology, zone: &IpNet) -> Vec<Record> {
    let mut named: Vec<(Fqdn, IpAddr)> = t
        .named_addresses()
        .into_iter()
        .filter(|(_, a)| t.reverse_zone_of(*a) == Some(zone))
        .collect();
    named.sort_by_key(|(_, a)| *a);
    let mut out: Vec<Record> = t
        .dns
        .nameservers
        .iter()
        .map(|ns| Record {
            name: reverse_zone_name(zone),
            data: RData::Ns(ns.name.to_string()),
            purpose: "name server",
        })
        .collect();
    for (name, addr) in named {
        let is_mta = t.hosts.iter().any(|h| h.name == name && h.has(Role::Mta));
        out.push(Record {
            name: ptr_name(addr),
            data: RData::Ptr(name.to_string()),
            purpose: if is_mta {
                "PTR (mandatory: MTA)"
            } else {
                "PTR"
            },
        });
    }
    out
}

/// `28.2.0.192.in-addr.arpa` / the nibble form under `ip6.arpa`.
pub fn ptr_name(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::new();
            for b in a.octets().iter().rev() {
                let _ = write!(s, "{:x}.{:x}.", b & 0xf, b >> 4);
            }
            s + "ip6.arpa"
        }
    }
}

/// The zone apex of a label-aligned prefix (`2.0.192.in-addr.arpa`, `8.b.d.0.1.0.0.2.ip6.arpa`).
pub fn reverse_zone_name(net: &IpNet) -> String {
    let full = ptr_name(net.network());
    let labels: Vec<&str> = full.split('.').collect();
    let (keep, suffix) = match net {
        IpNet::V4(n) => (usize::from(n.prefix_len() / 8), 2),
        IpNet::V6(n) => (usize::from(n.prefix_len() / 4), 2),
    };
    let host_labels = labels.len() - suffix;
    labels[host_labels - keep..].join(".")
}

/// Splits TXT data into strings of at most 255 bytes (RFC 1035 character-strings).
pub fn txt_strings(data: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() > 255 {
        let mut cut = 255;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

fn zone_text(t: &Topology, origin: &str, records: &[Record]) -> String {
    let o = Fqdn::parse(origin).expect("zone names are valid");
    let rel = |name: &str| match Fqdn::parse(name) {
        Ok(f) => f.relative_to(&o),
        // Wildcards and underscore labels are not host names: write them relative by hand.
        Err(_) => name
            .strip_suffix(&format!(".{origin}"))
            .map_or(format!("{name}."), str::to_string),
    };
    let mut z = String::new();
    let _ = writeln!(
        z,
        "; {origin}: rendered by `ringmail deploy render`; do not edit by hand."
    );
    let _ = writeln!(z, "$ORIGIN {origin}.");
    let _ = writeln!(z, "$TTL {}", t.dns.ttl);
    let primary_ns = t
        .dns
        .nameservers
        .first()
        .map_or_else(|| format!("ns.{origin}."), |n| format!("{}.", n.name));
    let _ = writeln!(
        z,
        "@ IN SOA {primary_ns} {}. ( {} 3600 900 1209600 300 )",
        t.dns.hostmaster, t.dns.serial
    );
    let mut last_purpose = "";
    for r in records {
        if r.purpose != last_purpose {
            let _ = writeln!(z, "; {}", r.purpose);
            last_purpose = r.purpose;
        }
        let owner = rel(&r.name);
        let data = match &r.data {
            RData::Mx(p, host) => format!("MX {p} {host}."),
            RData::A(a) => format!("A {a}"),
            RData::Aaaa(a) => format!("AAAA {a}"),
            RData::Ptr(n) => format!("PTR {n}."),
            RData::Ns(n) => format!("NS {n}."),
            RData::Txt(s) => {
                let parts: Vec<String> =
                    txt_strings(s).iter().map(|p| format!("\"{p}\"")).collect();
                if parts.len() == 1 {
                    format!("TXT {}", parts[0])
                } else {
                    format!("TXT ( {} )", parts.join("\n\t"))
                }
            }
        };
        let _ = writeln!(z, "{owner} IN {data}");
    }
    z
}

/// The zone files (`dns/<zone>.zone`) and an NSD include listing them (`dns/nsd-zones.conf`).
pub fn render(t: &Topology) -> Vec<RenderedFile> {
    let mut files = Vec::new();
    let mut zones = Vec::new();
    for d in &t.domains {
        let origin = d.name.to_string();
        let text = zone_text(t, &origin, &forward_records(t, d));
        files.push(RenderedFile::new(format!("dns/{origin}.zone"), text));
        zones.push(origin);
    }
    for net in &t.dns.reverse_zones {
        let origin = reverse_zone_name(net);
        let text = zone_text(t, &origin, &reverse_records(t, net));
        files.push(RenderedFile::new(format!("dns/{origin}.zone"), text));
        zones.push(origin);
    }
    let mut nsd = String::from(
        "# NSD zones for the rendered files: include this from nsd.conf and set zonesdir to this directory.\n",
    );
    for z in &zones {
        let _ = writeln!(nsd, "zone:\n\tname: \"{z}\"\n\tzonefile: \"{z}.zone\"");
    }
    files.push(RenderedFile::new("dns/nsd-zones.conf".into(), nsd));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptr_names() {
        assert_eq!(
            ptr_name("192.0.2.28".parse().unwrap()),
            "28.2.0.192.in-addr.arpa"
        );
        assert_eq!(
            ptr_name("2001:db8:a::28".parse().unwrap()),
            "8.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.a.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert_eq!(
            reverse_zone_name(&"192.0.2.0/24".parse().unwrap()),
            "2.0.192.in-addr.arpa"
        );
        assert_eq!(
            reverse_zone_name(&"2001:db8::/32".parse().unwrap()),
            "8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert_eq!(
            reverse_zone_name(&"10.0.0.0/8".parse().unwrap()),
            "10.in-addr.arpa"
        );
    }

    #[test]
    fn txt_split_at_255_bytes() {
        let long = "x".repeat(600);
        let parts = txt_strings(&long);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert_eq!(parts.concat(), long);
        assert_eq!(txt_strings("short"), ["short"]);
        assert_eq!(txt_strings(&"y".repeat(255)).len(), 1);
    }
}
