//! The MTA configuration: the validated model and its `[mta]` TOML schema (the same toolkit and
//! all-errors-at-once reporting as `[mx]` and `[msa]`).
//!
//! ```toml
//! [mta]
//! hostname = "mta-a1.example.com"      # required: EHLO name; the name its PTR and SPF records give
//! listen = ["10.0.0.30:25"]            # required: where our MSAs and MXs hand mail over
//! spool = "/var/spool/ringmail/mta"    # required: the durable queue
//! trusted_clients = ["10.0.0.0/24"]    # may relay without AUTH (our MSAs and MXs)
//! accounts = "sqlite:/var/lib/ringmail/accounts.db"  # optional: AUTH (under TLS) may relay too
//! relay = "192.0.2.25:587"             # optional: everything to a smart host, no MX lookups;
//!                                      #   several are tried in turn from a rotating start:
//!                                      #   ["192.0.2.25:587", "192.0.2.26:587"]
//! relay_tls = "encrypt"                # to the smart host: none | may | encrypt, or { level, ca,
//!                                      #   name, verify } (see [`crate::hop`]; default may)
//! relay_auth = { user = "mta@example.com", password_file = "/etc/ringmail/smarthost.pass" }
//! transport = { "example.com" = "10.0.0.10:25" }  # optional: mail for these domains (our own,
//!                                      #   bounces to our users included) goes to these next
//!                                      #   hops, no MX lookup, before `relay`; a domain may
//!                                      #   name several: { "example.com" = ["10.0.0.10:25",
//!                                      #   "10.0.0.11:25"] }; exact domains (not subdomains);
//!                                      #   STARTTLS when offered, no AUTH (Postfix's
//!                                      #   transport_maps with smtp:[ip]:port)
//! resolver = "10.0.0.53:53"            # optional: one DNS server (default: /etc/resolv.conf)
//! remote_port = 25                     # port of the remote MX hosts (labs may change it)
//! dkim = [                             # signing keys; several per domain sign with each
//!   { domain = "example.com", selector = "s2026r", key = "/etc/ringmail/dkim/s2026r.key" },
//!   { domain = "example.com", selector = "s2026e", key = "/etc/ringmail/dkim/s2026e.key" },
//! ]
//! mta_sts = true                       # RFC 8461 policies of recipient domains (default true)
//! mta_sts_ca = "/etc/ringmail/lab-ca.pem"  # an extra CA for policy hosts and MX certificates
//! max_connections = 100                # outbound connections in all          (default 100)
//! max_per_destination = 20             # concurrent connections per domain   (default 20)
//! workers = 2                          # listener threads (default: one per CPU, at most 4)
//! max_message_size = 68157440          # bytes                         (default 65 MiB)
//! max_recipients = 1000                # per message                         (default 1000)
//! retry_min = "5m"                     # first retry after a temporary failure
//! retry_max = "1h"                     # the backoff's ceiling
//! max_lifetime = "5d"                  # then the message bounces
//! delay_warning = "4h"                 # a delay notice to the sender (default: none)
//! command_timeout = "5m"
//! data_timeout = "10m"
//! admin = "127.0.0.1:9112"             # /metrics and the queue API
//! tls = { cert = "/etc/ringmail/mta.crt", key = "/etc/ringmail/mta.key" }  # absent: self-signed
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringmail_proxy_core::config::parse::{
    Ctx, DeTable, DeValue, Value, check_keys, duration, integer, mismatch, required, set,
    socket_addr, string, table,
};
use ringmail_proxy_core::config::{ConfigErrors, load_file_with, load_str_with};

use crate::config::{
    Cidr, TlsFiles, accounts_url, addr_list, cidr_list, hostname_key, tls_files, valid_domain,
};
use crate::dkim::DkimKeySpec;
use crate::hop::{HopSecurity, TlsLevel};

/// What the MTA runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct MtaConfig {
    pub hostname: String,
    pub runtime: crate::runtime::RuntimeMode,
    pub listen: Vec<SocketAddr>,
    pub spool: PathBuf,
    pub trusted_clients: Vec<Cidr>,
    pub accounts: Option<String>,
    /// Smart hosts; empty: MX lookups.
    pub relay: Vec<SocketAddr>,
    /// Next hops per recipient domain (lower case, exact), ahead of `relay` and MX lookups.
    pub transport: BTreeMap<String, Vec<SocketAddr>>,
    pub resolver: Option<SocketAddr>,
    pub remote_port: u16,
    pub dkim: Vec<DkimKeySpec>,
    pub mta_sts: bool,
    pub mta_sts_ca: Option<PathBuf>,
    pub max_connections: usize,
    pub max_per_destination: usize,
    pub workers: Option<usize>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_lifetime: Duration,
    pub delay_warning: Option<Duration>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Connect timeout per remote address.
    pub connect_timeout: Duration,
    pub admin: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    /// TLS policy and credentials for the smart host `relay` (`relay_tls`, `relay_auth`;
    /// default `may`: STARTTLS when offered).
    pub relay_security: HopSecurity,
}

