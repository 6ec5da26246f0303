//! The client side: an I/O-free SMTP/LMTP sender session for relays.
//!
//! ```text
//!  greeting 220 ─▶ EHLO/LHLO ─(5xx, SMTP)─▶ HELO
//!                     │
//!                     ├─ STARTTLS offered & wanted ─▶ 220 ─▶ Event::StartTls ─▶ tls_established()
//!                     │                                        └─▶ EHLO again
//!                     ├─ AUTH configured (TLS only) ─▶ AUTH PLAIN ─▶ 235
//!                     ▼
//!                  Ready ─ start_transaction(env) ─▶ MAIL, RCPT… (pipelined if offered)
//!                     ▲                                 │ DATA ─▶ 354  (or BDAT)
//!                     │                                 ▼
//!                     │                     Event::SendBody ─▶ send_body_chunk()… end_body()
//!                     └──── Event::TransactionDone(result) ◀── final reply (LMTP: one per rcpt)
//! ```
//!
//! The driver writes what [`Client::poll_transmit`] returns, feeds server bytes to
//! [`Client::receive`] and acts on [`Client::poll_event`].
//!
//! The body given to [`Client::send_body_chunk`] must already use CRLF line ends: the client
//! dot-stuffs (DATA) but never converts line ends. A bare CR or LF is refused with
//! [`ClientError::BareLineEnding`] before anything of that chunk is written, and the session
//! is poisoned (`should_close()`): SMTP cannot abort a DATA block, so the connection must be
//! dropped and the server discards the partial message. Lines are not re-wrapped; keeping them
//! under 1000 octets is the caller's job.
//!
//! After a 220 to STARTTLS every reply byte already buffered, or received before
//! [`Client::tls_established`], is discarded (reply injection, CVE-2011-0411 client side).

use std::collections::VecDeque;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

use crate::address::{AddressError, Mailbox, encode_xtext};
use crate::command::{Body, DsnNotify, DsnRet, RcptParams};
use crate::reply::{Reply, ReplyError, ReplyLimits, parse_reply};
use crate::secret::{Secret, wipe};

/// When to use STARTTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartTlsPolicy {
    /// Never (e.g. LMTP over a trusted local socket, or implicit TLS).
    Never,
    /// When offered; continue in plaintext otherwise (MTA to the world).
    Opportunistic,
    /// Fail the session unless TLS is established.
    Required,
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our name in EHLO/LHLO/HELO.
    pub helo_name: String,
    /// LMTP (LHLO, one final reply per recipient).
    pub lmtp: bool,
    /// STARTTLS policy.
    pub use_starttls: StartTlsPolicy,
    /// AUTH PLAIN credentials; only ever sent under TLS.
    pub auth: Option<(String, Secret)>,
    /// Longest reply line, CRLF included (default 2048).
    pub max_reply_line: usize,
    /// Most lines in one reply (default 100).
    pub max_reply_lines: usize,
    /// Use BDAT instead of DATA when the server offers CHUNKING and PIPELINING (default off).
    pub prefer_chunking: bool,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            helo_name: "localhost".into(),
            lmtp: false,
            use_starttls: StartTlsPolicy::Opportunistic,
            auth: None,
            max_reply_line: 2048,
            max_reply_lines: 100,
            prefer_chunking: false,
        }
    }
}

/// One mail transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse path without brackets; `None` for `<>`.
    pub mail_from: Option<String>,
    /// Forward paths without brackets.
    pub rcpt_to: Vec<String>,
    /// SIZE= (sent when the server offers SIZE).
    pub size: Option<u64>,
    /// BODY= (8BITMIME needs the extension; BINARYMIME needs CHUNKING, BINARYMIME and
    /// PIPELINING and is sent with BDAT).
    pub body: Body,
    /// SMTPUTF8 (needs the extension).
    pub smtputf8: bool,
    /// RET= (sent when the server offers DSN).
    pub ret: Option<DsnRet>,
    /// ENVID= (sent xtext-encoded when the server offers DSN).
    pub envid: Option<String>,
    /// Empty, or one entry per recipient: NOTIFY=/ORCPT= (sent when the server offers DSN).
    pub rcpt_params: Vec<RcptParams>,
}

