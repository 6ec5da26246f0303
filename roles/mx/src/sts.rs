//! MTA-STS (RFC 8461) for the sending side, and the TLS client configurations of delivery.
//!
//! - [`parse_txt`]: the `_mta-sts.<domain>` TXT record (`v=STSv1; id=...;`).
//! - [`Policy::parse`]: the policy file, strictly: `version: STSv1`, `mode`, `max_age`
//!   (at most 31557600) and, unless the mode is `none`, at least one `mx` pattern; each of
//!   those at most once except `mx`; LF or CRLF line ends; unknown (well-formed) keys ignored;
//!   at most [`MAX_POLICY_BYTES`]; anything else refuses the whole policy.
//! - [`Sts::policy`]: discovery, HTTPS fetch and an in-memory cache. The TXT `id` is compared
//!   with the cached policy's: same id and not expired → the cached policy, else a new fetch.
//!   A failed fetch, a missing TXT record or a DNS failure keep an unexpired cached policy
//!   (RFC 8461 §5.1: DNS alone must not be able to switch a policy off).
//! - The fetch: `https://mta-sts.<domain>/.well-known/mta-sts.txt` (port configurable), the
//!   host resolved with the [`MxResolver`], WebPKI validation against the system roots plus an
//!   optional extra CA, HTTP/1.1, status 200 only (redirects are not followed, §3.3),
//!   `Content-Type: text/plain`, size cap, one overall timeout.
//! - [`tls_verified`] and [`tls_opportunistic`]: client configurations for delivery, to an
//!   MX under an `enforce` policy (certificate valid and matching the MX host name) and for
//!   opportunistic STARTTLS (RFC 7435: any certificate, handshake signatures still checked).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::resolve::{MxResolver, ResolveError, to_ascii_domain};

/// Largest policy file accepted (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest `max_age` (RFC 8461 §3.2: one year).
pub const MAX_MAX_AGE: u32 = 31_557_600;
/// Most domains kept in the policy cache; past it expired entries, then arbitrary ones, go.
pub const MAX_CACHED_POLICIES: usize = 10_000;

