//! The server side: an I/O-free SMTP/LMTP session.
//!
//! ```text
//!             receive(bytes)                      poll_transmit() -> reply bytes
//!   socket ─────────────────▶ ┌────────────┐ ─────────────────────────────────▶ socket
//!                             │   Server   │
//!   driver ◀───────────────── │ (no I/O,   │ ◀──────────────────────────────── driver
//!          poll_event()       │  no clock) │   accept() / reject() / data_committed()
//!          Helo, MailFrom,    └────────────┘   auth_result() / tls_established()
//!          RcptTo, DataChunk…
//! ```
//!
//! # Driving it
//!
//! 1. `Server::new`, then `greet()` (or `refuse_connection()`), then loop:
//! 2. write everything `poll_transmit()` returns;
//! 3. handle every `poll_event()`; events marked *needs a verdict* stop the parser until the
//!    driver answers with [`Server::accept`], [`Server::reject`], [`Server::data_committed`] or
//!    [`Server::auth_result`];
//! 4. if `should_close()`, flush and close; else read more bytes (only while
//!    [`Server::wants_input`]: pipelined input is buffered up to
//!    [`ServerConfig::max_pending_input`], then the session is closed with 421) and `receive()`.
//!
//! Replies are always queued in command order (RFC 2920).
//!
//! # Strict framing
//!
//! Only CRLF ends a command line and only CRLF "." CRLF ends DATA. A bare LF or bare CR in a
//! command line or in DATA content is answered with `521 5.5.2 <host> Error: bare <LF>
//! received` (or `<CR>`) and the session closes (Postfix `smtpd_forbid_bare_newline = yes`
//! behaviour). Nothing after it is parsed, so "\n.\n", "\r.\r", "\n.\r\n" or "\r\n.\n" can never
//! end a message early and smuggle a second one (CVE-2023-51764/51765/51766, CVE-2023-52354).
//!
//! BDAT content is counted, never parsed for framing. Bare CR/LF are allowed in it only with
//! `BODY=BINARYMIME`; otherwise the message (not the session) is refused with `550 5.6.0`, the
//! rest of the chunk is still consumed.
//!
//! # STARTTLS
//!
//! After STARTTLS the server queues `220 2.0.0 Ready to start TLS`, emits [`Event::StartTls`]
//! and discards every byte already buffered or received later until
//! [`Server::tls_established`] (CVE-2011-0411 command injection). The driver must write the
//! 220 in plaintext, then run the handshake and must not feed bytes received before the
//! handshake completes: any such bytes are a driver bug and are dropped. After the handshake
//! the session is back in its initial state (EHLO needed again; AUTH and HELO forgotten).
//!
//! # Timeouts
//!
//! The core never reads a clock. Drivers should call [`Server::timeout`] after 300 s without a
//! complete command (Postfix `smtpd_timeout`), and after 600 s without progress inside
//! DATA/BDAT (RFC 5321 4.5.3.2.6 suggests 10 minutes for the DATA block).
//!
//! # Reply codes chosen
//!
//! | situation | reply |
//! |---|---|
//! | command line too long | `500 5.5.2 Error: line too long` |
//! | unknown command / NUL / bad UTF-8 | `500 5.5.2 ...` |
//! | bad syntax | `501 5.5.4 Syntax: ...` |
//! | bad sender / recipient path (source route, brackets, lengths) | `501 5.1.7` / `501 5.1.3` |
//! | 8-bit address without SMTPUTF8 | `553 5.6.7` |
//! | bad parameter value / duplicate | `501 5.5.4` |
//! | unknown parameter, or parameters after HELO | `555 5.5.4` |
//! | SIZE= over the limit | `552 5.3.4` |
//! | message over the limit | `552 5.3.4 Error: message file too big` |
//! | header section over the limit | `552 5.3.4 Error: message header too large` |
//! | data line over `max_data_line` | `550 5.6.0 Error: message line too long` |
//! | bare CR/LF in BDAT without BINARYMIME | `550 5.6.0` |
//! | too many recipients | `452 4.5.3 Error: too many recipients` |
//! | out of sequence | `503 5.5.1 ...`; DATA/BDAT without an accepted RCPT: `554 5.5.1` |
//! | too many errors | `421 4.7.0 <host> Error: too many errors`, close |
//! | too much pipelined input | `421 4.7.0 <host> Error: too much pipelined input`, close |
//! | timeout | `421 4.4.2 <host> Error: timeout exceeded`, close |
//! | AUTH before TLS | `538 5.7.11` |
//! | AUTH cancelled | `501 5.0.0`; undecodable: `501 5.5.2`; failed: `535 5.7.8` |
//! | AUTH mechanism not offered | `504 5.5.4` |
//!
//! # SASL mechanisms
//!
//! PLAIN and LOGIN are decoded here ([`Event::AuthPlain`], [`Event::AuthLogin`]). Multi-step
//! mechanisms (SCRAM-SHA-256) are relayed: each client response (the initial response of
//! `AUTH <mech> <ir>`, or a line after a `334`) becomes an [`Event::AuthSasl`]; the driver
//! answers with [`Server::auth_challenge`] (a `334` carrying the next server message, base64)
//! or [`Server::auth_result`]. RFC 4954 has no "success with data": a mechanism whose last
//! server message comes with success (SCRAM's `v=`) sends it as a challenge, and the client's
//! empty response then gets the `235`. `*` cancels at any step (`501 5.0.0`) without an event.
//! | malformed BDAT line | `501 5.5.4`, then close (the chunk size is unknown, so the byte stream cannot be re-framed) |

use std::collections::VecDeque;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::buf::Limit;
use bytes::{BufMut, Bytes, BytesMut};

use crate::address::{AddressError, Mailbox};
use crate::command::{
    Body, Command, MailParamPolicy, MailParams, RcptParams, parse_command, parse_mail_params,
    parse_rcpt_params,
};
use crate::reply::Reply;
use crate::secret::{Secret, wipe};

/// Largest [`Event::DataChunk`].
pub const MAX_CHUNK: usize = 64 * 1024;

/// Longest AUTH response line (RFC 4954 section 4), CRLF included.
const MAX_AUTH_LINE: usize = 12288;