impl Envelope {
    /// An envelope with default parameters.
    pub fn new(mail_from: Option<&str>, rcpt_to: &[&str]) -> Envelope {
        Envelope {
            mail_from: mail_from.map(str::to_string),
            rcpt_to: rcpt_to.iter().map(|s| s.to_string()).collect(),
            ..Envelope::default()
        }
    }
}

/// What the server offered in its EHLO/LHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// PIPELINING.
    pub pipelining: bool,
    /// SIZE, with the limit (0: none given).
    pub size: Option<u64>,
    /// 8BITMIME.
    pub eightbitmime: bool,
    /// SMTPUTF8.
    pub smtputf8: bool,
    /// ENHANCEDSTATUSCODES.
    pub enhanced_status_codes: bool,
    /// CHUNKING.
    pub chunking: bool,
    /// BINARYMIME.
    pub binarymime: bool,
    /// DSN.
    pub dsn: bool,
    /// STARTTLS.
    pub starttls: bool,
    /// AUTH PLAIN.
    pub auth_plain: bool,
    /// AUTH LOGIN.
    pub auth_login: bool,
}

impl Extensions {
    fn parse(reply: &Reply) -> Extensions {
        let mut e = Extensions::default();
        for line in reply.lines().iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => e.pipelining = true,
                "SIZE" => e.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => e.eightbitmime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => e.enhanced_status_codes = true,
                "CHUNKING" => e.chunking = true,
                "BINARYMIME" => e.binarymime = true,
                "DSN" => e.dsn = true,
                "STARTTLS" => e.starttls = true,
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => e.auth_plain = true,
                            "LOGIN" => e.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        e
    }
}

/// Errors of the client session or of a call into it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ClientError {
    /// The greeting was not 220.
    #[error("server refused the session: {0}")]
    Refused(Reply),
    /// EHLO/LHLO (and HELO) refused.
    #[error("EHLO/HELO refused: {0}")]
    HeloRefused(Reply),
    /// `helo_name` is not a plain host name.
    #[error("invalid helo_name")]
    InvalidHeloName,
    /// STARTTLS is required but not offered.
    #[error("STARTTLS required but not offered")]
    TlsNotOffered,
    /// STARTTLS refused while required.
    #[error("STARTTLS refused: {0}")]
    TlsRefused(Reply),
    /// AUTH is configured but TLS is not active.
    #[error("AUTH configured but TLS is not active")]
    AuthWithoutTls,
    /// AUTH is configured but the server does not offer AUTH PLAIN.
    #[error("server does not offer AUTH PLAIN")]
    AuthNotOffered,
    /// Credentials contain NUL.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// AUTH failed.
    #[error("authentication failed: {0}")]
    AuthFailed(Reply),
    /// A malformed reply.
    #[error("bad reply: {0}")]
    BadReply(#[from] ReplyError),
    /// A reply when none was expected.
    #[error("unexpected reply: {0}")]
    UnexpectedReply(Reply),
    /// A call at the wrong time.
    #[error("invalid state: {0}")]
    InvalidState(&'static str),
    /// An envelope address the server would (or should) refuse.
    #[error("invalid address: {0}")]
    InvalidAddress(AddressError),
    /// The envelope needs an extension the server does not offer.
    #[error("server does not offer {0}")]
    MissingExtension(&'static str),
    /// The envelope has no recipients, or `rcpt_params` does not match them.
    #[error("bad envelope: {0}")]
    BadEnvelope(&'static str),
    /// Body content with a bare CR or LF (the session is poisoned).
    #[error("bare CR or LF in message content")]
    BareLineEnding,
}

/// Final outcome for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered/queued by the server (the final reply).
    Accepted(Reply),
    /// Try again later.
    TempFail(Reply),
    /// Bounce.
    PermFail(Reply),
}

impl Outcome {
    fn from_reply(r: &Reply) -> Outcome {
        if r.is_positive() {
            Outcome::Accepted(r.clone())
        } else if r.is_permanent() {
            Outcome::PermFail(r.clone())
        } else {
            Outcome::TempFail(r.clone())
        }
    }
}

/// One recipient's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientResult {
    /// The address as given in the envelope.
    pub address: String,
    /// The outcome.
    pub outcome: Outcome,
}

/// Result of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionResult {
    /// Reply to MAIL FROM.
    pub mail_reply: Reply,
    /// Reply ending the message (SMTP), or the DATA/BDAT refusal; `None` if not reached or
    /// for LMTP finals (see the recipients).
    pub data_reply: Option<Reply>,
    /// In envelope order.
    pub recipients: Vec<RecipientResult>,
}

