//! `ringmail deploy check`: the live DNS against the topology, record by record.
//!
//! ```text
//! Topology --zone::forward_records/reverse_records--> expected (name, type) -> set of values
//!                                     DNS server --> found   (name, type) -> set of values
//!                                             compare --> one Finding per (name, type)
//! ```
//!
//! The comparison knows what each record means: MX, A, AAAA, NS and PTR are compared as sets;
//! at a name with an SPF record exactly one `v=spf1` TXT must be there and say the same; DKIM
//! compares the key type and the key itself (`p=`), whatever the other tags; DMARC compares the
//! tags, not their order or spacing. Every MTA address must also be forward-confirmed: its PTR
//! names a host whose A/AAAA records contain the address (what receivers' iprev checks do).
//! [`compare`] is pure; [`query_live`] does the DNS queries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RecordType};

use crate::topology::{Role, Topology};
use crate::zone::{self, RData, Record};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("resolver setup: {0}")]
    Resolver(String),
    #[error("DNS query {name} {rtype} failed: {message}")]
    Query {
        name: String,
        rtype: &'static str,
        message: String,
    },
}

/// What the server returned for one (name, type), in the normalised text form used for
/// comparison: `10 mx-a1.example.com` (MX), the address (A/AAAA), the name (PTR/NS), and the
/// TXT strings joined (TXT). An empty set is NXDOMAIN or no data.
pub type Found = BTreeMap<(String, &'static str), BTreeSet<String>>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Missing,
    Differs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    pub name: String,
    pub rtype: &'static str,
    pub purpose: &'static str,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.status {
            Status::Ok => "ok     ",
            Status::Missing => "MISSING",
            Status::Differs => "DIFFERS",
        };
        write!(
            f,
            "{s} {} {} ({}): {}",
            self.name, self.rtype, self.purpose, self.detail
        )
    }
}

/// One (name, type) the topology says must be published, with its records.
pub struct Expected {
    pub name: String,
    pub rtype: &'static str,
    pub purpose: &'static str,
    pub records: Vec<Record>,
}

/// The records the topology says must be published, grouped by (name, type), in zone-file
/// order (forward zones first, then reverse zones).
pub fn expected(t: &Topology) -> Vec<Expected> {
    let mut records: Vec<Record> = t
        .domains
        .iter()
        .flat_map(|d| zone::forward_records(t, d))
        .collect();
    for z in &t.dns.reverse_zones {
        records.extend(zone::reverse_records(t, z));
    }
    let mut out: Vec<Expected> = Vec::new();
    let mut index: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    for r in records {
        let key = (r.name.clone(), r.data.type_name());
        match index.get(&key) {
            Some(&i) => out[i].records.push(r),
            None => {
                index.insert(key, out.len());
                out.push(Expected {
                    name: r.name.clone(),
                    rtype: r.data.type_name(),
                    purpose: r.purpose,
                    records: vec![r],
                });
            }
        }
    }
    out
}

/// The normalised text of an expected record (see [`Found`]).
pub fn value_text(d: &RData) -> String {
    match d {
        RData::Mx(p, h) => format!("{p} {h}"),
        RData::A(a) => a.to_string(),
        RData::Aaaa(a) => a.to_string(),
        RData::Ptr(n) | RData::Ns(n) => n.clone(),
        RData::Txt(s) => s.clone(),
    }
}

fn tags(record: &str) -> BTreeMap<String, String> {
    record
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let v: String = v.chars().filter(|c| !c.is_whitespace()).collect();
            (k.trim().to_ascii_lowercase(), v)
        })
        .collect()
}

