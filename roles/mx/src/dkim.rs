//! DKIM signing of outbound mail (RFC 6376; Ed25519 per RFC 8463), on `mail-auth` with its ring
//! backend. With the `aws-lc-rsa` feature, the RSA private-key operation runs on aws-lc instead
//! (its AVX-512 IFMA and ADX code signs RSA-2048 in about half ring's CPU time on current x86
//! cores); PKCS#1 v1.5 signatures are deterministic, so the output is the same byte for byte.
//!
//! - [`DkimSigner::load`] reads the private keys named by [`DkimKeySpec`]s: PEM files holding a
//!   PKCS#1 RSA key (`BEGIN RSA PRIVATE KEY`), a PKCS#8 RSA key or a PKCS#8 Ed25519 key (both
//!   `BEGIN PRIVATE KEY`); the kind is detected from the PEM label and the PKCS#8 algorithm. RSA
//!   keys under 1024 bits are refused as too weak (RFC 8301); ring signs with 2048 to 4096-bit
//!   RSA keys only, so keys of 1024 to 2047 bits are refused too, with a message that says so.
//!   Every unusable file is reported at once ([`DkimError::Keys`]).
//! - [`DkimSigner::sign`] signs for the domain of the From: address, or its closest parent
//!   domain with a key, with every key of that domain (e.g. one RSA and one Ed25519 signature).
//!   Canonicalisation relaxed/relaxed, `t=` set, no `x=` and no `l=`.
//! - [`keygen`] makes a new key file and returns the TXT record to publish.
//!
//! Signed header fields follow rspamd's defaults: the fields in [`OVERSIGNED_HEADERS`] are
//! listed in `h=` once more than they occur (an absent one is listed once), so none can be
//! added after signing without breaking the signature — in particular no second From:. The
//! fields in [`SIGNED_HEADERS`] are signed as often as they occur, and only when present.
//!
//! How `mail-auth` builds `h=` from the list given to its `headers()`: every occurrence in the
//! message of a listed name is signed (bottom-up, as verifiers select them); then each list
//! *entry* whose position was never the first match of an occurrence is appended once, as an
//! absent field. So a name listed once costs one extra entry only when it is absent, and a name
//! listed twice gets exactly one extra entry (N+1) when present, two when absent. `header_list`
//! builds the list from the fields present so that the result is exactly the policy above.
//!
//! Key material is never logged nor put in an error message.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
#[cfg(not(feature = "aws-lc-rsa"))]
use mail_auth::common::crypto::RsaKey;
use mail_auth::common::crypto::{Algorithm, DkimKey, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::Canonicalization;
use mail_parser::parsers::MessageStream;
use mail_parser::{Address, HeaderValue};
#[cfg(not(feature = "aws-lc-rsa"))]
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};
use tracing::{debug, warn};

/// Header fields signed once more than they occur (an absent one once), so that none can be
/// added after signing: From (no second From:), and what a forwarder could add to redirect
/// replies or change the meaning (Reply-To, Subject, To, Cc). rspamd's `(o)` set.
pub const OVERSIGNED_HEADERS: &[&str] = &["From", "Reply-To", "Subject", "To", "Cc"];

/// Header fields signed as often as they occur, when present.
pub const SIGNED_HEADERS: &[&str] = &[
    "Sender",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Content-Language",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Date",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Owner",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Archive",
    "Feedback-ID",
    "OpenPGP",
    "Autocrypt",
];

/// RSA keys below this are refused outright (RFC 8301: too weak).
pub const RSA_MIN_BITS: usize = 1024;
/// The smallest RSA key ring signs with.
pub const RSA_SIGNER_MIN_BITS: usize = 2048;
/// The largest RSA key ring signs with.
pub const RSA_SIGNER_MAX_BITS: usize = 4096;
/// Default size of a generated RSA key.
pub const RSA_DEFAULT_BITS: usize = 2048;

/// Longest key file read; a PEM key of 4096 bits is about 3.3 KiB.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// DKIM signing algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DkimAlgo {
    /// rsa-sha256.
    Rsa,
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

impl DkimAlgo {
    /// The `k=` tag of the DNS record.
    pub fn dns_name(self) -> &'static str {
        match self {
            DkimAlgo::Rsa => "rsa",
            DkimAlgo::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for DkimAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DkimAlgo::Rsa => "rsa-sha256",
            DkimAlgo::Ed25519 => "ed25519-sha256",
        })
    }
}

/// One signing key: mail whose From: domain is `domain` (or a subdomain of it without a key of
/// its own) is signed with `d=domain; s=selector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeySpec {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
}

/// What is wrong with one key file or its spec.
#[derive(Debug, thiserror::Error)]
pub enum KeyProblem {
    #[error("cannot read: {0}")]
    Read(io::Error),
    #[error("larger than {MAX_KEY_FILE} bytes; not a key file")]
    TooLarge,
    #[error("no PEM block (want BEGIN RSA PRIVATE KEY or BEGIN PRIVATE KEY)")]
    NotPem,
    #[error("unterminated PEM block `{0}`")]
    Unterminated(String),
    #[error("bad base64 in the PEM block")]
    BadBase64,
    #[error("the key is encrypted; store it unencrypted (mode 0600)")]
    Encrypted,
    #[error("PEM block `{0}` is not a supported private key (want RSA PRIVATE KEY or PRIVATE KEY)")]
    UnsupportedPem(String),
    #[error(
        "PKCS#8 key of algorithm {0}; want RSA (1.2.840.113549.1.1.1) or Ed25519 (1.3.101.112)"
    )]
    UnsupportedAlgorithm(String),
    #[error("malformed {0} key structure")]
    Malformed(&'static str),
    #[error("RSA key of {0} bits is too weak (at least {RSA_MIN_BITS})")]
    RsaTooSmall(usize),
    #[error(
        "RSA key of {0} bits: the signer takes {RSA_SIGNER_MIN_BITS} to {RSA_SIGNER_MAX_BITS} bits"
    )]
    RsaSizeUnsupported(usize),
    #[error("key rejected by the crypto library: {0}")]
    Rejected(String),
    #[error("invalid domain `{0}`: {1}")]
    InvalidDomain(String, &'static str),
    #[error("invalid selector `{0}`: {1}")]
    InvalidSelector(String, &'static str),
    #[error("a second key for d={0} s={1}")]
    Duplicate(String, String),
}

/// One unusable key file, with the spec that named it.
#[derive(Debug, thiserror::Error)]
#[error("DKIM key {} (d={domain} s={selector}): {problem}", path.display())]
pub struct KeyFileError {
    pub path: PathBuf,
    pub domain: String,
    pub selector: String,
    pub problem: KeyProblem,
}

/// Why DKIM keys could not be loaded or made, or a message could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    /// Every unusable key file of a [`DkimSigner::load`] (at least one).
    #[error("{}", join_errors(.0))]
    Keys(Vec<KeyFileError>),
    #[error("signing for d={domain} s={selector} with {}: {reason}", path.display())]
    Sign {
        domain: String,
        selector: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{}: already exists; not overwritten", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("invalid domain `{0}`: {1}")]
    InvalidDomain(String, &'static str),
    #[error("invalid selector `{0}`: {1}")]
    InvalidSelector(String, &'static str),
    #[error(
        "RSA key size {0}: choose {RSA_SIGNER_MIN_BITS} to {RSA_SIGNER_MAX_BITS} bits (the signer's range)"
    )]
    InvalidBits(usize),
    #[error("key generation failed: {0}")]
    Keygen(String),
}

fn join_errors(errors: &[KeyFileError]) -> String {
    let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    match list.len() {
        1 => list.join(""),
        n => format!("{n} unusable DKIM keys: {}", list.join("; ")),
    }
}

/// A loaded key.
struct Key {
    domain: String,
    selector: String,
    path: PathBuf,
    algo: DkimAlgo,
    key: PrivateKey,
}

/// A parsed private key, ready to sign (parsed once, when the keys are loaded).
enum PrivateKey {
    /// mail-auth's own: Ed25519, and RSA on ring.
    MailAuth(Box<DkimKey>),
    /// RSA on aws-lc.
    #[cfg(feature = "aws-lc-rsa")]
    AwsLcRsa(aws_lc_rs::signature::RsaKeyPair),
}

/// Borrows a loaded key for one signature (mail-auth's builder takes its key by value).
struct KeyRef<'a>(&'a PrivateKey);