/// Server settings, shared by all sessions of a listener.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// In the 220 greeting and the EHLO reply.
    pub hostname: String,
    /// Longest command line, CRLF included (default 2048).
    pub max_command_line: usize,
    /// Longest line of message content, CRLF included (default: no limit, as Postfix). RFC 5321
    /// 4.5.3.1.6 names 1000, but 4.5.3.1 asks receivers to impose no limits where they can, and
    /// mail with longer lines is common; content is streamed, so a long line costs no memory.
    /// 1000 refuses what RFC 5322 2.1.1 forbids (550 5.6.0 at the end of the message).
    pub max_data_line: usize,
    /// Most accepted recipients per transaction (default 1000).
    pub max_recipients: usize,
    /// Largest message in octets, advertised as SIZE (default 50 MB).
    pub max_message_size: u64,
    /// Largest header section in octets (default 1 MiB).
    pub max_header_bytes: u64,
    /// Most `Received:` header fields a message may carry once this server has added its own
    /// (default 50, Postfix's `hopcount_limit`): a message arriving with `max_hops` or more is
    /// a mail loop (RFC 5321 6.3), refused with 554 5.4.6.
    pub max_hops: u32,
    /// Error replies before `421 Too many errors` (default 20).
    pub max_errors: u32,
    /// Junk commands (NOOP, RSET, VRFY, HELP, a repeated HELO/EHLO/LHLO) allowed per session
    /// (default 100, Postfix's `smtpd_junk_command_limit`); each one beyond counts as an error
    /// toward `max_errors`.
    pub max_junk_commands: u32,
    /// Unparsed pipelined input allowed while a verdict is pending (default 64 KiB).
    pub max_pending_input: usize,
    /// Offer STARTTLS (when TLS is not active yet).
    pub offer_starttls: bool,
    /// Offer AUTH (only ever advertised and accepted under TLS).
    pub offer_auth: bool,
    /// The mechanisms AUTH advertises and accepts, in EHLO order (default PLAIN, LOGIN).
    pub auth_mechanisms: Vec<AuthMechanism>,
    /// Offer BINARYMIME (RFC 3030); off by default.
    pub offer_binarymime: bool,
    /// LMTP (RFC 2033): LHLO instead of HELO/EHLO, one reply per recipient after the message.
    pub lmtp: bool,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            hostname: "localhost".into(),
            max_command_line: 2048,
            max_data_line: usize::MAX,
            max_recipients: 1000,
            max_message_size: 50_000_000,
            max_header_bytes: 1 << 20,
            max_hops: 50,
            max_errors: 20,
            max_junk_commands: 100,
            max_pending_input: 64 * 1024,
            offer_starttls: false,
            offer_auth: false,
            auth_mechanisms: vec![AuthMechanism::Plain, AuthMechanism::Login],
            offer_binarymime: false,
            lmtp: false,
        }
    }
}

/// A SASL mechanism the server can offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMechanism {
    /// RFC 4616, decoded by the core.
    Plain,
    /// The de-facto LOGIN mechanism, decoded by the core.
    Login,
    /// RFC 5802/7677, relayed to the driver ([`Event::AuthSasl`]).
    ScramSha256,
}

impl AuthMechanism {
    /// Every mechanism, strongest last.
    pub const ALL: [AuthMechanism; 3] = [
        AuthMechanism::Plain,
        AuthMechanism::Login,
        AuthMechanism::ScramSha256,
    ];

    /// The IANA name, as advertised.
    pub fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::Login => "LOGIN",
            AuthMechanism::ScramSha256 => "SCRAM-SHA-256",
        }
    }

    /// Looks a name up, case-insensitively.
    pub fn from_name(name: &str) -> Option<AuthMechanism> {
        AuthMechanism::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }
}

/// Why the core refused a message it was receiving (see [`Event::DataAborted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// More than `max_message_size` octets (552 5.3.4 at the end of the message).
    MessageTooBig,
    /// Header section over `max_header_bytes` (552 5.3.4 at the end of the message).
    HeaderTooLarge,
    /// A line over `max_data_line` (550 5.6.0 at the end of the message).
    LineTooLong,
    /// `max_hops` or more Received header fields (with ours, more than `max_hops`): a mail
    /// loop (554 5.4.6 at the end of the message).
    TooManyHops,
    /// Bare CR or LF in BDAT content without BINARYMIME (550 5.6.0 after the chunk).
    BareLineEnding,
    /// Bare LF in DATA: the session closes.
    BareLf,
    /// Bare CR in DATA: the session closes.
    BareCr,
    /// [`Server::timeout`] during the message: the session closes.
    Timeout,
    /// The session closed for another reason (too many errors, too much input).
    SessionClosed,
}

impl AbortReason {
    fn reply(self) -> Reply {
        match self {
            AbortReason::MessageTooBig => Reply::new(552, "5.3.4", "Error: message file too big"),
            AbortReason::HeaderTooLarge => {
                Reply::new(552, "5.3.4", "Error: message header too large")
            }
            AbortReason::LineTooLong => Reply::new(550, "5.6.0", "Error: message line too long"),
            AbortReason::TooManyHops => {
                Reply::new(554, "5.4.6", "Error: too many hops (mail loop)")
            }
            _ => Reply::new(
                550,
                "5.6.0",
                "Error: bare <CR> or <LF> in message content requires BODY=BINARYMIME",
            ),
        }
    }
}

/// What the driver must act on. The ones documented as *needs a verdict* stop the parser until
/// the driver answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// HELO/EHLO/LHLO. Needs a verdict (`accept` sends the greeting/extension list). Any open
    /// transaction was reset first ([`Event::Reset`]).
    Helo {
        /// The argument as sent (printable ASCII, not otherwise checked: HELO policy is the
        /// driver's).
        name: String,
        /// EHLO or LHLO.
        extended: bool,
    },
    /// MAIL FROM. Needs a verdict (`accept`: `250 2.1.0 Ok`).
    MailFrom {
        /// `None` for the null reverse path `<>`.
        reverse_path: Option<Mailbox>,
        /// Parameters.
        params: MailParams,
    },
    /// RCPT TO. Needs a verdict (`accept`: `250 2.1.5 Ok`).
    RcptTo {
        /// The recipient. `<postmaster>` without a domain gets the server's host name.
        forward_path: Mailbox,
        /// Parameters.
        params: RcptParams,
    },
    /// A message starts (DATA got 354, or the first accepted BDAT chunk).
    DataStart,
    /// Message content: un-dot-stuffed, in order, at most [`MAX_CHUNK`] bytes. Chunk boundaries
    /// depend on how the input arrived.
    DataChunk(Bytes),
    /// The message is complete. Needs a verdict: `data_committed` or `reject`. The transaction
    /// ends with it.
    DataEnd,
    /// The core refused the message being received; the driver drops what it spooled. No
    /// verdict; the transaction ends (and the session too for bare CR/LF, timeouts, closes).
    DataAborted {
        /// Why.
        reason: AbortReason,
    },
    /// The 220 for STARTTLS is queued: write it, do the TLS handshake, then call
    /// `tls_established`.
    StartTls,
    /// AUTH PLAIN credentials. Needs `auth_result` (or `reject`).
    AuthPlain {
        /// Authorization identity, if one was given.
        authzid: Option<String>,
        /// Authentication identity.
        authcid: String,
        /// Password.
        password: Secret,
    },
    /// AUTH LOGIN credentials. Needs `auth_result` (or `reject`).
    AuthLogin {
        /// Always `None` (LOGIN has no authorization identity).
        authzid: Option<String>,
        /// User name.
        authcid: String,
        /// Password.
        password: Secret,
    },
    /// One client response of a multi-step mechanism (see the module documentation). Needs
    /// `auth_challenge`, `auth_result` (or `reject`).
    AuthSasl {
        /// The mechanism.
        mechanism: AuthMechanism,
        /// True for the first response of an exchange (the driver starts afresh).
        first: bool,
        /// The decoded response (empty for an empty line or `=`).
        response: Secret,
    },
    /// RSET, or an implicit reset (EHLO during a transaction): drop the transaction state.
    Reset,
    /// QUIT: 221 is queued; the session closes.
    Quit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeloKind {
    Helo,
    Ehlo,
}

