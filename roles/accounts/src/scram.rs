//! SCRAM-SHA-256 (RFC 5802, RFC 7677): Dovecot's stored secret and an I/O-free server.
//!
//! ```text
//!   stored:  {SCRAM-SHA-256}<iterations>,<salt b64>,<StoredKey b64>,<ServerKey b64>   (Dovecot 2.3)
//!
//!   client                                  ScramServer (no I/O)            driver
//!   n,,n=user,r=cnonce  ──client_first()──▶ parse ─▶ ClientFirst{username} ─▶ look up the secret
//!                                                                            (or ScramSecret::fake)
//!   r=cnonce+snonce,s=salt,i=4096  ◀──────── server_first(secret) ◀──────────┘
//!   c=biws,r=…,p=proof ──client_final()───▶ check proof (constant time)
//!   v=ServerSignature  ◀──────────────────── Ok(server-final) / Err(ScramError)
//! ```
//!
//! The server never sees the password and does no key stretching: the proof check is two
//! HMACs and one SHA-256. The secret is the PBKDF2 output, so it is weaker against offline
//! cracking than argon2id (4096 iterations of HMAC-SHA-256 cost microseconds on a GPU) and a
//! stolen `StoredKey`+`ServerKey` lets an attacker impersonate the *server* (not the user).
//!
//! # Normalisation
//!
//! RFC 5802 asks for SASLprep (RFC 4013) of the user name and the password. The `stringprep`
//! crate (the one `postgres-protocol` uses) implements it. User names must pass it
//! (`e=invalid-username-encoding` otherwise) and are compared in their SASLprep'd form.
//! Passwords are hashed **as they are**, like Dovecot 2.3 (checked: `doveadm pw` hashes `ﬁx`
//! and `fix` differently) and Cyrus SASL do, so stored secrets mean the same in ringmail and
//! Dovecot. To keep RFC-conforming clients (which SASLprep the password) working too,
//! [`check_password`] refuses new SCRAM secrets for passwords SASLprep would change or
//! refuse (non-ASCII spaces, compatibility characters, control characters): for those the
//! raw and the prepared form differ and some client would fail. ASCII passwords without
//! control characters always pass.
//!
//! # What is refused
//!
//! Channel binding (`p=`: no `-PLUS` mechanism is offered), mandatory extensions (`m=`), an
//! authorisation identity other than the user, messages over [`MAX_MESSAGE`] bytes, attributes
//! out of order or missing, bad `=2C`/`=3D` escapes, nonces that do not continue the server's,
//! and stored secrets with fewer than one or more than [`MAX_ITERATIONS`] iterations.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The scheme prefix, as Dovecot writes it.
pub const PREFIX: &str = "{SCRAM-SHA-256}";
/// Iterations for new secrets: Dovecot 2.3's fixed count, and RFC 7677's minimum.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Fewest iterations `ringmail accounts` writes (RFC 7677 section 4: at least 4096).
pub const MIN_ITERATIONS: u32 = 4096;
/// Most iterations a stored secret may have: verifying PLAIN against it costs this many
/// HMACs, so a larger value would be a CPU sink.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Largest client message accepted, in bytes (decoded).
pub const MAX_MESSAGE: usize = 4096;
/// Salt length of new secrets (Dovecot uses 16 bytes too).
const SALT_LEN: usize = 16;

/// A stored SCRAM-SHA-256 secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// The salt.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys are password-equivalent for impersonating the server: never print them.
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802: PBKDF2-HMAC-SHA-256 with a 32-byte output.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = HmacSha256::new_from_slice(password).expect("HMAC takes keys of any length");
    let mut u: [u8; 32] = {
        let mut m = keyed.clone();
        m.update(salt);
        m.update(&1u32.to_be_bytes());
        m.finalize().into_bytes().into()
    };
    let mut out = u;
    for _ in 1..iterations {
        let mut m = keyed.clone();
        m.update(&u);
        u = m.finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

/// Whether `password` can get a SCRAM secret that every client agrees on: it must be its own
/// SASLprep form (see the module documentation).
pub fn check_password(password: &str) -> Result<(), &'static str> {
    match stringprep::saslprep(password) {
        Ok(p) if p == password => Ok(()),
        Ok(_) => Err(
            "SASLprep changes this password (non-ASCII spaces or compatibility characters), so SCRAM clients would disagree on it",
        ),
        Err(_) => Err("SASLprep refuses this password (control or unassigned characters)"),
    }
}