/// Errors of MTA-STS discovery, fetch and parsing, and of the TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum StsError {
    #[error("invalid MTA-STS policy: {0}")]
    Policy(String),
    #[error("no valid _mta-sts TXT record: {0}")]
    Txt(String),
    #[error("DNS: {0}")]
    Dns(#[from] ResolveError),
    #[error("policy fetch from {host}: {reason}")]
    Fetch { host: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The policy mode (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Deliver only over TLS to a matching MX with a valid certificate.
    Enforce,
    /// Report failures (TLSRPT) but deliver anyway.
    Testing,
    /// No policy (a way to withdraw one).
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// One `mx:` pattern: a host name, or `*.` and a suffix matching exactly one more label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxPattern {
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
}

impl MxPattern {
    /// Parses one pattern (lower-cased; a trailing dot is dropped).
    pub fn parse(s: &str) -> Result<MxPattern, StsError> {
        let bad = || StsError::Policy(format!("invalid mx pattern {s:?}"));
        let lower = s.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        let labels: Vec<&str> = name.split('.').collect();
        if name.is_empty() || name.len() > 253 || (wild && labels.len() < 2) {
            return Err(bad());
        }
        for l in &labels {
            if l.is_empty()
                || l.len() > 63
                || l.starts_with('-')
                || l.ends_with('-')
                || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(bad());
            }
        }
        Ok(if wild {
            MxPattern::Wildcard(name.to_string())
        } else {
            MxPattern::Exact(name.to_string())
        })
    }

    /// Whether `host` (A-labels, any case, trailing dot allowed) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        match self {
            MxPattern::Exact(p) => host == *p,
            MxPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|h| h.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

/// A parsed MTA-STS policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    mode: Mode,
    max_age: u32,
    mx: Vec<MxPattern>,
    /// The TXT `id` it was fetched under (empty when parsed alone).
    id: String,
}

fn is_ext_name(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

impl Policy {
    /// Parses a policy file (see the module documentation for the rules).
    pub fn parse(body: &[u8]) -> Result<Policy, StsError> {
        let err = |m: String| Err(StsError::Policy(m));
        if body.len() > MAX_POLICY_BYTES {
            return err(format!(
                "{} bytes, more than {MAX_POLICY_BYTES}",
                body.len()
            ));
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return err("not UTF-8".into());
        };
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        let mut lines: Vec<&str> = text.split('\n').collect();
        // One final line terminator (and blank lines after it) are allowed.
        while lines
            .last()
            .is_some_and(|l| l.trim_end_matches('\r').is_empty())
        {
            lines.pop();
        }
        if lines.is_empty() {
            return err("empty".into());
        }
        for (i, raw) in lines.iter().enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.contains('\r') {
                return err(format!("line {}: stray CR", i + 1));
            }
            let Some((key, value)) = line.split_once(':') else {
                return err(format!("line {}: no ':'", i + 1));
            };
            if !is_ext_name(key) {
                return err(format!("line {}: invalid key {key:?}", i + 1));
            }
            let value = value.trim_matches([' ', '\t']);
            if value.is_empty() {
                return err(format!("line {}: empty value for {key}", i + 1));
            }
            if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return err(format!("line {}: control character", i + 1));
            }
            let dup = || StsError::Policy(format!("duplicate {key}"));
            match key {
                "version" => {
                    if value != "STSv1" {
                        return err(format!("version {value:?}"));
                    }
                    if version.replace(()).is_some() {
                        return Err(dup());
                    }
                }
                "mode" => {
                    let m = match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        _ => return err(format!("mode {value:?}")),
                    };
                    if mode.replace(m).is_some() {
                        return Err(dup());
                    }
                }
                "max_age" => {
                    if value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
                        return err(format!("max_age {value:?}"));
                    }
                    let n: u64 = value
                        .parse()
                        .map_err(|_| StsError::Policy(format!("max_age {value:?}")))?;
                    if n > u64::from(MAX_MAX_AGE) {
                        return err(format!("max_age {n} above {MAX_MAX_AGE}"));
                    }
                    if max_age.replace(n as u32).is_some() {
                        return Err(dup());
                    }
                }
                "mx" => mx.push(MxPattern::parse(value)?),
                _ => debug!(key, "MTA-STS policy: unknown key ignored"),
            }
        }
        if version.is_none() {
            return err("no version".into());
        }
        let Some(mode) = mode else {
            return err("no mode".into());
        };
        let Some(max_age) = max_age else {
            return err("no max_age".into());
        };
        if mx.is_empty() && mode != Mode::None {
            return err("no mx".into());
        }
        Ok(Policy {
            mode,
            max_age,
            mx,
            id: String::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Seconds the policy may be cached.
    pub fn max_age(&self) -> u32 {
        self.max_age
    }

    pub fn mx_patterns(&self) -> &[MxPattern] {
        &self.mx
    }

    /// The `id` of the TXT record the policy was fetched under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the MX host name `host` is allowed by one of the `mx` patterns.
    pub fn mx_matches(&self, host: &str) -> bool {
        self.mx.iter().any(|p| p.matches(host))
    }
}

/// Parses the TXT records of `_mta-sts.<domain>` (RFC 8461 §3.1): records not starting with
/// `v=STSv1;` are discarded; exactly one must remain; returns its `id`.
pub fn parse_txt(records: &[String]) -> Result<String, StsError> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=STSv1")
                .is_some_and(|rest| rest.trim_start_matches([' ', '\t']).starts_with(';'))
        })
        .collect();
    let [record] = sts.as_slice() else {
        return Err(StsError::Txt(format!("{} STSv1 records", sts.len())));
    };
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let Some((k, v)) = field.split_once('=') else {
            return Err(StsError::Txt(format!("field {field:?}")));
        };
        if k == "id" {
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(StsError::Txt(format!("id {v:?}")));
            }
            if id.replace(v.to_string()).is_some() {
                return Err(StsError::Txt("duplicate id".into()));
            }
        } else if !is_ext_name(k) {
            return Err(StsError::Txt(format!("field {field:?}")));
        }
    }
    id.ok_or_else(|| StsError::Txt("no id".into()))
}

/// MTA-STS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsConfig {
    /// Off: [`Sts::policy`] always says no policy.
    pub enabled: bool,
    /// HTTPS port of `mta-sts.<domain>` (443; tests use another).
    pub port: u16,
    /// A PEM file of CA certificates trusted besides the system roots (tests, labs).
    pub extra_ca: Option<PathBuf>,
    /// Upper bound of one policy fetch (connect, TLS, request, body).
    pub timeout: Duration,
}

impl Default for StsConfig {
    fn default() -> Self {
        StsConfig {
            enabled: true,
            port: 443,
            extra_ca: None,
            timeout: Duration::from_secs(10),
        }
    }
}

struct Cached {
    policy: Arc<Policy>,
    expires: Instant,
}