/// Message content checks shared by DATA and BDAT.
#[derive(Debug)]
struct Content {
    /// Bare CR/LF refused (everything but BINARYMIME).
    strict: bool,
    size: u64,
    in_header: bool,
    line_len: usize,
    prev_cr: bool,
    refused: Option<AbortReason>,
    reported: bool,
    /// The first bytes of the current header line (enough to recognise `Received:`).
    head: [u8; HOP_FIELD.len()],
    /// `Received:` fields seen so far.
    hops: u32,
}

/// The trace field counted for loop detection, lower case, colon included.
const HOP_FIELD: &[u8] = b"received:";

impl Content {
    fn new(strict: bool) -> Content {
        Content {
            strict,
            size: 0,
            in_header: true,
            line_len: 0,
            prev_cr: false,
            refused: None,
            reported: false,
            head: [0; HOP_FIELD.len()],
            hops: 0,
        }
    }

    /// Checks `data` and appends it to `out` unless the message is (or becomes) refused.
    fn feed(&mut self, data: &[u8], out: &mut BytesMut, cfg: &ServerConfig) {
        if self.refused.is_some() || data.is_empty() {
            return;
        }
        let base = self.size;
        let mut i = 0;
        while i < data.len() {
            match data[i] {
                b'\r' => {
                    if self.prev_cr && self.strict {
                        self.refused = Some(AbortReason::BareLineEnding);
                        return;
                    }
                    self.prev_cr = true;
                    i += 1;
                }
                b'\n' if self.prev_cr => {
                    if self.in_header && self.line_len == 0 {
                        self.in_header = false;
                        if base + i as u64 + 1 > cfg.max_header_bytes {
                            self.refused = Some(AbortReason::HeaderTooLarge);
                            return;
                        }
                    } else if self.in_header
                        && self.line_len >= HOP_FIELD.len()
                        && self.head.eq_ignore_ascii_case(HOP_FIELD)
                    {
                        self.hops += 1;
                        // Counting the Received field this server adds (Postfix
                        // `hopcount_limit`): the next hop must not see more than the limit.
                        if self.hops.saturating_add(1) > cfg.max_hops {
                            self.refused = Some(AbortReason::TooManyHops);
                            return;
                        }
                    }
                    self.line_len = 0;
                    self.prev_cr = false;
                    i += 1;
                }
                b'\n' if self.strict => {
                    self.refused = Some(AbortReason::BareLineEnding);
                    return;
                }
                _ => {
                    if self.prev_cr {
                        if self.strict {
                            self.refused = Some(AbortReason::BareLineEnding);
                            return;
                        }
                        self.prev_cr = false;
                    }
                    let end = data[i + 1..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .map_or(data.len(), |p| i + 1 + p);
                    if self.in_header && self.line_len < HOP_FIELD.len() {
                        // Keep the line's first bytes, even when it arrives split.
                        let take = (HOP_FIELD.len() - self.line_len).min(end - i);
                        self.head[self.line_len..self.line_len + take]
                            .copy_from_slice(&data[i..i + take]);
                    }
                    self.line_len += end - i;
                    i = end;
                    if self.strict && self.line_len.saturating_add(2) > cfg.max_data_line {
                        self.refused = Some(AbortReason::LineTooLong);
                        return;
                    }
                }
            }
            if self.in_header && base + i as u64 > cfg.max_header_bytes {
                self.refused = Some(AbortReason::HeaderTooLarge);
                return;
            }
        }
        self.size += data.len() as u64;
        if self.size > cfg.max_message_size {
            self.refused = Some(AbortReason::MessageTooBig);
            return;
        }
        out.extend_from_slice(data);
    }
}

/// Dot-stuffing / end-of-data state for DATA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DotState {
    LineStart,
    Dot,
    DotCr,
    Mid,
    Cr,
}

enum DataScan {
    More,
    End(usize),
    BareLf,
    BareCr,
}

fn scan_data(
    st: &mut DotState,
    content: &mut Content,
    data: &[u8],
    out: &mut BytesMut,
    cfg: &ServerConfig,
) -> DataScan {
    let mut i = 0;
    while i < data.len() {
        match *st {
            DotState::Mid => {
                let end = data[i..]
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .map_or(data.len(), |p| i + p);
                content.feed(&data[i..end], out, cfg);
                i = end;
                if i == data.len() {
                    break;
                }
                if data[i] == b'\n' {
                    return DataScan::BareLf;
                }
                *st = DotState::Cr;
                i += 1;
            }
            DotState::LineStart => match data[i] {
                b'.' => {
                    *st = DotState::Dot;
                    i += 1;
                }
                b'\r' => {
                    *st = DotState::Cr;
                    i += 1;
                }
                b'\n' => return DataScan::BareLf,
                _ => *st = DotState::Mid,
            },
            // A leading dot is removed (RFC 5321 4.5.2), whatever follows it.
            DotState::Dot => match data[i] {
                b'\r' => {
                    *st = DotState::DotCr;
                    i += 1;
                }
                b'\n' => return DataScan::BareLf,
                _ => *st = DotState::Mid,
            },
            DotState::DotCr => {
                return if data[i] == b'\n' {
                    DataScan::End(i + 1)
                } else {
                    DataScan::BareCr
                };
            }
            DotState::Cr => {
                if data[i] != b'\n' {
                    return DataScan::BareCr;
                }
                content.feed(b"\r\n", out, cfg);
                *st = DotState::LineStart;
                i += 1;
            }
        }
    }
    DataScan::More
}

enum Mode {
    Command,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
    /// A multi-step exchange; true until the first response.
    AuthSasl(AuthMechanism, bool),
    Data(DotState, Content),
    Bdat {
        remaining: u64,
        last: bool,
        /// `None`: stream into the transaction's content. `Some`: discard, then send this.
        discard: Option<Reply>,
        end_txn: bool,
    },
    TlsPending,
    Closed,
}

enum Pending {
    None,
    Helo(HeloKind),
    Mail(MailParams),
    Rcpt,
    DataEnd,
    Auth,
}

