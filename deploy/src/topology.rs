//! The topology file: what a deployment is made of, typed and validated.
//!
//! ```text
//! topology.toml --(TOML syntax, unknown keys: every error at once)--> raw serde structs
//!               --(cross-references, addresses, names: every error at once)--> Topology
//! ```
//!
//! Every error names the file, line and column and what is wrong, like the role configs
//! (the same front end, [`ringmail_proxy_core::config::load_str_with`]). The validated
//! [`Topology`] holds only resolved references (indexes into its own vectors), so the renderers
//! cannot meet an unknown host, site or router.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine;
use ipnet::IpNet;
use ringmail_proxy_core::config::parse::{Ctx, Span, Value, check_keys};
use ringmail_proxy_core::config::{ConfigErrors, load_str_with};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A fully qualified domain name, lower case, without the trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fqdn(String);

impl Fqdn {
    /// Parses a host or domain name (letters, digits, hyphens; labels of 1-63 bytes; at least
    /// two labels; 253 bytes at most). A trailing dot is accepted and dropped.
    pub fn parse(s: &str) -> Result<Fqdn, String> {
        let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if s.is_empty() || s.len() > 253 {
            return Err(format!("`{s}` is not a domain name (1 to 253 bytes)"));
        }
        let labels: Vec<&str> = s.split('.').collect();
        if labels.len() < 2 {
            return Err(format!(
                "`{s}` is not a fully qualified name (write e.g. `{s}.example.com`)"
            ));
        }
        for l in &labels {
            let ok = !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-');
            if !ok {
                return Err(format!(
                    "`{s}`: label `{l}` is not a valid host name label (letters, digits, inner hyphens, 1-63 bytes)"
                ));
            }
        }
        Ok(Fqdn(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is `zone` or below it.
    pub fn is_in(&self, zone: &Fqdn) -> bool {
        self.0 == zone.0
            || self
                .0
                .strip_suffix(zone.0.as_str())
                .is_some_and(|p| p.ends_with('.'))
    }

    /// The name relative to `zone` (`@` for the apex), for zone files.
    pub fn relative_to(&self, zone: &Fqdn) -> String {
        if self.0 == zone.0 {
            "@".to_string()
        } else if let Some(p) = self.0.strip_suffix(&format!(".{}", zone.0)) {
            p.to_string()
        } else {
            format!("{}.", self.0)
        }
    }

    /// The first label (`mta-a1` of `mta-a1.example.com`).
    pub fn short(&self) -> &str {
        self.0.split('.').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a host does. Each role has its ports and its firewall rules (see `nft`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Anycast TCP proxy + BGP announcement (IMAPS 993, submission 587/465 on the VIPs).
    Lb,
    /// Submission: 587 (STARTTLS) and 465 (implicit TLS), relays to the MTAs.
    Msa,
    /// Inbound SMTP on 25 for our domains, relays to the MDAs over LMTP.
    Mx,
    /// Outbound SMTP: accepts only from our MSAs and MXs, delivers to the world.
    Mta,
    /// LMTP delivery (24, from MX/MSA only) and IMAPS 993.
    Mda,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Lb, Role::Msa, Role::Mx, Role::Mta, Role::Mda];

    pub fn name(self) -> &'static str {
        match self {
            Role::Lb => "lb",
            Role::Msa => "msa",
            Role::Mx => "mx",
            Role::Mta => "mta",
            Role::Mda => "mda",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Well-known ports of the deployment (the renderers and the firewall agree on these).
pub mod ports {
    pub const SMTP: u16 = 25;
    pub const LMTP: u16 = 24;
    pub const SUBMISSION: u16 = 587;
    pub const SUBMISSIONS: u16 = 465;
    pub const IMAPS: u16 = 993;
    pub const SSH: u16 = 22;
    pub const BGP: u16 = 179;
}

/// An anycast client service held by the LBs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// IMAPS on 993, to the MDAs.
    Imap,
    /// Submission on 587 and 465, to the MSAs.
    Submission,
}

impl ServiceKind {
    pub fn backend_role(self) -> Role {
        match self {
            ServiceKind::Imap => Role::Mda,
            ServiceKind::Submission => Role::Msa,
        }
    }

    pub fn ports(self) -> &'static [u16] {
        match self {
            ServiceKind::Imap => &[ports::IMAPS],
            ServiceKind::Submission => &[ports::SUBMISSION, ports::SUBMISSIONS],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Imap => "imap",
            ServiceKind::Submission => "submission",
        }
    }
}

/// How the LB hosts announce the anycast addresses (the bgp-glue modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BgpMode {
    /// ringmail's built-in BGP speaker talks to the routers.
    Speaker,
    /// ringmail writes kernel table routes that BIRD 2 on the LB exports.
    Bird,
    /// Same with FRR (IPv4 only on FRR 8.4).
    Frr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DkimAlgorithm {
    Rsa,
    Ed25519,
}

impl DkimAlgorithm {
    pub fn tag(self) -> &'static str {
        match self {
            DkimAlgorithm::Rsa => "rsa",
            DkimAlgorithm::Ed25519 => "ed25519",
        }
    }
}

#[derive(Clone, Debug)]
pub struct DkimKey {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// The `p=` value: base64 of the SubjectPublicKeyInfo (RSA) or of the raw 32-byte key
    /// (Ed25519, RFC 8463).
    pub public_key: String,
    /// Where the MTA hosts keep the private key (rendered into their config).
    pub private_key_path: PathBuf,
}

impl DkimKey {
    /// The TXT record's text, before splitting into 255-byte strings.
    pub fn record(&self) -> String {
        format!(
            "v=DKIM1; h=sha256; k={}; p={}",
            self.algorithm.tag(),
            self.public_key
        )
    }
}

#[derive(Clone, Debug)]
pub struct Dmarc {
    pub p: String,
    pub sp: String,
    pub np: String,
    pub adkim: String,
    pub aspf: String,
    pub rf: String,
    pub rua: Vec<String>,
    pub ruf: Vec<String>,
}

impl Dmarc {
    /// The record in the seed's form (`v=DMARC1;p=reject;sp=reject;…`).
    pub fn record(&self) -> String {
        let mut s = format!(
            "v=DMARC1;p={};sp={};np={};adkim={};aspf={};rf={}",
            self.p, self.sp, self.np, self.adkim, self.aspf, self.rf
        );
        if !self.rua.is_empty() {
            s.push_str(&format!(";rua={}", self.rua.join(",")));
        }
        if !self.ruf.is_empty() {
            s.push_str(&format!(";ruf={}", self.ruf.join(",")));
        }
        s
    }

    /// Domains that receive this domain's reports (from `mailto:` URIs).
    pub fn report_domains(&self) -> Vec<Fqdn> {
        let mut out: Vec<Fqdn> = self
            .rua
            .iter()
            .chain(&self.ruf)
            .filter_map(|u| u.strip_prefix("mailto:"))
            .filter_map(|a| a.split('!').next())
            .filter_map(|a| a.rsplit_once('@'))
            .filter_map(|(_, d)| Fqdn::parse(d).ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Clone, Debug)]
pub struct Domain {
    pub name: Fqdn,
    pub mx_priority: u16,
    pub adsp: bool,
    pub dmarc: Dmarc,
    pub dkim: Vec<DkimKey>,
}

#[derive(Clone, Debug)]
pub struct NameServer {
    pub name: Fqdn,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug)]
pub struct Dns {
    pub serial: u32,
    pub ttl: u32,
    /// SOA RNAME as a name (`hostmaster.example.com`).
    pub hostmaster: Fqdn,
    pub nameservers: Vec<NameServer>,
    pub reverse_zones: Vec<IpNet>,
    /// The recursive resolver the MX hosts (sender checks) and the MTA hosts (MX lookups) ask;
    /// `None`: each host's /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct Site {
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct Router {
    pub name: String,
    pub site: usize,
    pub asn: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug)]
pub struct LbBgp {
    pub router_id: Ipv4Addr,
    /// Indexes into [`Topology::routers`].
    pub neighbors: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct Host {
    pub name: Fqdn,
    pub site: usize,
    pub roles: Vec<Role>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub bgp: Option<LbBgp>,
}

impl Host {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: Fqdn,
    pub kind: ServiceKind,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl Service {
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

#[derive(Clone, Debug)]
pub struct Bgp {
    pub lb_asn: u32,
    pub mode: BgpMode,
    pub kernel_table: u32,
    /// The interface each LB host shares with the other LBs of its site: when set, every LB
    /// config gets `[announce.handoff]` with those LBs as peers (a draining LB keeps its
    /// connections after the routers move them).
    pub handoff_device: Option<String>,
}

/// The account store when the topology names none (one SQLite file per host: a trial setup).
pub const DEFAULT_ACCOUNTS: &str = "sqlite:/var/lib/ringmail/accounts.db";

/// A validated deployment.
#[derive(Clone, Debug)]
pub struct Topology {
    pub dns: Dns,
    pub management: Vec<IpNet>,
    /// The first one is the primary domain: the SPF include records live there.
    pub domains: Vec<Domain>,
    pub sites: Vec<Site>,
    pub routers: Vec<Router>,
    pub hosts: Vec<Host>,
    pub services: Vec<Service>,
    pub bgp: Bgp,
    /// The account store the MSAs and MDAs use (`sqlite:PATH`, `postgres://…`, `ldap(s)://…`).
    pub accounts: String,
}

impl Topology {
    pub fn primary(&self) -> &Domain {
        &self.domains[0]
    }

    pub fn hosts_with(&self, role: Role) -> impl Iterator<Item = &Host> + '_ {
        self.hosts.iter().filter(move |h| h.has(role))
    }

    /// The domain whose zone holds `name`'s records (the longest matching one).
    pub fn zone_of(&self, name: &Fqdn) -> Option<&Domain> {
        self.domains
            .iter()
            .filter(|d| name.is_in(&d.name))
            .max_by_key(|d| d.name.as_str().len())
    }

    /// The name of a site's SPF include record (`a._spf.example.com`).
    pub fn site_spf_name(&self, site: usize) -> String {
        format!(
            "{}._spf.{}",
            self.sites[site].name.to_ascii_lowercase(),
            self.primary().name
        )
    }

    /// Every named address of the deployment: (name, address), hosts, name servers and services.
    pub fn named_addresses(&self) -> Vec<(Fqdn, IpAddr)> {
        let mut out = Vec::new();
        for h in &self.hosts {
            out.extend(h.addrs().map(|a| (h.name.clone(), a)));
        }
        for n in &self.dns.nameservers {
            let v4 = n.ipv4.map(IpAddr::V4);
            let v6 = n.ipv6.map(IpAddr::V6);
            out.extend(v4.into_iter().chain(v6).map(|a| (n.name.clone(), a)));
        }
        for s in &self.services {
            out.extend(s.addrs().map(|a| (s.name.clone(), a)));
        }
        out
    }

    /// The declared reverse zone holding `addr`, if any (the most specific one).
    pub fn reverse_zone_of(&self, addr: IpAddr) -> Option<&IpNet> {
        self.dns
            .reverse_zones
            .iter()
            .filter(|z| z.contains(&addr))
            .max_by_key(|z| z.prefix_len())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw form (serde) and loading
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct RawTopology {
    dns: Spanned<RawDns>,
    #[serde(default)]
    management: Option<RawManagement>,
    domain: Vec<Spanned<RawDomain>>,
    site: Vec<Spanned<RawSite>>,
    #[serde(default)]
    router: Vec<Spanned<RawRouter>>,
    host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    bgp: Option<RawBgp>,
    #[serde(default)]
    accounts: Option<RawAccounts>,
}

#[derive(Deserialize)]
struct RawAccounts {
    url: Spanned<String>,
}

#[derive(Deserialize)]
struct RawDns {
    serial: Spanned<u32>,
    #[serde(default = "default_ttl")]
    ttl: Spanned<u32>,
    hostmaster: Spanned<String>,
    nameserver: Vec<Spanned<RawNameServer>>,
    reverse_zones: Vec<Spanned<String>>,
    #[serde(default)]
    resolver: Option<Spanned<String>>,
}

fn default_ttl() -> Spanned<u32> {
    Spanned::new(0..0, 3600)
}

#[derive(Deserialize)]
struct RawNameServer {
    name: Spanned<String>,
    ipv4: Option<Spanned<String>>,
    ipv6: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawManagement {
    networks: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawDomain {
    name: Spanned<String>,
    #[serde(default = "default_mx_priority")]
    mx_priority: u16,
    #[serde(default)]
    adsp: bool,
    dmarc: Spanned<RawDmarc>,
    #[serde(default)]
    dkim: Vec<Spanned<RawDkim>>,
}

fn default_mx_priority() -> u16 {
    10
}

#[derive(Deserialize)]
struct RawDmarc {
    p: Spanned<String>,
    sp: Option<Spanned<String>>,
    np: Option<Spanned<String>>,
    #[serde(default = "relaxed")]
    adkim: Spanned<String>,
    #[serde(default = "relaxed")]
    aspf: Spanned<String>,
    #[serde(default = "afrf")]
    rf: Spanned<String>,
    #[serde(default)]
    rua: Vec<Spanned<String>>,
    #[serde(default)]
    ruf: Vec<Spanned<String>>,
}

fn relaxed() -> Spanned<String> {
    Spanned::new(0..0, "r".into())
}

fn afrf() -> Spanned<String> {
    Spanned::new(0..0, "afrf".into())
}

#[derive(Deserialize)]
struct RawDkim {
    selector: Spanned<String>,
    public_key: Spanned<String>,
    private_key: Spanned<String>,
}

#[derive(Deserialize)]
struct RawSite {
    name: Spanned<String>,
}

#[derive(Deserialize)]
struct RawRouter {
    name: Spanned<String>,
    site: Spanned<String>,
    asn: Spanned<u32>,
    ipv4: Option<Spanned<String>>,
    ipv6: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawHost {
    name: Spanned<String>,
    site: Spanned<String>,
    roles: Spanned<Vec<Spanned<String>>>,
    ipv4: Option<Spanned<String>>,
    ipv6: Option<Spanned<String>>,
    bgp: Option<Spanned<RawLbBgp>>,
}

#[derive(Deserialize)]
struct RawLbBgp {
    router_id: Spanned<String>,
    neighbors: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawService {
    name: Spanned<String>,
    kind: Spanned<String>,
    ipv4: Option<Spanned<String>>,
    ipv6: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawBgp {
    lb_asn: Spanned<u32>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    kernel_table: Option<Spanned<u32>>,
    #[serde(default)]
    handoff_device: Option<Spanned<String>>,
}

/// The keys each table may hold (checked before serde, so every unknown key is reported).
const TOP_KEYS: &[&str] = &[
    "dns",
    "management",
    "domain",
    "site",
    "router",
    "host",
    "service",
    "bgp",
    "accounts",
];
const DNS_KEYS: &[&str] = &[
    "serial",
    "ttl",
    "hostmaster",
    "nameserver",
    "reverse_zones",
    "resolver",
];
const NS_KEYS: &[&str] = &["name", "ipv4", "ipv6"];
const MGMT_KEYS: &[&str] = &["networks"];
const DOMAIN_KEYS: &[&str] = &["name", "mx_priority", "adsp", "dmarc", "dkim"];
const DMARC_KEYS: &[&str] = &["p", "sp", "np", "adkim", "aspf", "rf", "rua", "ruf"];
const DKIM_KEYS: &[&str] = &["selector", "public_key", "private_key"];
const SITE_KEYS: &[&str] = &["name"];
const ROUTER_KEYS: &[&str] = &["name", "site", "asn", "ipv4", "ipv6"];
const HOST_KEYS: &[&str] = &["name", "site", "roles", "ipv4", "ipv6", "bgp"];
const HOST_BGP_KEYS: &[&str] = &["router_id", "neighbors"];
const SERVICE_KEYS: &[&str] = &["name", "kind", "ipv4", "ipv6"];
const BGP_KEYS: &[&str] = &["lb_asn", "mode", "kernel_table", "handoff_device"];
const ACCOUNTS_KEYS: &[&str] = &["url"];

fn check_tables(ctx: &mut Ctx<'_>, v: Option<&Value<'_>>, allowed: &[&str], section: &str) {
    let Some(v) = v else { return };
    match v.get_ref() {
        DeValue::Table(t) => check_keys(ctx, t, allowed, section),
        DeValue::Array(items) => {
            for item in items {
                if let DeValue::Table(t) = item.get_ref() {
                    check_keys(ctx, t, allowed, section);
                }
            }
        }
        _ => {}
    }
}

/// Every table reachable under `key` of `v` (one for a table, each element for an array).
fn children<'a, 'i>(v: Option<&'a Value<'i>>, key: &str) -> Vec<&'a Value<'i>> {
    let tables: Vec<&DeTable<'i>> = match v.map(|v| v.get_ref()) {
        Some(DeValue::Table(t)) => vec![t],
        Some(DeValue::Array(items)) => items
            .iter()
            .filter_map(|i| match i.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => vec![],
    };
    tables.into_iter().filter_map(|t| t.get(key)).collect()
}

fn check_all_keys(ctx: &mut Ctx<'_>, root: &DeTable<'_>) {
    check_keys(ctx, root, TOP_KEYS, "the top level");
    let dns = root.get("dns");
    check_tables(ctx, dns, DNS_KEYS, "[dns]");
    for ns in children(dns, "nameserver") {
        check_tables(ctx, Some(ns), NS_KEYS, "[[dns.nameserver]]");
    }
    check_tables(ctx, root.get("management"), MGMT_KEYS, "[management]");
    let domain = root.get("domain");
    check_tables(ctx, domain, DOMAIN_KEYS, "[[domain]]");
    for d in children(domain, "dmarc") {
        check_tables(ctx, Some(d), DMARC_KEYS, "[domain.dmarc]");
    }
    for d in children(domain, "dkim") {
        check_tables(ctx, Some(d), DKIM_KEYS, "[[domain.dkim]]");
    }
    check_tables(ctx, root.get("site"), SITE_KEYS, "[[site]]");
    check_tables(ctx, root.get("router"), ROUTER_KEYS, "[[router]]");
    let host = root.get("host");
    check_tables(ctx, host, HOST_KEYS, "[[host]]");
    for b in children(host, "bgp") {
        check_tables(ctx, Some(b), HOST_BGP_KEYS, "[host.bgp]");
    }
    check_tables(ctx, root.get("service"), SERVICE_KEYS, "[[service]]");
    check_tables(ctx, root.get("bgp"), BGP_KEYS, "[bgp]");
    check_tables(ctx, root.get("accounts"), ACCOUNTS_KEYS, "[accounts]");
}

/// Loads and validates a topology file. Relative key paths are resolved against the file's
/// directory; the public keys are read (the only other I/O).
pub fn load_file(path: &Path) -> Result<Topology, ConfigErrors> {
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ringmail_proxy_core::config::ConfigError {
            file: name.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        }])
    })?;
    load_str(&text, &name, &base)
}

/// [`load_file`] on a string; `base` is where relative key paths start.
pub fn load_str(text: &str, file: &str, base: &Path) -> Result<Topology, ConfigErrors> {
    load_str_with(text, file, |ctx, root| {
        check_all_keys(ctx, root);
        if ctx.has_errors() {
            return None;
        }
        match toml::from_str::<RawTopology>(text) {
            Ok(raw) => Validator { ctx, base }.topology(raw),
            Err(e) => {
                ctx.error(e.span().unwrap_or(0..0), e.message().trim().to_string());
                None
            }
        }
    })
}

struct Validator<'c, 'a, 'b> {
    ctx: &'c mut Ctx<'a>,
    base: &'b Path,
}

impl Validator<'_, '_, '_> {
    fn err(&mut self, span: Span, msg: impl Into<String>) {
        self.ctx.error(span, msg);
    }

    fn fqdn(&mut self, s: &Spanned<String>, what: &str) -> Option<Fqdn> {
        match Fqdn::parse(s.get_ref()) {
            Ok(f) => Some(f),
            Err(e) => {
                self.err(s.span(), format!("{what}: {e}"));
                None
            }
        }
    }

    fn v4(&mut self, s: &Option<Spanned<String>>, what: &str) -> Option<Ipv4Addr> {
        self.host_addr(s, what, "IPv4", |a: &Ipv4Addr| {
            a.is_unspecified() || a.is_multicast() || a.is_broadcast()
        })
    }

    fn v6(&mut self, s: &Option<Spanned<String>>, what: &str) -> Option<Ipv6Addr> {
        self.host_addr(s, what, "IPv6", |a: &Ipv6Addr| {
            a.is_unspecified() || a.is_multicast() || a.is_loopback()
        })
    }

    /// An optional address of one family that must name a host (`not_host` says when not).
    fn host_addr<A: std::str::FromStr + fmt::Display>(
        &mut self,
        s: &Option<Spanned<String>>,
        what: &str,
        family: &str,
        not_host: impl Fn(&A) -> bool,
    ) -> Option<A> {
        let s = s.as_ref()?;
        match s.get_ref().parse::<A>() {
            Ok(a) if not_host(&a) => {
                self.err(s.span(), format!("{what}: {a} is not a host address"));
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    s.span(),
                    format!("{what}: `{}` is not an {family} address", s.get_ref()),
                );
                None
            }
        }
    }

    fn net(&mut self, s: &Spanned<String>, what: &str) -> Option<IpNet> {
        match s.get_ref().parse::<IpNet>() {
            Ok(n) if n != n.trunc() => {
                self.err(
                    s.span(),
                    format!(
                        "{what}: `{n}` has host bits set (did you mean {}?)",
                        n.trunc()
                    ),
                );
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                self.err(
                    s.span(),
                    format!(
                        "{what}: `{}` is not a prefix like 192.0.2.0/24",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn one_of(&mut self, s: &Spanned<String>, allowed: &[&str], what: &str) -> String {
        let v = s.get_ref().to_ascii_lowercase();
        if !allowed.contains(&v.as_str()) {
            self.err(
                s.span(),
                format!(
                    "{what}: `{}` is not one of {}",
                    s.get_ref(),
                    allowed.join(", ")
                ),
            );
        }
        v
    }

    fn topology(mut self, raw: RawTopology) -> Option<Topology> {
        let dns = self.dns(&raw.dns);
        let management = raw
            .management
            .map(|m| {
                m.networks
                    .iter()
                    .filter_map(|n| self.net(n, "management.networks"))
                    .collect()
            })
            .unwrap_or_default();
        let domains: Vec<Domain> = raw.domain.iter().filter_map(|d| self.domain(d)).collect();
        if raw.domain.is_empty() {
            self.err(0..0, "the topology has no [[domain]]");
        }
        let mut seen = HashMap::new();
        for (d, raw_d) in domains.iter().zip(&raw.domain) {
            if seen.insert(d.name.clone(), ()).is_some() {
                self.err(
                    raw_d.get_ref().name.span(),
                    format!("domain {} is listed twice", d.name),
                );
            }
        }

        let mut sites = Vec::new();
        let mut site_index = HashMap::new();
        for s in &raw.site {
            let name = s.get_ref().name.get_ref().to_ascii_lowercase();
            let label_ok = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !label_ok {
                self.err(
                    s.get_ref().name.span(),
                    format!("site name `{name}` must be one DNS label (it names `<site>._spf`)"),
                );
            }
            if site_index.insert(name.clone(), sites.len()).is_some() {
                self.err(
                    s.get_ref().name.span(),
                    format!("site `{name}` is listed twice"),
                );
            }
            sites.push(Site { name });
        }
        if sites.is_empty() {
            self.err(0..0, "the topology has no [[site]]");
        }
        let site_of = |v: &mut Self, s: &Spanned<String>, what: &str| -> Option<usize> {
            let i = site_index.get(&s.get_ref().to_ascii_lowercase()).copied();
            if i.is_none() {
                v.err(
                    s.span(),
                    format!(
                        "{what}: unknown site `{}` (sites: {})",
                        s.get_ref(),
                        site_names(&raw.site)
                    ),
                );
            }
            i
        };

        let mut routers = Vec::new();
        let mut router_index = HashMap::new();
        for r in &raw.router {
            let r = r.get_ref();
            let name = r.name.get_ref().to_ascii_lowercase();
            if router_index.insert(name.clone(), routers.len()).is_some() {
                self.err(r.name.span(), format!("router `{name}` is listed twice"));
            }
            let site = site_of(&mut self, &r.site, &format!("router {name}"));
            let ipv4 = self.v4(&r.ipv4, &format!("router {name}"));
            let ipv6 = self.v6(&r.ipv6, &format!("router {name}"));
            if r.ipv4.is_none() && r.ipv6.is_none() {
                self.err(r.name.span(), format!("router {name} has no address"));
            }
            routers.push(Router {
                name,
                site: site.unwrap_or(0),
                asn: *r.asn.get_ref(),
                ipv4,
                ipv6,
            });
        }

        let mut hosts = Vec::new();
        for rh in &raw.host {
            let h = rh.get_ref();
            let Some(name) = self.fqdn(&h.name, "host name") else {
                continue;
            };
            let site = site_of(&mut self, &h.site, &format!("host {name}"));
            let mut roles = Vec::new();
            for r in h.roles.get_ref() {
                match Role::parse(&r.get_ref().to_ascii_lowercase()) {
                    Some(role) if roles.contains(&role) => {
                        self.err(r.span(), format!("host {name}: role `{role}` listed twice"));
                    }
                    Some(role) => roles.push(role),
                    None => self.err(
                        r.span(),
                        format!(
                            "host {name}: unknown role `{}` (roles: lb, msa, mx, mta, mda)",
                            r.get_ref()
                        ),
                    ),
                }
            }
            if roles.contains(&Role::Mx) && roles.contains(&Role::Mta) {
                self.err(
                    h.roles.span(),
                    format!(
                        "host {name}: the mx and mta roles both listen on port 25 (inbound from the Internet, and from our MSAs and MXs): put them on separate hosts, as the seed does"
                    ),
                );
            }
            if h.roles.get_ref().is_empty() {
                self.err(h.roles.span(), format!("host {name} has no role"));
            }
            roles.sort();
            let ipv4 = self.v4(&h.ipv4, &format!("host {name}"));
            let ipv6 = self.v6(&h.ipv6, &format!("host {name}"));
            if h.ipv4.is_none() && h.ipv6.is_none() {
                self.err(h.name.span(), format!("host {name} has no address"));
            }
            let bgp = match (&h.bgp, roles.contains(&Role::Lb)) {
                (Some(b), true) => self.lb_bgp(b, &name, &router_index, &raw.router),
                (Some(b), false) => {
                    self.err(
                        b.span(),
                        format!("host {name} has a [host.bgp] table but not the `lb` role"),
                    );
                    None
                }
                (None, true) => {
                    self.err(
                        h.roles.span(),
                        format!(
                            "host {name} has the `lb` role but no `bgp = {{ router_id, neighbors }}`"
                        ),
                    );
                    None
                }
                (None, false) => None,
            };
            hosts.push((
                rh.span(),
                Host {
                    name,
                    site: site.unwrap_or(0),
                    roles,
                    ipv4,
                    ipv6,
                    bgp,
                },
            ));
        }

        let mut services = Vec::new();
        for rs in &raw.service {
            let s = rs.get_ref();
            let Some(name) = self.fqdn(&s.name, "service name") else {
                continue;
            };
            let kind = match s.kind.get_ref().to_ascii_lowercase().as_str() {
                "imap" | "imaps" => Some(ServiceKind::Imap),
                "submission" => Some(ServiceKind::Submission),
                _ => {
                    self.err(
                        s.kind.span(),
                        format!(
                            "service {name}: unknown kind `{}` (imap, submission)",
                            s.kind.get_ref()
                        ),
                    );
                    None
                }
            };
            let ipv4 = self.v4(&s.ipv4, &format!("service {name}"));
            let ipv6 = self.v6(&s.ipv6, &format!("service {name}"));
            if s.ipv4.is_none() && s.ipv6.is_none() {
                self.err(s.name.span(), format!("service {name} has no address"));
            }
            if let Some(kind) = kind {
                services.push((
                    rs.span(),
                    Service {
                        name,
                        kind,
                        ipv4,
                        ipv6,
                    },
                ));
            }
        }

        let bgp = match &raw.bgp {
            Some(b) => {
                let mode = match &b.mode {
                    None => BgpMode::Speaker,
                    Some(m) => match self
                        .one_of(m, &["speaker", "bird", "frr"], "bgp.mode")
                        .as_str()
                    {
                        "bird" => BgpMode::Bird,
                        "frr" => BgpMode::Frr,
                        _ => BgpMode::Speaker,
                    },
                };
                let kernel_table = b.kernel_table.as_ref().map_or(100, |t| *t.get_ref());
                if let Some(t) = &b.kernel_table
                    && !(1..=252).contains(t.get_ref())
                    && mode == BgpMode::Frr
                {
                    self.err(t.span(), "bgp.kernel_table: FRR imports only tables 1-252");
                }
                let handoff_device = b.handoff_device.as_ref().and_then(|d| {
                    let name = d.get_ref();
                    let valid = ringmail_proxy_core::config::is_interface_name(name);
                    if !valid {
                        self.err(
                            d.span(),
                            "bgp.handoff_device: not an interface name (1-15 letters, digits, `-_.@`)",
                        );
                    }
                    valid.then(|| name.clone())
                });
                Some(Bgp {
                    lb_asn: *b.lb_asn.get_ref(),
                    mode,
                    kernel_table,
                    handoff_device,
                })
            }
            None => None,
        };

        // Cross-checks over the whole deployment.
        let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut claim = |v: &mut Self, addr: IpAddr, owner: String, span: Span| {
            if let Some(prev) = owners.insert(addr, owner.clone()) {
                v.err(span, format!("address {addr} of {owner} is also {prev}'s"));
            }
        };
        for (span, h) in &hosts {
            for a in h.addrs() {
                claim(&mut self, a, format!("host {}", h.name), span.clone());
            }
        }
        for (span, s) in &services {
            for a in s.addrs() {
                claim(&mut self, a, format!("service {}", s.name), span.clone());
            }
        }
        if let Some(dns) = &dns {
            for (ns, raw_ns) in dns.nameservers.iter().zip(&raw.dns.get_ref().nameserver) {
                let v4 = ns.ipv4.map(IpAddr::V4);
                for a in v4.into_iter().chain(ns.ipv6.map(IpAddr::V6)) {
                    claim(
                        &mut self,
                        a,
                        format!("name server {}", ns.name),
                        raw_ns.span(),
                    );
                }
            }
        }
        for (r, raw_r) in routers.iter().zip(&raw.router) {
            let span = raw_r.span();
            for a in r
                .ipv4
                .map(IpAddr::V4)
                .into_iter()
                .chain(r.ipv6.map(IpAddr::V6))
            {
                claim(&mut self, a, format!("router {}", r.name), span.clone());
            }
        }
        let mut names = HashMap::new();
        for (span, h) in &hosts {
            if names.insert(h.name.clone(), ()).is_some() {
                self.err(span.clone(), format!("host {} is listed twice", h.name));
            }
            if !domains.iter().any(|d| h.name.is_in(&d.name)) {
                self.err(
                    span.clone(),
                    format!(
                        "host {} is not under any [[domain]]: its A/AAAA (and PTR target) would have no zone",
                        h.name
                    ),
                );
            }
        }
        for (span, s) in &services {
            if names.insert(s.name.clone(), ()).is_some() {
                self.err(
                    span.clone(),
                    format!(
                        "service {} has the name of a host or another service",
                        s.name
                    ),
                );
            }
        }
        if let Some(dns) = &dns {
            for (span, h) in &hosts {
                if !h.has(Role::Mta) {
                    continue;
                }
                if h.ipv4.is_none() && h.ipv6.is_none() {
                    continue;
                }
                for a in h.addrs() {
                    if !dns.reverse_zones.iter().any(|z| z.contains(&a)) {
                        self.err(
                            span.clone(),
                            format!(
                                "MTA {} address {a} is in no `dns.reverse_zones` prefix: it could get no PTR, and receivers refuse mail from MTAs without one",
                                h.name
                            ),
                        );
                    }
                }
            }
            for (ns, raw_ns) in dns.nameservers.iter().zip(&raw.dns.get_ref().nameserver) {
                let in_zone = domains.iter().any(|d| ns.name.is_in(&d.name));
                if in_zone && ns.ipv4.is_none() && ns.ipv6.is_none() {
                    self.err(
                        raw_ns.span(),
                        format!(
                            "name server {} is inside our zones and needs an address (glue)",
                            ns.name
                        ),
                    );
                }
            }
        }
        let mtas = hosts.iter().filter(|(_, h)| h.has(Role::Mta)).count();
        let mxs = hosts.iter().filter(|(_, h)| h.has(Role::Mx)).count();
        if mtas == 0 {
            self.err(0..0, "no host has the `mta` role: nothing could send mail");
        }
        if mxs == 0 {
            self.err(
                0..0,
                "no host has the `mx` role: the MX records would be empty",
            );
        }
        for (span, s) in &services {
            let role = s.kind.backend_role();
            if !hosts.iter().any(|(_, h)| h.has(role)) {
                self.err(
                    span.clone(),
                    format!(
                        "service {}: no host has the `{role}` role to serve it",
                        s.name
                    ),
                );
            }
        }
        let has_lb = hosts.iter().any(|(_, h)| h.has(Role::Lb));
        if !services.is_empty() && !has_lb {
            self.err(0..0, "[[service]] addresses need hosts with the `lb` role");
        }
        if has_lb && bgp.is_none() {
            self.err(
                0..0,
                "hosts have the `lb` role but the topology has no [bgp] table",
            );
        }

        let accounts = match &raw.accounts {
            None => DEFAULT_ACCOUNTS.to_string(),
            Some(a) => {
                let url = a.url.get_ref().trim();
                let known = [
                    "sqlite:",
                    "postgres://",
                    "postgresql://",
                    "ldap://",
                    "ldaps://",
                ];
                if !known.iter().any(|k| url.starts_with(k)) {
                    self.err(
                        a.url.span(),
                        format!(
                            "accounts.url `{url}`: want sqlite:PATH, postgres://…, ldap://… or ldaps://…"
                        ),
                    );
                }
                url.to_string()
            }
        };

        Some(Topology {
            accounts,
            dns: dns?,
            management,
            domains,
            sites,
            routers,
            hosts: hosts.into_iter().map(|(_, h)| h).collect(),
            services: services.into_iter().map(|(_, s)| s).collect(),
            bgp: bgp.unwrap_or(Bgp {
                lb_asn: 0,
                mode: BgpMode::Speaker,
                kernel_table: 100,
                handoff_device: None,
            }),
        })
    }

    fn dns(&mut self, raw: &Spanned<RawDns>) -> Option<Dns> {
        let d = raw.get_ref();
        let hostmaster = {
            let h = d.hostmaster.get_ref().replacen('@', ".", 1);
            match Fqdn::parse(&h) {
                Ok(f) => Some(f),
                Err(e) => {
                    self.err(d.hostmaster.span(), format!("dns.hostmaster: {e}"));
                    None
                }
            }
        };
        let nameservers: Vec<NameServer> = d
            .nameserver
            .iter()
            .filter_map(|n| {
                let n = n.get_ref();
                let name = self.fqdn(&n.name, "dns.nameserver")?;
                Some(NameServer {
                    ipv4: self.v4(&n.ipv4, &format!("name server {name}")),
                    ipv6: self.v6(&n.ipv6, &format!("name server {name}")),
                    name,
                })
            })
            .collect();
        if d.nameserver.len() < 2 {
            self.err(
                raw.span(),
                "dns: at least two [[dns.nameserver]] are needed (RFC 1034 asks for two)",
            );
        }
        let mut reverse_zones = Vec::new();
        for z in &d.reverse_zones {
            let Some(net) = self.net(z, "dns.reverse_zones") else {
                continue;
            };
            let aligned = match net {
                IpNet::V4(n) => n.prefix_len() % 8 == 0 && n.prefix_len() > 0,
                IpNet::V6(n) => n.prefix_len() % 4 == 0 && n.prefix_len() > 0,
            };
            if !aligned {
                self.err(
                    z.span(),
                    format!(
                        "dns.reverse_zones: {net} does not end on a label boundary (IPv4 /8, /16, /24; IPv6 a multiple of /4)"
                    ),
                );
                continue;
            }
            reverse_zones.push(net);
        }
        if *d.ttl.get_ref() == 0 {
            self.err(d.ttl.span(), "dns.ttl must be at least 1");
        }
        let resolver = d.resolver.as_ref().and_then(|r| {
            let s = r.get_ref().trim();
            let parsed = s
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            if parsed.is_none() {
                self.err(
                    r.span(),
                    format!("dns.resolver `{s}` is not an IP address or IP:PORT"),
                );
            }
            parsed
        });
        Some(Dns {
            serial: *d.serial.get_ref(),
            ttl: *d.ttl.get_ref(),
            hostmaster: hostmaster?,
            nameservers,
            reverse_zones,
            resolver,
        })
    }

    fn domain(&mut self, raw: &Spanned<RawDomain>) -> Option<Domain> {
        let d = raw.get_ref();
        let name = self.fqdn(&d.name, "domain name")?;
        let m = d.dmarc.get_ref();
        let policies = ["none", "quarantine", "reject"];
        let p = self.one_of(&m.p, &policies, "dmarc.p");
        let sp =
            m.sp.as_ref()
                .map_or(p.clone(), |s| self.one_of(s, &policies, "dmarc.sp"));
        let np =
            m.np.as_ref()
                .map_or(sp.clone(), |s| self.one_of(s, &policies, "dmarc.np"));
        let adkim = self.one_of(&m.adkim, &["r", "s"], "dmarc.adkim");
        let aspf = self.one_of(&m.aspf, &["r", "s"], "dmarc.aspf");
        let rf = self.one_of(&m.rf, &["afrf"], "dmarc.rf");
        let mut uris = |list: &[Spanned<String>], what: &str| -> Vec<String> {
            list.iter()
                .filter_map(|u| {
                    let s = u.get_ref().trim();
                    let ok = s.strip_prefix("mailto:").is_some_and(|a| {
                        a.split('!').next().is_some_and(|a| {
                            a.rsplit_once('@')
                                .is_some_and(|(l, d)| !l.is_empty() && Fqdn::parse(d).is_ok())
                        })
                    }) && !s.contains([',', ';', ' ']);
                    if ok {
                        Some(s.to_string())
                    } else {
                        self.err(
                            u.span(),
                            format!(
                                "{what}: `{s}` is not a mailto: URI like mailto:dmarc@example.com"
                            ),
                        );
                        None
                    }
                })
                .collect()
        };
        let rua = uris(&m.rua, "dmarc.rua");
        let ruf = uris(&m.ruf, "dmarc.ruf");
        let mut dkim = Vec::new();
        for k in &d.dkim {
            if let Some(key) = self.dkim(k.get_ref()) {
                if dkim.iter().any(|o: &DkimKey| o.selector == key.selector) {
                    self.err(
                        k.span(),
                        format!("domain {name}: DKIM selector `{}` twice", key.selector),
                    );
                }
                dkim.push(key);
            }
        }
        Some(Domain {
            name,
            mx_priority: d.mx_priority,
            adsp: d.adsp,
            dmarc: Dmarc {
                p,
                sp,
                np,
                adkim,
                aspf,
                rf,
                rua,
                ruf,
            },
            dkim,
        })
    }

    fn dkim(&mut self, k: &RawDkim) -> Option<DkimKey> {
        let selector = k.selector.get_ref().to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !selector.split('.').all(label_ok) {
            self.err(
                k.selector.span(),
                format!("DKIM selector `{selector}` is not a DNS label"),
            );
            return None;
        }
        let path = self.base.join(k.public_key.get_ref());
        // Bounded: a public key is a few hundred bytes, and the path could name a device.
        let read = std::fs::File::open(&path).and_then(|f| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(f, 64 * 1024), &mut text)
                .map(|_| text)
        });
        let pem = match read {
            Ok(p) => p,
            Err(e) => {
                self.err(
                    k.public_key.span(),
                    format!("cannot read DKIM public key {}: {e}", path.display()),
                );
                return None;
            }
        };
        let (algorithm, public_key) = match parse_public_key(&pem) {
            Ok(v) => v,
            Err(e) => {
                self.err(
                    k.public_key.span(),
                    format!("DKIM public key {}: {e}", path.display()),
                );
                return None;
            }
        };
        let private_key_path = PathBuf::from(k.private_key.get_ref());
        if !private_key_path.is_absolute() {
            self.err(
                k.private_key.span(),
                "private_key is where the MTA hosts keep the key: it must be an absolute path",
            );
        }
        Some(DkimKey {
            selector,
            algorithm,
            public_key,
            private_key_path,
        })
    }

    fn lb_bgp(
        &mut self,
        b: &Spanned<RawLbBgp>,
        host: &Fqdn,
        routers: &HashMap<String, usize>,
        raw_routers: &[Spanned<RawRouter>],
    ) -> Option<LbBgp> {
        let b = b.get_ref();
        let router_id = match b.router_id.get_ref().parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    b.router_id.span(),
                    format!("host {host}: bgp.router_id must be an IPv4 address"),
                );
                None
            }
        };
        let mut neighbors = Vec::new();
        for n in &b.neighbors {
            match routers.get(&n.get_ref().to_ascii_lowercase()) {
                Some(&i) => neighbors.push(i),
                None => self.err(
                    n.span(),
                    format!(
                        "host {host}: bgp neighbor `{}` is no [[router]] (routers: {})",
                        n.get_ref(),
                        raw_routers
                            .iter()
                            .map(|r| r.get_ref().name.get_ref().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            }
        }
        if b.neighbors.is_empty() {
            self.err(
                b.router_id.span(),
                format!("host {host}: an LB needs at least one bgp neighbor"),
            );
        }
        Some(LbBgp {
            router_id: router_id?,
            neighbors,
        })
    }
}

fn site_names(sites: &[Spanned<RawSite>]) -> String {
    sites
        .iter()
        .map(|s| s.get_ref().name.get_ref().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) and returns the DKIM key type and `p=` value.
pub fn parse_public_key(pem: &str) -> Result<(DkimAlgorithm, String), String> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PUBLIC KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(
            "no `-----BEGIN PUBLIC KEY-----` block (write one with `openssl pkey -in KEY -pubout`)"
                .into(),
        );
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| format!("bad base64 in the PEM block: {e}"))?;
    // AlgorithmIdentifier OIDs, DER-encoded.
    const RSA_OID: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    let head = &der[..der.len().min(24)];
    if head.windows(RSA_OID.len()).any(|w| w == RSA_OID) {
        if der.len() < 270 {
            return Err("RSA key shorter than 2048 bits: receivers ignore such keys".into());
        }
        Ok((
            DkimAlgorithm::Rsa,
            base64::engine::general_purpose::STANDARD.encode(&der),
        ))
    } else if head.windows(ED25519_OID.len()).any(|w| w == ED25519_OID) && der.len() == 44 {
        Ok((
            DkimAlgorithm::Ed25519,
            base64::engine::general_purpose::STANDARD.encode(&der[12..]),
        ))
    } else {
        Err("not an RSA or Ed25519 public key".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
    }

    fn load(text: &str) -> Result<Topology, String> {
        load_str(text, "t.toml", &example_dir()).map_err(|e| e.to_string())
    }

    const SMALL: &str = r#"
[dns]
serial = 1
hostmaster = "hostmaster@example.net"
nameserver = [{ name = "ns1.example.net", ipv4 = "198.51.100.53" }, { name = "ns2.example.org" }]
reverse_zones = ["198.51.100.0/24"]

[[domain]]
name = "example.net"
dmarc = { p = "quarantine", rua = ["mailto:reports@example.net"] }

[[site]]
name = "one"

[[host]]
name = "mx1.example.net"
site = "one"
roles = ["mx"]
ipv4 = "198.51.100.25"

[[host]]
name = "mta1.example.net"
site = "one"
roles = ["mta"]
ipv4 = "198.51.100.26"
"#;

    #[test]
    fn resolver_is_an_address_with_port_53_by_default() {
        assert_eq!(load(SMALL).unwrap().dns.resolver, None);
        let with = |r: &str| {
            load(&SMALL.replace(
                "reverse_zones = [",
                &format!("resolver = \"{r}\"\nreverse_zones = ["),
            ))
        };
        assert_eq!(
            with("198.51.100.53").unwrap().dns.resolver,
            Some("198.51.100.53:53".parse().unwrap())
        );
        assert_eq!(
            with("[2001:db8::53]:5353").unwrap().dns.resolver,
            Some("[2001:db8::53]:5353".parse().unwrap())
        );
        let e = with("ns1.example.net").unwrap_err();
        assert!(e.contains("dns.resolver `ns1.example.net`"), "{e}");
    }

    #[test]
    fn the_example_is_the_seeds_deployment() {
        let t = load_file(&example_dir().join("example.com.toml")).unwrap();
        assert_eq!(t.hosts.len(), 20);
        assert_eq!(t.sites.len(), 2);
        let names = |r: Role| -> Vec<String> {
            t.hosts_with(r)
                .map(|h| h.name.short().to_string())
                .collect()
        };
        assert_eq!(names(Role::Mx), ["mx-a1", "mx-a2", "mx-b1", "mx-b2"]);
        assert_eq!(names(Role::Mta), ["mta-a1", "mta-a2", "mta-b1", "mta-b2"]);
        let addr = |n: &str| {
            t.hosts
                .iter()
                .find(|h| h.name.short() == n)
                .and_then(|h| h.ipv4)
                .unwrap()
                .to_string()
        };
        // The seed's addresses.
        for (h, a) in [
            ("mta-a1", "192.0.2.28"),
            ("mta-a2", "192.0.2.29"),
            ("mta-b1", "192.0.2.44"),
            ("mta-b2", "192.0.2.45"),
            ("mx-a1", "192.0.2.24"),
            ("mx-a2", "192.0.2.25"),
            ("mx-b1", "192.0.2.40"),
            ("mx-b2", "192.0.2.41"),
        ] {
            assert_eq!(addr(h), a, "{h}");
        }
        let svc: Vec<(String, String)> = t
            .services
            .iter()
            .map(|s| (s.name.to_string(), s.ipv4.unwrap().to_string()))
            .collect();
        assert_eq!(
            svc,
            [
                ("imap.example.com".to_string(), "192.0.2.1".to_string()),
                ("smtp.example.com".to_string(), "192.0.2.2".to_string())
            ]
        );
        assert_eq!(t.primary().dkim[0].selector, "202401");
        assert_eq!(t.primary().dkim[0].algorithm, DkimAlgorithm::Rsa);
        assert!(t.hosts.iter().all(|h| h.ipv6.is_some()));
    }

    #[test]
    fn a_small_topology_loads_with_defaults() {
        let t = load(SMALL).unwrap();
        assert_eq!(t.dns.ttl, 3600);
        assert_eq!(t.primary().mx_priority, 10);
        assert_eq!(
            t.primary().dmarc.record(),
            "v=DMARC1;p=quarantine;sp=quarantine;np=quarantine;adkim=r;aspf=r;rf=afrf;rua=mailto:reports@example.net"
        );
        assert_eq!(t.accounts, DEFAULT_ACCOUNTS);
        assert_eq!(t.hosts[0].roles, [Role::Mx]);
        let both = SMALL.replace("roles = [\"mx\"]", "roles = [\"mta\", \"mx\"]");
        assert!(
            load(&both)
                .unwrap_err()
                .contains("the mx and mta roles both listen on port 25")
        );
    }

    #[test]
    fn every_error_at_once_with_its_line() {
        let text = r#"
[dns]
serial = 1
hostmaster = "hostmaster@example.net"
nameserver = [{ name = "ns1.example.net" }, { name = "ns2.example.net", ipv4 = "203.0.113.5" }]
reverse_zones = ["198.51.100.0/24", "2001:db8::/30"]

[[domain]]
name = "example.net"
dmarc = { p = "rejected", rua = ["dmarc@example.net"] }

[[site]]
name = "one"

[[router]]
name = "rt1"
site = "two"
asn = 65000
ipv4 = "198.51.100.1"

[[host]]
name = "mta1.example.net"
site = "one"
roles = ["mta", "relay"]
ipv4 = "203.0.113.5"

[[host]]
name = "lb1.example.net"
site = "one"
roles = ["lb"]
ipv4 = "198.51.100.1"
bgp = { router_id = "198.51.100.7", neighbors = ["rt9"] }

[[host]]
name = "mx1.example.org"
site = "one"
roles = ["mx"]
ipv6 = "2001:db8::25"
"#;
        let e = load(text).unwrap_err();
        for want in [
            "t.toml:5:",  // ns1 in zone without address
            "t.toml:6:",  // /30 not nibble-aligned
            "t.toml:10:", // dmarc p and rua
            "`rejected` is not one of none, quarantine, reject",
            "`dmarc@example.net` is not a mailto: URI",
            "t.toml:17:", // router site
            "unknown site `two`",
            "unknown role `relay`",
            "MTA mta1.example.net address 203.0.113.5 is in no `dns.reverse_zones` prefix",
            "address 198.51.100.1 of router rt1 is also host lb1.example.net's",
            "bgp neighbor `rt9` is no [[router]]",
            "host mx1.example.org is not under any [[domain]]",
            "address 203.0.113.5 of name server ns2.example.net is also host mta1.example.net's",
        ] {
            assert!(e.contains(want), "`{want}` missing from:\n{e}");
        }
    }

    #[test]
    fn handoff_device_must_be_an_interface_name() {
        let good = format!("{SMALL}\n[bgp]\nlb_asn = 65010\nhandoff_device = \"bond0.12\"\n");
        assert_eq!(
            load(&good).unwrap().bgp.handoff_device.as_deref(),
            Some("bond0.12")
        );
        let bad = format!("{SMALL}\n[bgp]\nlb_asn = 65010\nhandoff_device = \"eth0; flush\"\n");
        assert!(
            load(&bad)
                .unwrap_err()
                .contains("bgp.handoff_device: not an interface name")
        );
    }

    #[test]
    fn unknown_keys_everywhere_are_all_reported() {
        let text = SMALL
            .replace("serial = 1", "serial = 1\nserail = 2")
            .replace("site = \"one\"", "site = \"one\"\ncolour = \"blue\"")
            .replace("p = \"quarantine\"", "p = \"quarantine\", pct = 50")
            + "\n[bgp]\nlb_asn = 1\nmodus = \"x\"\n";
        let e = load(&text).unwrap_err();
        for want in [
            "t.toml:4:1: unknown key \"serail\" in [dns]",
            "unknown key \"colour\" in [[host]]",
            "unknown key \"pct\" in [domain.dmarc]",
            "unknown key \"modus\" in [bgp] (did you mean `mode`?)",
        ] {
            assert!(e.contains(want), "`{want}` missing from:\n{e}");
        }
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        for text in [
            "",
            "[dns]",
            "dns = 5",
            "[[host]]\nname = \"\\u0000\"",
            "[dns]\nserial = -1",
            "[dns]\nserial = 99999999999",
            &format!("[[domain]]\nname = \"{}.com\"", "a".repeat(300)),
            &SMALL.replace("198.51.100.25", "::ffff:198.51.100.25"),
            &SMALL.replace("mx1.example.net", "mx1..example.net"),
            &SMALL.replace("mx1.example.net", "-mx.example.net"),
            &SMALL.replace("198.51.100.0/24", "198.51.100.1/24"),
            &SMALL.replace("198.51.100.0/24", "0.0.0.0/0"),
        ] {
            assert!(load(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn names() {
        let f = Fqdn::parse("MTA-A1.Example.COM.").unwrap();
        assert_eq!(f.as_str(), "mta-a1.example.com");
        let zone = Fqdn::parse("example.com").unwrap();
        assert!(f.is_in(&zone));
        assert!(!Fqdn::parse("badexample.com").unwrap().is_in(&zone));
        assert_eq!(f.relative_to(&zone), "mta-a1");
        assert_eq!(zone.relative_to(&zone), "@");
        assert!(Fqdn::parse("localhost").is_err());
        assert!(Fqdn::parse("a_b.example.com").is_err());
    }

    #[test]
    fn public_keys() {
        let rsa =
            std::fs::read_to_string(example_dir().join("keys/202401._domainkey.example.com.pub"))
                .unwrap();
        let (alg, p) = parse_public_key(&rsa).unwrap();
        assert_eq!(alg, DkimAlgorithm::Rsa);
        assert!(p.starts_with("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"));
        // Ed25519 SPKI (RFC 8410 example key): p= is the raw 32 bytes.
        let ed = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let (alg, p) = parse_public_key(ed).unwrap();
        assert_eq!(alg, DkimAlgorithm::Ed25519);
        assert_eq!(p, "Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=");
        assert!(
            parse_public_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
                .is_err()
        );
        assert!(
            parse_public_key("-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----").is_err()
        );
    }
}
