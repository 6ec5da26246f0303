//! ringmail-mailauth: sender authentication for the MX.
//!
//! Built on the `mail-auth` crate (ring crypto backend, hickory DNS resolver):
//!
//! - [`Checker::iprev`]: forward-confirmed reverse DNS of the client address (RFC 8601 §3).
//! - [`Checker::spf`]: SPF for the MAIL FROM identity, or for the HELO identity when the
//!   reverse-path is null (RFC 7208 §2.3, §2.4).
//! - [`Checker::message`]: every DKIM signature (RFC 6376, RFC 8463), the ARC chain (RFC 8617)
//!   and DMARC (alignment of the RFC 5322 From domain with the DKIM `d=` domains and the SPF
//!   domain; the policy that applies: `p=`, `sp=`, `np=`, `t=y` as `mail-auth` implements it).
//! - [`Checker::message_too_large`]: DMARC from SPF alignment only, for messages larger than
//!   [`AuthConfig::max_message_bytes_for_dkim`], which are not held in memory.
//! - [`Checker::authentication_results`]: the `Authentication-Results:` header (RFC 8601),
//!   folded, with every attacker-controlled value sanitized or quoted.
//!
//! DMARC follows what `mail-auth` 0.13 implements, which is DMARCbis (RFC 9989): the DNS tree
//! walk for the policy record, `p=`/`sp=`/`np=`, and `t=y` lowering the disposition one step;
//! the old `pct=` tag is ignored (a failing message gets the full policy).
//!
//! DNS goes to the system resolvers from `/etc/resolv.conf` or to one name server given as an
//! IP address and port ([`AuthConfig::nameserver`]), over UDP with TCP fallback, with a
//! response cache.
#![forbid(unsafe_code)]

mod header;

use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::{
    AuthenticatedMessage, DkimResult, DmarcResult, IprevResult, MessageAuthenticator, SpfOutput,
    SpfResult, common::crypto::Algorithm, dmarc::Policy, dmarc::verify::DmarcParameters,
    spf::verify::SpfParameters,
};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// At most this many DKIM signatures of one message are verified (each costs a DNS lookup and
/// a signature check); the rest are reported as `dkim=neutral`.
pub const MAX_DKIM_SIGNATURES: usize = 10;

/// Configuration of a [`Checker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The DNS server to ask. `None`: the system resolvers from `/etc/resolv.conf`.
    pub nameserver: Option<SocketAddr>,
    /// Timeout of one DNS query (each query is tried [`DNS_ATTEMPTS`] times).
    pub timeout: Duration,
    /// Upper bound of one whole check (`iprev`, `spf`, or the DKIM + ARC + DMARC of
    /// `message`), whatever the number of DNS queries it needs; past it the check is a
    /// `temperror`.
    pub check_timeout: Duration,
    /// Larger messages are not DKIM-verified (`dkim=neutral reason="message too large"`), so
    /// memory stays bounded: the MX calls [`Checker::message_too_large`] for them.
    pub max_message_bytes_for_dkim: usize,
    /// The authserv-id of `Authentication-Results` (this MX's host name).
    pub hostname: String,
}

/// Tries per DNS query.
pub const DNS_ATTEMPTS: usize = 2;

impl AuthConfig {
    /// Defaults (system resolvers, 2 s per query, 20 s per check, 10 MiB) for `hostname`.
    pub fn new(hostname: impl Into<String>) -> AuthConfig {
        AuthConfig {
            nameserver: None,
            timeout: Duration::from_secs(2),
            check_timeout: Duration::from_secs(20),
            max_message_bytes_for_dkim: 10 * 1024 * 1024,
            hostname: hostname.into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig::new("localhost")
    }
}

/// Errors of [`Checker::new`].
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("DNS resolver: {0}")]
    Resolver(String),
}

/// A result value of RFC 8601 §2.7. Each method produces only the values its RFC defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthResult {
    None,
    Pass,
    Fail,
    SoftFail,
    Neutral,
    Policy,
    TempError,
    PermError,
}

impl AuthResult {
    /// The lower-case token used in `Authentication-Results`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::None => "none",
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::SoftFail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::Policy => "policy",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
        }
    }
}