impl TransactionResult {
    /// Every recipient accepted.
    pub fn all_accepted(&self) -> bool {
        self.recipients
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Accepted(_)))
    }
}

/// What the driver must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The session is ready for (another) transaction.
    Ready,
    /// Write what is queued (the STARTTLS command), then do the TLS handshake and call
    /// `tls_established`.
    StartTls,
    /// Stream the message with `send_body_chunk`, then `end_body`.
    SendBody,
    /// The transaction ended; the session is ready again.
    TransactionDone(TransactionResult),
    /// The session failed; `should_close()` is true.
    Failed(ClientError),
    /// QUIT was answered.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Mail,
    Rcpt(usize),
    Data,
    BdatChunk,
    DataFinal,
    LmtpFinal(usize),
    Rset,
    Quit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    TlsHandshake,
    Ready,
    Txn,
    Body,
    Closed,
}

struct Txn {
    env: Envelope,
    mail: Option<Reply>,
    rcpt: Vec<Option<Reply>>,
    data: Option<Reply>,
    final_reply: Option<Reply>,
    lmtp: Vec<Option<Reply>>,
    bdat: bool,
    binary: bool,
    pipelined: bool,
    /// A BDAT chunk failed: send nothing more.
    failed: bool,
    /// The final replies were received (the server's transaction is over).
    completed: bool,
    line_start: bool,
    pending_cr: bool,
}

impl Txn {
    fn any_rcpt_ok(&self) -> bool {
        self.mail.as_ref().is_some_and(Reply::is_positive)
            && self.rcpt.iter().flatten().any(Reply::is_positive)
    }
}

/// One client session. See the module documentation.
pub struct Client {
    cfg: Arc<ClientConfig>,
    tls_active: bool,
    tls_declined: bool,
    authenticated: bool,
    ext: Extensions,
    expect: VecDeque<Expect>,
    /// Commands waiting for the previous reply (no PIPELINING).
    queued: VecDeque<(String, Expect)>,
    inbuf: BytesMut,
    out: BytesMut,
    events: VecDeque<ClientEvent>,
    phase: Phase,
    txn: Option<Txn>,
    done: Option<TransactionResult>,
    closing: bool,
}

impl Client {
    /// A new session on a connected socket; `tls_active` for implicit TLS.
    pub fn new(cfg: Arc<ClientConfig>, tls_active: bool) -> Client {
        Client {
            cfg,
            tls_active,
            tls_declined: false,
            authenticated: false,
            ext: Extensions::default(),
            expect: VecDeque::from([Expect::Greeting]),
            queued: VecDeque::new(),
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            events: VecDeque::new(),
            phase: Phase::Setup,
            txn: None,
            done: None,
            closing: false,
        }
    }

