//! Destination resolution for outbound delivery (the MTA role): the hosts to try for a
//! recipient domain (RFC 5321 §5.1), their addresses, and TXT lookups for MTA-STS.
//!
//! Decisions, following what Postfix does where the RFCs leave room:
//!
//! - MX records are tried by preference, lowest first; hosts of equal preference are shuffled
//!   (RFC 5321 §5.1 "the sender-SMTP MUST randomize them"). A host listed twice is kept once,
//!   at its lowest preference.
//! - No MX record but the domain exists (NODATA): the implicit MX, the domain itself with
//!   preference 0 ([`MxHost::implicit`]). Whether it has addresses is for [`MxResolver::addresses`].
//! - Null MX (RFC 7505): the MX set consists only of `.` targets (RFC 7505 §3 requires exactly
//!   one, preference 0; a set of only `.` records is refused the same way) → permanent, 5.1.10.
//!   A `.` next to real MX records is ignored (RFC 7505 §4.3 says such a set is a mistake).
//! - MX targets that are IP addresses written as names (`MX 10 192.0.2.1.`): RFC 5321 §5.1 says
//!   the target is a domain name, and Postfix refuses them ("numeric domain name in resource
//!   data of MX record") and skips the record. The same here (with a warning); when nothing
//!   usable is left the domain is refused, permanently, with 5.4.4 (unable to route).
//! - NXDOMAIN → permanent, 5.1.2 (bad destination system); SERVFAIL, REFUSED, timeouts and
//!   other failures → temporary.
//! - Domain literals `[192.0.2.1]`, `[IPv6:2001:db8::1]` → that address, no DNS.
//! - Internationalized domains (SMTPUTF8) are converted to A-labels (IDNA) for the lookups.
//! - Addresses: AAAA first, then A — like Postfix with `inet_protocols = all` and
//!   `smtp_address_preference = ipv6`; deterministic, the caller tries them in order and falls
//!   back to the next. Both families are asked in parallel; one family failing temporarily
//!   while the other has addresses still gives the addresses found.
//!
//! Not done here: dropping MX hosts at or below our own preference (mail-loop avoidance), DANE.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{TokioResolver, lookup::Lookup};
use tracing::{debug, warn};

/// Tries per DNS query.
pub const DNS_ATTEMPTS: usize = 2;

/// Why a destination could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The destination will never work: bounce. `code` is the RFC 3463 enhanced status code
    /// (e.g. `5.1.10` for a null MX).
    #[error("{code} {message}")]
    Permanent { code: String, message: String },
    /// Try again later (SERVFAIL, timeout, network).
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// The resolver could not be set up.
    #[error("resolver configuration: {0}")]
    Config(String),
}

impl ResolveError {
    fn permanent(code: &str, message: impl Into<String>) -> ResolveError {
        ResolveError::Permanent {
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// True for [`ResolveError::Temporary`].
    pub fn is_temporary(&self) -> bool {
        matches!(self, ResolveError::Temporary(_))
    }
}

/// One host to try for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// The host name in A-label form, lower case, without the trailing dot (for a domain
    /// literal: the literal as given, e.g. `[192.0.2.1]`).
    pub name: String,
    pub preference: u16,
    /// No MX records: the domain itself (RFC 5321 §5.1).
    pub implicit: bool,
    /// A domain literal: connect to this address, no DNS.
    pub literal: Option<IpAddr>,
}

/// DNS lookups for outbound delivery. Cheap to clone (shared resolver and cache).
#[derive(Clone)]
pub struct MxResolver {
    inner: Arc<TokioResolver>,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver").finish_non_exhaustive()
    }
}

/// Parses a domain literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 §4.1.3).
/// `None` when `domain` is not bracketed; `Some(Err)` when it is but is not a valid literal.
pub fn parse_domain_literal(domain: &str) -> Option<Result<IpAddr, ResolveError>> {
    let inner = domain.strip_prefix('[')?;
    let bad = || {
        ResolveError::permanent(
            "5.1.2",
            format!("invalid address literal {domain:?} in destination"),
        )
    };
    let Some(inner) = inner.strip_suffix(']') else {
        return Some(Err(bad()));
    };
    let ip = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..]
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| bad()),
        _ => inner
            .parse::<std::net::Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| bad()),
    };
    Some(ip)
}