impl ScramSecret {
    /// Derives the secret for `password` (its bytes as they are, like Dovecot).
    /// Costs `iterations` HMACs: call it off the async workers.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = hi(password.as_bytes(), salt, iterations.max(1));
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramSecret {
            iterations: iterations.max(1),
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// A new secret with a random 16-byte salt.
    pub fn generate(password: &str, iterations: u32) -> ScramSecret {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).expect("the OS random number generator is available");
        ScramSecret::derive(password, &salt, iterations)
    }

    /// Parses the part after `{SCRAM-SHA-256}`: `iterations,salt,StoredKey,ServerKey`.
    pub fn parse(value: &str) -> Option<ScramSecret> {
        let mut parts = value.trim().split(',');
        let (Some(i), Some(salt), Some(sk), Some(svk), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations: u32 = i.parse().ok()?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return None;
        }
        let salt = STANDARD.decode(salt).ok().filter(|s| !s.is_empty())?;
        let stored_key = STANDARD.decode(sk).ok()?.try_into().ok()?;
        let server_key = STANDARD.decode(svk).ok()?.try_into().ok()?;
        Some(ScramSecret {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// The stored form, `{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey`.
    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}{},{},{},{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }

    /// Checks a plaintext password (AUTH PLAIN/LOGIN against a SCRAM secret) in constant time.
    /// Costs `iterations` HMACs.
    pub fn verify_password(&self, password: &str) -> bool {
        let other = ScramSecret::derive(password, &self.salt, self.iterations);
        let a = other.stored_key.ct_eq(&self.stored_key);
        let b = other.server_key.ct_eq(&self.server_key);
        bool::from(a & b)
    }

    /// A stand-in for a user that does not exist or has no SCRAM secret: salt and keys derived
    /// from `server_secret` and the user name, so the same user always gets the same salt and
    /// the server-first message looks like a real one. No proof ever matches it (the driver
    /// still runs the check, and refuses the result).
    pub fn fake(server_secret: &[u8], username: &str) -> ScramSecret {
        let salt = hmac(server_secret, &[b"scram fake salt\0", username.as_bytes()]);
        ScramSecret {
            iterations: DEFAULT_ITERATIONS,
            salt: salt[..SALT_LEN].to_vec(),
            stored_key: hmac(
                server_secret,
                &[b"scram fake stored\0", username.as_bytes()],
            ),
            server_key: hmac(
                server_secret,
                &[b"scram fake server\0", username.as_bytes()],
            ),
        }
    }
}

/// `{SCRAM-SHA-256}` value of a new secret for `password`.
pub fn hash(password: &str, iterations: u32) -> String {
    ScramSecret::generate(password, iterations).encode()
}

/// Checks `password` against the part after `{SCRAM-SHA-256}`; malformed values never match.
pub fn verify(value: &str, password: &str) -> bool {
    ScramSecret::parse(value).is_some_and(|s| s.verify_password(password))
}

/// Whether `value` (after the prefix) is a well-formed secret.
pub fn is_well_formed(value: &str) -> bool {
    ScramSecret::parse(value).is_some()
}

/// If `stored` is a `{SCRAM-SHA-256}` value (prefix case-insensitive), its secret.
pub fn from_stored(stored: &str) -> Option<ScramSecret> {
    let head = stored.get(..PREFIX.len())?;
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    ScramSecret::parse(&stored[PREFIX.len()..])
}

/// Why an exchange failed. [`ScramError::server_error`] is the RFC 5802 `e=` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// Not UTF-8, bad base64, an attribute missing or out of order, a bad value.
    #[error("malformed SCRAM message")]
    Malformed,
    /// Over [`MAX_MESSAGE`] bytes.
    #[error("SCRAM message too long")]
    TooLong,
    /// The client asked for channel binding (`p=`), which no offered mechanism supports.
    #[error("channel binding not supported")]
    ChannelBindingNotSupported,
    /// `c=` does not repeat the GS2 header of the first message.
    #[error("channel bindings do not match")]
    ChannelBindingsDontMatch,
    /// A mandatory extension (`m=`).
    #[error("extensions not supported")]
    ExtensionsNotSupported,
    /// Bad `=2C`/`=3D` escaping, or a name SASLprep refuses.
    #[error("invalid username encoding")]
    InvalidUsernameEncoding,
    /// An authorisation identity other than the user.
    #[error("authorization identity differs from the user")]
    AuthzidMismatch,
    /// The nonce of the final message is not the combined nonce.
    #[error("nonce mismatch")]
    NonceMismatch,
    /// The proof is wrong (also: unknown user, no SCRAM secret).
    #[error("invalid proof")]
    InvalidProof,
    /// A message arrived in the wrong state.
    #[error("SCRAM message out of sequence")]
    OutOfSequence,
}

impl ScramError {
    /// The `server-error-value` of RFC 5802 section 7.
    pub fn server_error(self) -> &'static str {
        match self {
            ScramError::Malformed | ScramError::TooLong => "invalid-encoding",
            ScramError::ChannelBindingNotSupported => "channel-binding-not-supported",
            ScramError::ChannelBindingsDontMatch => "channel-bindings-dont-match",
            ScramError::ExtensionsNotSupported => "extensions-not-supported",
            ScramError::InvalidUsernameEncoding => "invalid-username-encoding",
            ScramError::InvalidProof => "invalid-proof",
            ScramError::AuthzidMismatch | ScramError::NonceMismatch | ScramError::OutOfSequence => {
                "other-error"
            }
        }
    }