struct Txn {
    params: MailParams,
    rcpts: usize,
    /// BDAT content once the first chunk was accepted.
    bdat: Option<Content>,
}

/// One server session. See the module documentation.
pub struct Server {
    cfg: Arc<ServerConfig>,
    tls_active: bool,
    greeted: bool,
    closing: bool,
    helo: Option<HeloKind>,
    authenticated: bool,
    /// The multi-step mechanism whose response is pending.
    sasl: Option<AuthMechanism>,
    txn: Option<Txn>,
    mode: Mode,
    pending: Pending,
    inbuf: BytesMut,
    /// Discarding an overlong command line; the flag is "last byte was CR".
    skipping: Option<bool>,
    data_open: bool,
    chunk: BytesMut,
    events: VecDeque<Event>,
    out: BytesMut,
    errors: u32,
    /// Junk commands so far (see [`ServerConfig::max_junk_commands`]).
    junk: u32,
}

impl Server {
    /// A new session. `tls_active` is true for implicit TLS (port 465).
    pub fn new(cfg: Arc<ServerConfig>, tls_active: bool) -> Server {
        Server {
            cfg,
            tls_active,
            greeted: false,
            closing: false,
            helo: None,
            authenticated: false,
            sasl: None,
            txn: None,
            mode: Mode::Command,
            pending: Pending::None,
            inbuf: BytesMut::new(),
            skipping: None,
            data_open: false,
            chunk: BytesMut::new(),
            events: VecDeque::new(),
            out: BytesMut::new(),
            errors: 0,
            junk: 0,
        }
    }

    /// Queues the greeting. Input received before it is buffered and handled afterwards.
    pub fn greet(&mut self) {
        if self.greeted || self.closing {
            return;
        }
        self.greeted = true;
        let proto = if self.cfg.lmtp { "LMTP" } else { "ESMTP" };
        let host = self.cfg.hostname.clone();
        self.send(Reply::new(220, "", &format!("{host} {proto} ringmail")));
        self.process();
    }

    /// Refuses the connection instead of greeting (e.g. `554 5.7.1` for a blocklisted client),
    /// then closes.
    pub fn refuse_connection(&mut self, code: u16, enhanced: &str, text: &str) {
        if self.closing {
            return;
        }
        self.greeted = true;
        self.send(Reply::new(code, enhanced, text));
        self.close(AbortReason::SessionClosed);
    }

    /// Feeds bytes from the client, split anywhere.
    pub fn receive(&mut self, data: &[u8]) {
        if self.closing || matches!(self.mode, Mode::TlsPending) {
            return;
        }
        self.inbuf.extend_from_slice(data);
        self.process();
    }

    /// Room for the driver to read the client's next bytes into, right after the unparsed
    /// input: at most `max` bytes, not zeroed, no copy through a buffer of the driver's. Report
    /// how many were read with [`Server::received`] (which is [`Server::receive`] for them).
    pub fn input_space(&mut self, max: usize) -> Limit<&mut BytesMut> {
        self.inbuf.reserve(max);
        (&mut self.inbuf).limit(max)
    }

    /// `n` bytes were read into [`Server::input_space`]: processes them as `receive` would.
    pub fn received(&mut self, n: usize) {
        if self.closing || matches!(self.mode, Mode::TlsPending) {
            // What `receive` would not have taken.
            let keep = self.inbuf.len().saturating_sub(n);
            wipe(&mut self.inbuf[keep..]);
            self.inbuf.truncate(keep);
            return;
        }
        self.process();
    }

    /// The next event. Call until `None` after every `receive` and verdict.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Reply bytes to write, in order.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// The session is over: write what `poll_transmit` still returns, then close.
    pub fn should_close(&self) -> bool {
        self.closing
    }

    /// Whether the driver should read more: false while a verdict or the TLS handshake is
    /// pending, and when closing. A driver that reads only while this is true, at most
    /// `max_pending_input` bytes at a time, never trips the pending-input limit.
    pub fn wants_input(&self) -> bool {
        !self.closing
            && matches!(self.pending, Pending::None)
            && !matches!(self.mode, Mode::TlsPending)
    }

    /// Bytes held by the core (unparsed input plus content not yet emitted). Bounded by
    /// `max_pending_input` plus one read.
    pub fn buffered_len(&self) -> usize {
        self.inbuf.len() + self.chunk.len()
    }

    /// TLS is active on this session.
    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// AUTH succeeded on this session.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The driver's timer fired: queues `421 4.4.2 <host> Error: timeout exceeded` and closes.
    pub fn timeout(&mut self) {
        if self.closing {
            return;
        }
        let host = self.cfg.hostname.clone();
        self.send(Reply::new(
            421,
            "4.4.2",
            &format!("{host} Error: timeout exceeded"),
        ));
        self.close(AbortReason::Timeout);
    }