impl fmt::Display for AuthResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of [`Checker::iprev`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IprevOutcome {
    /// pass / fail / temperror / permerror (no PTR record) / none.
    pub result: AuthResult,
    pub ip: IpAddr,
    /// The PTR name that resolves back to `ip` (pass), else the first PTR name, if any,
    /// without the trailing dot.
    pub name: Option<String>,
    /// Why it did not pass.
    pub reason: Option<String>,
}

/// Which identity SPF checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfIdentity {
    /// The RFC 5321 MAIL FROM address.
    MailFrom,
    /// The HELO/EHLO domain: the reverse-path was null.
    Helo,
}

/// Outcome of [`Checker::spf`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfOutcome {
    /// none / neutral / pass / fail / softfail / temperror / permerror.
    pub result: AuthResult,
    pub identity: SpfIdentity,
    /// The domain whose SPF record was checked (empty when there was none to check).
    pub domain: String,
    /// The MAIL FROM address as given ("" for the null reverse-path).
    pub mail_from: String,
    /// The HELO/EHLO argument as given.
    pub helo: String,
    /// The record's `exp=` explanation, on fail.
    pub explanation: Option<String>,
}

/// One DKIM signature's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimOutcome {
    /// pass / fail / neutral / temperror / permerror / none.
    pub result: AuthResult,
    /// `d=` of the signature (absent when it could not be parsed).
    pub domain: Option<String>,
    /// `s=` of the signature.
    pub selector: Option<String>,
    /// `a=` of the signature ("rsa-sha256", "ed25519-sha256", "rsa-sha1").
    pub algorithm: Option<&'static str>,
    /// The first 8 base64 characters of `b=` (RFC 6008 `header.b`).
    pub b_prefix: Option<String>,
    pub reason: Option<String>,
}

/// Outcome of the ARC chain validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcOutcome {
    /// none / pass / fail (RFC 8617 §7).
    pub result: AuthResult,
    /// Number of ARC sets in the chain.
    pub instances: usize,
    pub reason: Option<String>,
}

/// The DMARC disposition the author domain asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
}

/// Outcome of DMARC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcOutcome {
    /// none / pass / fail / temperror / permerror.
    pub result: AuthResult,
    /// The RFC 5322 From domain (absent when the message has none, or several domains).
    pub header_from: Option<String>,
    /// The policy that applies (p=, sp= or np=, lowered one step by t=y).
    pub policy: DmarcPolicy,
    pub spf_aligned: bool,
    pub dkim_aligned: bool,
    pub reason: Option<String>,
}

/// Outcome of [`Checker::message`] or [`Checker::message_too_large`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOutcome {
    /// One entry per DKIM-Signature; empty: the message is unsigned (`dkim=none`).
    pub dkim: Vec<DkimOutcome>,
    /// `None` when the chain was not evaluated (message too large).
    pub arc: Option<ArcOutcome>,
    pub dmarc: DmarcOutcome,
    /// The message was larger than `max_message_bytes_for_dkim`.
    pub too_large: bool,
}

impl MessageOutcome {
    /// DMARC failed and the author domain asks for reject: the MX refuses the message with
    /// `550 5.7.1`.
    pub fn dmarc_reject(&self) -> bool {
        self.dmarc.result == AuthResult::Fail && self.dmarc.policy == DmarcPolicy::Reject
    }

    /// DMARC failed and the author domain asks for quarantine (spam folder).
    pub fn dmarc_quarantine(&self) -> bool {
        self.dmarc.result == AuthResult::Fail && self.dmarc.policy == DmarcPolicy::Quarantine
    }
}

/// The sender authentication checker. Cheap to clone (the resolver and its cache are
/// shared); `Send + Sync`. Its async methods need a tokio runtime.
#[derive(Clone)]
pub struct Checker {
    inner: Arc<Inner>,
}

struct Inner {
    auth: MessageAuthenticator,
    cfg: AuthConfig,
}

