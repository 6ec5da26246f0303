//! The MSA configuration: the validated model and its `[msa]` TOML schema (the same toolkit and
//! all-errors-at-once reporting as `[mx]`).
//!
//! ```toml
//! [msa]
//! hostname = "smtp.example.com"        # required: greeting, Received, Message-ID
//! listen = ["0.0.0.0:587"]             # STARTTLS listeners (at least one of listen/listen_tls)
//! listen_tls = ["0.0.0.0:465"]         # implicit TLS listeners
//! accounts = "sqlite:/var/lib/ringmail/accounts.db"  # required: logins and sender ownership
//! spool = "/var/spool/ringmail/msa"    # required: the durable queue
//! relay = "10.0.0.30:25"               # required: the MTA next hop, or several, tried in turn
//!                                      #   from a rotating start: ["10.0.0.30:25", "10.0.0.31:25"]
//! local_relay = "10.0.0.20:24"         # the MDA (SMTP; one or a list); used when
//!                                      #   local_route = "mda"
//! local_route = "mta"                  # mta | mda: where mail for our own domains goes
//! workers = 2                          # default: one per CPU
//! max_message_size = 67108864          # bytes, advertised as SIZE        (default 64 MiB)
//! max_recipients = 100                 # per message (452 beyond)            (default 100)
//! max_messages_per_hour = 500          # per account (450 4.7.1 beyond)      (default 500)
//! max_auth_failures = 10               # per client address in 10 minutes, then 421 (default 10)
//! auth_mechanisms = ["PLAIN", "LOGIN"] # SASL mechanisms offered after TLS, in this order:
//!                                      #   PLAIN, LOGIN, SCRAM-SHA-256 (default PLAIN, LOGIN;
//!                                      #   SCRAM-SHA-256 needs an SQL store, not LDAP)
//! max_connections = 10000              # concurrent sessions, all clients          (default 10000)
//! max_connections_per_ip = 50          # per real client address (after PROXY)     (default 50)
//! trusted_proxies = ["10.0.0.1"]       # PROXY v1/v2 accepted (and required) from these only
//! command_timeout = "5m"
//! data_timeout = "10m"
//! admin = "127.0.0.1:9111"             # /metrics and the queue API
//! tls = { cert = "/etc/ringmail/smtp.crt", key = "/etc/ringmail/smtp.key" }  # absent: self-signed
//! relay_tls = "encrypt"                # to `relay`: none | may | encrypt, or { level, ca, name,
//!                                      #   verify } (see [`crate::hop`]; default none)
//! relay_auth = { user = "msa1@example.com", password_file = "/etc/ringmail/msa-relay.pass" }
//! local_relay_tls = "none"             # the same for `local_relay`
//! local_relay_auth = { user = "…", password_file = "…" }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringmail_proxy_core::config::parse::{
    Ctx, DeTable, check_keys, choice, duration, integer, required, set, socket_addr, string, table,
};
use ringmail_proxy_core::config::{ConfigErrors, load_file_with, load_str_with};

use crate::config::{Cidr, TlsFiles, accounts_url, addr_list, cidr_list, hostname_key, tls_files};
use crate::hop::HopSecurity;
use ringmail_smtp::AuthMechanism;

/// Where mail for our own domains goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRoute {
    Mta,
    Mda,
}

/// What the MSA runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct MsaConfig {
    pub hostname: String,
    pub runtime: crate::runtime::RuntimeMode,
    pub listen: Vec<SocketAddr>,
    pub listen_tls: Vec<SocketAddr>,
    pub accounts: String,
    pub spool: PathBuf,
    /// The MTA(s): at least one.
    pub relay: Vec<SocketAddr>,
    /// The MDA(s) for our own domains; empty: none.
    pub local_relay: Vec<SocketAddr>,
    pub local_route: LocalRoute,
    pub workers: Option<usize>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_messages_per_hour: u32,
    pub max_auth_failures: u32,
    /// SASL mechanisms offered (after TLS), in EHLO order.
    pub auth_mechanisms: Vec<AuthMechanism>,
    /// Concurrent sessions in all, and per client address (Postfix's
    /// `smtpd_client_connection_count_limit`): 421 4.7.0 beyond.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub trusted_proxies: Vec<Cidr>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub admin: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub connections: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_lifetime: Duration,
    /// TLS policy and credentials for `relay` (`relay_tls`, `relay_auth`; default plaintext).
    pub relay_security: HopSecurity,
    /// The same for `local_relay` (`local_relay_tls`, `local_relay_auth`).
    pub local_relay_security: HopSecurity,
}

