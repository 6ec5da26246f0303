//! The MX configuration: the validated model and its TOML schema (same front end, and the same
//! all-errors-at-once reporting, as the load balancer's).
//!
//! ```toml
//! [mx]
//! hostname = "mx1.example.com"       # required: greeting, Received, Authentication-Results
//! listen = ["0.0.0.0:25", "[::]:25"] # required, at least one
//! domains = ["example.com"]          # required: the only domains mail is accepted for
//! spool = "/var/spool/ringmail/mx"   # required: the durable queue
//! accounts = "sqlite:/var/lib/ringmail/accounts.db"  # or postgres://…, ldap://…: unknown users
//!                                    #   get 550 5.1.1 at RCPT; absent: every local part accepted
//! workers = 2                        # default: one per CPU
//! runtime = "per-core"               # per-core (a current-thread runtime per core, SO_REUSEPORT)
//!                                    #   | per-core-pinned (the same, each pinned to its CPU)
//!                                    #   | multi-thread (one tokio work-stealing runtime)
//! max_message_size = 67108864        # bytes, advertised as SIZE        (default 64 MiB)
//! max_recipients = 1000              #                                  (default 1000)
//! max_connections = 10000            # concurrent sessions, all clients (default 10000)
//! max_connections_per_ip = 50        # like Postfix's connection count limit (default 50)
//! connection_rate = { max = 60, period = "1m" }   # per client address; absent: unlimited
//! message_rate = { max = 120, period = "1m" }     # MAIL FROM commands per client address (like
//!                                                 #   Postfix's smtpd_client_message_rate_limit)
//! trusted_proxies = ["10.0.0.1"]     # PROXY headers accepted from these addresses only, and
//!                                    #   required from them; from anyone else a header is refused
//! command_timeout = "5m"             # idle between commands              (default 5m)
//! data_timeout = "10m"               # whole DATA/BDAT transfer           (default 10m)
//! admin = "127.0.0.1:9110"           # /metrics; absent: none
//! tls = { cert = "/etc/ringmail/mx.crt", key = "/etc/ringmail/mx.key" }  # absent: self-signed
//!
//! [mx.checks]
//! enabled = true                     # sender checks at all                 (default true)
//! dns = "127.0.0.1:53"               # resolver for iprev/SPF/DKIM/DMARC/DNSBL; absent: system
//! iprev = "record"                   # record | reject (450 4.7.25 when not forward-confirmed)
//! spf_fail = "reject"                # reject (550 5.7.23) | record
//! dmarc_reject = true                # a DMARC fail under p=reject gets 550 5.7.1
//! dnsbl = ["zen.example.org"]        # listed clients get 554 5.7.1 at connect
//!
//! [mx.relay]
//! next_hop = "10.0.0.20:24"          # required: the MDA, or several, tried in turn from a
//!                                    #   rotating start: ["10.0.0.20:24", "10.0.0.21:24"]
//! protocol = "lmtp"                  # lmtp | smtp                        (default lmtp)
//! bounce_next_hop = "10.0.0.30:25"   # where bounces go (the MTA; one or a list); absent:
//!                                    #   the next hop(s)
//! connections = 8                    # concurrent deliveries              (default 8)
//! retry_min = "5m"                   # first retry                        (default 5m)
//! retry_max = "1h"                   # backoff cap                        (default 1h)
//! max_lifetime = "5d"                # then bounce                        (default 5d)
//! tls = "encrypt"                    # none | may | encrypt, or { level, ca, name, verify }
//!                                    #   (see [`crate::hop`]; default none)
//! auth = { user = "mx1@example.com", password_file = "/etc/ringmail/mx-relay.pass" }
//! bounce_tls = "encrypt"             # the same for the bounce route; absent: the next hop's
//! bounce_auth = { user = "mx1@example.com", password_file = "/etc/ringmail/mx-relay.pass" }
//!                                    #   settings without `bounce_next_hop`, else none
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringmail_proxy_core::config::parse::{
    Ctx, DeTable, DeValue, Value, boolean, check_keys, choice, duration, integer, mismatch,
    required, set, socket_addr, string, table,
};
use ringmail_proxy_core::config::{ConfigErrors, load_file_with, load_str_with};

use crate::hop::HopSecurity;