/// MTA-STS discovery, fetch and cache. Cheap to clone.
#[derive(Clone)]
pub struct Sts {
    cfg: Arc<StsConfig>,
    resolver: MxResolver,
    tls: TlsConnector,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

impl std::fmt::Debug for Sts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sts")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Sts {
    /// Loads the trust anchors (system roots plus `cfg.extra_ca`).
    pub fn new(cfg: StsConfig, resolver: MxResolver) -> Result<Sts, StsError> {
        let mut tls = (*tls_verified(cfg.extra_ca.as_deref())?).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Sts {
            cfg: Arc::new(cfg),
            resolver,
            tls: TlsConnector::from(Arc::new(tls)),
            cache: Arc::default(),
        })
    }

    fn cached(&self, domain: &str) -> Option<Arc<Policy>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(domain)
            .filter(|c| c.expires > Instant::now())
            .map(|c| c.policy.clone())
    }

    fn store(&self, domain: &str, policy: Arc<Policy>) {
        let now = Instant::now();
        let expires = now + Duration::from_secs(u64::from(policy.max_age));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_POLICIES && !cache.contains_key(domain) {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= MAX_CACHED_POLICIES
                && let Some(k) = cache.keys().next().cloned()
            {
                cache.remove(&k);
            }
        }
        cache.insert(domain.to_string(), Cached { policy, expires });
    }

    /// The policy that applies to mail for `domain`, if any (also `mode: none` policies,
    /// which the caller treats as no policy). Never fails: every error means "no policy",
    /// or the cached one while it has not expired.
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        // Domain literals have no MTA-STS.
        if !self.cfg.enabled || domain.starts_with('[') {
            return None;
        }
        let domain = match to_ascii_domain(domain) {
            Ok(d) => d,
            Err(e) => {
                debug!(domain, error = %e, "MTA-STS: invalid domain");
                return None;
            }
        };
        let txt = self.discover(&domain).await;
        let cached = self.cached(&domain);
        let id = match decide(cached.as_deref(), &txt) {
            Decision::Cached => {
                if let Err(e) = &txt {
                    debug!(domain, error = %e, "MTA-STS: no usable TXT record; cached policy if any");
                }
                return cached;
            }
            Decision::Fetch(id) => id,
        };
        match self.fetch(&domain).await {
            Ok(mut p) => {
                p.id = id;
                info!(domain, mode = p.mode.as_str(), max_age = p.max_age, id = %p.id, "MTA-STS policy fetched");
                let p = Arc::new(p);
                self.store(&domain, p.clone());
                Some(p)
            }
            Err(e) => {
                warn!(domain, error = %e, "MTA-STS policy fetch failed; cached policy if any");
                self.cached(&domain)
            }
        }
    }
}

/// What [`Sts::policy`] does, given the unexpired cached policy and the TXT lookup.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The cached policy, or none when there is none (no TXT record, DNS failure, or the
    /// TXT `id` is the cached policy's).
    Cached,
    /// Fetch the policy; it is stored under this `id`.
    Fetch(String),
}

fn decide(cached: Option<&Policy>, txt: &Result<String, StsError>) -> Decision {
    match (cached, txt) {
        (_, Err(_)) => Decision::Cached,
        (Some(p), Ok(id)) if p.id == *id => Decision::Cached,
        (_, Ok(id)) => Decision::Fetch(id.clone()),
    }
}

impl Sts {
    /// The `id` of the `_mta-sts.<domain>` TXT record.
    pub async fn discover(&self, domain: &str) -> Result<String, StsError> {
        let records = self.resolver.txt(&format!("_mta-sts.{domain}")).await?;
        parse_txt(&records)
    }

    /// Fetches and parses the policy of `domain` (not cached; the TXT record not consulted).
    pub async fn fetch(&self, domain: &str) -> Result<Policy, StsError> {
        let domain = to_ascii_domain(domain)?;
        let host = format!("mta-sts.{domain}");
        let fail = |reason: String| StsError::Fetch {
            host: host.clone(),
            reason,
        };
        let body = tokio::time::timeout(self.cfg.timeout, self.fetch_body(&host))
            .await
            .map_err(|_| fail(format!("timed out after {:?}", self.cfg.timeout)))?
            .map_err(fail)?;
        Policy::parse(&body)
    }