impl MtaConfig {
    /// Quick mode defaults: relaying allowed from loopback only.
    pub fn quick(hostname: String, listen: Vec<SocketAddr>, spool: PathBuf) -> MtaConfig {
        MtaConfig {
            hostname,
            runtime: crate::runtime::RuntimeMode::PerCore,
            listen,
            spool,
            trusted_clients: vec![
                Cidr::parse("127.0.0.0/8").expect("valid"),
                Cidr::parse("::1/128").expect("valid"),
            ],
            accounts: None,
            relay: Vec::new(),
            transport: BTreeMap::new(),
            resolver: None,
            remote_port: 25,
            dkim: Vec::new(),
            mta_sts: true,
            mta_sts_ca: None,
            max_connections: 100,
            max_per_destination: 20,
            workers: None,
            max_message_size: crate::DEFAULT_INTERNAL_MAX_MESSAGE_SIZE,
            max_recipients: 1000,
            retry_min: Duration::from_secs(300),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            delay_warning: None,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(30),
            admin: None,
            tls: None,
            relay_security: HopSecurity::level(TlsLevel::May),
        }
    }
}

pub fn load_file(path: &Path) -> Result<MtaConfig, ConfigErrors> {
    load_file_with(path, schema)
}

pub fn load_str(text: &str, file: &str) -> Result<MtaConfig, ConfigErrors> {
    load_str_with(text, file, schema)
}

const MTA: &[&str] = &[
    "hostname",
    "listen",
    "spool",
    "trusted_clients",
    "accounts",
    "relay",
    "transport",
    "resolver",
    "remote_port",
    "dkim",
    "mta_sts",
    "mta_sts_ca",
    "max_connections",
    "max_per_destination",
    "workers",
    "max_message_size",
    "max_recipients",
    "retry_min",
    "retry_max",
    "max_lifetime",
    "delay_warning",
    "command_timeout",
    "data_timeout",
    "connect_timeout",
    "admin",
    "tls",
    "relay_tls",
    "relay_auth",
];