/// What the MX runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct MxConfig {
    pub hostname: String,
    /// Thread-per-core (default) or one multi-thread runtime (`runtime = "multi-thread"`).
    pub runtime: crate::runtime::RuntimeMode,
    pub listen: Vec<SocketAddr>,
    /// Lowercase, without a trailing dot.
    pub domains: Vec<String>,
    pub spool: PathBuf,
    /// Account store (`sqlite:PATH`, `postgres://…`, `ldap://…`): unknown users are refused at
    /// RCPT. `None`: every local part of our domains is accepted.
    pub accounts: Option<String>,
    pub workers: Option<usize>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub connection_rate: Option<Rate>,
    pub message_rate: Option<Rate>,
    pub trusted_proxies: Vec<Cidr>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub admin: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub checks: Checks,
    pub relay: Relay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub max: u32,
    pub period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforce {
    Record,
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checks {
    /// iprev/SPF/DKIM/DMARC/ARC and DNSBL at all (quick mode: only with `--dns`).
    pub enabled: bool,
    pub dns: Option<SocketAddr>,
    pub iprev: Enforce,
    pub spf_fail: Enforce,
    pub dmarc_reject: bool,
    pub dnsbl: Vec<String>,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            enabled: true,
            dns: None,
            iprev: Enforce::Record,
            spf_fail: Enforce::Reject,
            dmarc_reject: true,
            dnsbl: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayProtocol {
    Lmtp,
    Smtp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relay {
    /// The MDA(s): at least one, in order; a new connection tries each from a rotating start.
    pub next_hop: Vec<SocketAddr>,
    pub protocol: RelayProtocol,
    /// The MTA(s) for bounces; `None`: the next hops.
    pub bounce_next_hop: Option<Vec<SocketAddr>>,
    pub connections: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_lifetime: Duration,
    /// TLS policy and credentials for the next hop (`tls`, `auth`; default: plaintext).
    pub security: HopSecurity,
    /// The same for the bounce route (`bounce_tls`, `bounce_auth`); `None`: see
    /// [`Relay::bounce_security`].
    pub bounce_security: Option<HopSecurity>,
}

impl Relay {
    pub fn new(next_hop: Vec<SocketAddr>, protocol: RelayProtocol) -> Relay {
        Relay {
            next_hop,
            protocol,
            bounce_next_hop: None,
            connections: 8,
            retry_min: Duration::from_secs(300),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            security: HopSecurity::default(),
            bounce_security: None,
        }
    }

    /// The bounce route's security: as configured; else the next hop's when bounces go there
    /// too (no `bounce_next_hop`); else plaintext (the MTA trusts our address).
    pub fn bounce_security(&self) -> HopSecurity {
        match (&self.bounce_security, &self.bounce_next_hop) {
            (Some(s), _) => s.clone(),
            (None, None) => self.security.clone(),
            (None, Some(_)) => HopSecurity::default(),
        }
    }
}

/// `ROLE.tls = { cert = "…", key = "…" }`: PEM certificate chain and key files.
pub(crate) fn tls_files(ctx: &mut Ctx<'_>, x: &Value<'_>, role: &str) -> Option<TlsFiles> {
    let what = format!("{role}.tls");
    let tt = table(ctx, x, &what)?;
    check_keys(ctx, tt, &["cert", "key"], &what);
    let cert =
        required(ctx, x, tt, "cert", &what).and_then(|c| string(ctx, c, &format!("{what}.cert")));
    let key =
        required(ctx, x, tt, "key", &what).and_then(|k| string(ctx, k, &format!("{what}.key")));
    Some(TlsFiles {
        cert: PathBuf::from(cert?),
        key: PathBuf::from(key?),
    })
}

/// An address block, for `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl MxConfig {
    /// Quick mode (`ringmail mx --listen … --domain … --spool … --relay …`): defaults for the rest.
    pub fn quick(
        hostname: String,
        listen: SocketAddr,
        domains: Vec<String>,
        spool: PathBuf,
        relay: Relay,
    ) -> MxConfig {
        MxConfig {
            hostname,
            runtime: crate::runtime::RuntimeMode::PerCore,
            listen: vec![listen],
            domains: domains
                .into_iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            spool,
            accounts: None,
            workers: None,
            max_message_size: crate::DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: 1000,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            connection_rate: None,
            message_rate: None,
            trusted_proxies: Vec::new(),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            admin: None,
            tls: None,
            checks: Checks {
                enabled: false,
                ..Checks::default()
            },
            relay,
        }
    }

    /// Whether `domain` (any case, trailing dot allowed) is one of ours.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.');
        self.domains.iter().any(|ours| ours.eq_ignore_ascii_case(d))
    }
}

pub fn load_file(path: &Path) -> Result<MxConfig, ConfigErrors> {
    load_file_with(path, schema)
}

pub fn load_str(text: &str, file: &str) -> Result<MxConfig, ConfigErrors> {
    load_str_with(text, file, schema)
}

const TOP: &[&str] = &["mx"];
const MX: &[&str] = &[
    "hostname",
    "listen",
    "domains",
    "spool",
    "accounts",
    "workers",
    "runtime",
    "max_message_size",
    "max_recipients",
    "max_connections",
    "max_connections_per_ip",
    "connection_rate",
    "message_rate",
    "trusted_proxies",
    "command_timeout",
    "data_timeout",
    "admin",
    "tls",
    "checks",
    "relay",
];
const CHECKS: &[&str] = &[
    "enabled",
    "dns",
    "iprev",
    "spf_fail",
    "dmarc_reject",
    "dnsbl",
];
const RELAY: &[&str] = &[
    "next_hop",
    "protocol",
    "bounce_next_hop",
    "connections",
    "retry_min",
    "retry_max",
    "max_lifetime",
    "tls",
    "auth",
    "bounce_tls",
    "bounce_auth",
];
const ENFORCE: &[(&str, Enforce)] = &[("record", Enforce::Record), ("reject", Enforce::Reject)];
const PROTOCOLS: &[(&str, RelayProtocol)] =
    &[("lmtp", RelayProtocol::Lmtp), ("smtp", RelayProtocol::Smtp)];

fn schema(ctx: &mut Ctx<'_>, root: &DeTable<'_>) -> Option<MxConfig> {
    check_keys(ctx, root, TOP, "the top level");
    let Some(v) = root.get("mx") else {
        ctx.error(0..0, "no [mx] section");
        return None;
    };
    let t = table(ctx, v, "mx")?;
    check_keys(ctx, t, MX, "[mx]");
    let mut ok = true;

    let hostname = hostname_key(ctx, v, t, "mx");
    let listen = required(ctx, v, t, "listen", "mx").and_then(|l| {
        list(ctx, l, "mx.listen", |ctx, item| {
            socket_addr(ctx, item, "mx.listen")
        })
    });
    let domains = required(ctx, v, t, "domains", "mx").and_then(|d| {
        list(ctx, d, "mx.domains", |ctx, item| {
            let s = string(ctx, item, "mx.domains")?;
            let s = s.trim_end_matches('.');
            if valid_domain(s) {
                Some(s.to_ascii_lowercase())
            } else {
                ctx.error(
                    item.span(),
                    format!("`mx.domains`: {s:?} is not a domain name"),
                );
                None
            }
        })
    });
    let spool = required(ctx, v, t, "spool", "mx")
        .and_then(|s| string(ctx, s, "mx.spool"))
        .map(PathBuf::from);
    let relay = match t.get("relay") {
        None => {
            ctx.error(
                v.span(),
                "[mx] has no [mx.relay] with a `next_hop` (the MDA accepted mail goes to)",
            );
            None
        }
        Some(r) => table(ctx, r, "mx.relay").and_then(|rt| parse_relay(ctx, r, rt)),
    };
    // The optional keys are checked even when a required one failed, so that every problem is
    // reported in one go; placeholders stand in for what is missing.
    let placeholder: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 25));
    let required_ok = hostname.is_some()
        && listen.is_some()
        && domains.is_some()
        && spool.is_some()
        && relay.is_some();
    let listen = listen.unwrap_or_default();
    let mut c = MxConfig::quick(
        hostname.unwrap_or_default(),
        listen.first().copied().unwrap_or(placeholder),
        domains.unwrap_or_default(),
        spool.unwrap_or_default(),
        relay.unwrap_or_else(|| Relay::new(vec![placeholder], RelayProtocol::Lmtp)),
    );
    c.listen = listen;
    // A configured MX checks senders (with the system resolver unless [mx.checks] says).
    c.checks.enabled = true;
    ok &= required_ok;

    if let Some(x) = t.get("accounts") {
        match string(ctx, x, "mx.accounts") {
            Some(url)
                if url.starts_with("sqlite:")
                    || url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.starts_with("ldap://")
                    || url.starts_with("ldaps://") =>
            {
                c.accounts = Some(url.to_string())
            }
            Some(url) => {
                ctx.error(
                    x.span(),
                    format!(
                        "`mx.accounts`: {url:?} is not sqlite:PATH, postgres://… or ldap(s)://…"
                    ),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(w) = t.get("workers") {
        match integer(ctx, w, "mx.workers", 1, 4096) {
            Some(n) => c.workers = usize::try_from(n).ok(),
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.runtime,
        t.get("runtime").map(|x| {
            choice(
                ctx,
                x,
                "mx.runtime",
                &[
                    ("per-core", crate::runtime::RuntimeMode::PerCore),
                    (
                        "per-core-pinned",
                        crate::runtime::RuntimeMode::PerCorePinned,
                    ),
                    ("multi-thread", crate::runtime::RuntimeMode::MultiThread),
                ],
            )
        }),
    );
    ok &= set(
        &mut c.max_message_size,
        t.get("max_message_size")
            .map(|x| integer(ctx, x, "mx.max_message_size", 1024, 1 << 40)),
    );
    for (key, field, max) in [
        ("max_recipients", &mut c.max_recipients, 100_000u64),
        ("max_connections", &mut c.max_connections, 10_000_000),
        (
            "max_connections_per_ip",
            &mut c.max_connections_per_ip,
            1_000_000,
        ),
    ] {
        ok &= set(
            field,
            t.get(key).map(|x| {
                integer(ctx, x, &format!("mx.{key}"), 1, max).and_then(|n| usize::try_from(n).ok())
            }),
        );
    }
    for (key, field) in [
        ("connection_rate", &mut c.connection_rate),
        ("message_rate", &mut c.message_rate),
    ] {
        if let Some(x) = t.get(key) {
            match table(ctx, x, &format!("mx.{key}")).and_then(|rt| rate(ctx, x, rt, key)) {
                Some(r) => *field = Some(r),
                None => ok = false,
            }
        }
    }
    if let Some(x) = t.get("trusted_proxies") {
        match cidr_list(ctx, x, "mx.trusted_proxies") {
            Some(l) => c.trusted_proxies = l,
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.command_timeout,
        t.get("command_timeout")
            .map(|x| duration(ctx, x, "mx.command_timeout", false)),
    );
    ok &= set(
        &mut c.data_timeout,
        t.get("data_timeout")
            .map(|x| duration(ctx, x, "mx.data_timeout", false)),
    );
    if let Some(x) = t.get("admin") {
        match socket_addr(ctx, x, "mx.admin") {
            Some(a) => c.admin = Some(a),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("tls") {
        match tls_files(ctx, x, "mx") {
            Some(f) => c.tls = Some(f),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("checks") {
        match table(ctx, x, "mx.checks").and_then(|ct| parse_checks(ctx, ct)) {
            Some(ch) => c.checks = ch,
            None => ok = false,
        }
    }
    if let Some(admin) = c.admin
        && c.listen.contains(&admin)
    {
        let span = t.get("admin").map_or(0..0, |x| x.span());
        ctx.error(
            span,
            format!("`mx.admin` {admin} is also an SMTP listen address"),
        );
        ok = false;
    }
    ok.then_some(c)
}

fn parse_checks(ctx: &mut Ctx<'_>, t: &DeTable<'_>) -> Option<Checks> {
    check_keys(ctx, t, CHECKS, "[mx.checks]");
    let mut c = Checks::default();
    let mut ok = true;
    ok &= set(
        &mut c.enabled,
        t.get("enabled")
            .map(|x| boolean(ctx, x, "mx.checks.enabled")),
    );
    if let Some(x) = t.get("dns") {
        let s = string(ctx, x, "mx.checks.dns");
        let parsed = s.and_then(|s| {
            s.parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
        });
        match parsed {
            Some(a) => c.dns = Some(a),
            None => {
                if s.is_some() {
                    ctx.error(x.span(), "`mx.checks.dns` must be IP or IP:PORT");
                }
                ok = false;
            }
        }
    }
    ok &= set(
        &mut c.iprev,
        t.get("iprev")
            .map(|x| choice(ctx, x, "mx.checks.iprev", ENFORCE)),
    );
    ok &= set(
        &mut c.spf_fail,
        t.get("spf_fail")
            .map(|x| choice(ctx, x, "mx.checks.spf_fail", ENFORCE)),
    );
    ok &= set(
        &mut c.dmarc_reject,
        t.get("dmarc_reject")
            .map(|x| boolean(ctx, x, "mx.checks.dmarc_reject")),
    );
    if let Some(x) = t.get("dnsbl") {
        match list(ctx, x, "mx.checks.dnsbl", |ctx, item| {
            let s = string(ctx, item, "mx.checks.dnsbl")?;
            if valid_domain(s) {
                Some(s.to_ascii_lowercase())
            } else {
                ctx.error(
                    item.span(),
                    format!("`mx.checks.dnsbl`: {s:?} is not a DNS zone"),
                );
                None
            }
        }) {
            Some(l) => c.dnsbl = l,
            None => ok = false,
        }
    }
    ok.then_some(c)
}

fn parse_relay(ctx: &mut Ctx<'_>, v: &Value<'_>, t: &DeTable<'_>) -> Option<Relay> {
    check_keys(ctx, t, RELAY, "[mx.relay]");
    let next_hop = required(ctx, v, t, "next_hop", "mx.relay")
        .and_then(|x| crate::hop::parse_hops(ctx, x, "mx.relay.next_hop"));
    // The other keys are checked even without a usable next hop (every error at once).
    let mut ok = next_hop.is_some();
    let mut r = Relay::new(
        next_hop.unwrap_or_else(|| vec![SocketAddr::from(([127, 0, 0, 1], 24))]),
        RelayProtocol::Lmtp,
    );
    ok &= set(
        &mut r.protocol,
        t.get("protocol")
            .map(|x| choice(ctx, x, "mx.relay.protocol", PROTOCOLS)),
    );
    if let Some(x) = t.get("bounce_next_hop") {
        match crate::hop::parse_hops(ctx, x, "mx.relay.bounce_next_hop") {
            Some(a) => r.bounce_next_hop = Some(a),
            None => ok = false,
        }
    }
    ok &= set(
        &mut r.connections,
        t.get("connections").map(|x| {
            integer(ctx, x, "mx.relay.connections", 1, 1024).and_then(|n| usize::try_from(n).ok())
        }),
    );
    for (key, field) in [
        ("retry_min", &mut r.retry_min),
        ("retry_max", &mut r.retry_max),
        ("max_lifetime", &mut r.max_lifetime),
    ] {
        ok &= set(
            field,
            t.get(key)
                .map(|x| duration(ctx, x, &format!("mx.relay.{key}"), false)),
        );
    }
    if r.retry_max < r.retry_min {
        let span = t.get("retry_max").map_or(v.span(), |x| x.span());
        ctx.error(span, "`mx.relay.retry_max` is shorter than `retry_min`");
        ok = false;
    }
    match crate::hop::parse_hop(ctx, t, "mx.relay", "tls", "auth", HopSecurity::default()) {
        Some(s) => r.security = s,
        None => ok = false,
    }
    if t.get("bounce_tls").is_some() || t.get("bounce_auth").is_some() {
        match crate::hop::parse_hop(
            ctx,
            t,
            "mx.relay",
            "bounce_tls",
            "bounce_auth",
            HopSecurity::default(),
        ) {
            Some(s) => r.bounce_security = Some(s),
            None => ok = false,
        }
    }
    ok.then_some(r)
}

fn rate(ctx: &mut Ctx<'_>, v: &Value<'_>, t: &DeTable<'_>, key: &str) -> Option<Rate> {
    let here = format!("mx.{key}");
    check_keys(ctx, t, &["max", "period"], &here);
    let max = required(ctx, v, t, "max", &here)
        .and_then(|x| integer(ctx, x, &format!("{here}.max"), 1, 1_000_000))
        .and_then(|n| u32::try_from(n).ok());
    let period = required(ctx, v, t, "period", &here)
        .and_then(|x| duration(ctx, x, &format!("{here}.period"), false));
    Some(Rate {
        max: max?,
        period: period?,
    })
}

/// A non-empty array, each item converted by `f` (every bad item reported).
/// `ROLE.hostname`: required, a fully qualified host name; lower-cased.
pub(crate) fn hostname_key(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    t: &DeTable<'_>,
    role: &str,
) -> Option<String> {
    let what = format!("{role}.hostname");
    let h = required(ctx, v, t, "hostname", role)?;
    let s = string(ctx, h, &what)?;
    if valid_domain(s) {
        Some(s.to_ascii_lowercase())
    } else {
        ctx.error(
            h.span(),
            format!("`{what}`: {s:?} is not a fully qualified host name"),
        );
        None
    }
}

/// A non-empty list of `HOST:PORT`.
pub(crate) fn addr_list(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<Vec<SocketAddr>> {
    list(ctx, v, what, |ctx, item| socket_addr(ctx, item, what))
}

/// A non-empty list of addresses or CIDR blocks.
pub(crate) fn cidr_list(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<Vec<Cidr>> {
    list(ctx, v, what, |ctx, item| {
        let s = string(ctx, item, what)?;
        match Cidr::parse(s) {
            Ok(c) => Some(c),
            Err(e) => {
                ctx.error(item.span(), format!("`{what}`: {e}"));
                None
            }
        }
    })
}

/// An account store URL: `sqlite:PATH`, `postgres://…` or `ldap(s)://…`.
pub(crate) fn accounts_url(ctx: &mut Ctx<'_>, x: &Value<'_>, what: &str) -> Option<String> {
    let url = string(ctx, x, what)?;
    if [
        "sqlite:",
        "postgres://",
        "postgresql://",
        "ldap://",
        "ldaps://",
    ]
    .iter()
    .any(|p| url.starts_with(p))
    {
        Some(url.to_string())
    } else {
        ctx.error(
            x.span(),
            format!("`{what}`: {url:?} is not sqlite:PATH, postgres://… or ldap(s)://…"),
        );
        None
    }
}

pub(crate) fn list<T>(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    what: &str,
    mut f: impl FnMut(&mut Ctx<'_>, &Value<'_>) -> Option<T>,
) -> Option<Vec<T>> {
    let DeValue::Array(items) = v.get_ref() else {
        mismatch(ctx, v, what, "an array");
        return None;
    };
    if items.is_empty() {
        ctx.error(v.span(), format!("`{what}` is empty"));
        return None;
    }
    let mut ok = true;
    let mut out = Vec::with_capacity(items.len());
    for item in items.iter() {
        match f(ctx, item) {
            Some(x) => out.push(x),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// A DNS name of letters, digits and hyphens, at least two labels.
pub fn valid_domain(s: &str) -> bool {
    let s = s.trim_end_matches('.');
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[mx]
hostname = "mx1.example.com"
listen = ["127.0.0.1:2525", "[::1]:2525"]
domains = ["Example.com.", "example.org"]
spool = "/tmp/spool"
trusted_proxies = ["10.0.0.0/24", "2001:db8::1"]
connection_rate = { max = 10, period = "1m" }
tls = { cert = "c.pem", key = "k.pem" }

[mx.checks]
dns = "127.0.0.1:5353"
iprev = "reject"
dnsbl = ["bl.example.net"]

[mx.relay]
next_hop = "127.0.0.1:2424"
protocol = "smtp"
retry_min = "1s"
"#;

    #[test]
    fn loads_a_full_file() {
        let c = load_str(GOOD, "mx.toml").unwrap();
        assert_eq!(c.hostname, "mx1.example.com");
        assert_eq!(c.domains, ["example.com", "example.org"]);
        assert!(c.is_local_domain("EXAMPLE.COM."));
        assert!(!c.is_local_domain("sub.example.com"));
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.checks.iprev, Enforce::Reject);
        assert_eq!(c.checks.dns, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(c.relay.protocol, RelayProtocol::Smtp);
        assert_eq!(c.relay.retry_min, Duration::from_secs(1));
        assert_eq!(c.max_message_size, crate::DEFAULT_MAX_MESSAGE_SIZE);
        assert!(c.trusted_proxies[0].contains("10.0.0.77".parse().unwrap()));
        assert!(c.trusted_proxies[0].contains("::ffff:10.0.0.77".parse().unwrap()));
        assert!(!c.trusted_proxies[0].contains("10.0.1.1".parse().unwrap()));
        assert!(c.trusted_proxies[1].contains("2001:db8::1".parse().unwrap()));
        assert!(!c.trusted_proxies[1].contains("2001:db8::2".parse().unwrap()));
    }

    #[test]
    fn every_error_at_once() {
        let e = load_str(
            r#"[mx]
hostname = "mx"
listen = []
domains = ["exa mple.com"]
spool = "/s"
trusted_proxies = ["10.0.0.0/33"]
colour = "blue"
[mx.checks]
iprev = "maybe"
[mx.relay]
next_hop = "127.0.0.1:0"
"#,
            "mx.toml",
        )
        .unwrap_err();
        let text = e.to_string();
        for want in [
            "mx.toml:2:",
            "fully qualified",
            "mx.toml:3:",
            "is empty",
            "mx.toml:4:",
            "not a domain",
            "mx.toml:6:",
            "prefix length",
            "mx.toml:7:",
            "colour",
            "mx.toml:9:",
            "maybe",
            "mx.toml:11:",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