impl SigningKey for KeyRef<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match self.0 {
            PrivateKey::MailAuth(key) => key.sign(input),
            #[cfg(feature = "aws-lc-rsa")]
            PrivateKey::AwsLcRsa(key) => {
                // What mail-auth's ring RsaKey does, on aws-lc.
                use aws_lc_rs::signature::RSA_PKCS1_SHA256;
                let mut data = Vec::with_capacity(256);
                input.write(&mut data);
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(
                    &RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    &data,
                    &mut signature,
                )
                .map_err(|e| {
                    mail_auth::Error::Crypto(mail_auth::common::crypto::CryptoError::Library(
                        e.to_string(),
                    ))
                })?;
                Ok(signature)
            }
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self.0 {
            PrivateKey::MailAuth(key) => key.algorithm(),
            #[cfg(feature = "aws-lc-rsa")]
            PrivateKey::AwsLcRsa(_) => Algorithm::RsaSha256,
        }
    }
}

/// The DKIM keys of the MTA, by domain. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone, Default)]
pub struct DkimSigner {
    /// Domain (lower case, no trailing dot) → its keys, in spec order.
    keys: Arc<HashMap<String, Vec<Key>>>,
}

impl fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<String> = self
            .keys
            .values()
            .flatten()
            .map(|k| format!("d={} s={} a={}", k.domain, k.selector, k.algo))
            .collect();
        keys.sort();
        f.debug_struct("DkimSigner").field("keys", &keys).finish()
    }
}

impl DkimSigner {
    /// Reads every key file (PEM: PKCS#1 RSA, PKCS#8 RSA, PKCS#8 Ed25519; the kind is
    /// detected). RSA keys under 1024 bits are refused, and so are those ring cannot sign with
    /// (outside 2048..=4096 bits). Several specs for one domain are allowed (e.g. RSA and
    /// Ed25519: the message is signed with both); the same domain and selector twice is not.
    /// Reports every unusable file at once.
    pub fn load(specs: &[DkimKeySpec]) -> Result<DkimSigner, DkimError> {
        let mut keys: HashMap<String, Vec<Key>> = HashMap::new();
        let mut errors = Vec::new();
        for spec in specs {
            let fail = |problem| KeyFileError {
                path: spec.key_file.clone(),
                domain: spec.domain.clone(),
                selector: spec.selector.clone(),
                problem,
            };
            let domain = match normalize_name(&spec.domain) {
                Ok(d) => d,
                Err(why) => {
                    errors.push(fail(KeyProblem::InvalidDomain(spec.domain.clone(), why)));
                    continue;
                }
            };
            let selector = match normalize_name(&spec.selector) {
                Ok(s) => s,
                Err(why) => {
                    errors.push(fail(KeyProblem::InvalidSelector(
                        spec.selector.clone(),
                        why,
                    )));
                    continue;
                }
            };
            if keys
                .get(&domain)
                .is_some_and(|ks| ks.iter().any(|k| k.selector == selector))
            {
                errors.push(fail(KeyProblem::Duplicate(domain, selector)));
                continue;
            }
            match read_key_file(&spec.key_file) {
                Ok((algo, key)) => {
                    debug!(domain = %domain, selector = %selector, algo = %algo,
                        file = %spec.key_file.display(), "DKIM key loaded");
                    keys.entry(domain.clone()).or_default().push(Key {
                        domain,
                        selector,
                        path: spec.key_file.clone(),
                        algo,
                        key,
                    });
                }
                Err(problem) => errors.push(fail(problem)),
            }
        }
        if errors.is_empty() {
            Ok(DkimSigner {
                keys: Arc::new(keys),
            })
        } else {
            Err(DkimError::Keys(errors))
        }
    }

    /// True when there is no key at all (nothing is ever signed).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `(domain, selector, algorithm)` of every key, sorted.
    pub fn keys(&self) -> Vec<(String, String, DkimAlgo)> {
        let mut out: Vec<_> = self
            .keys
            .values()
            .flatten()
            .map(|k| (k.domain.clone(), k.selector.clone(), k.algo))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The domain whose keys sign mail from `domain`: itself or its closest parent domain
    /// that has a key.
    pub fn signing_domain(&self, domain: &str) -> Option<&str> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut candidate = domain.as_str();
        loop {
            if let Some((d, _)) = self.keys.get_key_value(candidate) {
                return Some(d.as_str());
            }
            candidate = candidate.split_once('.')?.1;
        }
    }