fn quote_set(s: &BTreeSet<String>) -> String {
    if s.is_empty() {
        return "nothing".into();
    }
    s.iter()
        .map(|v| format!("\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Compares one (name, type) group. TXT groups are compared per kind of record (SPF, DKIM,
/// DMARC, other) so that unrelated TXT records at the same name are no difference.
fn compare_group(want: &[Record], found: &BTreeSet<String>) -> (Status, String) {
    let want_set: BTreeSet<String> = want.iter().map(|r| value_text(&r.data)).collect();
    let is_txt = want.iter().all(|r| matches!(r.data, RData::Txt(_)));
    if found.is_empty() {
        return (Status::Missing, format!("want {}", quote_set(&want_set)));
    }
    if !is_txt {
        return if &want_set == found {
            (Status::Ok, quote_set(found))
        } else {
            let missing: BTreeSet<_> = want_set.difference(found).cloned().collect();
            let extra: BTreeSet<_> = found.difference(&want_set).cloned().collect();
            (
                Status::Differs,
                format!(
                    "missing {}; not in the topology {}",
                    quote_set(&missing),
                    quote_set(&extra)
                ),
            )
        };
    }
    let mut problems = Vec::new();
    for w in &want_set {
        let lower = w.to_ascii_lowercase();
        if lower.starts_with("v=spf1") {
            let spf: BTreeSet<String> = found
                .iter()
                .filter(|f| f.to_ascii_lowercase().starts_with("v=spf1"))
                .cloned()
                .collect();
            let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
            if spf.len() > 1 {
                problems.push(format!(
                    "{} SPF records (a receiver treats that as a permanent error): {}",
                    spf.len(),
                    quote_set(&spf)
                ));
            } else if spf.iter().all(|f| norm(f) != norm(w)) {
                problems.push(format!("want \"{w}\", found {}", quote_set(&spf)));
            }
        } else if lower.starts_with("v=dkim1") {
            let want_tags = tags(w);
            let ok = found.iter().any(|f| {
                let t = tags(f);
                t.get("p") == want_tags.get("p")
                    && t.get("k").map_or("rsa", String::as_str)
                        == want_tags.get("k").map_or("rsa", String::as_str)
            });
            if !ok {
                problems.push(format!(
                    "the published key is not the MTA's key (want k={} p={}…), found {}",
                    want_tags.get("k").map_or("rsa", String::as_str),
                    want_tags.get("p").map_or("", |p| &p[..p.len().min(24)]),
                    quote_set(found)
                ));
            }
        } else if lower.starts_with("v=dmarc1") {
            let want_tags = tags(w);
            let dmarc: Vec<&String> = found
                .iter()
                .filter(|f| f.to_ascii_lowercase().starts_with("v=dmarc1"))
                .collect();
            if dmarc.len() != 1 || tags(dmarc[0]) != want_tags {
                problems.push(format!(
                    "want \"{w}\", found {}",
                    quote_set(&dmarc.into_iter().cloned().collect())
                ));
            }
        } else if !found.contains(w) {
            problems.push(format!("want \"{w}\", found {}", quote_set(found)));
        }
    }
    if problems.is_empty() {
        (Status::Ok, quote_set(found))
    } else {
        (Status::Differs, problems.join("; "))
    }
}

/// Compares the live records with the topology; `found` must hold every name and type of
/// [`expected`] plus the forward lookups of the PTR targets (see [`queries`]).
pub fn compare(t: &Topology, found: &Found) -> Vec<Finding> {
    let empty = BTreeSet::new();
    let mut out = Vec::new();
    for Expected {
        name,
        rtype,
        purpose,
        records,
    } in expected(t)
    {
        let f = found.get(&(name.clone(), rtype)).unwrap_or(&empty);
        let (status, detail) = compare_group(&records, f);
        out.push(Finding {
            status,
            name,
            rtype,
            purpose,
            detail,
        });
    }
    // Forward-confirmed reverse DNS for every MTA address, from what the server says (not
    // what the topology says): PTR -> name -> A/AAAA contains the address.
    for h in t.hosts_with(Role::Mta) {
        for addr in h.addrs() {
            let ptr = zone::ptr_name(addr);
            let names = found.get(&(ptr.clone(), "PTR")).unwrap_or(&empty);
            let fwd_type = if addr.is_ipv4() { "A" } else { "AAAA" };
            let confirmed: Vec<&String> = names
                .iter()
                .filter(|n| {
                    found
                        .get(&((*n).clone(), fwd_type))
                        .is_some_and(|a| a.contains(&addr.to_string()))
                })
                .collect();
            let (status, detail) = if names.is_empty() {
                (Status::Missing, format!("{addr} has no PTR"))
            } else if confirmed.is_empty() {
                (
                    Status::Differs,
                    format!(
                        "{addr} -> {} but no {fwd_type} record of that name points back to {addr}",
                        quote_set(names)
                    ),
                )
            } else {
                (Status::Ok, format!("{addr} -> {} -> {addr}", confirmed[0]))
            };
            out.push(Finding {
                status,
                name: format!("{} ({addr})", h.name),
                rtype: "FCrDNS",
                purpose: "MTA address forward-confirmed",
                detail,
            });
        }
    }
    out
}

/// The (name, type) pairs [`query_live`] asks for, before the PTR targets' forward lookups.
pub fn queries(t: &Topology) -> Vec<(String, &'static str)> {
    expected(t).into_iter().map(|e| (e.name, e.rtype)).collect()
}

fn record_type(t: &str) -> RecordType {
    match t {
        "MX" => RecordType::MX,
        "A" => RecordType::A,
        "AAAA" => RecordType::AAAA,
        "PTR" => RecordType::PTR,
        "NS" => RecordType::NS,
        _ => RecordType::TXT,
    }
}

fn name_text(n: &Name) -> String {
    let s = n.to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_ascii_lowercase()
}

/// Asks `server` (or the system resolver) for every record of [`queries`], and the A/AAAA of
/// every name the MTA addresses' PTR records point to.
pub async fn query_live(
    t: &Topology,
    server: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Found, CheckError> {
    let (config, mut opts) =
        ringmail_mailauth::resolver_config(server).map_err(CheckError::Resolver)?;
    opts.timeout = timeout;
    opts.attempts = 2;
    opts.cache_size = 0;
    opts.try_tcp_on_error = true;
    opts.edns0 = true;
    let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| CheckError::Resolver(e.to_string()))?;

    let mut found = Found::new();
    let mut todo = queries(t);
    let mut i = 0;
    while i < todo.len() {
        let (name, rtype) = todo[i].clone();
        i += 1;
        let values = lookup(&resolver, &name, rtype).await?;
        if rtype == "PTR" {
            for target in &values {
                for fwd in ["A", "AAAA"] {
                    let q = (target.clone(), fwd);
                    if !todo.contains(&q) {
                        todo.push(q);
                    }
                }
            }
        }
        found.insert((name, rtype), values);
    }
    Ok(found)
}

async fn lookup(
    resolver: &TokioResolver,
    name: &str,
    rtype: &'static str,
) -> Result<BTreeSet<String>, CheckError> {
    let fail = |message: String| CheckError::Query {
        name: name.to_string(),
        rtype,
        message,
    };
    let qname = Name::from_ascii(format!("{name}.")).map_err(|e| fail(e.to_string()))?;
    let lookup = match resolver.lookup(qname, record_type(rtype)).await {
        Ok(l) => l,
        Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
            if matches!(
                nr.response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            ) =>
        {
            return Ok(BTreeSet::new());
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    use hickory_resolver::proto::rr::RData as H;
    let values = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            H::MX(mx) => Some(format!("{} {}", mx.preference, name_text(&mx.exchange))),
            H::A(a) => Some(a.0.to_string()),
            H::AAAA(a) => Some(a.0.to_string()),
            H::PTR(p) => Some(name_text(&p.0)),
            H::NS(n) => Some(name_text(&n.0)),
            H::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect();
    Ok(values)
}