    async fn fetch_body(&self, host: &str) -> Result<Vec<u8>, String> {
        let addrs = self
            .resolver
            .addresses(host)
            .await
            .map_err(|e| e.to_string())?;
        if addrs.is_empty() {
            return Err("no address".into());
        }
        let server_name =
            ServerName::try_from(host.to_string()).map_err(|e| format!("host name: {e}"))?;
        let mut last = String::new();
        let mut tcp = None;
        for ip in addrs {
            match TcpStream::connect(SocketAddr::new(ip, self.cfg.port)).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("connect {}: {e}", fmt_addr(ip, self.cfg.port)),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let tls = self
            .tls
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "ringmail-mta")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            if resp.status() != hyper::StatusCode::OK {
                // 3xx included: redirects are not followed (RFC 8461 §3.3).
                return Err(format!("HTTP status {}", resp.status()));
            }
            let ctype = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let media = ctype.split(';').next().unwrap_or("").trim();
            if !media.eq_ignore_ascii_case("text/plain") {
                return Err(format!("content type {ctype:?}, not text/plain"));
            }
            if let Some(len) = resp
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                && len > MAX_POLICY_BYTES as u64
            {
                return Err(format!(
                    "policy of {len} bytes, more than {MAX_POLICY_BYTES}"
                ));
            }
            let body = Limited::new(resp.into_body(), MAX_POLICY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok(body.to_bytes().to_vec())
        }
        .await;
        conn.abort();
        result
    }
}