impl fmt::Debug for Checker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checker")
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Checker {
    /// Builds the resolver: `cfg.nameserver` over UDP and TCP, or the system configuration;
    /// per-query timeout `cfg.timeout`, [`DNS_ATTEMPTS`] tries, response cache.
    pub fn new(cfg: AuthConfig) -> Result<Checker, AuthError> {
        if !header::is_valid_authserv_id(&cfg.hostname) {
            return Err(AuthError::Config(format!(
                "hostname {:?} is not a valid authserv-id (letters, digits, '.', '-', '_')",
                cfg.hostname
            )));
        }
        if cfg.timeout.is_zero() || cfg.check_timeout.is_zero() {
            return Err(AuthError::Config("timeouts must be positive".into()));
        }
        let (config, mut opts) = resolver_config(cfg.nameserver).map_err(AuthError::Resolver)?;
        opts.timeout = cfg.timeout;
        opts.attempts = DNS_ATTEMPTS;
        opts.cache_size = 8192;
        // Truncated UDP answers (long TXT records) are retried over TCP.
        opts.try_tcp_on_error = true;
        opts.edns0 = true;
        let auth = MessageAuthenticator::new(config, opts)
            .map_err(|e| AuthError::Resolver(e.to_string()))?;
        Ok(Checker {
            inner: Arc::new(Inner { auth, cfg }),
        })
    }

    /// The configuration this checker was built with.
    pub fn config(&self) -> &AuthConfig {
        &self.inner.cfg
    }

    async fn bounded<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout(self.inner.cfg.check_timeout, fut)
            .await
            .ok()
    }

    /// Whether `ip` is listed in the DNSBL `zone`: an A record for the reversed address under
    /// the zone (`4.3.2.1.zone` for 1.2.3.4; nibbles for IPv6), answered in 127.0.0.0/8 as
    /// RFC 5782 requires (other answers, e.g. a resolver's NXDOMAIN rewriting, are ignored).
    /// Lookup failures count as not listed: a broken blocklist must not stop all mail.
    pub async fn dnsbl_listed(&self, ip: IpAddr, zone: &str) -> bool {
        let name = dnsbl_name(ip, zone);
        let lookup = self.bounded(self.inner.auth.0.ipv4_lookup(name.as_str()));
        match lookup.await {
            Some(Ok(found)) => found.answers().iter().any(|r| match &r.data {
                mail_auth::hickory_resolver::proto::rr::RData::A(a) => a.0.octets()[0] == 127,
                _ => false,
            }),
            _ => false,
        }
    }

    /// Forward-confirmed reverse DNS: one of the PTR names of `ip` (at most two are tried)
    /// has an A/AAAA record equal to `ip`. Loopback addresses are answered by the resolver
    /// itself (RFC 6761: `localhost`), without asking the DNS server.
    pub async fn iprev(&self, ip: IpAddr) -> IprevOutcome {
        if ip.is_unspecified() {
            return IprevOutcome {
                result: AuthResult::None,
                ip,
                name: None,
                reason: Some("unspecified address".into()),
            };
        }
        let Some(out) = self.bounded(self.inner.auth.verify_iprev(ip)).await else {
            return IprevOutcome {
                result: AuthResult::TempError,
                ip,
                name: None,
                reason: Some("timed out".into()),
            };
        };
        let names: Vec<String> = out
            .ptr
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|n| n.trim_end_matches('.').to_string())
            .collect();
        let (result, reason) = match &out.result {
            IprevResult::Pass => (AuthResult::Pass, None),
            IprevResult::Fail(e) => (AuthResult::Fail, Some(e.to_string())),
            IprevResult::TempError(e) => (AuthResult::TempError, Some(e.to_string())),
            IprevResult::PermError(e) => (AuthResult::PermError, Some(e.to_string())),
            IprevResult::None => (AuthResult::None, None),
        };
        let mut name = names.first().cloned();
        if result == AuthResult::Pass && names.len() > 1 {
            // Name the PTR that confirmed: mail-auth tries the first two.
            for n in names.iter().take(2) {
                if self.forward_has(n, ip).await {
                    name = Some(n.clone());
                    break;
                }
            }
        }
        IprevOutcome {
            result,
            ip,
            name,
            reason,
        }
    }

    async fn forward_has(&self, name: &str, ip: IpAddr) -> bool {
        let fqdn = format!("{name}.");
        match ip {
            IpAddr::V4(v4) => self
                .inner
                .auth
                .ipv4_lookup_raw(&fqdn)
                .await
                .is_ok_and(|e| e.entry.contains(&v4)),
            IpAddr::V6(v6) => self
                .inner
                .auth
                .ipv6_lookup_raw(&fqdn)
                .await
                .is_ok_and(|e| e.entry.contains(&v6)),
        }
    }

    /// SPF `check_host()` for the MAIL FROM identity; for the null reverse-path (`None`, `""`
    /// or `"<>"`) for the HELO identity `postmaster@<helo>` (RFC 7208 §2.3, §2.4). A HELO that
    /// is an address literal has no SPF identity: `none`.
    pub async fn spf(&self, ip: IpAddr, helo: &str, mail_from: Option<&str>) -> SpfOutcome {
        let mail_from = normalize_mail_from(mail_from);
        let helo_domain = helo.trim().trim_end_matches('.');
        let identity = if mail_from.is_empty() {
            SpfIdentity::Helo
        } else {
            SpfIdentity::MailFrom
        };
        let mut outcome = SpfOutcome {
            result: AuthResult::None,
            identity,
            domain: String::new(),
            mail_from: mail_from.to_string(),
            helo: helo.to_string(),
            explanation: None,
        };
        let hostname = self.inner.cfg.hostname.as_str();
        let params = match identity {
            SpfIdentity::Helo => {
                if !is_domain_like(helo_domain) {
                    return outcome;
                }
                SpfParameters::verify_ehlo(ip, helo_domain, hostname)
            }
            SpfIdentity::MailFrom => {
                let domain = mail_from.rsplit_once('@').map_or("", |(_, d)| d);
                if !is_domain_like(domain) {
                    outcome.result = AuthResult::None;
                    return outcome;
                }
                SpfParameters::verify_mail_from(ip, helo_domain, hostname, mail_from)
            }
        };
        let Some(out) = self.bounded(self.inner.auth.verify_spf(params)).await else {
            outcome.result = AuthResult::TempError;
            outcome.domain = match identity {
                SpfIdentity::Helo => helo_domain.to_ascii_lowercase(),
                SpfIdentity::MailFrom => mail_from
                    .rsplit_once('@')
                    .map_or("", |(_, d)| d)
                    .to_ascii_lowercase(),
            };
            return outcome;
        };
        outcome.result = match out.result() {
            SpfResult::Pass => AuthResult::Pass,
            SpfResult::Fail => AuthResult::Fail,
            SpfResult::SoftFail => AuthResult::SoftFail,
            SpfResult::Neutral => AuthResult::Neutral,
            SpfResult::TempError => AuthResult::TempError,
            SpfResult::PermError => AuthResult::PermError,
            SpfResult::None => AuthResult::None,
        };
        outcome.domain = out.domain().trim_end_matches('.').to_string();
        outcome.explanation = out.explanation().map(str::to_string);
        outcome
    }

    /// DKIM (every signature, up to [`MAX_DKIM_SIGNATURES`]), ARC and DMARC of a whole
    /// message. `spf` is this transaction's [`Checker::spf`] outcome: its domain is the SPF
    /// identifier DMARC aligns with. A message larger than `max_message_bytes_for_dkim` is
    /// handed to [`Checker::message_too_large`] (with its header section).
    pub async fn message(
        &self,
        raw: &[u8],
        ip: IpAddr,
        helo: &str,
        mail_from: Option<&str>,
        spf: &SpfOutcome,
    ) -> MessageOutcome {
        if raw.len() > self.inner.cfg.max_message_bytes_for_dkim {
            return self.message_too_large(header_section(raw), spf).await;
        }
        tracing::debug!(%ip, helo, mail_from = mail_from.unwrap_or(""), spf = %spf.result, "message authentication");
        let Some(mut msg) = AuthenticatedMessage::parse(raw) else {
            return MessageOutcome {
                dkim: vec![DkimOutcome::without_signature(
                    AuthResult::PermError,
                    "message has no header",
                )],
                arc: Some(ArcOutcome {
                    result: AuthResult::None,
                    instances: 0,
                    reason: None,
                }),
                dmarc: DmarcOutcome::none(None, Some("message has no header".into())),
                too_large: false,
            };
        };

        // RFC 8301: rsa-sha1 signatures are never valid; signatures past the cap are not
        // verified. Both are taken out before verification so DMARC cannot use them.
        let mut dkim = Vec::new();
        let mut kept = Vec::with_capacity(msg.dkim_headers.len());
        for h in std::mem::take(&mut msg.dkim_headers) {
            if h.header.a == Algorithm::RsaSha1 {
                dkim.push(DkimOutcome::from_signature(
                    &h.header,
                    AuthResult::PermError,
                    Some("rsa-sha1 is not accepted (RFC 8301)".into()),
                ));
            } else if kept.len() >= MAX_DKIM_SIGNATURES {
                dkim.push(DkimOutcome::from_signature(
                    &h.header,
                    AuthResult::Neutral,
                    Some("too many signatures".into()),
                ));
            } else {
                kept.push(h);
            }
        }
        msg.dkim_headers = kept;
        let msg = msg;

        let spf_output = spf_output_for_dmarc(spf);
        let checks = async {
            let dkim_out = self.inner.auth.verify_dkim(&msg).await;
            let arc_out = self.inner.auth.verify_arc(&msg).await;
            let dmarc_out = self
                .inner
                .auth
                .verify_dmarc(DmarcParameters::new(
                    &msg,
                    &dkim_out,
                    &spf.domain,
                    &spf_output,
                ))
                .await;
            let mut verified: Vec<DkimOutcome> = dkim_out.iter().map(DkimOutcome::from).collect();
            let arc = ArcOutcome::from(&arc_out);
            let dmarc = DmarcOutcome::from(&dmarc_out);
            verified.append(&mut dkim);
            (verified, arc, dmarc)
        };
        match self.bounded(checks).await {
            Some((dkim, arc, dmarc)) => MessageOutcome {
                dkim,
                arc: Some(arc),
                dmarc,
                too_large: false,
            },
            None => MessageOutcome {
                dkim: vec![DkimOutcome::without_signature(
                    AuthResult::TempError,
                    "timed out",
                )],
                arc: None,
                dmarc: DmarcOutcome {
                    result: AuthResult::TempError,
                    header_from: None,
                    policy: DmarcPolicy::None,
                    spf_aligned: false,
                    dkim_aligned: false,
                    reason: Some("timed out".into()),
                },
                too_large: false,
            },
        }
    }

    /// For a message larger than `max_message_bytes_for_dkim`, of which the MX keeps only the
    /// header section in memory (`header_section`: the header fields, with or without the
    /// blank line; longer input is cut at that size). No DKIM signature is verified
    /// (`dkim=neutral reason="message too large"`), the ARC chain is not evaluated, and DMARC
    /// is evaluated from SPF alignment alone: it passes when SPF passed for a domain aligned
    /// with the From domain, otherwise it fails (and the policy applies) when the From domain
    /// publishes a DMARC record. A legitimately DKIM-signed but SPF-failing large message
    /// from a `p=reject` domain is therefore rejected: keep the limit above the MX's
    /// accepted message size where that matters.
    pub async fn message_too_large(
        &self,
        header_section: &[u8],
        spf: &SpfOutcome,
    ) -> MessageOutcome {
        let max = self.inner.cfg.max_message_bytes_for_dkim;
        let headers = &header_section[..header_section.len().min(max)];
        let too_large_dkim = vec![DkimOutcome::without_signature(
            AuthResult::Neutral,
            "message too large",
        )];
        let Some(msg) = AuthenticatedMessage::parse(headers) else {
            return MessageOutcome {
                dkim: too_large_dkim,
                arc: None,
                dmarc: DmarcOutcome::none(None, Some("message has no header".into())),
                too_large: true,
            };
        };
        let spf_output = spf_output_for_dmarc(spf);
        let dmarc = self
            .bounded(self.inner.auth.verify_dmarc(DmarcParameters::new(
                &msg,
                &[],
                &spf.domain,
                &spf_output,
            )))
            .await
            .map_or_else(
                || DmarcOutcome {
                    result: AuthResult::TempError,
                    header_from: None,
                    policy: DmarcPolicy::None,
                    spf_aligned: false,
                    dkim_aligned: false,
                    reason: Some("timed out".into()),
                },
                |d| DmarcOutcome::from(&d),
            );
        MessageOutcome {
            dkim: too_large_dkim,
            arc: None,
            dmarc,
            too_large: true,
        }
    }

    /// The `Authentication-Results:` header field (RFC 8601) for this transaction: one
    /// result per line (folded with CRLF + TAB), ending in CRLF. `msg` is `None` when the
    /// message was not looked at (no dkim/arc/dmarc results then).
    pub fn authentication_results(
        &self,
        iprev: &IprevOutcome,
        spf: &SpfOutcome,
        msg: Option<&MessageOutcome>,
    ) -> String {
        header::authentication_results(&self.inner.cfg.hostname, iprev, spf, msg)
    }
}