    /// Feeds bytes from the server, split anywhere.
    pub fn receive(&mut self, data: &[u8]) {
        if self.closing || self.phase == Phase::TlsHandshake {
            return;
        }
        self.inbuf.extend_from_slice(data);
        self.process();
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Bytes to write.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// The session is over (failed or quit): write what is queued and close.
    pub fn should_close(&self) -> bool {
        self.closing
    }

    /// The server's extensions (after EHLO).
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// TLS is active.
    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after [`ClientEvent::StartTls`] completed: EHLO is sent again.
    pub fn tls_established(&mut self) {
        if self.phase != Phase::TlsHandshake || self.closing {
            return;
        }
        self.tls_active = true;
        self.ext = Extensions::default();
        self.inbuf.clear();
        self.phase = Phase::Setup;
        self.send_hello();
    }

    /// Starts a transaction (when [`ClientEvent::Ready`] or the previous
    /// [`ClientEvent::TransactionDone`] was seen).
    pub fn start_transaction(&mut self, env: Envelope) -> Result<(), ClientError> {
        if self.phase != Phase::Ready || self.closing {
            return Err(ClientError::InvalidState("not ready for a transaction"));
        }
        if env.rcpt_to.is_empty() {
            return Err(ClientError::BadEnvelope("no recipients"));
        }
        if !env.rcpt_params.is_empty() && env.rcpt_params.len() != env.rcpt_to.len() {
            return Err(ClientError::BadEnvelope(
                "rcpt_params must be empty or match rcpt_to",
            ));
        }
        let ext = &self.ext;
        if env.smtputf8 && !ext.smtputf8 {
            return Err(ClientError::MissingExtension("SMTPUTF8"));
        }
        if env.body == Body::EightBitMime && !ext.eightbitmime {
            return Err(ClientError::MissingExtension("8BITMIME"));
        }
        let binary = env.body == Body::BinaryMime;
        if binary {
            for (ok, name) in [
                (ext.binarymime, "BINARYMIME"),
                (ext.chunking, "CHUNKING"),
                (ext.pipelining, "PIPELINING"),
            ] {
                if !ok {
                    return Err(ClientError::MissingExtension(name));
                }
            }
        }
        if let Some(from) = &env.mail_from {
            Mailbox::parse(from, env.smtputf8).map_err(ClientError::InvalidAddress)?;
        }
        for r in &env.rcpt_to {
            Mailbox::parse(r, env.smtputf8).map_err(ClientError::InvalidAddress)?;
        }
        let bdat = binary || (self.cfg.prefer_chunking && ext.chunking && ext.pipelining);

        let mut mail = format!("MAIL FROM:<{}>", env.mail_from.as_deref().unwrap_or(""));
        if let (Some(s), Some(_)) = (env.size, ext.size) {
            mail.push_str(&format!(" SIZE={s}"));
        }
        match env.body {
            Body::SevenBit => {}
            Body::EightBitMime => mail.push_str(" BODY=8BITMIME"),
            Body::BinaryMime => mail.push_str(" BODY=BINARYMIME"),
        }
        if env.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if ext.dsn {
            match env.ret {
                Some(DsnRet::Full) => mail.push_str(" RET=FULL"),
                Some(DsnRet::Hdrs) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(id) = &env.envid {
                mail.push_str(&format!(" ENVID={}", encode_xtext(id)));
            }
        }
        let mut cmds = vec![(mail, Expect::Mail)];
        for (i, r) in env.rcpt_to.iter().enumerate() {
            let mut line = format!("RCPT TO:<{r}>");
            if let (true, Some(p)) = (ext.dsn, env.rcpt_params.get(i)) {
                if let Some(n) = &p.notify {
                    let list: Vec<&str> = n
                        .iter()
                        .map(|n| match n {
                            DsnNotify::Never => "NEVER",
                            DsnNotify::Success => "SUCCESS",
                            DsnNotify::Failure => "FAILURE",
                            DsnNotify::Delay => "DELAY",
                        })
                        .collect();
                    if !list.is_empty() {
                        line.push_str(&format!(" NOTIFY={}", list.join(",")));
                    }
                }
                if let Some(o) = &p.orcpt {
                    if o.addr_type.is_empty()
                        || !o
                            .addr_type
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    {
                        return Err(ClientError::BadEnvelope("bad ORCPT address type"));
                    }
                    line.push_str(&format!(" ORCPT={};{}", o.addr_type, encode_xtext(&o.addr)));
                }
            }
            cmds.push((line, Expect::Rcpt(i)));
        }
        let pipelined = ext.pipelining;
        if pipelined && !bdat {
            cmds.push(("DATA".into(), Expect::Data));
        }
        let n = env.rcpt_to.len();
        self.txn = Some(Txn {
            env,
            mail: None,
            rcpt: vec![None; n],
            data: None,
            final_reply: None,
            lmtp: vec![None; n],
            bdat,
            binary,
            pipelined,
            failed: false,
            completed: false,
            line_start: true,
            pending_cr: false,
        });
        self.phase = Phase::Txn;
        for (line, e) in cmds {
            if pipelined {
                self.write_cmd(&line, e);
            } else {
                self.queued.push_back((line, e));
            }
        }
        self.send_queued();
        Ok(())
    }

    /// Same as [`Client::start_transaction`], for reusing the connection.
    pub fn next_transaction(&mut self, env: Envelope) -> Result<(), ClientError> {
        self.start_transaction(env)
    }

    /// Message content after [`ClientEvent::SendBody`]; CRLF line ends only.
    pub fn send_body_chunk(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if self.phase != Phase::Body || self.closing {
            return Err(ClientError::InvalidState("no message body expected"));
        }
        let Some(t) = &mut self.txn else {
            return Err(ClientError::InvalidState("no transaction"));
        };
        if !t.binary {
            match crlf_only(data, t.pending_cr) {
                Some(pending_cr) => t.pending_cr = pending_cr,
                None => {
                    self.poison();
                    return Err(ClientError::BareLineEnding);
                }
            }
        }
        if data.is_empty() || t.failed {
            return Ok(());
        }
        if t.bdat {
            self.out
                .extend_from_slice(format!("BDAT {}\r\n", data.len()).as_bytes());
            self.out.extend_from_slice(data);
            self.expect.push_back(Expect::BdatChunk);
            return Ok(());
        }
        // Dot-stuffing: a line starting with "." gets another one.
        let mut start = 0;
        let line_starts = t
            .line_start
            .then_some(0)
            .into_iter()
            .chain(memchr::memchr_iter(b'\n', data).map(|nl| nl + 1));
        for i in line_starts {
            if data.get(i) == Some(&b'.') {
                self.out.extend_from_slice(&data[start..i]);
                self.out.extend_from_slice(b".");
                start = i;
            }
        }
        t.line_start = data.last() == Some(&b'\n');
        self.out.extend_from_slice(&data[start..]);
        Ok(())
    }

    /// Ends the message body.
    pub fn end_body(&mut self) -> Result<(), ClientError> {
        if self.phase != Phase::Body || self.closing {
            return Err(ClientError::InvalidState("no message body expected"));
        }
        let Some(t) = &mut self.txn else {
            return Err(ClientError::InvalidState("no transaction"));
        };
        if t.pending_cr {
            self.poison();
            return Err(ClientError::BareLineEnding);
        }
        self.phase = Phase::Txn;
        if t.failed {
            self.maybe_finish();
            return Ok(());
        }
        if t.bdat {
            self.out.extend_from_slice(b"BDAT 0 LAST\r\n");
        } else {
            if !t.line_start {
                self.out.extend_from_slice(b"\r\n");
            }
            self.out.extend_from_slice(b".\r\n");
        }
        if self.cfg.lmtp {
            let accepted: Vec<usize> = t
                .rcpt
                .iter()
                .enumerate()
                .filter(|(_, r)| r.as_ref().is_some_and(Reply::is_positive))
                .map(|(i, _)| i)
                .collect();
            for i in accepted {
                self.expect.push_back(Expect::LmtpFinal(i));
            }
        } else {
            self.expect.push_back(Expect::DataFinal);
        }
        Ok(())
    }

    /// Sends QUIT; [`ClientEvent::Closed`] follows the reply.
    pub fn quit(&mut self) {
        if self.closing || self.expect.contains(&Expect::Quit) {
            return;
        }
        self.queued.clear();
        self.write_cmd("QUIT", Expect::Quit);
    }

    // ---- internals ----

    fn poison(&mut self) {
        self.closing = true;
        self.phase = Phase::Closed;
        self.txn = None;
    }

    fn write_cmd(&mut self, line: &str, e: Expect) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.expect.push_back(e);
    }

    fn send_queued(&mut self) {
        if self.expect.is_empty()
            && let Some((line, e)) = self.queued.pop_front()
        {
            self.write_cmd(&line, e);
        }
    }

    fn fail(&mut self, e: ClientError, polite: bool) {
        if self.closing {
            return;
        }
        if polite {
            self.out.extend_from_slice(b"QUIT\r\n");
        }
        self.events.push_back(ClientEvent::Failed(e));
        self.poison();
    }

    fn send_hello(&mut self) {
        let name = &self.cfg.helo_name;
        if name.is_empty() || name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            self.fail(ClientError::InvalidHeloName, true);
            return;
        }
        let verb = if self.cfg.lmtp { "LHLO" } else { "EHLO" };
        let line = format!("{verb} {name}");
        self.write_cmd(&line, Expect::Ehlo);
    }