    /// Signs a whole message (header fields, blank line, body; CRLF line ends) for the domain
    /// of its From: address, or the closest parent domain that has a key (From:
    /// a@lists.example.com with a key for example.com signs d=example.com), with every key of
    /// that domain. Returns the DKIM-Signature header field(s) to prepend, folded, each ending
    /// in CRLF; an empty string when no key matches, or the message has no From: field, more
    /// than one, or one without a usable address (several addresses must share one domain).
    pub fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        if self.is_empty() {
            return Ok(String::new());
        }
        let fields = HeaderFields::scan(message);
        let from_domain = match fields.author_domain() {
            Ok(d) => d,
            Err(why) => {
                debug!(reason = why, "DKIM: not signed");
                return Ok(String::new());
            }
        };
        let Some(domain) = self.signing_domain(&from_domain) else {
            debug!(from_domain = %from_domain, "DKIM: no key for the From: domain");
            return Ok(String::new());
        };
        let keys = self.keys.get(domain).map(Vec::as_slice).unwrap_or_default();
        let list = header_list(&fields);
        let mut out = String::new();
        for k in keys {
            let signature = mail_auth::dkim::DkimSigner::from_key(KeyRef(&k.key))
                .domain(k.domain.as_str())
                .selector(k.selector.as_str())
                .headers(list.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .sign(message)
                .map_err(|e| DkimError::Sign {
                    domain: k.domain.clone(),
                    selector: k.selector.clone(),
                    path: k.path.clone(),
                    reason: e.to_string(),
                })?;
            out.push_str(&signature.to_header());
            debug!(d = %k.domain, s = %k.selector, a = %k.algo, "DKIM: signed");
        }
        Ok(out)
    }
}

/// The header fields of a message that decide what is signed.
struct HeaderFields<'a> {
    /// Lower-case name → occurrences.
    counts: HashMap<String, usize>,
    /// The value of each From: field.
    from: Vec<&'a [u8]>,
}

impl<'a> HeaderFields<'a> {
    fn scan(message: &'a [u8]) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut from = Vec::new();
        for (name, value) in header_fields(message) {
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            if name == "from" {
                from.push(value);
            }
            *counts.entry(name).or_default() += 1;
        }
        HeaderFields { counts, from }
    }

    fn count(&self, name: &str) -> usize {
        self.counts
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// The domain of the From: address, lower case without a trailing dot.
    fn author_domain(&self) -> Result<String, &'static str> {
        let value = match self.from.as_slice() {
            [] => return Err("no From: field"),
            [one] => *one,
            _ => return Err("more than one From: field"),
        };
        let mut domains = Vec::new();
        let mut add = |addr: Option<&str>| {
            if let Some(addr) = addr
                && let Some((_, domain)) = addr.rsplit_once('@')
            {
                domains.push(domain.trim_end_matches('.').to_ascii_lowercase());
            }
        };
        match MessageStream::new(value).parse_address() {
            HeaderValue::Address(Address::List(list)) => {
                list.iter().for_each(|a| add(a.address.as_deref()));
            }
            HeaderValue::Address(Address::Group(groups)) => groups
                .iter()
                .flat_map(|g| g.addresses.iter())
                .for_each(|a| add(a.address.as_deref())),
            _ => {}
        }
        let Some(first) = domains.first() else {
            return Err("no address in From:");
        };
        if first.is_empty() {
            return Err("no domain in the From: address");
        }
        if domains.iter().any(|d| d != first) {
            return Err("From: addresses of different domains");
        }
        Ok(first.clone())
    }
}

/// The header fields of a message as (name, value), split exactly as mail-auth's signer splits
/// them (a port of its private `HeaderIterator`), so that what is counted here is what it
/// matches: a field ends at a line end not followed by SP or HT; the header ends at an empty
/// line or at a line without a colon that ends in CRLF; a last field without a line end is
/// not a field.
fn header_fields(message: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut fields = Vec::new();
    let mut start = 0;
    'fields: loop {
        let mut cur = start;
        loop {
            let Some(rest) = message.get(cur..) else {
                break 'fields;
            };
            let Some(offset) = rest.iter().position(|&b| b == b':' || b == b'\n') else {
                break 'fields;
            };
            let pos = cur + offset;
            if message[pos] == b':' {
                let mut vcur = pos + 1;
                loop {
                    let Some(off) = message
                        .get(vcur..)
                        .and_then(|r| r.iter().position(|&b| b == b'\n'))
                    else {
                        break 'fields;
                    };
                    let nl = vcur + off;
                    if matches!(message.get(nl + 1), Some(b' ' | b'\t')) {
                        vcur = nl + 1;
                    } else {
                        fields.push((&message[start..pos], &message[pos + 1..nl + 1]));
                        start = nl + 1;
                        continue 'fields;
                    }
                }
            }
            if (pos > cur && message[pos - 1] == b'\r') || pos == start {
                break 'fields;
            }
            if matches!(message.get(pos + 1), Some(b' ' | b'\t')) {
                cur = pos + 1;
            } else {
                fields.push((&message[start..pos + 1], &[][..]));
                start = pos + 1;
                continue 'fields;
            }
        }
    }
    fields
}

/// The list for mail-auth's `headers()` that gives the `h=` policy of the module docs.
fn header_list(fields: &HeaderFields<'_>) -> Vec<&'static str> {
    let mut list = Vec::with_capacity(OVERSIGNED_HEADERS.len() * 2 + SIGNED_HEADERS.len());
    for &name in OVERSIGNED_HEADERS {
        list.push(name);
        if fields.count(name) > 0 {
            // Present: the second entry is never matched, so it is appended once as absent.
            list.push(name);
        }
    }
    list.extend(
        SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|name| fields.count(name) > 0),
    );
    list
}

/// Lower-cases and checks a domain or selector: dot-separated LDH labels (ASCII; IDNs in
/// their A-label form), no trailing dot kept.
fn normalize_name(name: &str) -> Result<String, &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-' and '_' (IDNs as xn-- A-labels)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with '-'");
        }
    }
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// Key files

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

fn read_key_file(path: &Path) -> Result<(DkimAlgo, PrivateKey), KeyProblem> {
    let file = File::open(path).map_err(KeyProblem::Read)?;
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "DKIM key file is readable by group or others; make it 0600");
    }
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(KeyProblem::Read)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(KeyProblem::TooLarge);
    }
    parse_key_pem(&bytes)
}