fn schema(ctx: &mut Ctx<'_>, root: &DeTable<'_>) -> Option<MtaConfig> {
    check_keys(ctx, root, &["mta"], "the top level");
    let Some(v) = root.get("mta") else {
        ctx.error(0..0, "no [mta] section");
        return None;
    };
    let t = table(ctx, v, "mta")?;
    check_keys(ctx, t, MTA, "[mta]");
    let mut ok = true;
    let hostname = hostname_key(ctx, v, t, "mta");
    let listen = required(ctx, v, t, "listen", "mta").and_then(|x| addr_list(ctx, x, "mta.listen"));
    let spool = required(ctx, v, t, "spool", "mta")
        .and_then(|s| string(ctx, s, "mta.spool"))
        .map(PathBuf::from);
    ok &= hostname.is_some() && listen.is_some() && spool.is_some();
    let mut c = MtaConfig::quick(
        hostname.unwrap_or_default(),
        listen.unwrap_or_default(),
        spool.unwrap_or_default(),
    );
    if let Some(x) = t.get("trusted_clients") {
        c.trusted_clients.clear();
        match cidr_list(ctx, x, "mta.trusted_clients") {
            Some(l) => c.trusted_clients = l,
            None => ok = false,
        }
    }
    if let Some(x) = t.get("accounts") {
        match accounts_url(ctx, x, "mta.accounts") {
            Some(url) => c.accounts = Some(url),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("relay") {
        match crate::hop::parse_hops(ctx, x, "mta.relay") {
            Some(a) => c.relay = a,
            None => ok = false,
        }
    }
    if let Some(x) = t.get("transport") {
        match transport(ctx, x) {
            Some(m) => c.transport = m,
            None => ok = false,
        }
    }
    if let Some(x) = t.get("resolver") {
        match socket_addr(ctx, x, "mta.resolver") {
            Some(a) => c.resolver = Some(a),
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.remote_port,
        t.get("remote_port").map(|x| {
            integer(ctx, x, "mta.remote_port", 1, 65535).and_then(|n| u16::try_from(n).ok())
        }),
    );
    if let Some(x) = t.get("dkim") {
        match x.get_ref() {
            DeValue::Array(items) => {
                for item in items.iter() {
                    let Some(tt) = table(ctx, item, "mta.dkim") else {
                        ok = false;
                        continue;
                    };
                    check_keys(ctx, tt, &["domain", "selector", "key"], "mta.dkim");
                    let domain = required(ctx, item, tt, "domain", "mta.dkim")
                        .and_then(|d| string(ctx, d, "mta.dkim.domain"));
                    let selector = required(ctx, item, tt, "selector", "mta.dkim")
                        .and_then(|d| string(ctx, d, "mta.dkim.selector"));
                    let key = required(ctx, item, tt, "key", "mta.dkim")
                        .and_then(|d| string(ctx, d, "mta.dkim.key"));
                    match (domain, selector, key) {
                        (Some(d), Some(s), Some(k)) => {
                            if !valid_domain(d) {
                                ctx.error(
                                    item.span(),
                                    format!("`mta.dkim.domain`: {d:?} is not a domain name"),
                                );
                                ok = false;
                            } else if s.is_empty()
                                || !s.split('.').all(|l| {
                                    !l.is_empty()
                                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                                })
                            {
                                ctx.error(
                                    item.span(),
                                    format!("`mta.dkim.selector`: {s:?} is not a valid selector"),
                                );
                                ok = false;
                            } else {
                                c.dkim.push(DkimKeySpec {
                                    domain: d.to_ascii_lowercase(),
                                    selector: s.to_string(),
                                    key_file: PathBuf::from(k),
                                });
                            }
                        }
                        _ => ok = false,
                    }
                }
            }
            _ => {
                mismatch(ctx, x, "mta.dkim", "an array of tables");
                ok = false;
            }
        }
    }
    if let Some(x) = t.get("mta_sts") {
        match x.get_ref() {
            DeValue::Boolean(b) => c.mta_sts = *b,
            _ => {
                mismatch(ctx, x, "mta.mta_sts", "true or false");
                ok = false;
            }
        }
    }
    if let Some(x) = t.get("mta_sts_ca") {
        match string(ctx, x, "mta.mta_sts_ca") {
            Some(p) => c.mta_sts_ca = Some(PathBuf::from(p)),
            None => ok = false,
        }
    }
    for (key, field, max) in [
        ("max_connections", &mut c.max_connections, 100_000),
        ("max_per_destination", &mut c.max_per_destination, 10_000),
        ("max_recipients", &mut c.max_recipients, 100_000),
    ] {
        ok &= set(
            field,
            t.get(key).map(|x| {
                integer(ctx, x, &format!("mta.{key}"), 1, max).and_then(|n| usize::try_from(n).ok())
            }),
        );
    }
    if let Some(w) = t.get("workers") {
        match integer(ctx, w, "mta.workers", 1, 4096) {
            Some(n) => c.workers = usize::try_from(n).ok(),
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.max_message_size,
        t.get("max_message_size")
            .map(|x| integer(ctx, x, "mta.max_message_size", 1024, 1 << 40)),
    );
    for (key, field) in [
        ("command_timeout", &mut c.command_timeout),
        ("data_timeout", &mut c.data_timeout),
        ("connect_timeout", &mut c.connect_timeout),
        ("retry_min", &mut c.retry_min),
        ("retry_max", &mut c.retry_max),
        ("max_lifetime", &mut c.max_lifetime),
    ] {
        ok &= set(
            field,
            t.get(key)
                .map(|x| duration(ctx, x, &format!("mta.{key}"), false)),
        );
    }
    if let Some(x) = t.get("delay_warning") {
        match duration(ctx, x, "mta.delay_warning", false) {
            Some(d) => c.delay_warning = Some(d),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("admin") {
        match socket_addr(ctx, x, "mta.admin") {
            Some(a) => c.admin = Some(a),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("tls") {
        match tls_files(ctx, x, "mta") {
            Some(f) => c.tls = Some(f),
            None => ok = false,
        }
    }
    match crate::hop::parse_hop(
        ctx,
        t,
        "mta",
        "relay_tls",
        "relay_auth",
        HopSecurity::level(TlsLevel::May),
    ) {
        Some(s) => c.relay_security = s,
        None => ok = false,
    }
    if t.get("relay").is_none() {
        for key in ["relay_tls", "relay_auth"] {
            if let Some(x) = t.get(key) {
                ctx.error(
                    x.span(),
                    format!("`mta.{key}` applies to the smart host: set `mta.relay`"),
                );
                ok = false;
            }
        }
    }
    if c.trusted_clients.is_empty() && c.accounts.is_none() {
        ctx.error(
            v.span(),
            "[mta] accepts from nobody: set `trusted_clients` or `accounts`",
        );
        ok = false;
    }
    ok.then_some(c)
}

/// `transport = { "DOMAIN" = "IP:PORT" or ["IP:PORT", …], … }`: domains compared ignoring
/// case, each once.
fn transport(ctx: &mut Ctx<'_>, v: &Value<'_>) -> Option<BTreeMap<String, Vec<SocketAddr>>> {
    let t = table(ctx, v, "mta.transport")?;
    let mut ok = true;
    let mut out = BTreeMap::new();
    for (k, x) in t.iter() {
        let domain = k
            .get_ref()
            .as_ref()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !valid_domain(&domain) {
            ctx.error(
                k.span(),
                format!("`mta.transport`: {:?} is not a domain name", k.get_ref()),
            );
            ok = false;
            continue;
        }
        let what = format!("mta.transport.{domain}");
        match crate::hop::parse_hops(ctx, x, &what) {
            Some(hops) => {
                if out.insert(domain.clone(), hops).is_some() {
                    ctx.error(
                        k.span(),
                        format!("`mta.transport`: {domain} is listed twice"),
                    );
                    ok = false;
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_reports_every_error() {
        let c = load_str(
            r#"[mta]
hostname = "mta-a1.example.com"
listen = ["127.0.0.1:25"]
spool = "/tmp/s"
trusted_clients = ["10.0.0.0/24"]
resolver = "127.0.0.1:53"
dkim = [{ domain = "example.com", selector = "s1", key = "/k" }]
delay_warning = "4h"
"#,
            "mta.toml",
        )
        .unwrap();
        assert_eq!(c.dkim.len(), 1);
        assert_eq!(c.delay_warning, Some(Duration::from_secs(4 * 3600)));
        assert_eq!(c.max_per_destination, 20);
        assert!(c.trusted_clients[0].contains("10.0.0.9".parse().unwrap()));
        assert!(c.transport.is_empty());
        let e = load_str(
            "[mta]\nhostname = \"x\"\nlisten = []\nspool = \"/s\"\ndkim = [{ domain = \"example.com\", selector = \"a b\", key = \"/k\" }]\nrelay = \"nowhere\"\ncolour = 1\n",
            "mta.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "mta.toml:2:",
            "mta.toml:3:",
            "mta.toml:5:",
            "mta.toml:6:",
            "colour",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }

    #[test]
    fn transports_per_domain() {
        let base =
            "[mta]\nhostname = \"mta.example.com\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/s\"\n";
        let c = load_str(
            &format!(
                "{base}transport = {{ \"Example.COM\" = \"10.0.0.10:25\", \"lists.example.com\" = [\"10.0.0.40:25\", \"10.0.0.41:25\"] }}\n"
            ),
            "mta.toml",
        )
        .unwrap();
        assert_eq!(
            c.transport.get("example.com"),
            Some(&vec!["10.0.0.10:25".parse().unwrap()])
        );
        assert_eq!(c.transport["lists.example.com"].len(), 2);
        for (bad, why) in [
            ("transport = \"10.0.0.10:25\"", "must be a table"),
            (
                "transport = { \"not a domain\" = \"10.0.0.10:25\" }",
                "is not a domain name",
            ),
            (
                "transport = { \"example.com\" = \"mx.example.com\" }",
                "mta.transport.example.com",
            ),
            ("transport = { \"example.com\" = [] }", "is empty"),
            (
                "transport = { \"example.com\" = [\"10.0.0.1:25\", \"10.0.0.1:25\"] }",
                "listed twice",
            ),
            (
                "transport = { \"example.com\" = \"10.0.0.1:25\", \"EXAMPLE.com\" = \"10.0.0.2:25\" }",
                "listed twice",
            ),
        ] {
            let e = load_str(&format!("{base}{bad}\n"), "mta.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("mta.toml:5:") && e.contains(why), "{bad}: {e}");
        }
    }
}