impl MsaConfig {
    /// Quick mode defaults.
    pub fn quick(
        hostname: String,
        listen: Vec<SocketAddr>,
        listen_tls: Vec<SocketAddr>,
        accounts: String,
        spool: PathBuf,
        relay: Vec<SocketAddr>,
    ) -> MsaConfig {
        MsaConfig {
            hostname,
            runtime: crate::runtime::RuntimeMode::PerCore,
            listen,
            listen_tls,
            accounts,
            spool,
            relay,
            local_relay: Vec::new(),
            local_route: LocalRoute::Mta,
            workers: None,
            max_message_size: crate::DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: 100,
            max_messages_per_hour: 500,
            max_auth_failures: 10,
            auth_mechanisms: DEFAULT_AUTH_MECHANISMS.to_vec(),
            max_connections: 10_000,
            max_connections_per_ip: 50,
            trusted_proxies: Vec::new(),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            admin: None,
            tls: None,
            connections: 4,
            retry_min: Duration::from_secs(300),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            relay_security: HopSecurity::default(),
            local_relay_security: HopSecurity::default(),
        }
    }

    /// Sets `--local-relay`: mail for our domains goes to the MDA(s) there.
    pub fn with_local_relay(mut self, addrs: Vec<SocketAddr>) -> MsaConfig {
        self.local_relay = addrs;
        if !self.local_relay.is_empty() {
            self.local_route = LocalRoute::Mda;
        }
        self
    }
}

/// What the MSA offers unless configured: PLAIN and LOGIN. Not SCRAM-SHA-256: Cyrus SASL
/// clients (Postfix, sendmail, many MUAs' libraries) pick the strongest advertised mechanism
/// and do not fall back, so advertising it while accounts hold argon2id hashes breaks their
/// logins. Turn it on once the accounts that log in have `{SCRAM-SHA-256}` secrets.
pub const DEFAULT_AUTH_MECHANISMS: [AuthMechanism; 2] =
    [AuthMechanism::Plain, AuthMechanism::Login];

/// Parses a mechanism list (`auth_mechanisms`, `--auth-mechanisms`): known names, no
/// duplicates, not empty.
pub fn parse_mechanisms<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<AuthMechanism>, String> {
    let mut out = Vec::new();
    for n in names {
        let m = AuthMechanism::from_name(n.trim()).ok_or_else(|| {
            let known: Vec<&str> = AuthMechanism::ALL.iter().map(|m| m.name()).collect();
            format!(
                "unknown SASL mechanism {:?} (known: {})",
                n,
                known.join(", ")
            )
        })?;
        if out.contains(&m) {
            return Err(format!("SASL mechanism {} listed twice", m.name()));
        }
        out.push(m);
    }
    if out.is_empty() {
        return Err("no SASL mechanism".into());
    }
    Ok(out)
}

/// Why the account store cannot serve `mechanisms`, if it cannot: SCRAM needs the stored
/// secret, and an LDAP store authenticates by bind.
pub fn mechanisms_store_conflict(mechanisms: &[AuthMechanism], accounts: &str) -> Option<String> {
    let ldap = accounts.starts_with("ldap://") || accounts.starts_with("ldaps://");
    (ldap && mechanisms.contains(&AuthMechanism::ScramSha256)).then(|| {
        "SCRAM-SHA-256 needs the stored secret, and an LDAP account store authenticates by bind: \
         offer PLAIN/LOGIN only"
            .to_string()
    })
}

pub fn load_file(path: &Path) -> Result<MsaConfig, ConfigErrors> {
    load_file_with(path, schema)
}

pub fn load_str(text: &str, file: &str) -> Result<MsaConfig, ConfigErrors> {
    load_str_with(text, file, schema)
}

const MSA: &[&str] = &[
    "hostname",
    "listen",
    "listen_tls",
    "accounts",
    "spool",
    "relay",
    "local_relay",
    "local_route",
    "workers",
    "max_message_size",
    "max_recipients",
    "max_messages_per_hour",
    "max_auth_failures",
    "auth_mechanisms",
    "max_connections",
    "max_connections_per_ip",
    "trusted_proxies",
    "command_timeout",
    "data_timeout",
    "admin",
    "tls",
    "retry_min",
    "retry_max",
    "max_lifetime",
    "relay_tls",
    "relay_auth",
    "local_relay_tls",
    "local_relay_auth",
];