/// Parses a PEM private key of a kind the signer takes.
fn parse_key_pem(pem: &[u8]) -> Result<(DkimAlgo, PrivateKey), KeyProblem> {
    let (label, der) = decode_pem(pem)?;
    match label.as_str() {
        "RSA PRIVATE KEY" => rsa_key(&der, &der, false),
        "PRIVATE KEY" => {
            let (oid, private) = pkcs8_algorithm(&der).ok_or(KeyProblem::Malformed("PKCS#8"))?;
            if oid == OID_RSA {
                rsa_key(&der, private, true)
            } else if oid == OID_ED25519 {
                let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(&der)
                    .map_err(|e| KeyProblem::Rejected(e.to_string()))?;
                Ok((
                    DkimAlgo::Ed25519,
                    PrivateKey::MailAuth(Box::new(DkimKey::Ed25519(key))),
                ))
            } else {
                Err(KeyProblem::UnsupportedAlgorithm(oid_to_string(oid)))
            }
        }
        "ENCRYPTED PRIVATE KEY" => Err(KeyProblem::Encrypted),
        _ => Err(KeyProblem::UnsupportedPem(label)),
    }
}

/// An RSA key from its PKCS#1 or PKCS#8 DER; `pkcs1` is the RSAPrivateKey structure (inside
/// the PKCS#8 one for PKCS#8), read for the modulus size.
fn rsa_key(der: &[u8], pkcs1: &[u8], pkcs8: bool) -> Result<(DkimAlgo, PrivateKey), KeyProblem> {
    let bits = rsa_modulus_bits(pkcs1).ok_or(KeyProblem::Malformed("RSA"))?;
    if bits < RSA_MIN_BITS {
        return Err(KeyProblem::RsaTooSmall(bits));
    }
    if !(RSA_SIGNER_MIN_BITS..=RSA_SIGNER_MAX_BITS).contains(&bits) {
        return Err(KeyProblem::RsaSizeUnsupported(bits));
    }
    #[cfg(feature = "aws-lc-rsa")]
    {
        use aws_lc_rs::signature::RsaKeyPair;
        let key = if pkcs8 {
            RsaKeyPair::from_pkcs8(der)
        } else {
            RsaKeyPair::from_der(der)
        }
        .map_err(|e| KeyProblem::Rejected(e.to_string()))?;
        Ok((DkimAlgo::Rsa, PrivateKey::AwsLcRsa(key)))
    }
    #[cfg(not(feature = "aws-lc-rsa"))]
    {
        let der = if pkcs8 {
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))
        } else {
            PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der))
        };
        let key =
            RsaKey::<Sha256>::from_key_der(der).map_err(|e| KeyProblem::Rejected(e.to_string()))?;
        Ok((
            DkimAlgo::Rsa,
            PrivateKey::MailAuth(Box::new(DkimKey::Rsa(key))),
        ))
    }
}

/// The first PEM block: its label and decoded contents.
fn decode_pem(pem: &[u8]) -> Result<(String, Vec<u8>), KeyProblem> {
    let text = std::str::from_utf8(pem).map_err(|_| KeyProblem::NotPem)?;
    let mut lines = text.lines().map(str::trim);
    let label = lines
        .by_ref()
        .find_map(|l| {
            l.strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
        })
        .ok_or(KeyProblem::NotPem)?
        .to_string();
    let end = format!("-----END {label}-----");
    let mut b64 = String::new();
    let mut terminated = false;
    for line in lines {
        if line == end {
            terminated = true;
            break;
        }
        if line.contains(':') {
            // RFC 1421 headers: "Proc-Type: 4,ENCRYPTED", "DEK-Info: ...".
            return Err(KeyProblem::Encrypted);
        }
        b64.push_str(line);
    }
    if !terminated {
        return Err(KeyProblem::Unterminated(label));
    }
    let der = BASE64.decode(b64).map_err(|_| KeyProblem::BadBase64)?;
    if der.is_empty() {
        return Err(KeyProblem::BadBase64);
    }
    Ok((label, der))
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// PKCS#8 PrivateKeyInfo → (algorithm OID contents, privateKey OCTET STRING contents).
fn pkcs8_algorithm(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (0x30, info, _) = der_tlv(der)? else {
        return None;
    };
    let (0x02, _version, rest) = der_tlv(info)? else {
        return None;
    };
    let (0x30, alg, rest) = der_tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_tlv(alg)? else {
        return None;
    };
    let (0x04, private, _) = der_tlv(rest)? else {
        return None;
    };
    Some((oid, private))
}

/// Bit length of the modulus of a PKCS#1 RSAPrivateKey.
fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    let (0x30, seq, _) = der_tlv(der)? else {
        return None;
    };
    let (0x02, _version, rest) = der_tlv(seq)? else {
        return None;
    };
    let (0x02, modulus, _) = der_tlv(rest)? else {
        return None;
    };
    let start = modulus.iter().position(|&b| b != 0)?;
    let top = modulus[start];
    Some((modulus.len() - start - 1) * 8 + (8 - top.leading_zeros() as usize))
}