    fn process(&mut self) {
        let limits = ReplyLimits {
            max_line: self.cfg.max_reply_line,
            max_lines: self.cfg.max_reply_lines,
        };
        while !self.closing {
            if self.phase == Phase::TlsHandshake {
                // Anything after the 220 to STARTTLS is an injection attempt.
                self.inbuf.clear();
                return;
            }
            match parse_reply(&self.inbuf, limits) {
                Ok(None) => break,
                Err(e) => self.fail(ClientError::BadReply(e), false),
                Ok(Some((reply, n))) => {
                    self.inbuf.advance(n);
                    match self.expect.pop_front() {
                        None => self.fail(ClientError::UnexpectedReply(reply), false),
                        Some(e) => self.handle(e, reply),
                    }
                    self.send_queued();
                }
            }
        }
    }

    fn after_hello(&mut self) {
        if !self.tls_active
            && !self.tls_declined
            && self.cfg.use_starttls != StartTlsPolicy::Never
            && self.ext.starttls
        {
            self.write_cmd("STARTTLS", Expect::StartTls);
            return;
        }
        if !self.tls_active && self.cfg.use_starttls == StartTlsPolicy::Required {
            self.fail(ClientError::TlsNotOffered, true);
            return;
        }
        if let Some((user, pass)) = &self.cfg.auth
            && !self.authenticated
        {
            if !self.tls_active {
                self.fail(ClientError::AuthWithoutTls, true);
                return;
            }
            if !self.ext.auth_plain {
                self.fail(ClientError::AuthNotOffered, true);
                return;
            }
            if user.contains('\0') || pass.expose().contains(&0) {
                self.fail(ClientError::InvalidCredentials, true);
                return;
            }
            let mut raw = Vec::with_capacity(user.len() + pass.expose().len() + 2);
            raw.push(0);
            raw.extend_from_slice(user.as_bytes());
            raw.push(0);
            raw.extend_from_slice(pass.expose());
            let mut line = format!("AUTH PLAIN {}\r\n", B64.encode(&raw)).into_bytes();
            wipe(&mut raw);
            self.out.extend_from_slice(&line);
            wipe(&mut line);
            self.expect.push_back(Expect::Auth);
            return;
        }
        self.phase = Phase::Ready;
        self.events.push_back(ClientEvent::Ready);
    }