fn fmt_addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that validates server certificates with WebPKI against the system
/// roots plus the CA certificates of the PEM file `extra_ca`. Delivery under an `enforce`
/// policy connects with the MX host name as server name, so the certificate must match it.
pub fn tls_verified(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, StsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        debug!(error = %e, "loading system CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    debug!(added, ignored, "system CA certificates");
    if let Some(path) = extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect())
            .map_err(|e| StsError::Config(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(StsError::Config(format!(
                "{}: no certificate",
                path.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| StsError::Config(format!("{}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(StsError::Config("no trusted CA certificates".into()));
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Opportunistic TLS (RFC 7435): any certificate is accepted (self-signed, expired, other
/// names), but the handshake signatures are still verified, so the session is bound to the
/// key of the certificate presented.
#[derive(Debug)]
struct AcceptAnyCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client configuration for opportunistic STARTTLS: any server certificate is accepted.
pub fn tls_opportunistic() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyCert {
        algs: provider.signature_verification_algorithms,
    });
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n";

    #[test]
    fn parses_rfc_example() {
        let p = Policy::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(p.mode(), Mode::Enforce);
        assert_eq!(p.max_age(), 604800);
        assert_eq!(p.mx_patterns().len(), 3);
        assert!(p.mx_matches("mail.example.com"));
        assert!(p.mx_matches("MAIL.Example.COM."));
        assert!(p.mx_matches("foo.example.net"));
        assert!(!p.mx_matches("example.net"));
        assert!(!p.mx_matches("a.b.example.net"));
        assert!(!p.mx_matches("fooexample.net"));
        assert!(!p.mx_matches("other.example.com"));
    }

    #[test]
    fn crlf_and_lf_and_whitespace() {
        let crlf = GOOD.replace('\n', "\r\n");
        assert_eq!(
            Policy::parse(crlf.as_bytes()).unwrap(),
            Policy::parse(GOOD.as_bytes()).unwrap()
        );
        // No final line end; spaces and tabs around values.
        let p = Policy::parse(b"version:STSv1\nmode:\ttesting \nmx:  mx.example.org\nmax_age: 0")
            .unwrap();
        assert_eq!(p.mode(), Mode::Testing);
        assert_eq!(p.max_age(), 0);
    }

    #[test]
    fn unknown_keys_ignored() {
        let s = format!("{GOOD}foo_bar: some value here\nx.y-z: 1\n");
        assert!(Policy::parse(s.as_bytes()).is_ok());
    }

    #[test]
    fn mode_none_needs_no_mx() {
        let p = Policy::parse(b"version: STSv1\nmode: none\nmax_age: 86400\n").unwrap();
        assert_eq!(p.mode(), Mode::None);
        assert!(!p.mx_matches("anything.example"));
    }

    #[test]
    fn refuses_missing_and_bad_fields() {
        for bad in [
            "",
            "\n",
            "mode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: testing\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\n",
            "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999999\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1d\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age:\n",
            "version: STSv1\nversion: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmode: testing\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nmax_age: 2\n",
            "version: STSv1\nmode: enforce\nmx: *.\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: *.com.\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: **.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a_b.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: -a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example extra\nmax_age: 1\n",
            " version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\ngarbage line\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n: value\n",
            "version: STSv1\r\rmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\x00\nmx: a.example\nmax_age: 1\n",
        ] {
            assert!(Policy::parse(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
        assert!(Policy::parse(b"version: STSv1\nmode: enforce\nmx: \xff\nmax_age: 1\n").is_err());
    }

    #[test]
    fn refuses_huge_policy() {
        let mut s = GOOD.to_string();
        while s.len() <= MAX_POLICY_BYTES {
            s.push_str("mx: filler.example.com\n");
        }
        assert!(matches!(
            Policy::parse(s.as_bytes()),
            Err(StsError::Policy(m)) if m.contains("more than")
        ));
        // Many mx lines under the cap are fine.
        let mut s = GOOD.to_string();
        while s.len() < MAX_POLICY_BYTES - 64 {
            s.push_str("mx: filler.example.com\n");
        }
        assert!(Policy::parse(s.as_bytes()).is_ok());
    }

    #[test]
    fn max_age_bounds() {
        let p = |n: &str| {
            Policy::parse(format!("version: STSv1\nmode: none\nmax_age: {n}\n").as_bytes())
        };
        assert_eq!(p("31557600").unwrap().max_age(), MAX_MAX_AGE);
        assert_eq!(p("0000000001").unwrap().max_age(), 1);
        assert!(p("31557601").is_err());
        assert!(p("4294967296").is_err());
    }

    #[test]
    fn patterns() {
        let w = MxPattern::parse("*.Example.NET.").unwrap();
        assert_eq!(w, MxPattern::Wildcard("example.net".into()));
        assert!(w.matches("mx1.example.net"));
        assert!(w.matches("MX1.EXAMPLE.NET."));
        assert!(!w.matches(".example.net"));
        assert!(!w.matches("example.net"));
        assert!(!w.matches("a.mx1.example.net"));
        assert!(!w.matches("mx1.example.net.evil"));
        assert!(!w.matches("mx1-example.net"));
        let e = MxPattern::parse("mx.example.org").unwrap();
        assert!(e.matches("mx.example.org."));
        assert!(!e.matches("a.mx.example.org"));
        assert!(MxPattern::parse("*").is_err());
        assert!(MxPattern::parse("*.").is_err());
        assert!(MxPattern::parse("").is_err());
        assert!(MxPattern::parse(&format!("{}.example", "a".repeat(64))).is_err());
    }

    #[test]
    fn txt_records() {
        let r = |v: &[&str]| parse_txt(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            r(&["v=STSv1; id=20160831085700Z;"]).unwrap(),
            "20160831085700Z"
        );
        assert_eq!(r(&["v=STSv1;id=abc"]).unwrap(), "abc");
        assert_eq!(
            r(&["v=spf1 -all", "v=STSv1; id=abc; ext=1;"]).unwrap(),
            "abc"
        );
        assert!(r(&[]).is_err());
        assert!(r(&["v=STSv1; id=a;", "v=STSv1; id=b;"]).is_err());
        assert!(r(&["v=STSv1;"]).is_err());
        assert!(r(&["v=STSv1; id=;"]).is_err());
        assert!(r(&["v=STSv1; id=a-b;"]).is_err());
        assert!(r(&[&format!("v=STSv1; id={};", "a".repeat(33))]).is_err());
        assert!(r(&["v=STSv1; id=a; id=b;"]).is_err());
        assert!(r(&["v=STSv1; id=a; garbage;"]).is_err());
        assert!(r(&["v=STSv10; id=a;"]).is_err());
        assert!(r(&["id=a; v=STSv1;"]).is_err());
    }

    #[test]
    fn cache_decisions() {
        let mut p = Policy::parse(GOOD.as_bytes()).unwrap();
        p.id = "one".into();
        let ok = |s: &str| Ok(s.to_string());
        let none = || Err(StsError::Txt("0 STSv1 records".into()));
        // Same id: the cached policy; another id: a new fetch (RFC 8461 §3.3).
        assert_eq!(decide(Some(&p), &ok("one")), Decision::Cached);
        assert_eq!(decide(Some(&p), &ok("two")), Decision::Fetch("two".into()));
        assert_eq!(decide(None, &ok("one")), Decision::Fetch("one".into()));
        // No TXT record or a DNS failure: keep the cached policy (or none).
        assert_eq!(decide(Some(&p), &none()), Decision::Cached);
        assert_eq!(decide(None, &none()), Decision::Cached);
    }

    #[test]
    fn tls_configs_build() {
        let o = tls_opportunistic();
        assert!(!o.crypto_provider().cipher_suites.is_empty());
        let dir = std::env::temp_dir().join(format!("ringmail-sts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a pem").unwrap();
        assert!(matches!(tls_verified(Some(&bad)), Err(StsError::Config(_))));
        assert!(tls_verified(Some(&dir.join("missing.pem"))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