    /// The server-final message carrying the error, `e=<value>` (for protocols that can send
    /// data with a failure; SMTP and IMAP just fail).
    pub fn server_final(self) -> Vec<u8> {
        format!("e={}", self.server_error()).into_bytes()
    }
}

/// What the client's first message said.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientFirst {
    /// The user name: unescaped and SASLprep'd.
    pub username: String,
}

impl fmt::Debug for ClientFirst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientFirst").finish_non_exhaustive()
    }
}

enum State {
    Start,
    GotFirst {
        gs2_header: String,
        client_first_bare: String,
        nonce: String,
    },
    SentFirst {
        gs2_header: String,
        client_first_bare: String,
        nonce: String,
        server_first: String,
        secret: ScramSecret,
        genuine: bool,
    },
    Done,
}

/// One server-side SCRAM-SHA-256 exchange (no channel binding). Bytes in, bytes out.
pub struct ScramServer {
    server_nonce: String,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer").finish_non_exhaustive()
    }
}

impl ScramServer {
    /// An exchange whose server nonce is `nonce_bytes`, base64-encoded (the caller supplies
    /// the randomness: see [`ScramServer::with_os_nonce`]).
    pub fn new(nonce_bytes: &[u8]) -> ScramServer {
        ScramServer {
            server_nonce: STANDARD.encode(nonce_bytes),
            state: State::Start,
        }
    }

    /// An exchange with an 18-byte nonce from the OS random number generator.
    pub fn with_os_nonce() -> ScramServer {
        let mut n = [0u8; 18];
        getrandom::fill(&mut n).expect("the OS random number generator is available");
        ScramServer::new(&n)
    }

