//! Security of the hop to a fixed next hop (MX -> MDA, MX bounces -> MTA, MSA -> MTA/MDA,
//! MTA -> smart host): a TLS policy and optional AUTH credentials, like Postfix's
//! `smtp_tls_security_level` and `smtp_sasl_password_maps`.
//!
//! ```toml
//! tls = "encrypt"                              # none | may | encrypt
//! tls = { level = "encrypt", ca = "/etc/ringmail/internal-ca.pem", name = "mta.int.example.com" }
//! tls = { level = "encrypt", verify = false }  # encrypted, certificate not checked
//! auth = { user = "relay@example.com", password_file = "/etc/ringmail/relay.pass" }
//! ```
//!
//! * `none`: plaintext (the hop trusts our address).
//! * `may`: STARTTLS when offered, any certificate; a failed handshake is retried in plaintext.
//! * `encrypt`: STARTTLS required; the certificate is verified against `ca` only (an internal
//!   CA, pinned) or, without `ca`, the system roots, for `name` (default: the next hop's IP
//!   address, which the certificate must then carry). `verify = false` keeps the encryption and
//!   skips the check (Postfix's own `encrypt`). A hop without STARTTLS, a refused STARTTLS or a
//!   failed handshake is a temporary failure: the mail stays queued.
//!
//! A route may name several next hops (`next_hop = ["10.0.0.20:24", "10.0.0.21:24"]`, like
//! Postfix's `relayhost = [a]:25, [b]:25`): they share the route's TLS policy and credentials
//! (without `name`, each certificate must carry its own hop's IP address), and a new
//! connection tries them in turn from a rotating start (see [`Hops`]).
//!
//! AUTH PLAIN is only ever sent under TLS: credentials need `encrypt` (a configuration error
//! otherwise). The password is read from `password_file` (its first line) when the
//! configuration is loaded; it never appears in the configuration, in `Debug` output or in logs.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ringmail_proxy_core::config::parse::{
    Ctx, DeValue, Value, boolean, check_keys, choice, mismatch, required, socket_addr, string,
    table,
};
use ringmail_smtp::{ClientConfig, Secret, StartTlsPolicy};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::relay::TlsSetup;

/// The largest password file read.
const MAX_PASSWORD_FILE: u64 = 4096;

/// Why a next hop's security settings are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("AUTH credentials need `tls = \"encrypt\"` (AUTH is only ever sent under TLS)")]
    AuthWithoutEncrypt,
    #[error("`{0}` only applies with `level = \"encrypt\"`")]
    OnlyWithEncrypt(&'static str),
    #[error("`ca` and `verify = false` contradict each other")]
    CaWithoutVerify,
    #[error("{path}: cannot read the password: {message}")]
    PasswordFile { path: String, message: String },
    #[error("{path}: the password file is empty")]
    EmptyPassword { path: String },
    #[error("AUTH user {0:?} is empty or contains a NUL or line break")]
    BadUser(String),
    #[error("{path}: cannot read CA certificates: {message}")]
    Ca { path: String, message: String },
    #[error("no trusted CA certificates (system roots empty and no `ca`)")]
    NoRoots,
    #[error("`name` {0:?} is not a valid TLS server name")]
    BadName(String),
    #[error("TLS client configuration: {0}")]
    Tls(String),
}

/// The TLS policy of a hop (`smtp_tls_security_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsLevel {
    None,
    May,
    Encrypt,
}

/// `tls = ...` of a hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopTls {
    pub level: TlsLevel,
    /// `encrypt`: the only CA(s) trusted (PEM); `None`: the system roots.
    pub ca: Option<PathBuf>,
    /// `encrypt`: the name the certificate must carry; `None`: the next hop's IP address.
    pub name: Option<String>,
    /// `encrypt`: check the certificate (default true).
    pub verify: bool,
}

impl HopTls {
    pub fn level(level: TlsLevel) -> HopTls {
        HopTls {
            level,
            ca: None,
            name: None,
            verify: true,
        }
    }
}