/// Dotted form of a DER OID, for messages.
fn oid_to_string(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &b in oid {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

// ---------------------------------------------------------------------------------------------
// Key generation

/// Generates a key (RSA of `bits` bits, 2048 to 4096, [`RSA_DEFAULT_BITS`] the usual choice;
/// Ed25519, where `bits` is ignored), writes it to `out` as PKCS#8 PEM (`BEGIN PRIVATE KEY`),
/// mode 0600, refusing to overwrite an existing file, and returns the DNS record to publish as
/// a zone-file line, without a line end:
/// `<selector>._domainkey.<domain>. IN TXT ( "v=DKIM1; k=rsa; p=..." )`, the TXT data split
/// into strings of at most 255 bytes.
pub fn keygen(
    algo: DkimAlgo,
    bits: usize,
    domain: &str,
    selector: &str,
    out: &Path,
) -> Result<String, DkimError> {
    let domain =
        normalize_name(domain).map_err(|why| DkimError::InvalidDomain(domain.into(), why))?;
    let selector =
        normalize_name(selector).map_err(|why| DkimError::InvalidSelector(selector.into(), why))?;
    if algo == DkimAlgo::Rsa && !(RSA_SIGNER_MIN_BITS..=RSA_SIGNER_MAX_BITS).contains(&bits) {
        return Err(DkimError::InvalidBits(bits));
    }
    if out.symlink_metadata().is_ok() {
        return Err(DkimError::Exists {
            path: out.to_path_buf(),
        });
    }
    let (pkcs8, public) = match algo {
        DkimAlgo::Rsa => generate_rsa(bits)?,
        DkimAlgo::Ed25519 => generate_ed25519()?,
    };
    let pem = pem_encode("PRIVATE KEY", &pkcs8);
    // The key must load into the signer before it is written.
    match parse_key_pem(pem.as_bytes()) {
        Ok((a, _)) if a == algo => {}
        Ok(_) => return Err(DkimError::Keygen("generated key of the wrong kind".into())),
        Err(e) => return Err(DkimError::Keygen(format!("generated key unusable: {e}"))),
    }
    write_new_file(out, pem.as_bytes())?;
    Ok(dns_txt_record(
        &domain,
        &selector,
        &format!(
            "v=DKIM1; k={}; p={}",
            algo.dns_name(),
            BASE64.encode(public)
        ),
    ))
}

/// The public half of a private key file's key, as DKIM publishes it: the key type and the
/// `p=` value (base64 of the SubjectPublicKeyInfo for RSA, of the raw 32 bytes for Ed25519,
/// RFC 8463). `ringmail deploy check` compares it with the topology and the DNS.
pub fn public_key_of_pem(pem: &[u8]) -> Result<(DkimAlgo, String), KeyProblem> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let rsa_public = |key: rsa::RsaPrivateKey| {
        key.to_public_key()
            .to_public_key_der()
            .map(|d| (DkimAlgo::Rsa, BASE64.encode(d.as_bytes())))
            .map_err(|_| KeyProblem::Malformed("RSA"))
    };
    let (label, der) = decode_pem(pem)?;
    match label.as_str() {
        "RSA PRIVATE KEY" => rsa_public(
            rsa::RsaPrivateKey::from_pkcs1_der(&der).map_err(|_| KeyProblem::Malformed("RSA"))?,
        ),
        "PRIVATE KEY" => {
            let (oid, _) = pkcs8_algorithm(&der).ok_or(KeyProblem::Malformed("PKCS#8"))?;
            if oid == OID_RSA {
                rsa_public(
                    rsa::RsaPrivateKey::from_pkcs8_der(&der)
                        .map_err(|_| KeyProblem::Malformed("RSA"))?,
                )
            } else if oid == OID_ED25519 {
                use ring::signature::{Ed25519KeyPair, KeyPair};
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                    .map_err(|e| KeyProblem::Rejected(e.to_string()))?;
                Ok((DkimAlgo::Ed25519, BASE64.encode(pair.public_key().as_ref())))
            } else {
                Err(KeyProblem::UnsupportedAlgorithm(oid_to_string(oid)))
            }
        }
        "ENCRYPTED PRIVATE KEY" => Err(KeyProblem::Encrypted),
        _ => Err(KeyProblem::UnsupportedPem(label)),
    }
}

/// `<selector>._domainkey.<domain>. IN TXT ( "…" "…" )`: `data` in strings of at most 255
/// bytes (it is ASCII: tags and base64).
pub fn dns_txt_record(domain: &str, selector: &str, data: &str) -> String {
    let strings: Vec<String> = data
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        strings.join(" ")
    )
}

/// (PKCS#8 DER, SubjectPublicKeyInfo DER).
fn generate_rsa(bits: usize) -> Result<(Vec<u8>, Vec<u8>), DkimError> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits)
        .map_err(|e| DkimError::Keygen(format!("RSA: {e}")))?;
    let pkcs8 = key
        .to_pkcs8_der()
        .map_err(|e| DkimError::Keygen(format!("RSA PKCS#8: {e}")))?;
    let public = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| DkimError::Keygen(format!("RSA public key: {e}")))?;
    Ok((pkcs8.as_bytes().to_vec(), public.as_bytes().to_vec()))
}