    /// Parses client-first-message. The driver then looks up the user's secret and calls
    /// [`ScramServer::server_first`].
    pub fn client_first(&mut self, msg: &[u8]) -> Result<ClientFirst, ScramError> {
        if !matches!(self.state, State::Start) {
            self.state = State::Done;
            return Err(ScramError::OutOfSequence);
        }
        self.state = State::Done;
        let msg = text(msg)?;
        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let (flag, rest) = msg.split_once(',').ok_or(ScramError::Malformed)?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBindingNotSupported),
            _ => return Err(ScramError::Malformed),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed)?;
        let authzid = match authzid {
            "" => None,
            a => Some(saslname(
                a.strip_prefix("a=").ok_or(ScramError::Malformed)?,
            )?),
        };
        let gs2_header = msg[..msg.len() - bare.len()].to_string();
        let mut attrs = bare.split(',');
        let mut first = attrs.next().ok_or(ScramError::Malformed)?;
        if first.starts_with("m=") {
            return Err(ScramError::ExtensionsNotSupported);
        }
        let username = first.strip_prefix("n=").ok_or(ScramError::Malformed)?;
        let username = saslname(username)?;
        if username.is_empty() {
            return Err(ScramError::Malformed);
        }
        first = attrs.next().ok_or(ScramError::Malformed)?;
        let cnonce = first.strip_prefix("r=").ok_or(ScramError::Malformed)?;
        if cnonce.is_empty() || !cnonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::Malformed);
        }
        // Optional extensions: attr-val, ignored.
        for a in attrs {
            attr_val(a)?;
        }
        if let Some(z) = authzid
            && !z.eq_ignore_ascii_case(&username)
        {
            return Err(ScramError::AuthzidMismatch);
        }
        self.state = State::GotFirst {
            gs2_header,
            client_first_bare: bare.to_string(),
            nonce: format!("{cnonce}{}", self.server_nonce),
        };
        Ok(ClientFirst { username })
    }

    /// server-first-message for `secret`. `genuine` is false for [`ScramSecret::fake`]
    /// stand-ins: the exchange then always fails at the proof, like a wrong password.
    pub fn server_first(&mut self, secret: ScramSecret, genuine: bool) -> Vec<u8> {
        let State::GotFirst {
            gs2_header,
            client_first_bare,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Vec::new();
        };
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&secret.salt),
            secret.iterations
        );
        let out = server_first.clone().into_bytes();
        self.state = State::SentFirst {
            gs2_header,
            client_first_bare,
            nonce,
            server_first,
            secret,
            genuine,
        };
        out
    }

    /// Checks client-final-message; `Ok` carries server-final-message (`v=...`).
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::SentFirst {
            gs2_header,
            client_first_bare,
            nonce,
            server_first,
            secret,
            genuine,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfSequence);
        };
        let msg = text(msg)?;
        // client-final-message-without-proof "," proof; the proof is last.
        let (without_proof, proof) = msg.rsplit_once(',').ok_or(ScramError::Malformed)?;
        let proof = proof.strip_prefix("p=").ok_or(ScramError::Malformed)?;
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed)?
            .try_into()
            .map_err(|_| ScramError::Malformed)?;
        let mut attrs = without_proof.split(',');
        let c = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed)?;
        let cbind = STANDARD.decode(c).map_err(|_| ScramError::Malformed)?;
        if cbind != gs2_header.as_bytes() {
            return Err(ScramError::ChannelBindingsDontMatch);
        }
        let r = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed)?;
        for a in attrs {
            attr_val(a)?;
        }
        // Both nonces are public; compare in constant time anyway.
        let nonce_ok = r.len() == nonce.len() && bool::from(r.as_bytes().ct_eq(nonce.as_bytes()));
        if !nonce_ok {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&secret.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature.iter()) {
            *k ^= s;
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        let matches = computed.ct_eq(&secret.stored_key);
        if !(bool::from(matches) && genuine) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&secret.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

fn text(msg: &[u8]) -> Result<&str, ScramError> {
    if msg.len() > MAX_MESSAGE {
        return Err(ScramError::TooLong);
    }
    let s = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed)?;
    if s.contains('\0') {
        return Err(ScramError::Malformed);
    }
    Ok(s)
}

/// attr-val = ALPHA "=" value (an extension; its value is not interpreted).
fn attr_val(a: &str) -> Result<(), ScramError> {
    let b = a.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'=' {
        Ok(())
    } else {
        Err(ScramError::Malformed)
    }
}

/// Unescapes a saslname (`=2C` -> `,`, `=3D` -> `=`, any other `=` refused) and SASLpreps it.
fn saslname(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::InvalidUsernameEncoding),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    match stringprep::saslprep(&out) {
        Ok(p) => Ok(p.into_owned()),
        Err(_) => Err(ScramError::InvalidUsernameEncoding),
    }
}