    /// Positive verdict for the pending HELO/EHLO/LHLO, MAIL or RCPT (or DataEnd, as
    /// `data_committed` without an id). Ignored when nothing of that kind is pending.
    pub fn accept(&mut self) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Helo(kind) => {
                self.helo = Some(kind);
                let r = match kind {
                    HeloKind::Ehlo => self.ehlo_reply(),
                    HeloKind::Helo => Reply::new(250, "", &self.cfg.hostname),
                };
                self.send(r);
            }
            Pending::Mail(params) => {
                self.txn = Some(Txn {
                    params,
                    rcpts: 0,
                    bdat: None,
                });
                self.send(Reply::new(250, "2.1.0", "Ok"));
            }
            Pending::Rcpt => {
                if let Some(t) = &mut self.txn {
                    t.rcpts += 1;
                }
                self.send(Reply::new(250, "2.1.5", "Ok"));
            }
            Pending::DataEnd => {
                self.pending = Pending::DataEnd;
                self.data_committed("");
                return;
            }
            p @ (Pending::Auth | Pending::None) => {
                self.pending = p;
                return;
            }
        }
        self.process();
    }

    /// Negative verdict for whatever is pending. A code below 400 is a driver bug and becomes
    /// `451 4.3.0`.
    pub fn reject(&mut self, reply: Reply) {
        let reply = if reply.code() < 400 {
            Reply::new(451, "4.3.0", "Error: internal error")
        } else {
            reply
        };
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => return,
            Pending::DataEnd => {
                let n = self.reply_count();
                self.txn = None;
                for _ in 1..n {
                    reply.encode(&mut self.out);
                }
                self.send(reply);
            }
            Pending::Auth => {
                self.sasl = None;
                self.send(reply);
            }
            Pending::Helo(_) | Pending::Mail(_) | Pending::Rcpt => self.send(reply),
        }
        self.process();
    }

    /// The message of the pending [`Event::DataEnd`] is safely stored:
    /// `250 2.0.0 Ok: queued as <id>` (in LMTP once per accepted recipient).
    pub fn data_committed(&mut self, queue_id: &str) {
        if !matches!(self.pending, Pending::DataEnd) {
            return;
        }
        let text = if queue_id.is_empty() {
            "Ok: queued".to_string()
        } else {
            format!("Ok: queued as {queue_id}")
        };
        let r = Reply::new(250, "2.0.0", &text);
        let n = self.reply_count();
        self.data_committed_lmtp(&vec![r; n]);
    }

    /// LMTP: one reply per accepted recipient, in RCPT order. Missing replies become
    /// `451 4.3.0`, extra ones are ignored. In SMTP mode only the first reply is used.
    pub fn data_committed_lmtp(&mut self, replies: &[Reply]) {
        if !matches!(self.pending, Pending::DataEnd) {
            return;
        }
        self.pending = Pending::None;
        let n = self.reply_count();
        self.txn = None;
        for i in 0..n {
            let r = replies
                .get(i)
                .cloned()
                .unwrap_or_else(|| Reply::new(451, "4.3.0", "Error: no delivery status"));
            self.send(r);
        }
        self.process();
    }

    /// The TLS handshake after [`Event::StartTls`] completed: the session starts over.
    pub fn tls_established(&mut self) {
        if !matches!(self.mode, Mode::TlsPending) || self.closing {
            return;
        }
        self.tls_active = true;
        self.helo = None;
        self.authenticated = false;
        self.txn = None;
        self.inbuf.clear();
        self.mode = Mode::Command;
    }

    /// Result of checking the credentials of [`Event::AuthPlain`] / [`Event::AuthLogin`].
    pub fn auth_result(&mut self, ok: bool) {
        if !matches!(self.pending, Pending::Auth) {
            return;
        }
        self.pending = Pending::None;
        self.sasl = None;
        if ok {
            self.authenticated = true;
            self.send(Reply::new(235, "2.7.0", "Authentication successful"));
        } else {
            self.send(Reply::new(535, "5.7.8", "Error: authentication failed"));
        }
        self.process();
    }

    /// Continues the pending [`Event::AuthSasl`] exchange: `334 <base64(data)>`; the client's
    /// next line becomes another `AuthSasl`. Ignored unless an `AuthSasl` is pending.
    pub fn auth_challenge(&mut self, data: &[u8]) {
        if !matches!(self.pending, Pending::Auth) {
            return;
        }
        let Some(mech) = self.sasl.take() else {
            return;
        };
        self.pending = Pending::None;
        self.out.extend_from_slice(b"334 ");
        self.out.extend_from_slice(B64.encode(data).as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.mode = Mode::AuthSasl(mech, false);
        self.process();
    }

    // ---- internals ----

    fn reply_count(&self) -> usize {
        if self.cfg.lmtp {
            self.txn.as_ref().map_or(1, |t| t.rcpts.max(1))
        } else {
            1
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
            "DSN".into(),
        ];
        if self.cfg.offer_binarymime {
            lines.push("BINARYMIME".into());
        }
        if self.cfg.offer_starttls && !self.tls_active {
            lines.push("STARTTLS".into());
        }
        if self.cfg.offer_auth && self.tls_active && !self.cfg.auth_mechanisms.is_empty() {
            let names: Vec<&str> = self.cfg.auth_mechanisms.iter().map(|m| m.name()).collect();
            lines.push(format!("AUTH {}", names.join(" ")));
        }
        Reply::multiline(250, "", lines)
    }

    /// Queues a reply; error replies count toward `max_errors`.
    fn send(&mut self, r: Reply) {
        r.encode(&mut self.out);
        if r.code() >= 400 && !self.closing {
            self.errors += 1;
            if self.errors >= self.cfg.max_errors {
                let host = self.cfg.hostname.clone();
                Reply::new(421, "4.7.0", &format!("{host} Error: too many errors"))
                    .encode(&mut self.out);
                self.close(AbortReason::SessionClosed);
            }
        }
    }

    /// The HELP reply: the commands this session accepts, STARTTLS and AUTH only when the
    /// EHLO reply would offer them.
    fn help_text(&self) -> String {
        let mut text = String::from(if self.cfg.lmtp {
            "Commands: LHLO"
        } else {
            "Commands: EHLO HELO"
        });
        text.push_str(" MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY");
        if self.cfg.offer_starttls && !self.tls_active {
            text.push_str(" STARTTLS");
        }
        if self.cfg.offer_auth && self.tls_active && !self.cfg.auth_mechanisms.is_empty() {
            text.push_str(" AUTH");
        }
        text
    }

    /// Counts a junk command; past `max_junk_commands` each one is an error, and at
    /// `max_errors` the session ends with 421 instead of the command's reply. True if so.
    fn too_much_junk(&mut self) -> bool {
        self.junk = self.junk.saturating_add(1);
        if self.junk <= self.cfg.max_junk_commands {
            return false;
        }
        self.errors += 1;
        if self.errors < self.cfg.max_errors {
            return false;
        }
        let host = self.cfg.hostname.clone();
        self.send_final(
            Reply::new(421, "4.7.0", &format!("{host} Error: too many errors")),
            AbortReason::SessionClosed,
        );
        true
    }

    /// Queues a final reply and closes.
    fn send_final(&mut self, r: Reply, reason: AbortReason) {
        r.encode(&mut self.out);
        self.close(reason);
    }

    fn close(&mut self, reason: AbortReason) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.chunk.clear();
        if self.data_open {
            self.data_open = false;
            self.events.push_back(Event::DataAborted { reason });
        }
        self.mode = Mode::Closed;
        self.pending = Pending::None;
        wipe(&mut self.inbuf);
        self.inbuf = BytesMut::new();
    }

    fn bare(&mut self, lf: bool) {
        let host = self.cfg.hostname.clone();
        let (what, reason) = if lf {
            ("<LF>", AbortReason::BareLf)
        } else {
            ("<CR>", AbortReason::BareCr)
        };
        self.send_final(
            Reply::new(521, "5.5.2", &format!("{host} Error: bare {what} received")),
            reason,
        );
    }

    fn flush_chunk(&mut self) {
        if !self.chunk.is_empty() {
            self.events
                .push_back(Event::DataChunk(self.chunk.split().freeze()));
        }
    }

    fn process(&mut self) {
        while !self.closing && self.greeted && matches!(self.pending, Pending::None) {
            let progressed = match self.mode {
                Mode::Closed => false,
                Mode::TlsPending => {
                    wipe(&mut self.inbuf);
                    self.inbuf.clear();
                    false
                }
                Mode::Data(..) => self.process_data(),
                Mode::Bdat { .. } => self.process_bdat(),
                _ => self.process_line(),
            };
            if !progressed {
                break;
            }
        }
        self.flush_chunk();
        if !self.closing && self.inbuf.len() > self.cfg.max_pending_input {
            let host = self.cfg.hostname.clone();
            self.send_final(
                Reply::new(
                    421,
                    "4.7.0",
                    &format!("{host} Error: too much pipelined input"),
                ),
                AbortReason::SessionClosed,
            );
        }
    }

    fn process_data(&mut self) -> bool {
        if self.inbuf.is_empty() {
            return false;
        }
        if self.chunk.len() >= MAX_CHUNK {
            self.flush_chunk();
        }
        // Content is never longer than its input: the chunk stays within MAX_CHUNK.
        let n = self.inbuf.len().min(MAX_CHUNK - self.chunk.len());
        let Mode::Data(st, content) = &mut self.mode else {
            return false;
        };
        let res = scan_data(st, content, &self.inbuf[..n], &mut self.chunk, &self.cfg);
        let newly_refused = content.refused.filter(|_| !content.reported);
        if newly_refused.is_some() {
            content.reported = true;
        }
        let refused = content.refused;
        if let Some(reason) = newly_refused {
            self.chunk.clear();
            self.data_open = false;
            self.events.push_back(Event::DataAborted { reason });
        }
        match res {
            DataScan::More => {
                let _ = self.inbuf.split_to(n);
                if self.chunk.len() >= MAX_CHUNK {
                    self.flush_chunk();
                }
                true
            }
            DataScan::BareLf => {
                self.bare(true);
                false
            }
            DataScan::BareCr => {
                self.bare(false);
                false
            }
            DataScan::End(used) => {
                let _ = self.inbuf.split_to(used);
                self.flush_chunk();
                self.mode = Mode::Command;
                match refused {
                    Some(reason) => {
                        self.txn = None;
                        self.send(reason.reply());
                    }
                    None => {
                        self.data_open = false;
                        self.events.push_back(Event::DataEnd);
                        self.pending = Pending::DataEnd;
                    }
                }
                true
            }
        }
    }

    fn process_bdat(&mut self) -> bool {
        let Mode::Bdat {
            remaining,
            discard,
            end_txn,
            ..
        } = &mut self.mode
        else {
            return false;
        };
        if self.chunk.len() >= MAX_CHUNK {
            self.events
                .push_back(Event::DataChunk(self.chunk.split().freeze()));
        }
        let n = usize::try_from(*remaining)
            .unwrap_or(usize::MAX)
            .min(self.inbuf.len())
            .min(MAX_CHUNK - self.chunk.len());
        if n > 0 {
            let bytes = self.inbuf.split_to(n);
            *remaining -= n as u64;
            if discard.is_none()
                && let Some(content) = self.txn.as_mut().and_then(|t| t.bdat.as_mut())
            {
                content.feed(&bytes, &mut self.chunk, &self.cfg);
                if let Some(reason) = content.refused {
                    content.reported = true;
                    *discard = Some(reason.reply());
                    *end_txn = true;
                    self.chunk.clear();
                    self.data_open = false;
                    self.events.push_back(Event::DataAborted { reason });
                } else if self.chunk.len() >= MAX_CHUNK {
                    self.events
                        .push_back(Event::DataChunk(self.chunk.split().freeze()));
                }
            }
        }
        let Mode::Bdat {
            remaining,
            last,
            discard,
            end_txn,
        } = std::mem::replace(&mut self.mode, Mode::Command)
        else {
            return false;
        };
        if remaining > 0 {
            self.mode = Mode::Bdat {
                remaining,
                last,
                discard,
                end_txn,
            };
            return n > 0;
        }
        if end_txn {
            self.txn = None;
        }
        if let Some(r) = discard {
            self.send(r);
            return true;
        }
        if !last {
            self.send(Reply::new(250, "2.0.0", "Ok: chunk received"));
            return true;
        }
        // BDAT LAST: a message may not end in a bare CR either.
        let bare_end = self
            .txn
            .as_ref()
            .and_then(|t| t.bdat.as_ref())
            .is_some_and(|c| c.strict && c.prev_cr);
        self.flush_chunk();
        self.data_open = false;
        if bare_end {
            self.txn = None;
            self.chunk.clear();
            self.events.push_back(Event::DataAborted {
                reason: AbortReason::BareLineEnding,
            });
            self.send(AbortReason::BareLineEnding.reply());
        } else {
            self.events.push_back(Event::DataEnd);
            self.pending = Pending::DataEnd;
        }
        true
    }

    fn process_line(&mut self) -> bool {
        let auth = matches!(
            self.mode,
            Mode::AuthPlain | Mode::AuthLoginUser | Mode::AuthLoginPass(_) | Mode::AuthSasl(..)
        );
        let limit = if auth {
            self.cfg.max_command_line.max(MAX_AUTH_LINE)
        } else {
            self.cfg.max_command_line
        };
        if let Some(mut prev_cr) = self.skipping {
            for i in 0..self.inbuf.len() {
                let b = self.inbuf[i];
                if prev_cr {
                    if b != b'\n' {
                        self.bare(false);
                        return false;
                    }
                    let _ = self.inbuf.split_to(i + 1);
                    self.skipping = None;
                    if auth {
                        self.mode = Mode::Command;
                    }
                    self.send(Reply::new(500, "5.5.2", "Error: line too long"));
                    return true;
                }
                if b == b'\n' {
                    self.bare(true);
                    return false;
                }
                prev_cr = b == b'\r';
            }
            wipe(&mut self.inbuf);
            self.inbuf.clear();
            self.skipping = Some(prev_cr);
            return false;
        }
        let mut end = None;
        for (i, &b) in self.inbuf.iter().enumerate() {
            match b {
                b'\n' => {
                    self.bare(true);
                    return false;
                }
                b'\r' => match self.inbuf.get(i + 1) {
                    Some(b'\n') => {
                        end = Some(i);
                        break;
                    }
                    Some(_) => {
                        self.bare(false);
                        return false;
                    }
                    None => break,
                },
                _ => {}
            }
            if i + 1 >= limit {
                break;
            }
        }
        let Some(end) = end else {
            if self.inbuf.len() >= limit {
                // No CRLF within the limit: drop the line up to its end.
                let prev_cr = self.inbuf[limit - 1] == b'\r';
                let mut head = self.inbuf.split_to(limit);
                wipe(&mut head);
                self.skipping = Some(prev_cr);
                return true;
            }
            return false;
        };
        let mut line = self.inbuf.split_to(end + 2);
        if end + 2 > limit {
            if auth {
                self.mode = Mode::Command;
            }
            self.send(Reply::new(500, "5.5.2", "Error: line too long"));
        } else {
            self.handle_line(&line[..end]);
        }
        wipe(&mut line);
        true
    }

    fn handle_line(&mut self, line: &[u8]) {
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::AuthPlain => self.auth_response_plain(line),
            Mode::AuthLoginUser => self.auth_response_login_user(line),
            Mode::AuthLoginPass(user) => self.auth_response_login_pass(user, line),
            Mode::AuthSasl(mech, first) => self.auth_response_sasl(mech, first, line),
            _ => self.command(line),
        }
    }

    fn command(&mut self, line: &[u8]) {
        if line.contains(&0) {
            self.send(Reply::new(500, "5.5.2", "Error: NUL character in command"));
            return;
        }
        let Ok(line) = std::str::from_utf8(line) else {
            self.send(Reply::new(500, "5.5.2", "Error: bad UTF-8 syntax"));
            return;
        };
        if line.is_empty() {
            self.send(Reply::new(500, "5.5.2", "Error: bad syntax"));
            return;
        }
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(r) => {
                if line.len() >= 4 && line.as_bytes()[..4].eq_ignore_ascii_case(b"BDAT") {
                    // The chunk size is unknown: the stream cannot be re-framed.
                    self.send_final(r, AbortReason::SessionClosed);
                } else {
                    self.send(r);
                }
                return;
            }
        };
        let junk = match cmd {
            Command::Noop | Command::Rset | Command::Vrfy | Command::Help => true,
            Command::Helo(_) | Command::Ehlo(_) | Command::Lhlo(_) => self.helo.is_some(),
            _ => false,
        };
        if junk && self.too_much_junk() {
            return;
        }
        match cmd {
            Command::Helo(n) => self.helo_cmd(n, HeloKind::Helo, false),
            Command::Ehlo(n) => self.helo_cmd(n, HeloKind::Ehlo, false),
            Command::Lhlo(n) => self.helo_cmd(n, HeloKind::Ehlo, true),
            Command::Mail { path, params } => self.mail(path, params),
            Command::Rcpt { path, params } => self.rcpt(path, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.txn = None;
                self.events.push_back(Event::Reset);
                self.send(Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Noop => self.send(Reply::new(250, "2.0.0", "Ok")),
            Command::Quit => {
                self.events.push_back(Event::Quit);
                self.send_final(Reply::new(221, "2.0.0", "Bye"), AbortReason::SessionClosed);
            }
            Command::Vrfy => self.send(Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user; try RCPT to attempt delivery",
            )),
            Command::Expn => self.send(Reply::new(502, "5.5.1", "Error: command not implemented")),
            Command::Help => {
                let text = self.help_text();
                self.send(Reply::new(214, "2.0.0", &text));
            }
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial),
        }
    }

    fn helo_cmd(&mut self, name: &str, kind: HeloKind, lhlo: bool) {
        if lhlo != self.cfg.lmtp {
            let r = if self.cfg.lmtp {
                Reply::new(500, "5.5.1", "Error: LMTP requires LHLO")
            } else {
                Reply::new(500, "5.5.2", "Error: command not recognized")
            };
            self.send(r);
            return;
        }
        if name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            self.send(Reply::new(501, "5.5.2", "Error: invalid hostname"));
            return;
        }
        if self.txn.take().is_some() {
            self.events.push_back(Event::Reset);
        }
        self.helo = None;
        self.pending = Pending::Helo(kind);
        self.events.push_back(Event::Helo {
            name: name.to_string(),
            extended: kind == HeloKind::Ehlo,
        });
    }

    fn mail(&mut self, path: &str, params: &str) {
        let Some(helo) = self.helo else {
            self.send(Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"));
            return;
        };
        if self.txn.is_some() {
            self.send(Reply::new(503, "5.5.1", "Error: nested MAIL command"));
            return;
        }
        let esmtp = helo == HeloKind::Ehlo;
        let policy = MailParamPolicy {
            esmtp,
            binarymime: esmtp && self.cfg.offer_binarymime,
            auth: esmtp && self.cfg.offer_auth && self.tls_active,
        };
        let params = match parse_mail_params(params, &policy) {
            Ok(p) => p,
            Err(r) => return self.send(r),
        };
        if params.size.is_some_and(|s| s > self.cfg.max_message_size) {
            self.send(Reply::new(
                552,
                "5.3.4",
                "Error: message file too big for this system",
            ));
            return;
        }
        let reverse_path = if path.is_empty() {
            None
        } else {
            match Mailbox::parse(path, params.smtputf8) {
                Ok(m) => Some(m),
                Err(e) => return self.send(address_reply(e, true)),
            }
        };
        self.pending = Pending::Mail(params.clone());
        self.events.push_back(Event::MailFrom {
            reverse_path,
            params,
        });
    }

    fn rcpt(&mut self, path: &str, params: &str) {
        let esmtp = self.helo == Some(HeloKind::Ehlo);
        let Some(txn) = &self.txn else {
            self.send(Reply::new(503, "5.5.1", "Error: need MAIL command"));
            return;
        };
        if txn.bdat.is_some() {
            self.send(Reply::new(503, "5.5.1", "Error: RCPT after BDAT"));
            return;
        }
        if txn.rcpts >= self.cfg.max_recipients {
            self.send(Reply::new(452, "4.5.3", "Error: too many recipients"));
            return;
        }
        let utf8 = txn.params.smtputf8;
        let params = match parse_rcpt_params(params, esmtp) {
            Ok(p) => p,
            Err(r) => return self.send(r),
        };
        let forward_path = if path.eq_ignore_ascii_case("postmaster") {
            Mailbox::postmaster(path, &self.cfg.hostname)
        } else {
            match Mailbox::parse(path, utf8) {
                Ok(m) => m,
                Err(e) => return self.send(address_reply(e, false)),
            }
        };
        self.pending = Pending::Rcpt;
        self.events.push_back(Event::RcptTo {
            forward_path,
            params,
        });
    }

    fn data(&mut self) {
        let Some(txn) = &self.txn else {
            self.send(Reply::new(503, "5.5.1", "Error: need MAIL command"));
            return;
        };
        if txn.bdat.is_some() {
            self.send(Reply::new(
                503,
                "5.5.1",
                "Error: DATA cannot be mixed with BDAT",
            ));
            return;
        }
        if txn.params.body == Body::BinaryMime {
            self.send(Reply::new(
                503,
                "5.5.1",
                "Error: BODY=BINARYMIME requires BDAT",
            ));
            return;
        }
        if txn.rcpts == 0 {
            self.send(Reply::new(554, "5.5.1", "Error: no valid recipients"));
            return;
        }
        self.send(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        self.events.push_back(Event::DataStart);
        self.data_open = true;
        self.mode = Mode::Data(DotState::LineStart, Content::new(true));
    }

    fn bdat(&mut self, size: u64, last: bool) {
        let mut end_txn = false;
        let discard = if self.helo != Some(HeloKind::Ehlo) {
            Some(Reply::new(503, "5.5.1", "Error: send EHLO first"))
        } else {
            match &mut self.txn {
                None => Some(Reply::new(503, "5.5.1", "Error: need MAIL command")),
                Some(t) if t.rcpts == 0 => {
                    Some(Reply::new(554, "5.5.1", "Error: no valid recipients"))
                }
                Some(t) => {
                    if t.bdat.is_none() {
                        t.bdat = Some(Content::new(t.params.body != Body::BinaryMime));
                        self.events.push_back(Event::DataStart);
                        self.data_open = true;
                    }
                    let c = t.bdat.as_mut().expect("just set");
                    if c.size.saturating_add(size) > self.cfg.max_message_size {
                        c.refused = Some(AbortReason::MessageTooBig);
                        c.reported = true;
                        end_txn = true;
                        self.data_open = false;
                        self.chunk.clear();
                        self.events.push_back(Event::DataAborted {
                            reason: AbortReason::MessageTooBig,
                        });
                        Some(AbortReason::MessageTooBig.reply())
                    } else {
                        None
                    }
                }
            }
        };
        self.mode = Mode::Bdat {
            remaining: size,
            last,
            discard,
            end_txn,
        };
    }

    fn starttls(&mut self) {
        if !self.cfg.offer_starttls {
            self.send(Reply::new(502, "5.5.1", "Error: command not implemented"));
        } else if self.tls_active {
            self.send(Reply::new(554, "5.5.1", "Error: TLS already active"));
        } else if self.helo != Some(HeloKind::Ehlo) {
            self.send(Reply::new(503, "5.5.1", "Error: send EHLO first"));
        } else if self.txn.is_some() {
            self.send(Reply::new(
                503,
                "5.5.1",
                "Error: MAIL transaction in progress",
            ));
        } else {
            self.send(Reply::new(220, "2.0.0", "Ready to start TLS"));
            self.events.push_back(Event::StartTls);
            self.mode = Mode::TlsPending;
            // Everything pipelined after STARTTLS is dropped (CVE-2011-0411).
            wipe(&mut self.inbuf);
            self.inbuf.clear();
        }
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) {
        let refuse = if !self.cfg.offer_auth {
            Some(Reply::new(
                503,
                "5.5.1",
                "Error: authentication not enabled",
            ))
        } else if !self.tls_active {
            Some(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ))
        } else if self.helo != Some(HeloKind::Ehlo) {
            Some(Reply::new(503, "5.5.1", "Error: send EHLO first"))
        } else if self.authenticated {
            Some(Reply::new(503, "5.5.1", "Error: already authenticated"))
        } else if self.txn.is_some() {
            Some(Reply::new(
                503,
                "5.5.1",
                "Error: MAIL transaction in progress",
            ))
        } else {
            None
        };
        if let Some(r) = refuse {
            return self.send(r);
        }
        let offered =
            AuthMechanism::from_name(mechanism).filter(|m| self.cfg.auth_mechanisms.contains(m));
        match offered {
            Some(AuthMechanism::Plain) => match initial {
                None => {
                    self.out.extend_from_slice(b"334 \r\n");
                    self.mode = Mode::AuthPlain;
                }
                Some(r) => self.auth_response_plain(r.as_bytes()),
            },
            Some(AuthMechanism::Login) => match initial {
                None => {
                    self.out.extend_from_slice(b"334 VXNlcm5hbWU6\r\n");
                    self.mode = Mode::AuthLoginUser;
                }
                Some(r) => self.auth_response_login_user(r.as_bytes()),
            },
            Some(mech @ AuthMechanism::ScramSha256) => match initial {
                None => {
                    self.out.extend_from_slice(b"334 \r\n");
                    self.mode = Mode::AuthSasl(mech, true);
                }
                Some(r) => self.auth_response_sasl(mech, true, r.as_bytes()),
            },
            None => self.send(Reply::new(
                504,
                "5.5.4",
                "Error: unsupported authentication mechanism",
            )),
        }
    }

    /// Decodes a base64 AUTH response; `None` after replying to `*` or bad base64.
    fn auth_decode(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        if line == b"*" {
            self.send(Reply::new(501, "5.0.0", "Authentication aborted"));
            return None;
        }
        if line == b"=" {
            return Some(Vec::new());
        }
        match B64.decode(line) {
            Ok(v) => Some(v),
            Err(_) => {
                self.send(Reply::new(501, "5.5.2", "Error: cannot decode response"));
                None
            }
        }
    }

    fn auth_response_plain(&mut self, line: &[u8]) {
        let Some(mut raw) = self.auth_decode(line) else {
            return;
        };
        let parsed = {
            let mut parts = raw.split(|&b| b == 0);
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(z), Some(c), Some(p), None) if !c.is_empty() && !p.is_empty() => {
                    match (std::str::from_utf8(z), std::str::from_utf8(c)) {
                        (Ok(z), Ok(c)) => Some((
                            (!z.is_empty()).then(|| z.to_string()),
                            c.to_string(),
                            Secret::new(p),
                        )),
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        wipe(&mut raw);
        match parsed {
            Some((authzid, authcid, password)) => {
                self.pending = Pending::Auth;
                self.events.push_back(Event::AuthPlain {
                    authzid,
                    authcid,
                    password,
                });
            }
            None => self.send(Reply::new(
                501,
                "5.5.2",
                "Error: invalid authentication data",
            )),
        }
    }

    fn auth_response_sasl(&mut self, mechanism: AuthMechanism, first: bool, line: &[u8]) {
        let Some(raw) = self.auth_decode(line) else {
            return;
        };
        self.pending = Pending::Auth;
        self.sasl = Some(mechanism);
        self.events.push_back(Event::AuthSasl {
            mechanism,
            first,
            response: Secret::new(raw),
        });
    }

    fn auth_response_login_user(&mut self, line: &[u8]) {
        let Some(raw) = self.auth_decode(line) else {
            return;
        };
        match String::from_utf8(raw) {
            Ok(u) if !u.is_empty() && !u.contains('\0') => {
                self.out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                self.mode = Mode::AuthLoginPass(u);
            }
            _ => self.send(Reply::new(
                501,
                "5.5.2",
                "Error: invalid authentication data",
            )),
        }
    }

    fn auth_response_login_pass(&mut self, user: String, line: &[u8]) {
        let Some(raw) = self.auth_decode(line) else {
            return;
        };
        if raw.is_empty() {
            self.send(Reply::new(
                501,
                "5.5.2",
                "Error: invalid authentication data",
            ));
            return;
        }
        self.pending = Pending::Auth;
        self.events.push_back(Event::AuthLogin {
            authzid: None,
            authcid: user,
            password: Secret::new(raw),
        });
    }
}

fn address_reply(e: AddressError, sender: bool) -> Reply {
    if e == AddressError::NonAscii {
        return Reply::new(
            553,
            "5.6.7",
            "Error: must declare SMTPUTF8 to send a non-ASCII address",
        );
    }
    let (enh, who) = if sender {
        ("5.1.7", "sender")
    } else {
        ("5.1.3", "recipient")
    };
    Reply::new(501, enh, &format!("Bad {who} address syntax: {e}"))
}