    fn handle(&mut self, e: Expect, r: Reply) {
        match e {
            Expect::Greeting => {
                if r.code() == 220 {
                    self.send_hello();
                } else {
                    self.fail(ClientError::Refused(r), true);
                }
            }
            Expect::Ehlo => {
                if r.is_positive() {
                    self.ext = Extensions::parse(&r);
                    self.after_hello();
                } else if r.is_permanent() && !self.cfg.lmtp {
                    let line = format!("HELO {}", self.cfg.helo_name);
                    self.write_cmd(&line, Expect::Helo);
                } else {
                    self.fail(ClientError::HeloRefused(r), true);
                }
            }
            Expect::Helo => {
                if r.is_positive() {
                    self.ext = Extensions::default();
                    self.after_hello();
                } else {
                    self.fail(ClientError::HeloRefused(r), true);
                }
            }
            Expect::StartTls => {
                if r.code() == 220 {
                    self.phase = Phase::TlsHandshake;
                    self.inbuf.clear();
                    self.events.push_back(ClientEvent::StartTls);
                } else if self.cfg.use_starttls == StartTlsPolicy::Required {
                    self.fail(ClientError::TlsRefused(r), true);
                } else {
                    self.tls_declined = true;
                    self.after_hello();
                }
            }
            Expect::Auth => {
                if r.code() == 235 {
                    self.authenticated = true;
                    self.after_hello();
                } else {
                    self.fail(ClientError::AuthFailed(r), true);
                }
            }
            Expect::Rset => {
                if r.is_positive() {
                    self.phase = Phase::Ready;
                    if let Some(res) = self.done.take() {
                        self.events.push_back(ClientEvent::TransactionDone(res));
                    }
                } else {
                    self.fail(ClientError::UnexpectedReply(r), true);
                }
            }
            Expect::Quit => {
                self.events.push_back(ClientEvent::Closed);
                self.poison();
            }
            _ => self.handle_txn(e, r),
        }
    }