/// Escapes a user name for `n=` / `a=` (for clients and tests).
pub fn escape_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3.
    const USER: &str = "user";
    const PASSWORD: &str = "pencil";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE_B64: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_secret() -> ScramSecret {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramSecret::derive(PASSWORD, &salt, 4096)
    }

    /// A server whose nonce is the RFC's (which is not base64 of anything: set it directly).
    fn rfc_server() -> ScramServer {
        let mut s = ScramServer::new(b"");
        s.server_nonce = SERVER_NONCE_B64.to_string();
        s
    }

    /// A minimal client, for the tests.
    struct Client {
        gs2: String,
        bare: String,
    }

    impl Client {
        fn first(user: &str, authzid: Option<&str>) -> (Client, String) {
            let gs2 = match authzid {
                Some(a) => format!("n,a={},", escape_saslname(a)),
                None => "n,,".to_string(),
            };
            let bare = format!("n={},r=fyko+d2lbbFgONRv9qkxdawL", escape_saslname(user));
            let msg = format!("{gs2}{bare}");
            (Client { gs2, bare }, msg)
        }

        fn last(&self, server_first: &str, password: &str) -> (String, [u8; 32]) {
            let mut nonce = "";
            let mut salt = Vec::new();
            let mut iters = 0;
            for a in server_first.split(',') {
                if let Some(v) = a.strip_prefix("r=") {
                    nonce = v;
                } else if let Some(v) = a.strip_prefix("s=") {
                    salt = STANDARD.decode(v).unwrap();
                } else if let Some(v) = a.strip_prefix("i=") {
                    iters = v.parse().unwrap();
                }
            }
            let salted = hi(password.as_bytes(), &salt, iters);
            let client_key = hmac(&salted, &[b"Client Key"]);
            let stored: [u8; 32] = Sha256::digest(client_key).into();
            let without = format!("c={},r={nonce}", STANDARD.encode(&self.gs2));
            let am = format!("{},{server_first},{without}", self.bare);
            let sig = hmac(&stored, &[am.as_bytes()]);
            let mut proof = client_key;
            for (p, s) in proof.iter_mut().zip(sig.iter()) {
                *p ^= s;
            }
            let server_sig = hmac(&hmac(&salted, &[b"Server Key"]), &[am.as_bytes()]);
            (
                format!("{without},p={}", STANDARD.encode(proof)),
                server_sig,
            )
        }
    }

    fn exchange(secret: ScramSecret, user: &str, password: &str) -> Result<Vec<u8>, ScramError> {
        let mut s = ScramServer::with_os_nonce();
        let (c, first) = Client::first(user, None);
        let cf = s.client_first(first.as_bytes())?;
        assert_eq!(cf.username, user);
        let sf = String::from_utf8(s.server_first(secret, true)).unwrap();
        let (last, server_sig) = c.last(&sf, password);
        let v = s.client_final(last.as_bytes())?;
        assert_eq!(v, format!("v={}", STANDARD.encode(server_sig)).into_bytes());
        Ok(v)
    }

    #[test]
    fn rfc7677_vector() {
        let mut s = rfc_server();
        let cf = s.client_first(CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(cf.username, USER);
        assert_eq!(s.server_first(rfc_secret(), true), SERVER_FIRST.as_bytes());
        assert_eq!(
            s.client_final(CLIENT_FINAL.as_bytes()).unwrap(),
            SERVER_FINAL.as_bytes()
        );
        // A finished exchange takes nothing more.
        assert_eq!(
            s.client_final(CLIENT_FINAL.as_bytes()),
            Err(ScramError::OutOfSequence)
        );
    }

    #[test]
    fn rfc7677_vector_wrong_password_and_fake() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let mut s = rfc_server();
        s.client_first(CLIENT_FIRST.as_bytes()).unwrap();
        s.server_first(ScramSecret::derive("pencil2", &salt, 4096), true);
        assert_eq!(
            s.client_final(CLIENT_FINAL.as_bytes()),
            Err(ScramError::InvalidProof)
        );
        // The right secret, but marked as a stand-in: still refused.
        let mut s = rfc_server();
        s.client_first(CLIENT_FIRST.as_bytes()).unwrap();
        s.server_first(rfc_secret(), false);
        assert_eq!(
            s.client_final(CLIENT_FINAL.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn stored_form_round_trips_and_verifies_plaintext() {
        let h = hash("s3cret pass", DEFAULT_ITERATIONS);
        assert!(h.starts_with("{SCRAM-SHA-256}4096,"), "{h}");
        let s = from_stored(&h).unwrap();
        assert_eq!(s.encode(), h);
        assert_eq!(s.salt.len(), 16);
        assert!(s.verify_password("s3cret pass"));
        assert!(!s.verify_password("s3cret pasS"));
        assert!(!s.verify_password(""));
        // Not base64, or the wrong length: no secret (lowercasing is no test: it can leave valid
        // base64 of the right lengths).
        assert!(from_stored(&format!("{h}A")).is_none());
        assert!(from_stored(&h.replacen(",", ",*", 2)).is_none());
        assert!(from_stored(&h.replacen("{SCRAM-SHA-256}", "{scram-sha-256}", 1)).is_some());
        assert_ne!(h, hash("s3cret pass", DEFAULT_ITERATIONS));
        // The secret from a full exchange.
        exchange(s, "me@example.com", "s3cret pass").unwrap();
    }

    #[test]
    fn iteration_count_comes_from_the_stored_secret() {
        let s = ScramSecret::generate("pw", 5000);
        let mut srv = ScramServer::with_os_nonce();
        srv.client_first(b"n,,n=u,r=abc").unwrap();
        let sf = String::from_utf8(srv.server_first(s.clone(), true)).unwrap();
        assert!(sf.ends_with(",i=5000"), "{sf}");
        exchange(s, "u", "pw").unwrap();
        // Bounds on stored secrets.
        let enc = |i: &str| {
            format!(
                "{i},AAAAAAAAAAAAAAAAAAAAAA==,{k},{k}",
                k = STANDARD.encode([0u8; 32])
            )
        };
        assert!(ScramSecret::parse(&enc("1")).is_some());
        assert!(ScramSecret::parse(&enc("10000000")).is_some());
        for bad in ["0", "10000001", "-1", "+5", "", "4096 ", "99999999999"] {
            assert!(ScramSecret::parse(&enc(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_stored_values() {
        let k = STANDARD.encode([1u8; 32]);
        for bad in [
            String::new(),
            "4096".into(),
            format!("4096,,{k},{k}"),
            format!("4096,c2FsdA==,{k}"),
            format!("4096,c2FsdA==,{k},{k},x"),
            format!("4096,c2FsdA==,AAAA,{k}"),
            format!("4096,not base64,{k},{k}"),
        ] {
            assert!(!is_well_formed(&bad), "{bad}");
            assert!(!verify(&bad, "x"));
        }
    }

    #[test]
    fn fake_secrets_are_deterministic_per_user() {
        let a = ScramSecret::fake(b"server secret", "a@example.com");
        assert_eq!(a, ScramSecret::fake(b"server secret", "a@example.com"));
        assert_ne!(
            a.salt,
            ScramSecret::fake(b"server secret", "b@example.com").salt
        );
        assert_ne!(
            a.salt,
            ScramSecret::fake(b"other secret", "a@example.com").salt
        );
        assert_eq!(a.iterations, DEFAULT_ITERATIONS);
        assert_eq!(a.salt.len(), 16);
        assert!(format!("{a:?}").contains("iterations"));
        assert!(!format!("{a:?}").contains("key"));
    }

    #[test]
    fn authzid_must_be_the_user() {
        let mut s = ScramServer::with_os_nonce();
        let (_, m) = Client::first("me@example.com", Some("ME@example.com"));
        assert!(s.client_first(m.as_bytes()).is_ok());
        let mut s = ScramServer::with_os_nonce();
        let (_, m) = Client::first("me@example.com", Some("boss@example.com"));
        assert_eq!(
            s.client_first(m.as_bytes()),
            Err(ScramError::AuthzidMismatch)
        );
        // The proof is checked over the GS2 header with the authzid.
        let secret = ScramSecret::generate("pw", 4096);
        let mut s = ScramServer::with_os_nonce();
        let (c, m) = Client::first("me@example.com", Some("me@example.com"));
        s.client_first(m.as_bytes()).unwrap();
        let sf = String::from_utf8(s.server_first(secret, true)).unwrap();
        let (last, _) = c.last(&sf, "pw");
        assert!(s.client_final(last.as_bytes()).is_ok());
    }

    #[test]
    fn escaped_user_names() {
        let mut s = ScramServer::with_os_nonce();
        let cf = s.client_first(b"n,,n=a=2Cb=3Dc,r=xyz").unwrap();
        assert_eq!(cf.username, "a,b=c");
        for bad in [
            "n,,n=a=2,r=x",
            "n,,n=a=41,r=x",
            "n,,n=a=,r=x",
            "n,,n=a=2c,r=x",
        ] {
            let mut s = ScramServer::with_os_nonce();
            assert_eq!(
                s.client_first(bad.as_bytes()),
                Err(ScramError::InvalidUsernameEncoding),
                "{bad}"
            );
        }
        // SASLprep: non-ASCII space maps to a space; a control character is prohibited.
        let mut s = ScramServer::with_os_nonce();
        let cf = s.client_first("n,,n=a\u{00A0}b,r=x".as_bytes()).unwrap();
        assert_eq!(cf.username, "a b");
        let mut s = ScramServer::with_os_nonce();
        assert_eq!(
            s.client_first("n,,n=a\u{0007}b,r=x".as_bytes()),
            Err(ScramError::InvalidUsernameEncoding)
        );
    }

    #[test]
    fn hostile_client_first() {
        let long = format!("n,,n=u,r={}", "x".repeat(MAX_MESSAGE));
        for (msg, err) in [
            (
                b"p=tls-unique,,n=u,r=x".as_slice(),
                ScramError::ChannelBindingNotSupported,
            ),
            (
                b"p=tls-server-end-point,,n=u,r=x",
                ScramError::ChannelBindingNotSupported,
            ),
            (b"n,,m=ext,n=u,r=x", ScramError::ExtensionsNotSupported),
            (b"x,,n=u,r=x", ScramError::Malformed),
            (b"", ScramError::Malformed),
            (b"n", ScramError::Malformed),
            (b"n,,", ScramError::Malformed),
            (b"n,,n=u", ScramError::Malformed),
            (b"n,,r=x,n=u", ScramError::Malformed),
            (b"n,,n=,r=x", ScramError::Malformed),
            (b"n,,n=u,r=", ScramError::Malformed),
            (b"n,,n=u,r=a b", ScramError::Malformed),
            (b"n,,n=u,r=x,", ScramError::Malformed),
            (b"n,,n=u,r=x,1=y", ScramError::Malformed),
            (b"n,b=x,n=u,r=x", ScramError::Malformed),
            (b"n,,n=u\0,r=x", ScramError::Malformed),
            (b"n,,n=\xff,r=x", ScramError::Malformed),
            (long.as_bytes(), ScramError::TooLong),
        ] {
            let mut s = ScramServer::with_os_nonce();
            assert_eq!(
                s.client_first(msg),
                Err(err),
                "{:?}",
                String::from_utf8_lossy(msg)
            );
            // After a failure, nothing goes on.
            assert_eq!(
                s.client_final(b"c=biws,r=x,p=AAAA"),
                Err(ScramError::OutOfSequence)
            );
        }
        // Extensions after the nonce are ignored; "y" (client could bind, we cannot) is fine.
        let mut s = ScramServer::with_os_nonce();
        assert!(s.client_first(b"y,,n=u,r=x,x=ext,t=1").is_ok());
        // Out of sequence.
        let mut s = ScramServer::with_os_nonce();
        assert_eq!(
            s.client_final(b"c=biws,r=x,p=AAAA"),
            Err(ScramError::OutOfSequence)
        );
        let mut s = ScramServer::with_os_nonce();
        s.client_first(b"n,,n=u,r=x").unwrap();
        assert_eq!(
            s.client_first(b"n,,n=u,r=x"),
            Err(ScramError::OutOfSequence)
        );
    }

    fn after_first(user: &str) -> (ScramServer, Client, String) {
        let mut s = ScramServer::with_os_nonce();
        let (c, m) = Client::first(user, None);
        s.client_first(m.as_bytes()).unwrap();
        let sf =
            String::from_utf8(s.server_first(ScramSecret::generate("pw", 4096), true)).unwrap();
        (s, c, sf)
    }

    #[test]
    fn hostile_client_final() {
        let (_, c, sf) = after_first("u");
        let (good, _) = c.last(&sf, "pw");
        let nonce = sf
            .split(',')
            .next()
            .unwrap()
            .strip_prefix("r=")
            .unwrap()
            .to_string();
        let proof = good.rsplit_once(",p=").unwrap().1.to_string();
        let short = &nonce[..nonce.len() - 1];
        let cases: Vec<(String, ScramError)> = vec![
            (
                good.replace("c=biws", "c=eSws"),
                ScramError::ChannelBindingsDontMatch,
            ), // "y,,"
            (
                good.replace("c=biws", "c=bixhPXUs"),
                ScramError::ChannelBindingsDontMatch,
            ),
            (good.replace("c=biws", "c=!!"), ScramError::Malformed),
            (
                format!("c=biws,r={short},p={proof}"),
                ScramError::NonceMismatch,
            ),
            (
                format!("c=biws,r={nonce}x,p={proof}"),
                ScramError::NonceMismatch,
            ),
            (
                format!("c=biws,r=fyko+d2lbbFgONRv9qkxdawL,p={proof}"),
                ScramError::NonceMismatch,
            ),
            (format!("c=biws,p={proof}"), ScramError::Malformed),
            (format!("r={nonce},p={proof}"), ScramError::Malformed),
            (format!("c=biws,r={nonce}"), ScramError::Malformed),
            (format!("c=biws,r={nonce},p="), ScramError::Malformed),
            (
                format!("c=biws,r={nonce},p=not*base64"),
                ScramError::Malformed,
            ),
            (format!("c=biws,r={nonce},p=AAAA"), ScramError::Malformed),
            (
                format!("c=biws,r={nonce},p={proof},x=1"),
                ScramError::Malformed,
            ),
            (
                format!("c=biws,r={nonce},7=1,p={proof}"),
                ScramError::Malformed,
            ),
            (format!("r={nonce},c=biws,p={proof}"), ScramError::Malformed),
            (
                format!("c=biws,r={nonce},p={}", STANDARD.encode([0u8; 32])),
                ScramError::InvalidProof,
            ),
            ("x".repeat(MAX_MESSAGE + 1), ScramError::TooLong),
        ];
        for (msg, err) in cases {
            let (mut s, c, sf) = after_first("u");
            // Each case against a fresh exchange with its own nonce.
            let (fresh_good, _) = c.last(&sf, "pw");
            let fresh_nonce = sf.split(',').next().unwrap().strip_prefix("r=").unwrap();
            let fresh_proof = fresh_good.rsplit_once(",p=").unwrap().1;
            let msg = msg
                .replace(&nonce, fresh_nonce)
                .replace(&proof, fresh_proof);
            assert_eq!(s.client_final(msg.as_bytes()), Err(err), "{msg}");
        }
        // An extension before the proof is ignored, but it is part of the AuthMessage: a
        // client that signed without it fails.
        let (mut s, c, sf) = after_first("u");
        let (good, _) = c.last(&sf, "pw");
        let (head, p) = good.rsplit_once(',').unwrap();
        let with_ext = format!("{head},x=1,{p}");
        assert_eq!(
            s.client_final(with_ext.as_bytes()),
            Err(ScramError::InvalidProof)
        );
        // The good one works.
        let (mut s, c, sf) = after_first("u");
        let (good, _) = c.last(&sf, "pw");
        assert!(s.client_final(good.as_bytes()).is_ok());
        // Wrong password.
        let (mut s, c, sf) = after_first("u");
        let (bad, _) = c.last(&sf, "pW");
        assert_eq!(
            s.client_final(bad.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn server_nonce_is_random_and_printable() {
        let mut a = ScramServer::with_os_nonce();
        let mut b = ScramServer::with_os_nonce();
        a.client_first(b"n,,n=u,r=c").unwrap();
        b.client_first(b"n,,n=u,r=c").unwrap();
        let sa = a.server_first(ScramSecret::fake(b"k", "u"), false);
        let sb = b.server_first(ScramSecret::fake(b"k", "u"), false);
        assert_ne!(sa, sb);
        let sa = String::from_utf8(sa).unwrap();
        let n = sa.split(',').next().unwrap();
        assert!(n.starts_with("r=c") && n.len() == 2 + 1 + 24, "{n}");
        assert!(n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','));
    }

    #[test]
    fn errors_name_rfc_values() {
        assert_eq!(ScramError::InvalidProof.server_final(), b"e=invalid-proof");
        assert_eq!(
            ScramError::ChannelBindingNotSupported.server_error(),
            "channel-binding-not-supported"
        );
        assert_eq!(
            ScramError::ChannelBindingsDontMatch.server_error(),
            "channel-bindings-dont-match"
        );
    }

    #[test]
    fn passwords_for_new_secrets_must_be_saslprep_stable() {
        assert!(check_password("correct horse battery staple").is_ok());
        assert!(check_password("pässword").is_ok());
        assert!(check_password("a\u{00A0}b").is_err()); // mapped to a space
        assert!(check_password("\u{2168}").is_err()); // NFKC: "IX"
        assert!(check_password("\u{FB01}x").is_err()); // the "fi" ligature
        assert!(check_password("a\u{0007}b").is_err()); // prohibited
        // Stored secrets hash the bytes as they are (Dovecot does the same).
        let salt = b"0123456789abcdef";
        assert_ne!(
            ScramSecret::derive("\u{FB01}x", salt, 4096),
            ScramSecret::derive("fix", salt, 4096)
        );
    }
}