/// `None`, `""` and `"<>"` are the null reverse-path; angle brackets are removed.
fn normalize_mail_from(mail_from: Option<&str>) -> &str {
    let s = mail_from.unwrap_or("").trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    s.strip_suffix('>').unwrap_or(s)
}

/// Something SPF can be evaluated for: not an address literal, has a dot, only LDH, '_' and
/// non-ASCII (IDN) characters.
fn is_domain_like(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.contains('.')
        && !d.starts_with('[')
        && d.parse::<IpAddr>().is_err()
        && d.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') || !c.is_ascii())
}

/// The header section of a raw message (up to and including the blank line).
fn header_section(raw: &[u8]) -> &[u8] {
    let crlf = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = raw.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => &raw[..a.min(b)],
        (Some(a), None) | (None, Some(a)) => &raw[..a],
        (None, None) => raw,
    }
}

fn spf_output_for_dmarc(spf: &SpfOutcome) -> SpfOutput {
    let result = match spf.result {
        AuthResult::Pass => SpfResult::Pass,
        AuthResult::Fail => SpfResult::Fail,
        AuthResult::SoftFail => SpfResult::SoftFail,
        AuthResult::Neutral => SpfResult::Neutral,
        AuthResult::TempError => SpfResult::TempError,
        AuthResult::PermError => SpfResult::PermError,
        AuthResult::None | AuthResult::Policy => SpfResult::None,
    };
    SpfOutput::new(spf.domain.clone()).with_result(result)
}

fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

impl DkimOutcome {
    fn without_signature(result: AuthResult, reason: &str) -> DkimOutcome {
        DkimOutcome {
            result,
            domain: None,
            selector: None,
            algorithm: None,
            b_prefix: None,
            reason: Some(reason.into()),
        }
    }

    fn from_signature(
        sig: &mail_auth::dkim::Signature,
        result: AuthResult,
        reason: Option<String>,
    ) -> DkimOutcome {
        DkimOutcome {
            result,
            domain: Some(sig.d.trim_end_matches('.').to_string()),
            selector: Some(sig.s.clone()),
            algorithm: Some(algorithm_name(sig.a)),
            b_prefix: sig.b.get(..6).map(header::base64_6),
            reason,
        }
    }
}

impl From<&mail_auth::DkimOutput<'_>> for DkimOutcome {
    fn from(o: &mail_auth::DkimOutput<'_>) -> Self {
        let (result, reason) = match o.result() {
            DkimResult::Pass => (AuthResult::Pass, None),
            // RFC 6376 §6.1.3: a body hash mismatch is PERMFAIL, i.e. dkim=fail.
            DkimResult::Neutral(
                e @ mail_auth::Error::Dkim(mail_auth::dkim::DkimError::FailedBodyHashMatch),
            ) => (AuthResult::Fail, Some(e.to_string())),
            DkimResult::Neutral(e) => (AuthResult::Neutral, Some(e.to_string())),
            DkimResult::Fail(e) => (AuthResult::Fail, Some(e.to_string())),
            DkimResult::PermError(e) => (AuthResult::PermError, Some(e.to_string())),
            DkimResult::TempError(e) => (AuthResult::TempError, Some(e.to_string())),
            DkimResult::None => (AuthResult::None, None),
        };
        match o.signature() {
            Some(sig) => DkimOutcome::from_signature(sig, result, reason),
            None => DkimOutcome {
                result,
                domain: None,
                selector: None,
                algorithm: None,
                b_prefix: None,
                reason,
            },
        }
    }
}