    fn handle_txn(&mut self, e: Expect, r: Reply) {
        let Some(t) = &mut self.txn else {
            self.fail(ClientError::UnexpectedReply(r), false);
            return;
        };
        match e {
            Expect::Mail => {
                let ok = r.is_positive();
                t.mail = Some(r);
                if !ok && !t.pipelined {
                    self.queued.clear();
                    self.finish();
                }
            }
            Expect::Rcpt(i) => {
                t.rcpt[i] = Some(r);
                let last = i + 1 == t.rcpt.len();
                if last && (!t.pipelined || t.bdat) {
                    if t.any_rcpt_ok() {
                        if t.bdat {
                            self.phase = Phase::Body;
                            self.events.push_back(ClientEvent::SendBody);
                        } else {
                            self.queued.push_back(("DATA".into(), Expect::Data));
                        }
                    } else {
                        self.finish();
                    }
                }
            }
            Expect::Data => {
                let go = r.code() == 354;
                t.data = Some(r);
                if go && t.any_rcpt_ok() {
                    self.phase = Phase::Body;
                    self.events.push_back(ClientEvent::SendBody);
                } else if go {
                    // 354 although no recipient was accepted (RFC 2920 3.1): send an empty
                    // message and treat the transaction as failed.
                    t.failed = true;
                    self.out.extend_from_slice(b".\r\n");
                    self.expect.push_back(Expect::DataFinal);
                } else {
                    self.finish();
                }
            }
            Expect::BdatChunk => {
                if !r.is_positive() && !t.failed {
                    t.failed = true;
                    t.data = Some(r);
                }
                self.maybe_finish();
            }
            Expect::DataFinal => {
                t.completed = true;
                t.final_reply = Some(r);
                self.finish();
            }
            Expect::LmtpFinal(i) => {
                t.lmtp[i] = Some(r);
                if !self
                    .expect
                    .iter()
                    .any(|e| matches!(e, Expect::LmtpFinal(_)))
                {
                    t.completed = true;
                    self.finish();
                }
            }
            _ => self.fail(ClientError::UnexpectedReply(r), false),
        }
    }