/// `auth = { user, password_file }` of a hop. `Debug` never shows the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopAuth {
    pub user: String,
    pub password_file: PathBuf,
    pub password: Secret,
}

impl HopAuth {
    /// Reads the password: the file's first line, without its line end.
    pub fn load(user: &str, password_file: &Path) -> Result<HopAuth, HopError> {
        if user.is_empty() || user.contains(['\0', '\r', '\n']) {
            return Err(HopError::BadUser(user.to_string()));
        }
        let path = password_file.display().to_string();
        let mut bytes = Vec::new();
        let read = std::fs::File::open(password_file).and_then(|f| {
            use std::io::Read;
            f.take(MAX_PASSWORD_FILE + 1).read_to_end(&mut bytes)
        });
        if let Err(e) = read {
            return Err(HopError::PasswordFile {
                path,
                message: e.to_string(),
            });
        }
        if bytes.len() as u64 > MAX_PASSWORD_FILE {
            bytes.fill(0);
            return Err(HopError::PasswordFile {
                path,
                message: format!("larger than {MAX_PASSWORD_FILE} bytes"),
            });
        }
        let end = bytes
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(bytes.len());
        let password = Secret::new(&bytes[..end]);
        bytes.fill(0);
        if password.expose().is_empty() {
            return Err(HopError::EmptyPassword { path });
        }
        if password.expose().contains(&0) {
            return Err(HopError::PasswordFile {
                path,
                message: "the password contains NUL".into(),
            });
        }
        Ok(HopAuth {
            user: user.to_string(),
            password_file: password_file.to_path_buf(),
            password,
        })
    }
}

/// How to talk to one next hop: TLS policy and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopSecurity {
    pub tls: HopTls,
    pub auth: Option<HopAuth>,
}

impl Default for HopSecurity {
    /// Plaintext, no AUTH: the next hop trusts our address.
    fn default() -> HopSecurity {
        HopSecurity::level(TlsLevel::None)
    }
}

impl HopSecurity {
    pub fn level(level: TlsLevel) -> HopSecurity {
        HopSecurity {
            tls: HopTls::level(level),
            auth: None,
        }
    }

    /// The combination rules: credentials need `encrypt`; `ca`/`name`/`verify` only apply to
    /// `encrypt`; `ca` needs verification.
    pub fn check(&self) -> Result<(), HopError> {
        if self.tls.level != TlsLevel::Encrypt {
            if self.tls.ca.is_some() {
                return Err(HopError::OnlyWithEncrypt("ca"));
            }
            if self.tls.name.is_some() {
                return Err(HopError::OnlyWithEncrypt("name"));
            }
            if !self.tls.verify {
                return Err(HopError::OnlyWithEncrypt("verify"));
            }
            if self.auth.is_some() {
                return Err(HopError::AuthWithoutEncrypt);
            }
        }
        if self.tls.ca.is_some() && !self.tls.verify {
            return Err(HopError::CaWithoutVerify);
        }
        if let Some(name) = &self.tls.name {
            server_name(name)?;
        }
        Ok(())
    }

    /// One line for logs (never the password).
    pub fn describe(&self) -> String {
        let level = match self.tls.level {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt if !self.tls.verify => "encrypt (unverified)",
            TlsLevel::Encrypt => "encrypt",
        };
        match &self.auth {
            Some(a) => format!("tls {level}, auth as {}", a.user),
            None => format!("tls {level}"),
        }
    }
}

fn server_name(name: &str) -> Result<ServerName<'static>, HopError> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(name.trim_end_matches('.').to_string())
            .map_err(|_| HopError::BadName(name.to_string())),
    }
}