/// The DNS name of a domain given as UTF-8 (U-labels allowed) or ASCII: A-labels, lower case,
/// fully qualified (so no search list applies).
fn dns_name(domain: &str) -> Result<Name, String> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() || d.starts_with('.') || d.contains("..") {
        return Err(format!("invalid domain name {domain:?}"));
    }
    let mut name = Name::from_utf8(d)
        .or_else(|_| Name::from_ascii(d))
        .map_err(|e| format!("invalid domain name {domain:?}: {e}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// `domain` (UTF-8 or ASCII) in A-label form, lower case, without a trailing dot.
pub fn to_ascii_domain(domain: &str) -> Result<String, ResolveError> {
    let name = dns_name(domain).map_err(|m| ResolveError::permanent("5.1.2", m))?;
    Ok(name_to_string(&name))
}

fn name_to_string(name: &Name) -> String {
    let s = name.to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_ascii_lowercase()
}

/// Orders MX hosts for delivery: by preference, lowest first, each group of equal preference
/// shuffled with `pick(n)`, which returns a random index in `0..n` (injected so that tests
/// can use a fixed sequence). A name listed twice is kept once, at its lowest preference.
pub fn order_mx(mut hosts: Vec<MxHost>, mut pick: impl FnMut(usize) -> usize) -> Vec<MxHost> {
    hosts.sort_by_key(|h| h.preference);
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.name.clone()));
    let mut start = 0;
    while start < hosts.len() {
        let pref = hosts[start].preference;
        let end = start
            + hosts[start..]
                .iter()
                .take_while(|h| h.preference == pref)
                .count();
        // Fisher-Yates within [start, end).
        let group = &mut hosts[start..end];
        for i in (1..group.len()).rev() {
            let j = pick(i + 1).min(i);
            group.swap(i, j);
        }
        start = end;
    }
    hosts
}

/// What an MX answer means, before ordering: the `(preference, target)` pairs of the answer
/// (targets in A-label form, `""` for the root `.`).
pub fn classify_mx(domain: &str, records: &[(u16, String)]) -> Result<Vec<MxHost>, ResolveError> {
    if !records.is_empty() && records.iter().all(|(_, t)| t.is_empty()) {
        return Err(ResolveError::permanent(
            "5.1.10",
            format!("{domain} does not accept mail (null MX, RFC 7505)"),
        ));
    }
    let mut hosts = Vec::new();
    for (pref, target) in records {
        if target.is_empty() {
            warn!(domain, "null MX next to other MX records: ignored");
            continue;
        }
        if target.parse::<IpAddr>().is_ok() {
            warn!(domain, target, "numeric domain name in MX record: skipped");
            continue;
        }
        hosts.push(MxHost {
            name: target.clone(),
            preference: *pref,
            implicit: false,
            literal: None,
        });
    }
    if hosts.is_empty() && !records.is_empty() {
        return Err(ResolveError::permanent(
            "5.4.4",
            format!("no usable MX host for {domain} (IP addresses as MX names)"),
        ));
    }
    Ok(hosts)
}

/// A small random source for [`order_mx`]: splitmix64 seeded from the OS.
fn os_pick() -> impl FnMut(usize) -> usize {
    let mut state = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
    });
    move |n| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z % n.max(1) as u64) as usize
    }
}

/// The outcome of one lookup: records, no records (NODATA), no such domain, or a temporary
/// failure.
enum Answer {
    Records(Lookup),
    NoData,
    NxDomain,
}

fn classify_error(e: NetError) -> Result<Answer, ResolveError> {
    match &e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => Ok(Answer::NxDomain),
            ResponseCode::NoError => Ok(Answer::NoData),
            code => Err(ResolveError::Temporary(format!("DNS: {code}"))),
        },
        _ => Err(ResolveError::Temporary(e.to_string())),
    }
}