    /// A failed BDAT transaction ends once the body is over and every chunk was answered.
    fn maybe_finish(&mut self) {
        if let Some(t) = &self.txn
            && t.failed
            && self.phase == Phase::Txn
            && !self.expect.contains(&Expect::BdatChunk)
            && !self
                .expect
                .iter()
                .any(|e| matches!(e, Expect::DataFinal | Expect::LmtpFinal(_)))
        {
            self.finish();
        }
    }

    fn finish(&mut self) {
        let Some(t) = self.txn.take() else { return };
        let mail = t
            .mail
            .clone()
            .unwrap_or_else(|| Reply::new(451, "4.3.0", "no reply to MAIL"));
        let data_fail = t.data.as_ref().filter(|d| d.code() != 354).cloned();
        let recipients = t
            .env
            .rcpt_to
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let outcome = if !mail.is_positive() {
                    Outcome::from_reply(&mail)
                } else {
                    match &t.rcpt[i] {
                        None => Outcome::TempFail(Reply::new(451, "4.3.0", "no reply to RCPT")),
                        Some(r) if !r.is_positive() => Outcome::from_reply(r),
                        Some(_) => {
                            let fin = if let Some(d) = &data_fail {
                                Some(d)
                            } else if self.cfg.lmtp {
                                t.lmtp[i].as_ref()
                            } else {
                                t.final_reply.as_ref()
                            };
                            match fin {
                                Some(f) if t.failed && f.is_positive() => Outcome::TempFail(
                                    Reply::new(451, "4.3.0", "transaction failed"),
                                ),
                                Some(f) => Outcome::from_reply(f),
                                None => {
                                    Outcome::TempFail(Reply::new(451, "4.3.0", "message not sent"))
                                }
                            }
                        }
                    }
                };
                RecipientResult {
                    address: addr.clone(),
                    outcome,
                }
            })
            .collect();
        let result = TransactionResult {
            mail_reply: mail.clone(),
            data_reply: data_fail.or(t.final_reply.clone()),
            recipients,
        };
        self.queued.clear();
        if mail.is_positive() && !t.completed {
            // The server may still hold transaction state.
            self.done = Some(result);
            self.phase = Phase::Txn;
            self.write_cmd("RSET", Expect::Rset);
        } else {
            self.phase = Phase::Ready;
            self.events.push_back(ClientEvent::TransactionDone(result));
        }
    }
}

/// Whether every CR in `data` is followed by LF and every LF preceded by CR, given whether the
/// bytes before ended with a CR: `Some(data ends with a CR)`, or `None` at the first bare one.
fn crlf_only(data: &[u8], pending_cr: bool) -> Option<bool> {
    // Where the LF that a CR asks for must be.
    let mut lf_due = pending_cr.then_some(0);
    for at in memchr::memchr2_iter(b'\r', b'\n', data) {
        match (data[at], lf_due) {
            (b'\n', Some(due)) if due == at => lf_due = None,
            (b'\r', None) => lf_due = Some(at + 1),
            _ => return None,
        }
    }
    match lf_due {
        Some(due) if due < data.len() => None,
        due => Some(due.is_some()),
    }
}

#[cfg(test)]
mod crlf_tests {
    use super::crlf_only;

    /// The byte-at-a-time rule the scan must agree with.
    fn reference(data: &[u8], mut prev: bool) -> Option<bool> {
        for &b in data {
            if (prev && b != b'\n') || (!prev && b == b'\n') {
                return None;
            }
            prev = b == b'\r';
        }
        Some(prev)
    }

    #[test]
    fn agrees_with_the_byte_rule_on_every_short_input() {
        // Every string of length up to 7 over {CR, LF, 'a', '.'}, with and without a CR before.
        let alphabet = [b'\r', b'\n', b'a', b'.'];
        for len in 0..=7u32 {
            for n in 0..4usize.pow(len) {
                let data: Vec<u8> = (0..len).map(|k| alphabet[(n >> (2 * k)) & 3]).collect();
                for pending in [false, true] {
                    assert_eq!(
                        crlf_only(&data, pending),
                        reference(&data, pending),
                        "{data:?} pending {pending}"
                    );
                }
            }
        }
    }
}