/// PEM certificates of a CA file (at least one).
fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, HopError> {
    let shown = path.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| HopError::Ca {
            path: shown.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(HopError::Ca {
            path: shown,
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A verifying TLS client configuration: `ca` only, or the system roots.
fn verifying(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, HopError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in read_ca(path)? {
                roots.add(c).map_err(|e| HopError::Ca {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(HopError::NoRoots);
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| HopError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A next hop ready to connect to: the client configuration and the TLS connector, built once
/// when the role starts.
#[derive(Clone)]
pub(crate) struct Hop {
    pub addr: SocketAddr,
    pub level: TlsLevel,
    /// The session settings (STARTTLS policy, AUTH).
    pub client: Arc<ClientConfig>,
    /// `may`: the same without STARTTLS, for the retry in plaintext after a failed handshake.
    pub plain: Arc<ClientConfig>,
    pub tls: Option<TlsSetup>,
    /// For logs.
    pub describe: String,
}

impl std::fmt::Debug for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hop")
            .field("addr", &self.addr)
            .field("security", &self.describe)
            .finish_non_exhaustive()
    }
}

impl Hop {
    /// Checks `sec` and builds what the sessions to `addr` use.
    pub fn new(
        addr: SocketAddr,
        helo_name: &str,
        lmtp: bool,
        sec: &HopSecurity,
    ) -> Result<Hop, HopError> {
        sec.check()?;
        let base = ClientConfig {
            helo_name: helo_name.to_string(),
            lmtp,
            use_starttls: StartTlsPolicy::Never,
            ..ClientConfig::default()
        };
        let plain = Arc::new(base.clone());
        let name = match &sec.tls.name {
            Some(n) => server_name(n)?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        let (policy, tls) = match sec.tls.level {
            TlsLevel::None => (StartTlsPolicy::Never, None),
            TlsLevel::May => (
                StartTlsPolicy::Opportunistic,
                Some(crate::sts::tls_opportunistic()),
            ),
            TlsLevel::Encrypt if !sec.tls.verify => (
                StartTlsPolicy::Required,
                Some(crate::sts::tls_opportunistic()),
            ),
            TlsLevel::Encrypt => (
                StartTlsPolicy::Required,
                Some(verifying(sec.tls.ca.as_deref())?),
            ),
        };
        let client = Arc::new(ClientConfig {
            use_starttls: policy,
            auth: sec
                .auth
                .as_ref()
                .map(|a| (a.user.clone(), a.password.clone())),
            ..base
        });
        Ok(Hop {
            addr,
            level: sec.tls.level,
            client,
            plain,
            tls: tls.map(|c| TlsSetup {
                connector: tokio_rustls::TlsConnector::from(c),
                name,
            }),
            describe: sec.describe(),
        })
    }
}

/// The next hops of one route, in their configured order, with the same security each. A new
/// connection tries them all, starting at a rotating index, so that connections (and the load)
/// spread over the hops, and a dead hop is passed over.
pub(crate) struct Hops {
    pub list: Vec<Hop>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Hops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.list).finish()
    }
}

impl Hops {
    /// A hop for each of `addrs` (at least one), all with `sec`.
    pub fn new(
        addrs: &[SocketAddr],
        helo_name: &str,
        lmtp: bool,
        sec: &HopSecurity,
    ) -> Result<Hops, crate::MxError> {
        if addrs.is_empty() {
            return Err(crate::MxError::NoNextHop);
        }
        let list = addrs
            .iter()
            .map(|&addr| {
                Hop::new(addr, helo_name, lmtp, sec)
                    .map_err(|source| crate::MxError::NextHop { addr, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Hops {
            list,
            next: AtomicUsize::new(0),
        })
    }

    /// The hops in the order one new connection tries them: every hop once, starting one
    /// further on each call.
    pub fn order(&self) -> Vec<&Hop> {
        let n = self.list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|i| &self.list[(start + i) % n]).collect()
    }

    /// The addresses, for logs: `10.0.0.20:24, 10.0.0.21:24`.
    pub fn addrs(&self) -> String {
        let addrs: Vec<String> = self.list.iter().map(|h| h.addr.to_string()).collect();
        addrs.join(", ")
    }

    /// The security of the hops (the same for each), for logs.
    pub fn describe(&self) -> &str {
        self.list.first().map_or("", |h| h.describe.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// The TOML schema
// ---------------------------------------------------------------------------------------------

const LEVELS: &[(&str, TlsLevel)] = &[
    ("none", TlsLevel::None),
    ("may", TlsLevel::May),
    ("encrypt", TlsLevel::Encrypt),
];

/// `WHAT = "IP:PORT"` or `WHAT = ["IP:PORT", …]`: the next hops of a route, in order (at
/// least one, none twice).
pub(crate) fn parse_hops(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<Vec<SocketAddr>> {
    let items = match v.get_ref() {
        DeValue::String(_) => return socket_addr(ctx, v, what).map(|a| vec![a]),
        DeValue::Array(items) => items,
        _ => {
            mismatch(ctx, v, what, "\"IP:PORT\" or an array of them");
            return None;
        }
    };
    if items.is_empty() {
        ctx.error(
            v.span(),
            format!("`{what}` is empty: name at least one next hop (IP:PORT)"),
        );
        return None;
    }
    let mut ok = true;
    let mut out: Vec<SocketAddr> = Vec::with_capacity(items.len());
    for item in items.iter() {
        match socket_addr(ctx, item, what) {
            Some(a) if out.contains(&a) => {
                ctx.error(item.span(), format!("`{what}`: {a} is listed twice"));
                ok = false;
            }
            Some(a) => out.push(a),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// `WHAT = "LEVEL"` or `WHAT = { level, ca, name, verify }`.
pub(crate) fn parse_tls(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<HopTls> {
    if let DeValue::String(_) = v.get_ref() {
        return choice(ctx, v, what, LEVELS).map(HopTls::level);
    }
    let DeValue::Table(t) = v.get_ref() else {
        mismatch(
            ctx,
            v,
            what,
            "\"none\", \"may\", \"encrypt\" or a table { level, ca, name, verify }",
        );
        return None;
    };
    check_keys(ctx, t, &["level", "ca", "name", "verify"], what);
    let mut ok = true;
    let level = required(ctx, v, t, "level", what)
        .and_then(|x| choice(ctx, x, &format!("{what}.level"), LEVELS));
    let mut tls = HopTls::level(level.unwrap_or(TlsLevel::None));
    ok &= level.is_some();
    if let Some(x) = t.get("ca") {
        match string(ctx, x, &format!("{what}.ca")) {
            Some(p) => match read_ca(Path::new(p)) {
                Ok(_) => tls.ca = Some(PathBuf::from(p)),
                Err(e) => {
                    ctx.error(x.span(), format!("`{what}.ca`: {e}"));
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    if let Some(x) = t.get("name") {
        match string(ctx, x, &format!("{what}.name")) {
            Some(n) => match server_name(n) {
                Ok(_) => tls.name = Some(n.to_string()),
                Err(e) => {
                    ctx.error(x.span(), format!("`{what}.name`: {e}"));
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    if let Some(x) = t.get("verify") {
        match boolean(ctx, x, &format!("{what}.verify")) {
            Some(b) => tls.verify = b,
            None => ok = false,
        }
    }
    ok.then_some(tls)
}

/// `WHAT = { user, password_file }`; the password is read now.
pub(crate) fn parse_auth(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<HopAuth> {
    let t = table(ctx, v, what)?;
    check_keys(ctx, t, &["user", "password_file"], what);
    if t.get("password").is_some() {
        // check_keys reported it; say why.
        ctx.error(
            v.span(),
            format!("`{what}`: the password is never written in the configuration; put it in a file and name it in `password_file`"),
        );
    }
    let user = required(ctx, v, t, "user", what)
        .and_then(|x| string(ctx, x, &format!("{what}.user")).map(|s| (x, s)));
    let file = required(ctx, v, t, "password_file", what)
        .and_then(|x| string(ctx, x, &format!("{what}.password_file")).map(|s| (x, s)));
    let ((ux, user), (fx, file)) = (user?, file?);
    match HopAuth::load(user, Path::new(file)) {
        Ok(a) => Some(a),
        Err(e @ HopError::BadUser(_)) => {
            ctx.error(ux.span(), format!("`{what}.user`: {e}"));
            None
        }
        Err(e) => {
            ctx.error(fx.span(), format!("`{what}.password_file`: {e}"));
            None
        }
    }
}

/// The optional keys `tls_key` and `auth_key` of table `t` (section `section`, e.g.
/// `mx.relay`), combined and checked, starting from `default`. `None` after an error.
pub(crate) fn parse_hop(
    ctx: &mut Ctx<'_>,
    t: &ringmail_proxy_core::config::parse::DeTable<'_>,
    section: &str,
    tls_key: &str,
    auth_key: &str,
    default: HopSecurity,
) -> Option<HopSecurity> {
    let mut sec = default;
    let mut ok = true;
    let tls_v = t.get(tls_key);
    if let Some(x) = tls_v {
        match parse_tls(ctx, x, &format!("{section}.{tls_key}")) {
            Some(tls) => sec.tls = tls,
            None => ok = false,
        }
    }
    let auth_v = t.get(auth_key);
    if let Some(x) = auth_v {
        match parse_auth(ctx, x, &format!("{section}.{auth_key}")) {
            Some(a) => sec.auth = Some(a),
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    if let Err(e) = sec.check() {
        let span = match e {
            HopError::AuthWithoutEncrypt => auth_v.or(tls_v),
            _ => tls_v,
        }
        .map_or(0..0, |x| x.span());
        let key = if matches!(e, HopError::AuthWithoutEncrypt) {
            auth_key
        } else {
            tls_key
        };
        ctx.error(span, format!("`{section}.{key}`: {e}"));
        return None;
    }
    Some(sec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmail_proxy_core::config::load_str_with;
    use ringmail_proxy_core::config::parse::DeTable;

    fn load(text: &str) -> Result<HopSecurity, String> {
        load_str_with(text, "hop.toml", |ctx: &mut Ctx<'_>, root: &DeTable<'_>| {
            parse_hop(ctx, root, "hop", "tls", "auth", HopSecurity::default())
        })
        .map_err(|e| e.to_string())
    }

    fn password_file(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("relay.pass");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn levels_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let pw = password_file(dir.path(), "s3cret-Pw\n");
        assert_eq!(load("").unwrap(), HopSecurity::default());
        assert_eq!(load("tls = \"may\"").unwrap().tls.level, TlsLevel::May);
        let s = load(&format!(
            "tls = {{ level = \"encrypt\", verify = false }}\nauth = {{ user = \"relay@example.com\", password_file = {:?} }}\n",
            pw.display().to_string()
        ))
        .unwrap();
        assert_eq!(s.tls.level, TlsLevel::Encrypt);
        assert!(!s.tls.verify);
        let a = s.auth.as_ref().unwrap();
        assert_eq!(a.user, "relay@example.com");
        assert_eq!(a.password.expose(), b"s3cret-Pw");
        let shown = format!("{s:?} {}", s.describe());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("relay@example.com"), "{shown}");
    }

    #[test]
    fn config_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let pw = password_file(dir.path(), "pw\n");
        let pw = pw.display().to_string();
        // AUTH without `encrypt`: refused, at the `auth` line.
        let e = load(&format!(
            "tls = \"may\"\nauth = {{ user = \"u\", password_file = {pw:?} }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("hop.toml:2:"), "{e}");
        assert!(e.contains("encrypt"), "{e}");
        // AUTH with the default (none) too.
        let e = load(&format!(
            "auth = {{ user = \"u\", password_file = {pw:?} }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("hop.toml:1:") && e.contains("encrypt"), "{e}");
        // An inline password is refused.
        let e = load("tls = \"encrypt\"\nauth = { user = \"u\", password = \"hunter2\" }\n")
            .unwrap_err();
        assert!(e.contains("hop.toml:2:"), "{e}");
        assert!(e.contains("password_file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        // A missing password file, a missing CA file, an unknown level, `ca` with `may`.
        let e = load(
            "tls = { level = \"encrypt\", ca = \"/nonexistent/ca.pem\" }\nauth = { user = \"u\", password_file = \"/nonexistent/pw\" }\n",
        )
        .unwrap_err();
        for want in [
            "hop.toml:1:",
            "/nonexistent/ca.pem",
            "hop.toml:2:",
            "/nonexistent/pw",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let e = load("tls = \"dane\"").unwrap_err();
        assert!(
            e.contains("hop.toml:1:") && e.contains("none | may | encrypt"),
            "{e}"
        );
        let e = load("tls = { level = \"may\", name = \"mta.example.com\" }").unwrap_err();
        assert!(e.contains("hop.toml:1:") && e.contains("`name`"), "{e}");
        let e = load("tls = { level = \"encrypt\", verfy = false }").unwrap_err();
        assert!(e.contains("verfy") && e.contains("did you mean"), "{e}");
        // An empty password file.
        let empty = password_file(dir.path(), "\n");
        let e = load(&format!(
            "tls = \"encrypt\"\nauth = {{ user = \"u\", password_file = {:?} }}\n",
            empty.display().to_string()
        ))
        .unwrap_err();
        assert!(e.contains("hop.toml:2:") && e.contains("empty"), "{e}");
    }

    #[test]
    fn hop_builds_client_settings() {
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let h = Hop::new(addr, "a.example.com", false, &HopSecurity::default()).unwrap();
        assert_eq!(h.client.use_starttls, StartTlsPolicy::Never);
        assert!(h.tls.is_none());
        let mut sec = HopSecurity::level(TlsLevel::Encrypt);
        sec.tls.verify = false;
        sec.auth = Some(HopAuth {
            user: "u".into(),
            password_file: PathBuf::from("/x"),
            password: Secret::from("pw"),
        });
        let h = Hop::new(addr, "a.example.com", true, &sec).unwrap();
        assert_eq!(h.client.use_starttls, StartTlsPolicy::Required);
        assert!(h.client.lmtp);
        assert!(h.client.auth.is_some());
        assert_eq!(h.plain.use_starttls, StartTlsPolicy::Never);
        assert!(!format!("{h:?}").contains("pw\""));
        sec.tls.level = TlsLevel::May;
        assert_eq!(
            Hop::new(addr, "a.example.com", false, &sec).unwrap_err(),
            HopError::OnlyWithEncrypt("verify")
        );
    }

    #[test]
    fn next_hop_lists() {
        let a: SocketAddr = "10.0.0.20:24".parse().unwrap();
        let b: SocketAddr = "10.0.0.21:24".parse().unwrap();
        let c: SocketAddr = "[2001:db8::30]:25".parse().unwrap();
        let mx = |relay: &str| {
            format!(
                "[mx]\nhostname = \"mx.example.com\"\nlisten = [\"127.0.0.1:25\"]\ndomains = [\"example.com\"]\nspool = \"/s\"\n[mx.relay]\n{relay}"
            )
        };
        // One address, as ever, and a list; bounces follow the list unless told otherwise.
        let one = crate::config::load_str(&mx("next_hop = \"10.0.0.20:24\"\n"), "mx.toml").unwrap();
        assert_eq!(one.relay.next_hop, [a]);
        let two = crate::config::load_str(
            &mx("next_hop = [\"10.0.0.20:24\", \"10.0.0.21:24\"]\nbounce_next_hop = [\"[2001:db8::30]:25\"]\n"),
            "mx.toml",
        )
        .unwrap();
        assert_eq!(two.relay.next_hop, [a, b]);
        assert_eq!(two.relay.bounce_next_hop, Some(vec![c]));

        // Errors, each at its line: empty, a duplicate, a bad address, the wrong type.
        let e = crate::config::load_str(
            &mx("next_hop = []\nbounce_next_hop = [\"10.0.0.30:25\", \"10.0.0.30:25\"]\n"),
            "mx.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("mx.toml:7:") && e.contains("`mx.relay.next_hop` is empty"),
            "{e}"
        );
        let e = crate::config::load_str(
            &mx("next_hop = [\"10.0.0.20:24\",\n  \"10.0.0.20:24\"]\n"),
            "mx.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("mx.toml:8:") && e.contains("10.0.0.20:24 is listed twice"),
            "{e}"
        );
        let e = crate::config::load_str(
            &mx("next_hop = [\"10.0.0.20:24\", \"mda.example.com:24\", \"10.0.0.21\"]\nbounce_next_hop = [\"10.0.0.30:25\", \"10.0.0.30:25\"]\n"),
            "mx.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "mx.toml:7:",
            "mda.example.com:24",
            "missing port",
            "mx.toml:8:",
            "listed twice",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let e = crate::config::load_str(&mx("next_hop = 24\n"), "mx.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mx.toml:7:") && e.contains("an array of them"),
            "{e}"
        );

        // [msa]: relay and local_relay.
        let msa = "[msa]\nhostname = \"smtp.example.com\"\nlisten = [\"127.0.0.1:587\"]\naccounts = \"sqlite:/a.db\"\nspool = \"/s\"\n";
        let m = crate::msa_config::load_str(
            &format!("{msa}relay = [\"10.0.0.20:24\", \"10.0.0.21:24\"]\nlocal_relay = [\"[2001:db8::30]:25\"]\n"),
            "msa.toml",
        )
        .unwrap();
        assert_eq!(m.relay, [a, b]);
        assert_eq!(m.local_relay, [c]);
        assert_eq!(m.local_route, crate::msa_config::LocalRoute::Mda);
        let m =
            crate::msa_config::load_str(&format!("{msa}relay = \"10.0.0.20:24\"\n"), "msa.toml")
                .unwrap();
        assert_eq!((m.relay, m.local_relay), (vec![a], vec![]));
        let e = crate::msa_config::load_str(
            &format!("{msa}relay = []\nlocal_relay = [\"10.0.0.20:24\", \"10.0.0.20:24\"]\n"),
            "msa.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "msa.toml:6:",
            "`msa.relay` is empty",
            "msa.toml:7:",
            "listed twice",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }

        // [mta]: smart hosts; relay_tls needs at least one.
        let mta =
            "[mta]\nhostname = \"mta.example.com\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/s\"\n";
        let t = crate::mta_config::load_str(
            &format!(
                "{mta}relay = [\"10.0.0.20:24\", \"10.0.0.21:24\"]\nrelay_tls = \"encrypt\"\n"
            ),
            "mta.toml",
        )
        .unwrap();
        assert_eq!(t.relay, [a, b]);
        assert!(
            crate::mta_config::load_str(mta, "mta.toml")
                .unwrap()
                .relay
                .is_empty()
        );
        let e = crate::mta_config::load_str(&format!("{mta}relay = []\n"), "mta.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mta.toml:5:") && e.contains("is empty"), "{e}");
        assert!(!e.contains("set `mta.relay`"), "{e}");
    }

    #[test]
    fn hops_rotate_and_share_the_security() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:24", "127.0.0.2:24", "127.0.0.3:24"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let hops = Hops::new(&addrs, "mx.example.com", true, &HopSecurity::default()).unwrap();
        let firsts: Vec<SocketAddr> = (0..6).map(|_| hops.order()[0].addr).collect();
        assert_eq!(
            firsts,
            [addrs[0], addrs[1], addrs[2], addrs[0], addrs[1], addrs[2]]
        );
        // Every order holds every hop once.
        let mut o: Vec<SocketAddr> = hops.order().iter().map(|h| h.addr).collect();
        assert_eq!(o[0], addrs[0]);
        o.sort();
        assert_eq!(o, addrs);
        assert_eq!(hops.addrs(), "127.0.0.1:24, 127.0.0.2:24, 127.0.0.3:24");
        // Without `name`, each hop's certificate is checked for its own address.
        let mut sec = HopSecurity::level(TlsLevel::Encrypt);
        sec.tls.verify = false;
        let hops = Hops::new(&addrs, "mx.example.com", true, &sec).unwrap();
        let names: Vec<_> = hops
            .list
            .iter()
            .map(|h| h.tls.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(
            names,
            addrs
                .iter()
                .map(|a| ServerName::IpAddress(a.ip().into()))
                .collect::<Vec<_>>()
        );
        sec.tls.name = Some("mda.int.example.com".into());
        let hops = Hops::new(&addrs, "mx.example.com", true, &sec).unwrap();
        assert!(hops.list.iter().all(|h| h.tls.as_ref().unwrap().name
            == ServerName::try_from("mda.int.example.com").unwrap()));
        assert!(matches!(
            Hops::new(&[], "mx.example.com", true, &HopSecurity::default()),
            Err(crate::MxError::NoNextHop)
        ));
    }

    #[test]
    fn role_configs() {
        let dir = tempfile::tempdir().unwrap();
        let pw = password_file(dir.path(), "pw\n").display().to_string();
        // [mx.relay]: tls/auth for the MDA, bounce_* for the bounce route.
        let mx = format!(
            "[mx]\nhostname = \"mx.example.com\"\nlisten = [\"127.0.0.1:25\"]\ndomains = [\"example.com\"]\nspool = \"/s\"\n[mx.relay]\nnext_hop = \"127.0.0.1:24\"\nbounce_next_hop = \"127.0.0.1:26\"\ntls = {{ level = \"encrypt\", verify = false }}\nauth = {{ user = \"mx\", password_file = {pw:?} }}\n"
        );
        let c = crate::config::load_str(&mx, "mx.toml").unwrap();
        assert_eq!(c.relay.security.tls.level, TlsLevel::Encrypt);
        assert!(c.relay.security.auth.is_some());
        // A separate bounce next hop does not inherit the credentials.
        assert_eq!(c.relay.bounce_security(), HopSecurity::default());
        let e = crate::config::load_str(
            &format!("{mx}bounce_auth = {{ user = \"mx\", password_file = {pw:?} }}\n"),
            "mx.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("mx.toml:11:") && e.contains("mx.relay.bounce_auth"),
            "{e}"
        );

        // [msa]: relay_* and local_relay_*.
        let msa = "[msa]\nhostname = \"smtp.example.com\"\nlisten = [\"127.0.0.1:587\"]\naccounts = \"sqlite:/a.db\"\nspool = \"/s\"\nrelay = \"127.0.0.1:25\"\n";
        let c = crate::msa_config::load_str(
            &format!("{msa}relay_tls = \"encrypt\"\nrelay_auth = {{ user = \"msa\", password_file = {pw:?} }}\n"),
            "msa.toml",
        )
        .unwrap();
        assert_eq!(c.relay_security.tls.level, TlsLevel::Encrypt);
        assert_eq!(c.relay_security.auth.unwrap().user, "msa");
        assert_eq!(c.local_relay_security, HopSecurity::default());
        let e = crate::msa_config::load_str(
            &format!("{msa}relay_tls = \"may\"\nrelay_auth = {{ user = \"msa\", password_file = {pw:?} }}\nlocal_relay_tls = \"sometimes\"\n"),
            "msa.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "msa.toml:8:",
            "msa.relay_auth",
            "encrypt",
            "msa.toml:9:",
            "sometimes",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }

        // [mta]: relay_* for the smart host (default may), only with `relay`.
        let mta =
            "[mta]\nhostname = \"mta.example.com\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/s\"\n";
        let c =
            crate::mta_config::load_str(&format!("{mta}relay = \"127.0.0.1:2525\"\n"), "mta.toml")
                .unwrap();
        assert_eq!(c.relay_security, HopSecurity::level(TlsLevel::May));
        let e = crate::mta_config::load_str(&format!("{mta}relay_tls = \"encrypt\"\n"), "mta.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mta.toml:5:") && e.contains("set `mta.relay`"),
            "{e}"
        );
    }
}