impl MxResolver {
    /// `nameserver`: one DNS server (tests, lab), asked over UDP and TCP, without
    /// `/etc/hosts`; `None`: the system configuration from `/etc/resolv.conf`. `timeout` is
    /// per query (each tried [`DNS_ATTEMPTS`] times).
    pub fn new(
        nameserver: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<MxResolver, ResolveError> {
        if timeout.is_zero() {
            return Err(ResolveError::Config("timeout must be positive".into()));
        }
        let (config, mut opts) =
            ringmail_mailauth::resolver_config(nameserver).map_err(ResolveError::Config)?;
        opts.timeout = timeout;
        opts.attempts = DNS_ATTEMPTS;
        opts.cache_size = 8192;
        opts.try_tcp_on_error = true;
        opts.edns0 = true;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| ResolveError::Config(e.to_string()))?;
        Ok(MxResolver {
            inner: Arc::new(resolver),
        })
    }

    async fn query(&self, name: &Name, rtype: RecordType) -> Result<Answer, ResolveError> {
        match self.inner.lookup(name.clone(), rtype).await {
            Ok(l) => Ok(Answer::Records(l)),
            Err(e) => classify_error(e),
        }
    }

    /// The hosts to try for a recipient domain, in order (see the module documentation).
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<MxHost>, ResolveError> {
        if let Some(lit) = parse_domain_literal(domain) {
            let ip = lit?;
            return Ok(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
                implicit: false,
                literal: Some(ip),
            }]);
        }
        let name = dns_name(domain).map_err(|m| ResolveError::permanent("5.1.2", m))?;
        let ascii = name_to_string(&name);
        let implicit = || {
            vec![MxHost {
                name: ascii.clone(),
                preference: 0,
                implicit: true,
                literal: None,
            }]
        };
        match self.query(&name, RecordType::MX).await? {
            Answer::NxDomain => Err(ResolveError::permanent(
                "5.1.2",
                format!("domain {ascii} does not exist (NXDOMAIN)"),
            )),
            Answer::NoData => {
                debug!(domain = %ascii, "no MX records: implicit MX");
                Ok(implicit())
            }
            Answer::Records(l) => {
                let records: Vec<(u16, String)> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, name_to_string(&mx.exchange))),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    // Only a CNAME chain without MX at its end.
                    return Ok(implicit());
                }
                let hosts = classify_mx(&ascii, &records)?;
                Ok(order_mx(hosts, os_pick()))
            }
        }
    }

    /// AAAA then A addresses of `host` (see the module documentation). Empty when the host
    /// has none or does not exist; temporary failure when neither family could be asked.
    /// An IP address given as `host` is returned as is.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let name = dns_name(host).map_err(|m| ResolveError::permanent("5.4.4", m))?;
        let (v6, v4) = tokio::join!(
            self.query(&name, RecordType::AAAA),
            self.query(&name, RecordType::A)
        );
        let mut out = Vec::new();
        let mut temp = None;
        for ans in [v6, v4] {
            match ans {
                Ok(Answer::Records(l)) => {
                    for r in l.answers() {
                        let ip = match &r.data {
                            RData::AAAA(a) => IpAddr::V6(a.0),
                            RData::A(a) => IpAddr::V4(a.0),
                            _ => continue,
                        };
                        if !out.contains(&ip) {
                            out.push(ip);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => temp = Some(e),
            }
        }
        match temp {
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                warn!(host, error = %e, "one address family failed; using the other");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// The TXT records of `name`, each record's strings concatenated (invalid UTF-8 replaced).
    /// Empty when there are none or the name does not exist.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, ResolveError> {
        let n = dns_name(name).map_err(|m| ResolveError::permanent("5.1.2", m))?;
        match self.query(&n, RecordType::TXT).await? {
            Answer::Records(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => {
                        let bytes: Vec<u8> =
                            t.txt_data.iter().flat_map(|s| s.iter()).copied().collect();
                        Some(String::from_utf8_lossy(&bytes).into_owned())
                    }
                    _ => None,
                })
                .collect()),
            Answer::NoData | Answer::NxDomain => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, pref: u16) -> MxHost {
        MxHost {
            name: name.into(),
            preference: pref,
            implicit: false,
            literal: None,
        }
    }

    fn names(h: &[MxHost]) -> Vec<&str> {
        h.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn orders_by_preference() {
        let hosts = vec![host("c", 30), host("a", 10), host("b", 20)];
        let out = order_mx(hosts, |_| 0);
        assert_eq!(names(&out), ["a", "b", "c"]);
    }

    #[test]
    fn shuffles_only_within_equal_preference() {
        let hosts = vec![host("x1", 10), host("x2", 10), host("y", 5), host("z", 20)];
        // pick(i+1) = i keeps the order; pick = 0 swaps the last into first place.
        let keep = order_mx(hosts.clone(), |n| n - 1);
        assert_eq!(names(&keep), ["y", "x1", "x2", "z"]);
        let swap = order_mx(hosts.clone(), |_| 0);
        assert_eq!(names(&swap), ["y", "x2", "x1", "z"]);
        // Out-of-range picks are clamped, never panic.
        let wild = order_mx(hosts, |_| usize::MAX);
        assert_eq!(wild.len(), 4);
        assert_eq!(wild[0].name, "y");
        assert_eq!(wild[3].name, "z");
    }

    #[test]
    fn os_shuffle_reaches_every_order() {
        let hosts = vec![host("a", 10), host("b", 10), host("c", 10)];
        let mut seen = std::collections::HashSet::new();
        let mut pick = os_pick();
        for _ in 0..500 {
            let out = order_mx(hosts.clone(), &mut pick);
            seen.insert(names(&out).join(","));
        }
        assert_eq!(seen.len(), 6, "{seen:?}");
    }

    #[test]
    fn duplicates_keep_lowest_preference() {
        let hosts = vec![host("a", 20), host("b", 15), host("a", 10)];
        let out = order_mx(hosts, |n| n - 1);
        assert_eq!(names(&out), ["a", "b"]);
        assert_eq!(out[0].preference, 10);
    }

    #[test]
    fn null_mx() {
        let e = classify_mx("example.org", &[(0, String::new())]).unwrap_err();
        assert!(matches!(e, ResolveError::Permanent { ref code, .. } if code == "5.1.10"));
        // A "." next to real MX hosts is ignored.
        let h = classify_mx(
            "example.org",
            &[(0, String::new()), (10, "mx.example.org".into())],
        )
        .unwrap();
        assert_eq!(names(&h), ["mx.example.org"]);
    }

    #[test]
    fn numeric_mx_targets_are_skipped() {
        let h = classify_mx(
            "example.org",
            &[(10, "192.0.2.1".into()), (20, "mx.example.org".into())],
        )
        .unwrap();
        assert_eq!(names(&h), ["mx.example.org"]);
        let e = classify_mx("example.org", &[(10, "192.0.2.1".into())]).unwrap_err();
        assert!(matches!(e, ResolveError::Permanent { ref code, .. } if code == "5.4.4"));
    }

    #[test]
    fn literals() {
        assert_eq!(
            parse_domain_literal("[192.0.2.1]").unwrap().unwrap(),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_domain_literal("[IPv6:2001:db8::1]").unwrap().unwrap(),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_domain_literal("[ipv6:2001:DB8::1]").unwrap().unwrap(),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert!(parse_domain_literal("example.org").is_none());
        for bad in [
            "[2001:db8::1]",
            "[192.0.2.1",
            "[192.0.2.256]",
            "[]",
            "[IPv6:192.0.2.1]",
            "[IPv6:]",
            "[ 192.0.2.1]",
        ] {
            let r = parse_domain_literal(bad).unwrap();
            assert!(
                matches!(r, Err(ResolveError::Permanent { ref code, .. }) if code == "5.1.2"),
                "{bad}: {r:?}"
            );
        }
    }

    #[test]
    fn idna_to_a_labels() {
        assert_eq!(
            to_ascii_domain("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(to_ascii_domain("Example.ORG.").unwrap(), "example.org");
        assert_eq!(
            to_ascii_domain("_mta-sts.example.org").unwrap(),
            "_mta-sts.example.org"
        );
        for bad in ["", ".", "a..b", ".a"] {
            assert!(to_ascii_domain(bad).is_err(), "{bad:?}");
        }
    }
}