impl From<&mail_auth::ArcOutput<'_>> for ArcOutcome {
    fn from(o: &mail_auth::ArcOutput<'_>) -> Self {
        // RFC 8617 defines none, pass and fail only.
        let (result, reason) = match o.result() {
            DkimResult::Pass => (AuthResult::Pass, None),
            DkimResult::None => (AuthResult::None, None),
            DkimResult::Neutral(e)
            | DkimResult::Fail(e)
            | DkimResult::PermError(e)
            | DkimResult::TempError(e) => (AuthResult::Fail, Some(e.to_string())),
        };
        ArcOutcome {
            result,
            instances: o.sets().len(),
            reason,
        }
    }
}

impl DmarcOutcome {
    fn none(header_from: Option<String>, reason: Option<String>) -> DmarcOutcome {
        DmarcOutcome {
            result: AuthResult::None,
            header_from,
            policy: DmarcPolicy::None,
            spf_aligned: false,
            dkim_aligned: false,
            reason,
        }
    }
}

impl From<&mail_auth::DmarcOutput> for DmarcOutcome {
    fn from(o: &mail_auth::DmarcOutput) -> Self {
        let (result, reason) = match o.result() {
            DmarcResult::Pass => (AuthResult::Pass, None),
            DmarcResult::Fail(e) => (AuthResult::Fail, Some(e.to_string())),
            DmarcResult::TempError(e) => (AuthResult::TempError, Some(e.to_string())),
            DmarcResult::PermError(e) => (AuthResult::PermError, Some(e.to_string())),
            DmarcResult::None => (AuthResult::None, None),
        };
        let policy = match o.policy() {
            Policy::Reject => DmarcPolicy::Reject,
            Policy::Quarantine => DmarcPolicy::Quarantine,
            Policy::None | Policy::Unspecified => DmarcPolicy::None,
        };
        let domain = o.domain().trim_end_matches('.');
        DmarcOutcome {
            result,
            header_from: (!domain.is_empty()).then(|| domain.to_string()),
            policy,
            spf_aligned: *o.spf_result() == DmarcResult::Pass,
            dkim_aligned: *o.dkim_result() == DmarcResult::Pass,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_sender_forms() {
        assert_eq!(normalize_mail_from(None), "");
        assert_eq!(normalize_mail_from(Some("")), "");
        assert_eq!(normalize_mail_from(Some("<>")), "");
        assert_eq!(normalize_mail_from(Some("<a@b.test>")), "a@b.test");
        assert_eq!(normalize_mail_from(Some("a@b.test")), "a@b.test");
    }

    #[test]
    fn domain_like() {
        assert!(is_domain_like("mail.sender.test"));
        assert!(!is_domain_like("[192.0.2.1]"));
        assert!(!is_domain_like("192.0.2.1"));
        assert!(!is_domain_like("localhost"));
        assert!(!is_domain_like("a b.test"));
        assert!(!is_domain_like(""));
    }

    #[test]
    fn header_section_split() {
        assert_eq!(header_section(b"A: b\r\n\r\nbody"), b"A: b\r\n\r\n");
        assert_eq!(header_section(b"A: b\n\nbody"), b"A: b\n\n");
        assert_eq!(header_section(b"A: b\r\n"), b"A: b\r\n");
    }

    #[test]
    fn bad_hostname_is_refused() {
        let cfg = AuthConfig::new("mx.example.test;\r\nX-Evil: 1");
        assert!(matches!(Checker::new(cfg), Err(AuthError::Config(_))));
    }

    #[test]
    fn checker_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Checker>();
    }
}

/// The DNSBL query name for `ip` under `zone` (RFC 5782 section 2.1 and 2.4).
pub fn dnsbl_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(80);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            format!("{s}{zone}.")
        }
    }
}

#[cfg(test)]
mod dnsbl_tests {
    use super::dnsbl_name;

    #[test]
    fn query_names() {
        assert_eq!(
            dnsbl_name("192.0.2.99".parse().unwrap(), "bl.example.org"),
            "99.2.0.192.bl.example.org."
        );
        assert_eq!(
            dnsbl_name("2001:db8::1".parse().unwrap(), "bl.example.org."),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example.org."
        );
    }
}

/// The resolver configuration every ringmail DNS client starts from: with `nameserver`, that one
/// server over UDP and TCP and nothing else (no `/etc/hosts`: only what the server says counts;
/// tests and labs point it at their own server); without, the system's `/etc/resolv.conf`.
/// Callers set their own timeouts, attempts and cache on the returned options.
pub fn resolver_config(
    nameserver: Option<SocketAddr>,
) -> Result<(ResolverConfig, ResolverOpts), String> {
    match nameserver {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            let mut opts = ResolverOpts::default();
            opts.use_hosts_file = ResolveHosts::Never;
            Ok((ResolverConfig::from_name_servers(vec![ns]), opts))
        }
        None => mail_auth::hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("reading resolv.conf: {e}")),
    }
}