fn schema(ctx: &mut Ctx<'_>, root: &DeTable<'_>) -> Option<MsaConfig> {
    check_keys(ctx, root, &["msa"], "the top level");
    let Some(v) = root.get("msa") else {
        ctx.error(0..0, "no [msa] section");
        return None;
    };
    let t = table(ctx, v, "msa")?;
    check_keys(ctx, t, MSA, "[msa]");
    let mut ok = true;
    let hostname = hostname_key(ctx, v, t, "msa");
    let listen = match t.get("listen") {
        Some(x) => addr_list(ctx, x, "msa.listen"),
        None => Some(Vec::new()),
    };
    let listen_tls = match t.get("listen_tls") {
        Some(x) => addr_list(ctx, x, "msa.listen_tls"),
        None => Some(Vec::new()),
    };
    if let (Some(a), Some(b)) = (&listen, &listen_tls)
        && a.is_empty()
        && b.is_empty()
    {
        ctx.error(v.span(), "[msa] needs `listen` or `listen_tls`");
        ok = false;
    }
    let accounts =
        required(ctx, v, t, "accounts", "msa").and_then(|x| accounts_url(ctx, x, "msa.accounts"));
    let spool = required(ctx, v, t, "spool", "msa")
        .and_then(|s| string(ctx, s, "msa.spool"))
        .map(PathBuf::from);
    let relay = required(ctx, v, t, "relay", "msa")
        .and_then(|x| crate::hop::parse_hops(ctx, x, "msa.relay"));
    let required_ok = hostname.is_some()
        && listen.is_some()
        && listen_tls.is_some()
        && accounts.is_some()
        && spool.is_some()
        && relay.is_some();
    ok &= required_ok;
    let mut c = MsaConfig::quick(
        hostname.unwrap_or_default(),
        listen.unwrap_or_default(),
        listen_tls.unwrap_or_default(),
        accounts.unwrap_or_default(),
        spool.unwrap_or_default(),
        relay.unwrap_or_else(|| vec![SocketAddr::from(([127, 0, 0, 1], 25))]),
    );
    if let Some(x) = t.get("local_relay") {
        match crate::hop::parse_hops(ctx, x, "msa.local_relay") {
            Some(a) => c = c.with_local_relay(a),
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.local_route,
        t.get("local_route").map(|x| {
            choice(
                ctx,
                x,
                "msa.local_route",
                &[("mta", LocalRoute::Mta), ("mda", LocalRoute::Mda)],
            )
        }),
    );
    if c.local_route == LocalRoute::Mda && c.local_relay.is_empty() {
        let span = t.get("local_route").map_or(v.span(), |x| x.span());
        ctx.error(span, "`msa.local_route = \"mda\"` needs `msa.local_relay`");
        ok = false;
    }
    if let Some(w) = t.get("workers") {
        match integer(ctx, w, "msa.workers", 1, 4096) {
            Some(n) => c.workers = usize::try_from(n).ok(),
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.max_message_size,
        t.get("max_message_size")
            .map(|x| integer(ctx, x, "msa.max_message_size", 1024, 1 << 40)),
    );
    for (key, field) in [
        ("max_connections", &mut c.max_connections),
        ("max_connections_per_ip", &mut c.max_connections_per_ip),
    ] {
        ok &= set(
            field,
            t.get(key).map(|x| {
                integer(ctx, x, &format!("msa.{key}"), 1, 1_000_000)
                    .and_then(|n| usize::try_from(n).ok())
            }),
        );
    }
    ok &= set(
        &mut c.max_recipients,
        t.get("max_recipients").map(|x| {
            integer(ctx, x, "msa.max_recipients", 1, 100_000).and_then(|n| usize::try_from(n).ok())
        }),
    );
    for (key, field) in [
        ("max_messages_per_hour", &mut c.max_messages_per_hour),
        ("max_auth_failures", &mut c.max_auth_failures),
    ] {
        ok &= set(
            field,
            t.get(key).map(|x| {
                integer(ctx, x, &format!("msa.{key}"), 1, 10_000_000)
                    .and_then(|n| u32::try_from(n).ok())
            }),
        );
    }
    if let Some(x) = t.get("auth_mechanisms") {
        let names = crate::config::list(ctx, x, "msa.auth_mechanisms", |ctx, item| {
            string(ctx, item, "msa.auth_mechanisms").map(|s| (s.to_string(), item.span()))
        });
        match names {
            Some(names) => {
                let parsed = parse_mechanisms(names.iter().map(|(n, _)| n.as_str()));
                match parsed {
                    Ok(m) => {
                        if let Some(e) = mechanisms_store_conflict(&m, &c.accounts) {
                            ctx.error(x.span(), format!("`msa.auth_mechanisms`: {e}"));
                            ok = false;
                        }
                        c.auth_mechanisms = m;
                    }
                    Err(e) => {
                        // Point at the offending element when there is one.
                        let span = names
                            .iter()
                            .find(|(n, _)| AuthMechanism::from_name(n.trim()).is_none())
                            .map_or(x.span(), |(_, s)| s.clone());
                        ctx.error(span, format!("`msa.auth_mechanisms`: {e}"));
                        ok = false;
                    }
                }
            }
            None => ok = false,
        }
    }
    if let Some(x) = t.get("trusted_proxies") {
        match cidr_list(ctx, x, "msa.trusted_proxies") {
            Some(l) => c.trusted_proxies = l,
            None => ok = false,
        }
    }
    for (key, field) in [
        ("command_timeout", &mut c.command_timeout),
        ("data_timeout", &mut c.data_timeout),
        ("retry_min", &mut c.retry_min),
        ("retry_max", &mut c.retry_max),
        ("max_lifetime", &mut c.max_lifetime),
    ] {
        ok &= set(
            field,
            t.get(key)
                .map(|x| duration(ctx, x, &format!("msa.{key}"), false)),
        );
    }
    if let Some(x) = t.get("admin") {
        match socket_addr(ctx, x, "msa.admin") {
            Some(a) => c.admin = Some(a),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("tls") {
        match tls_files(ctx, x, "msa") {
            Some(f) => c.tls = Some(f),
            None => ok = false,
        }
    }
    for (prefix, field) in [
        ("relay", &mut c.relay_security),
        ("local_relay", &mut c.local_relay_security),
    ] {
        let (tls, auth) = (format!("{prefix}_tls"), format!("{prefix}_auth"));
        match crate::hop::parse_hop(ctx, t, "msa", &tls, &auth, HopSecurity::default()) {
            Some(s) => *field = s,
            None => ok = false,
        }
    }
    ok.then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_reports_every_error() {
        let c = load_str(
            r#"[msa]
hostname = "smtp.example.com"
listen = ["127.0.0.1:587"]
listen_tls = ["127.0.0.1:465"]
accounts = "sqlite:/tmp/a.db"
spool = "/tmp/s"
relay = "127.0.0.1:25"
local_relay = "127.0.0.1:24"
max_auth_failures = 3
"#,
            "msa.toml",
        )
        .unwrap();
        assert_eq!(c.local_route, LocalRoute::Mda);
        assert_eq!(c.max_auth_failures, 3);
        assert_eq!(c.max_messages_per_hour, 500);
        let e = load_str(
            "[msa]\nhostname = \"x\"\naccounts = \"mysql:x\"\nspool = \"/s\"\nrelay = \"127.0.0.1:25\"\ncolour = 1\n",
            "msa.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "msa.toml:2:",
            "msa.toml:3:",
            "msa.toml:6:",
            "colour",
            "listen",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }

    const BASE: &str = "[msa]\nhostname = \"smtp.example.com\"\nlisten = [\"127.0.0.1:587\"]\nspool = \"/s\"\nrelay = \"127.0.0.1:25\"\n";

    #[test]
    fn auth_mechanisms() {
        let c = load_str(&format!("{BASE}accounts = \"sqlite:/a.db\"\n"), "m.toml").unwrap();
        assert_eq!(
            c.auth_mechanisms,
            [AuthMechanism::Plain, AuthMechanism::Login]
        );
        let c = load_str(
            &format!("{BASE}accounts = \"sqlite:/a.db\"\nauth_mechanisms = [\"scram-sha-256\", \"PLAIN\"]\n"),
            "m.toml",
        )
        .unwrap();
        assert_eq!(
            c.auth_mechanisms,
            [AuthMechanism::ScramSha256, AuthMechanism::Plain]
        );
        for (list, line, want) in [
            (
                "[\"PLAIN\", \"CRAM-MD5\"]",
                7,
                "unknown SASL mechanism \"CRAM-MD5\"",
            ),
            ("[\"PLAIN\", \"plain\"]", 7, "listed twice"),
            ("[]", 7, "is empty"),
            ("\"PLAIN\"", 7, "an array"),
        ] {
            let e = load_str(
                &format!("{BASE}accounts = \"sqlite:/a.db\"\nauth_mechanisms = {list}\n"),
                "m.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("m.toml:{line}:")), "{e}");
            assert!(e.contains(want), "{e}");
        }
        let e = load_str(
            &format!("{BASE}accounts = \"ldap://ldap.example.com/dc=example,dc=com\"\nauth_mechanisms = [\"SCRAM-SHA-256\"]\n"),
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("m.toml:7:") && e.contains("LDAP"), "{e}");
        assert!(parse_mechanisms(["PLAIN", " LOGIN "]).is_ok());
    }
}