/// (PKCS#8 DER, raw 32-byte public key, as RFC 8463 publishes it).
fn generate_ed25519() -> Result<(Vec<u8>, Vec<u8>), DkimError> {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| DkimError::Keygen("Ed25519: no randomness".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| DkimError::Keygen(format!("Ed25519: {e}")))?;
    Ok((pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// Creates `path` (mode 0600; never an existing file or symlink) and writes `data`; removes
/// the file again if writing fails.
fn write_new_file(path: &Path, data: &[u8]) -> Result<(), DkimError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => DkimError::Exists {
                path: path.to_path_buf(),
            },
            _ => DkimError::Write {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    // The umask cannot widen 0600, but make sure whatever created the file.
    let result = file
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(data))
        .and_then(|()| file.sync_all());
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(DkimError::Write {
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::EncodePrivateKey;

    fn spec(domain: &str, selector: &str, key_file: &Path) -> DkimKeySpec {
        DkimKeySpec {
            domain: domain.into(),
            selector: selector.into(),
            key_file: key_file.to_path_buf(),
        }
    }

    /// A signer with an RSA and an Ed25519 key for example.com, and its directory.
    fn both() -> (tempfile::TempDir, DkimSigner) {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("rsa.key");
        let e = dir.path().join("ed.key");
        keygen(DkimAlgo::Rsa, 2048, "example.com", "r1", &r).unwrap();
        keygen(DkimAlgo::Ed25519, 0, "example.com", "e1", &e).unwrap();
        let s = DkimSigner::load(&[spec("example.com", "r1", &r), spec("example.com", "e1", &e)])
            .unwrap();
        (dir, s)
    }

    /// An Ed25519 signer for `domain`.
    fn ed(domain: &str) -> (tempfile::TempDir, DkimSigner) {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("ed.key");
        keygen(DkimAlgo::Ed25519, 0, domain, "e1", &e).unwrap();
        let s = DkimSigner::load(&[spec(domain, "e1", &e)]).unwrap();
        (dir, s)
    }

    /// The tag values of each signature: unfolded, whitespace removed.
    fn tags(headers: &str) -> Vec<HashMap<String, String>> {
        headers
            .split("DKIM-Signature:")
            .filter(|h| !h.trim().is_empty())
            .map(|h| {
                let flat: String = h.chars().filter(|c| !c.is_whitespace()).collect();
                flat.split(';')
                    .filter_map(|t| t.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    fn h_count(tags: &HashMap<String, String>, name: &str) -> usize {
        tags["h"]
            .split(':')
            .filter(|h| h.eq_ignore_ascii_case(name))
            .count()
    }

    const MSG: &[u8] = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n\
Subject: hello\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\
\r\nHello Bob.\r\n";

    #[test]
    fn public_key_of_a_key_file_is_what_keygen_published() {
        let dir = tempfile::tempdir().unwrap();
        for (algo, bits, name) in [
            (DkimAlgo::Rsa, 2048, "r.key"),
            (DkimAlgo::Ed25519, 0, "e.key"),
        ] {
            let path = dir.path().join(name);
            let record = keygen(algo, bits, "example.com", "s1", &path).unwrap();
            let published: String = record.split('"').skip(1).step_by(2).collect::<String>();
            let (got_algo, p) = public_key_of_pem(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(got_algo, algo);
            assert!(published.ends_with(&format!("p={p}")), "{published} vs {p}");
        }
        assert!(public_key_of_pem(b"not a key").is_err());
    }

    #[test]
    fn signer_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<DkimSigner>();
    }

    #[test]
    fn signs_with_every_key_of_the_domain() {
        let (_dir, s) = both();
        assert!(!s.is_empty());
        let out = s.sign(MSG).unwrap();
        assert_eq!(out.matches("DKIM-Signature: ").count(), 2, "{out}");
        assert!(out.ends_with("\r\n"));
        // Folded: every line ends in CRLF, continuation lines start with a tab, lines stay
        // short (mail-auth folds near 76 columns; RFC 5322's hard limit is 998).
        for line in out.split_terminator("\r\n") {
            assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
            assert!(line.starts_with("DKIM-Signature: ") || line.starts_with('\t'));
            assert!(line.len() <= 100, "{line:?}");
        }
        let sigs = tags(&out);
        let algos: Vec<&str> = sigs.iter().map(|t| t["a"].as_str()).collect();
        assert_eq!(algos, ["rsa-sha256", "ed25519-sha256"]);
        for t in &sigs {
            assert_eq!(t["v"], "1");
            assert_eq!(t["d"], "example.com");
            assert_eq!(t["c"], "relaxed/relaxed");
            assert!(t["t"].parse::<u64>().unwrap() > 1_700_000_000);
            assert!(!t.contains_key("l") && !t.contains_key("x"));
            assert!(!t["bh"].is_empty() && !t["b"].is_empty());
        }
        assert_eq!(sigs[0]["s"], "r1");
        assert_eq!(sigs[1]["s"], "e1");
    }

    #[test]
    fn header_list_oversigns_from_and_signs_present_fields() {
        let (_dir, s) = ed("example.com");
        let t = &tags(&s.sign(MSG).unwrap())[0];
        // Present once, listed twice: a second From cannot be added.
        assert_eq!(h_count(t, "from"), 2);
        assert_eq!(h_count(t, "to"), 2);
        assert_eq!(h_count(t, "subject"), 2);
        // Absent over-signed fields: listed once (cannot be added).
        assert_eq!(h_count(t, "reply-to"), 1);
        assert_eq!(h_count(t, "cc"), 1);
        // Present ordinary fields once; absent ordinary fields not at all.
        assert_eq!(h_count(t, "date"), 1);
        assert_eq!(h_count(t, "message-id"), 1);
        assert_eq!(h_count(t, "list-id"), 0);
        assert_eq!(h_count(t, "mime-version"), 0);
        assert_eq!(h_count(t, "received"), 0);

        // Each occurrence signed, plus one for an over-signed field; case-insensitive names.
        let msg = b"FROM: a@example.com\r\nto: x@example.org\r\nTo: y@example.org\r\n\
List-Unsubscribe: <mailto:u@example.com>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\
Received: from x\r\nReceived: from y\r\n\r\nbody\r\n";
        let t = &tags(&s.sign(msg).unwrap())[0];
        assert_eq!(h_count(t, "from"), 2);
        assert_eq!(h_count(t, "to"), 3);
        assert_eq!(h_count(t, "list-unsubscribe"), 1);
        assert_eq!(h_count(t, "list-unsubscribe-post"), 1);
        assert_eq!(h_count(t, "received"), 0);
    }

    #[test]
    fn closest_parent_domain_signs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.key");
        let b = dir.path().join("b.key");
        keygen(DkimAlgo::Ed25519, 0, "example.com", "s", &a).unwrap();
        keygen(DkimAlgo::Ed25519, 0, "sub.example.com", "s", &b).unwrap();
        let s = DkimSigner::load(&[
            spec("Example.COM.", "s", &a),
            spec("sub.example.com", "s", &b),
        ])
        .unwrap();
        let d = |from: &str| -> Option<String> {
            let msg = format!("From: {from}\r\nSubject: x\r\n\r\nbody\r\n");
            let out = s.sign(msg.as_bytes()).unwrap();
            tags(&out).first().map(|t| t["d"].clone())
        };
        assert_eq!(d("a@example.com").as_deref(), Some("example.com"));
        assert_eq!(d("a@lists.example.com").as_deref(), Some("example.com"));
        assert_eq!(d("a@x.y.example.com").as_deref(), Some("example.com"));
        assert_eq!(d("a@sub.example.com").as_deref(), Some("sub.example.com"));
        assert_eq!(
            d("a@deep.sub.example.com").as_deref(),
            Some("sub.example.com")
        );
        assert_eq!(d("\"A\" <A@EXAMPLE.COM.>").as_deref(), Some("example.com"));
        // Not a label boundary, or another domain: no key.
        assert_eq!(d("a@notexample.com"), None);
        assert_eq!(d("a@example.com.evil.org"), None);
        assert_eq!(d("a@com"), None);
        assert_eq!(s.signing_domain("x.example.com"), Some("example.com"));
        assert_eq!(s.signing_domain("example.org"), None);
    }

    #[test]
    fn hostile_messages_are_left_unsigned() {
        let (_dir, s) = ed("example.com");
        for msg in [
            // No From.
            &b"To: b@example.org\r\nSubject: x\r\n\r\nbody\r\n"[..],
            // Two From fields.
            b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n",
            b"From: a@example.com\r\nSubject: x\r\nfrom: evil@example.org\r\n\r\nbody\r\n",
            // From without an address, with an empty domain, garbage.
            b"From: undisclosed\r\n\r\nbody\r\n",
            b"From: <>\r\n\r\nbody\r\n",
            b"From: a@\r\n\r\nbody\r\n",
            b"From: \xff\xfe\x00@@@\r\n\r\nbody\r\n",
            // Several addresses of different domains.
            b"From: a@example.com, b@example.org\r\n\r\nbody\r\n",
            // The From field is in the body, not the header.
            b"Subject: x\r\n\r\nFrom: a@example.com\r\n",
            // The last line has no line end: not a field to mail-auth's signer either.
            b"Subject: x\r\nFrom: a@example.com",
            // Empty and binary input.
            b"",
            b"\r\n\r\n",
            b"\x00\x01\x02:\n\n",
        ] {
            assert_eq!(
                s.sign(msg).unwrap(),
                "",
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
        // Several addresses of one domain, a group: signed.
        for msg in [
            &b"From: a@example.com, B <b@Example.com>\r\nSender: a@example.com\r\n\r\nx\r\n"[..],
            b"From: team: a@example.com, b@example.com;\r\n\r\nx\r\n",
            b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com> (comment)\r\n\r\nx\r\n",
            b"From:\r\n\tfolded <f@example.com>\r\n\r\nx\r\n",
        ] {
            let out = s.sign(msg).unwrap();
            assert_eq!(tags(&out).len(), 1, "{:?}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn header_only_and_empty_body_messages_are_signed() {
        let (_dir, s) = ed("example.com");
        for msg in [
            &b"From: a@example.com\r\nSubject: x\r\n"[..],
            b"From: a@example.com\r\nSubject: x\r\n\r\n",
        ] {
            let t = &tags(&s.sign(msg).unwrap())[0];
            // The relaxed hash of an empty body is the SHA-256 of nothing.
            assert_eq!(t["bh"], "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
        }
    }

    #[test]
    fn no_keys_signs_nothing() {
        let s = DkimSigner::load(&[]).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.sign(MSG).unwrap(), "");
        let (_dir, s) = ed("example.org");
        assert_eq!(s.sign(MSG).unwrap(), "");
    }

    #[test]
    fn header_fields_split_like_mail_auth() {
        let f = header_fields(b"A: 1\r\nB:\r\n 2\r\n\tx\r\nC: 3\r\n\r\nD: body\r\n");
        let names: Vec<&[u8]> = f.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [&b"A"[..], b"B", b"C"]);
        assert_eq!(f[1].1, b"\r\n 2\r\n\tx\r\n");
        // A line without a colon ending in CRLF ends the header.
        let f = header_fields(b"A: 1\r\ngarbage\r\nB: 2\r\n\r\n");
        assert_eq!(f.len(), 1);
        // Bare LF lines work; a last field without a line end is not one.
        assert_eq!(header_fields(b"A: 1\nB: 2\n\nbody").len(), 2);
        assert_eq!(header_fields(b"A: 1\r\nB: 2").len(), 1);
        assert!(header_fields(b"").is_empty());
    }

    /// Writes `text` to `dir/name`.
    fn put(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn rsa_pkcs1_pem(bits: usize) -> String {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap();
        pem_encode("RSA PRIVATE KEY", key.to_pkcs1_der().unwrap().as_bytes())
    }

    fn rsa_pkcs8_pem(bits: usize) -> String {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap();
        pem_encode("PRIVATE KEY", key.to_pkcs8_der().unwrap().as_bytes())
    }

    #[test]
    fn key_formats_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pkcs1 = put(d, "pkcs1.pem", rsa_pkcs1_pem(2048).as_bytes());
        let pkcs8 = put(d, "pkcs8.pem", rsa_pkcs8_pem(3072).as_bytes());
        // Ed25519 PKCS#8 v1 (no public key, as openssl writes it): seed only.
        let v1 = {
            let mut der = vec![
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            der.extend_from_slice(&[7u8; 32]);
            put(d, "ed-v1.pem", pem_encode("PRIVATE KEY", &der).as_bytes())
        };
        let ed = d.join("ed-v2.pem");
        keygen(DkimAlgo::Ed25519, 0, "example.com", "x", &ed).unwrap();
        // Surrounding text and CRLF line ends are fine.
        let noisy = {
            let mut t = String::from("Key for example.com\r\n");
            t.push_str(&rsa_pkcs1_pem(2048).replace('\n', "\r\n"));
            t.push_str("trailer\r\n");
            put(d, "noisy.pem", t.as_bytes())
        };
        let s = DkimSigner::load(&[
            spec("a.example", "pkcs1", &pkcs1),
            spec("a.example", "pkcs8", &pkcs8),
            spec("a.example", "v1", &v1),
            spec("a.example", "v2", &ed),
            spec("a.example", "noisy", &noisy),
        ])
        .unwrap();
        let kinds: Vec<(String, DkimAlgo)> =
            s.keys().into_iter().map(|(_, sel, a)| (sel, a)).collect();
        assert_eq!(
            kinds,
            [
                ("noisy".into(), DkimAlgo::Rsa),
                ("pkcs1".into(), DkimAlgo::Rsa),
                ("pkcs8".into(), DkimAlgo::Rsa),
                ("v1".into(), DkimAlgo::Ed25519),
                ("v2".into(), DkimAlgo::Ed25519),
            ]
        );
        let out = s.sign(b"From: x@a.example\r\n\r\nbody\r\n").unwrap();
        assert_eq!(tags(&out).len(), 5);
    }

    #[test]
    fn bad_key_files_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = d.join("good.key");
        keygen(DkimAlgo::Ed25519, 0, "example.com", "good", &good).unwrap();
        let ec = {
            let rng = ring::rand::SystemRandom::new();
            let der = ring::signature::EcdsaKeyPair::generate_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &rng,
            )
            .unwrap();
            put(
                d,
                "ec.pem",
                pem_encode("PRIVATE KEY", der.as_ref()).as_bytes(),
            )
        };
        let pkcs1 = rsa_pkcs1_pem(2048);
        let truncated = {
            let (label, der) = decode_pem(pkcs1.as_bytes()).unwrap();
            pem_encode(&label, &der[..der.len() / 2])
        };
        type Check = fn(&KeyProblem) -> bool;
        let cases: Vec<(DkimKeySpec, Check)> = vec![
            (spec("example.com", "missing", &d.join("nope.key")), |p| {
                matches!(p, KeyProblem::Read(_))
            }),
            (spec("example.com", "dir", d), |p| matches!(p, KeyProblem::Read(_))),
            (spec("example.com", "empty", &put(d, "empty", b"")), |p| {
                matches!(p, KeyProblem::NotPem)
            }),
            (
                spec("example.com", "text", &put(d, "text", b"hello world\n")),
                |p| matches!(p, KeyProblem::NotPem),
            ),
            (
                spec("example.com", "binary", &put(d, "binary", &[0x30, 0x82, 0xff, 0x00])),
                |p| matches!(p, KeyProblem::NotPem),
            ),
            (
                spec(
                    "example.com",
                    "big",
                    &put(d, "big", &vec![b'A'; MAX_KEY_FILE as usize + 10]),
                ),
                |p| matches!(p, KeyProblem::TooLarge),
            ),
            (
                spec(
                    "example.com",
                    "b64",
                    &put(d, "b64", b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n"),
                ),
                |p| matches!(p, KeyProblem::BadBase64),
            ),
            (
                spec(
                    "example.com",
                    "unterminated",
                    &put(d, "unterminated", b"-----BEGIN PRIVATE KEY-----\nMIIB\n"),
                ),
                |p| matches!(p, KeyProblem::Unterminated(_)),
            ),
            (
                spec(
                    "example.com",
                    "legacy-enc",
                    &put(
                        d,
                        "legacy-enc",
                        b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
DEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
                    ),
                ),
                |p| matches!(p, KeyProblem::Encrypted),
            ),
            (
                spec(
                    "example.com",
                    "pkcs8-enc",
                    &put(
                        d,
                        "pkcs8-enc",
                        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n",
                    ),
                ),
                |p| matches!(p, KeyProblem::Encrypted),
            ),
            (
                spec(
                    "example.com",
                    "public",
                    &put(d, "public", b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n"),
                ),
                |p| matches!(p, KeyProblem::UnsupportedPem(l) if l == "PUBLIC KEY"),
            ),
            (spec("example.com", "ec", &ec), |p| {
                matches!(p, KeyProblem::UnsupportedAlgorithm(oid) if oid == "1.2.840.10045.2.1")
            }),
            (
                spec("example.com", "truncated", &put(d, "truncated", truncated.as_bytes())),
                |p| matches!(p, KeyProblem::Malformed(_)),
            ),
            (
                spec(
                    "example.com",
                    "garbage-der",
                    &put(d, "garbage-der", pem_encode("PRIVATE KEY", b"\x30\x03\x02\x01\x00").as_bytes()),
                ),
                |p| matches!(p, KeyProblem::Malformed(_)),
            ),
            (
                spec("example.com", "rsa512", &put(d, "rsa512", rsa_pkcs1_pem(512).as_bytes())),
                |p| matches!(p, KeyProblem::RsaTooSmall(512)),
            ),
            (
                spec("example.com", "rsa1024", &put(d, "rsa1024", rsa_pkcs8_pem(1024).as_bytes())),
                |p| matches!(p, KeyProblem::RsaSizeUnsupported(1024)),
            ),
            (spec("example com", "s", &good), |p| {
                matches!(p, KeyProblem::InvalidDomain(..))
            }),
            (spec("example.com", "", &good), |p| {
                matches!(p, KeyProblem::InvalidSelector(..))
            }),
            (spec("example.com", "good", &good), |p| {
                matches!(p, KeyProblem::Duplicate(..))
            }),
        ];
        let mut specs = vec![spec("example.com", "good", &good)];
        specs.extend(cases.iter().map(|(s, _)| s.clone()));
        let Err(DkimError::Keys(errors)) = DkimSigner::load(&specs) else {
            panic!("bad keys accepted");
        };
        assert_eq!(errors.len(), cases.len(), "{errors:#?}");
        for (e, (spec, check)) in errors.iter().zip(&cases) {
            assert_eq!(e.path, spec.key_file);
            assert_eq!(e.selector, spec.selector);
            assert!(check(&e.problem), "{}: {:?}", spec.selector, e.problem);
        }
        // One message names every file, and holds no key material.
        let message = DkimError::Keys(errors).to_string();
        assert!(message.starts_with(&format!("{} unusable DKIM keys", cases.len())));
        for (spec, _) in &cases {
            assert!(message.contains(&spec.key_file.display().to_string()));
        }
        assert!(!message.contains("MII"), "{message}");
    }

    #[test]
    fn keygen_writes_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        let rec = keygen(DkimAlgo::Rsa, 2048, "Example.com", "Sel", &p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&p).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(matches!(
            keygen(DkimAlgo::Ed25519, 0, "example.com", "sel", &p),
            Err(DkimError::Exists { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), pem, "file changed");
        // A dangling symlink is not followed.
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        assert!(matches!(
            keygen(DkimAlgo::Ed25519, 0, "example.com", "sel", &link),
            Err(DkimError::Exists { .. })
        ));
        assert!(!dir.path().join("target").exists());

        // The record: name, quoted strings of at most 255 bytes, the whole data.
        let rest = rec
            .strip_prefix("sel._domainkey.example.com. IN TXT ( ")
            .unwrap();
        let rest = rest.strip_suffix(" )").unwrap();
        let strings: Vec<&str> = rest.split("\" \"").map(|s| s.trim_matches('"')).collect();
        assert_eq!(strings.len(), 2, "{rec}");
        assert!(strings.iter().all(|s| s.len() <= 255 && !s.contains('"')));
        let data = strings.concat();
        assert!(data.starts_with("v=DKIM1; k=rsa; p=MII"), "{data}");
        let p = data.split_once("p=").unwrap().1;
        assert!(BASE64.decode(p).is_ok());

        let e = dir.path().join("e.key");
        let rec = keygen(DkimAlgo::Ed25519, 0, "example.com", "e", &e).unwrap();
        let data = rec
            .strip_prefix("e._domainkey.example.com. IN TXT ( \"")
            .and_then(|r| r.strip_suffix("\" )"))
            .unwrap();
        let p = data.strip_prefix("v=DKIM1; k=ed25519; p=").unwrap();
        assert_eq!(BASE64.decode(p).unwrap().len(), 32);
    }

    #[test]
    fn keygen_refuses_bad_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        for bits in [0, 512, 1024, 2047, 4097, 8192] {
            assert!(matches!(
                keygen(DkimAlgo::Rsa, bits, "example.com", "s", &p),
                Err(DkimError::InvalidBits(b)) if b == bits
            ));
        }
        assert!(matches!(
            keygen(DkimAlgo::Ed25519, 0, "exa mple.com", "s", &p),
            Err(DkimError::InvalidDomain(..))
        ));
        assert!(matches!(
            keygen(DkimAlgo::Ed25519, 0, "example.com", "a..b", &p),
            Err(DkimError::InvalidSelector(..))
        ));
        assert!(matches!(
            keygen(
                DkimAlgo::Ed25519,
                0,
                "example.com",
                "s",
                &dir.path().join("no/such/dir/k")
            ),
            Err(DkimError::Write { .. })
        ));
        assert!(!p.exists());
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(normalize_name("Example.COM.").unwrap(), "example.com");
        assert_eq!(
            normalize_name("xn--bcher-kva.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(normalize_name("2024_q1").unwrap(), "2024_q1");
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "bücher.example",
            "a b",
            "a;b",
            &"a".repeat(64),
        ] {
            assert!(normalize_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let (_dir, s) = both();
        let dbg = format!("{s:?}");
        assert!(dbg.contains("d=example.com s=r1 a=rsa-sha256"), "{dbg}");
        assert!(dbg.len() < 200, "{dbg}");
    }

    #[test]
    fn oid_names() {
        assert_eq!(oid_to_string(OID_RSA), "1.2.840.113549.1.1.1");
        assert_eq!(oid_to_string(OID_ED25519), "1.3.101.112");
    }
}
