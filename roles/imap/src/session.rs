//! [`Session`]: one IMAP server connection, I/O-free.
//!
//! Bytes from the client go into [`Session::receive`] together with the current time;
//! replies come out of [`Session::poll_transmit`], and things only the driver can do come out
//! of [`Session::poll_event`] ([`Event::StartTls`], [`Event::Login`], [`Event::Idle`]). The
//! driver answers with [`Session::tls_established`] and [`Session::login_result`] (the latter
//! hands over the user's [`MailStore`]). While an answer is pending the session buffers input
//! (bounded) and does nothing else.
//!
//! ```text
//!  not authenticated ──LOGIN/AUTHENTICATE──▶ Event::Login ──login_result(Some(store))──▶
//!  authenticated ◀──CLOSE/UNSELECT── selected ◀──SELECT/EXAMINE──┘        LOGOUT ──▶ logout
//! ```
//!
//! Framing: lines end in CRLF; a line ending in `{n}` is followed by a `+` continuation and
//! `n` literal octets, `{n+}` (LITERAL+) by the octets at once. imap-codec decides whether a
//! complete command has arrived or a literal follows, and parses it; [`crate::ext`] covers
//! the extension syntax imap-codec 1.0 lacks.
//!
//! Sequence numbers: the session keeps the selected mailbox's UID list; expunges that the
//! store reports are announced only after commands that may announce them (never after
//! FETCH, STORE or SEARCH without UID: RFC 9051 7.5.1), so sequence numbers the client holds
//! stay valid.

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use imap_codec::decode::{CommandDecodeError, Decoder};
use imap_codec::encode::Encoder;
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::imap_types::core::{AString, Atom, NonEmptyVec, QuotedChar, Tag, Text};
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use imap_codec::imap_types::fetch::{
    MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName,
};
use imap_codec::imap_types::flag::{
    Flag as ImapFlag, FlagFetch, FlagNameAttribute, FlagPerm, StoreResponse, StoreType,
};
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::response::{
    Code, CodeOther, CommandContinuationRequest, Data, Response, Status,
};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_codec::imap_types::status::{StatusDataItem, StatusDataItemName};
use imap_codec::{CommandCodec, ResponseCodec};

use crate::ext::{self, Extras, Recognised, StatusItem};
use crate::message::{self, Parsed, SearchView, UnknownCte};
use crate::secret::Secret;
use crate::store::{Flag, FlagOp, MailStore, MailboxInfo, MessageMeta, StoreError};
use crate::uids::UidList;

/// Limits and offers of a session.
#[derive(Clone, Debug)]
pub struct Config {
    /// Text of the greeting.
    pub greeting: String,
    /// Offer STARTTLS on plaintext connections.
    pub offer_starttls: bool,
    /// Allow LOGIN/AUTHENTICATE without TLS (tests and loopback only).
    pub allow_plaintext_auth: bool,
    /// Longest command line in octets, without literals.
    pub max_line: usize,
    /// Largest literal outside APPEND.
    pub max_literal: u32,
    /// Largest APPEND message literal.
    pub max_append: u32,
    /// Most literals in one command.
    pub max_literals_per_command: usize,
    /// Invalid commands (BAD) before the session says BYE.
    pub max_bad_commands: u32,
    /// Failed logins before the session says BYE.
    pub max_login_failures: u32,
    /// Sustained commands per second (token bucket refill rate).
    pub commands_per_second: u32,
    /// Commands that may arrive at once (token bucket size).
    pub command_burst: u32,
    /// Input the session buffers while it waits (for the driver or the rate limit).
    pub max_pending_input: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            greeting: "ringmail IMAP4rev2 server ready".into(),
            offer_starttls: true,
            allow_plaintext_auth: false,
            max_line: 64 * 1024,
            max_literal: 64 * 1024,
            max_append: 50 * 1024 * 1024,
            max_literals_per_command: 64,
            max_bad_commands: 10,
            max_login_failures: 3,
            commands_per_second: 500,
            command_burst: 1000,
            max_pending_input: 256 * 1024,
        }
    }
}

/// Something only the driver can do.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The client asked for TLS and the OK is queued: flush [`Session::poll_transmit`], run
    /// the handshake, then call [`Session::tls_established`]. Plaintext that arrived after
    /// the command has been discarded.
    StartTls,
    /// Check these credentials (LOGIN or AUTHENTICATE PLAIN) and call
    /// [`Session::login_result`].
    Login {
        /// The user name (authentication identity).
        user: String,
        /// The password.
        password: Secret,
    },
    /// The client entered IDLE: call [`Session::changes_available`] when the store may have
    /// changed (or on a timer) until [`Session::is_idling`] turns false.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotAuthenticated,
    Authenticated,
    Selected,
    Logout,
}

#[derive(Debug)]
enum Mode {
    Line,
    Literal(usize),
    /// Dropping an oversized non-synchronising literal, then the rest of its command.
    Skip(usize),
    /// Dropping the lines left of a command whose literal was refused.
    DiscardRest,
    /// Dropping the rest of an overlong line.
    SkipLine,
    Idle(String),
    AuthData(String),
}

#[derive(Debug)]
enum Wait {
    Tls,
    Login(String),
}

#[derive(Debug)]
struct Sel {
    writable: bool,
    uidnext: u32,
    highestmodseq: u64,
    /// The UIDs; sequence number = index + 1. Everything else about a message is asked of
    /// the store when needed.
    uids: UidList,
    /// Expunged in the store, not yet announced (still hold sequence numbers).
    pending_expunge: Vec<u32>,
    /// The last metadata of those, as the store reported it with the expunge.
    gone: Vec<MessageMeta>,
    /// Flag changes this session announced since the last refresh (UID, modseq): the store
    /// may report them again.
    told: Vec<(u32, u64)>,
    /// The SEARCHRES `$` (RFC 5182): UIDs a `SEARCH RETURN (SAVE)` found. Expunged messages
    /// drop out when they leave `uids`; empty after SELECT and after a failed SAVE search.
    saved: UidList,
    /// The keywords announced in the last untagged FLAGS.
    keywords: Vec<String>,
}

/// The messages a command names: a sequence set, or the saved search result `$`.
#[derive(Clone, Copy)]
enum Target<'a> {
    Set(&'a SequenceSet),
    Saved,
}

impl<'a> Target<'a> {
    fn of(set: &'a SequenceSet, ex: &Extras) -> Target<'a> {
        if ex.saved_set {
            Target::Saved
        } else {
            Target::Set(set)
        }
    }
}

impl Sel {
    fn index_of(&self, uid: u32) -> Option<usize> {
        self.uids.index_of(uid)
    }

    fn uid_at(&self, index: usize) -> u32 {
        self.uids.get(index).unwrap_or(0)
    }
}

enum Kind {
    Ok,
    No,
    Bad,
    /// No tagged reply now: the command continues (LOGIN and AUTHENTICATE wait for the
    /// driver, IDLE for DONE, AUTHENTICATE for the client's response).
    Later,
    /// OK, then wait for the TLS handshake.
    StartTls,
}

/// The tagged reply a command ends with.
struct Done {
    kind: Kind,
    code: Option<String>,
    text: &'static str,
}

impl Done {
    fn ok(text: &'static str) -> Done {
        Done {
            kind: Kind::Ok,
            code: None,
            text,
        }
    }
    fn no(code: &str, text: &'static str) -> Done {
        Done {
            kind: Kind::No,
            code: (!code.is_empty()).then(|| code.to_owned()),
            text,
        }
    }
    fn bad(text: &'static str) -> Done {
        Done {
            kind: Kind::Bad,
            code: None,
            text,
        }
    }
    fn later() -> Done {
        Done {
            kind: Kind::Later,
            code: None,
            text: "",
        }
    }
    fn code(mut self, code: String) -> Done {
        self.code = Some(code);
        self
    }
}

fn store_error(e: &StoreError) -> Done {
    match e {
        StoreError::NotFound => Done::no("NONEXISTENT", "No such mailbox or message"),
        StoreError::AlreadyExists => Done::no("ALREADYEXISTS", "Mailbox already exists"),
        StoreError::InvalidName => Done::no("CANNOT", "Invalid mailbox name"),
        StoreError::NotAllowed(_) => Done::no("CANNOT", "Operation not allowed"),
        StoreError::OverQuota => Done::no("OVERQUOTA", "Quota exceeded"),
        StoreError::TooBig => Done::no("TOOBIG", "Message too large"),
        StoreError::NotSelected => Done::bad("No mailbox selected"),
        StoreError::Unavailable(_) => Done::no("UNAVAILABLE", "Temporary failure, try again"),
    }
}

type Reply<T> = Result<T, Done>;

/// Longest mailbox name the session passes to the store, in octets.
pub const MAX_MAILBOX_NAME: usize = 1024;

/// Checks and converts a mailbox name from the client to the store's form (modified UTF-7,
/// as Dovecot keeps it): a UTF-8 session's names are encoded; an IMAP4rev1 session's must
/// already be canonical modified UTF-7.
fn mailbox_name(mb: &Mailbox<'_>, utf8: bool) -> Reply<String> {
    match mb {
        Mailbox::Inbox => Ok("INBOX".into()),
        Mailbox::Other(o) => name_from_bytes(o.as_ref(), utf8),
    }
}

fn name_from_bytes(b: &[u8], utf8: bool) -> Reply<String> {
    let s = std::str::from_utf8(b).map_err(|_| Done::bad("Mailbox name is not UTF-8"))?;
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err(Done::no("CANNOT", "Invalid mailbox name"));
    }
    let s = if utf8 {
        crate::utf7::encode(s)
    } else {
        crate::utf7::decode(s)
            .map_err(|_| Done::no("CANNOT", "Mailbox name is not valid modified UTF-7"))?;
        s.to_owned()
    };
    if s.len() > MAX_MAILBOX_NAME {
        return Err(Done::no("CANNOT", "Invalid mailbox name"));
    }
    if s.eq_ignore_ascii_case("INBOX") {
        return Ok("INBOX".into());
    }
    Ok(s)
}

fn from_imap_flag(f: &ImapFlag<'_>) -> Option<Flag> {
    Some(match f {
        ImapFlag::Seen => Flag::Seen,
        ImapFlag::Answered => Flag::Answered,
        ImapFlag::Flagged => Flag::Flagged,
        ImapFlag::Deleted => Flag::Deleted,
        ImapFlag::Draft => Flag::Draft,
        ImapFlag::Keyword(a) => Flag::Keyword(a.as_ref().to_owned()),
        // \Recent and unknown system flags cannot be stored.
        ImapFlag::Extension(_) => return None,
    })
}

fn to_imap_flag(f: &Flag) -> Option<ImapFlag<'static>> {
    Some(match f {
        Flag::Seen => ImapFlag::Seen,
        Flag::Answered => ImapFlag::Answered,
        Flag::Flagged => ImapFlag::Flagged,
        Flag::Deleted => ImapFlag::Deleted,
        Flag::Draft => ImapFlag::Draft,
        Flag::Keyword(k) => ImapFlag::Keyword(Atom::try_from(k.clone()).ok()?),
    })
}

fn other_code(s: &str) -> Code<'static> {
    Code::Other(CodeOther::unvalidated(s.as_bytes().to_vec()))
}

/// Sorted, merged inclusive ranges of a sequence set, with `*` as `largest`.
fn ranges(set: &SequenceSet, largest: u32) -> Vec<(u32, u32)> {
    let val = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => largest,
    };
    let mut r: Vec<(u32, u32)> = set
        .0
        .as_ref()
        .iter()
        .map(|s| match s {
            Sequence::Single(x) => (val(x), val(x)),
            Sequence::Range(a, b) => {
                let (a, b) = (val(a), val(b));
                (a.min(b), a.max(b))
            }
        })
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn charset_ok(c: &imap_codec::imap_types::core::Charset<'_>) -> bool {
    use imap_codec::imap_types::core::Charset;
    let c = match c {
        Charset::Atom(a) => a.as_ref(),
        Charset::Quoted(q) => q.inner(),
    };
    c.eq_ignore_ascii_case("UTF-8") || c.eq_ignore_ascii_case("US-ASCII")
}

fn status_item(n: &StatusDataItemName) -> StatusItem {
    match n {
        StatusDataItemName::Messages => StatusItem::Messages,
        StatusDataItemName::Recent => StatusItem::Recent,
        StatusDataItemName::UidNext => StatusItem::UidNext,
        StatusDataItemName::UidValidity => StatusItem::UidValidity,
        StatusDataItemName::Unseen => StatusItem::Unseen,
        StatusDataItemName::Deleted => StatusItem::Deleted,
        StatusDataItemName::DeletedStorage => StatusItem::DeletedStorage,
        StatusDataItemName::HighestModSeq => StatusItem::HighestModSeq,
    }
}

fn in_ranges(r: &[(u32, u32)], n: u32) -> bool {
    let i = r.partition_point(|&(_, b)| b < n);
    r.get(i).is_some_and(|&(a, _)| a <= n)
}

/// `1:3,5` style set of sorted numbers.
fn compact_set(nums: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < nums.len() {
        let start = nums[i];
        let mut end = start;
        while i + 1 < nums.len() && nums[i + 1] == end + 1 {
            i += 1;
            end = nums[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// IMAP list-pattern match: `*` matches anything, `%` anything but the delimiter.
fn pattern_match(pattern: &[u8], name: &[u8], delim: u8) -> bool {
    // Dynamic programming over (pattern position, name position): linear memory, no
    // exponential backtracking on hostile patterns like `*a*a*a*a*b`.
    let mut cur = vec![false; name.len() + 1];
    cur[0] = true;
    for &p in pattern {
        let mut next = vec![false; name.len() + 1];
        match p {
            b'*' | b'%' => {
                let mut reach = false;
                for j in 0..=name.len() {
                    if cur[j] {
                        reach = true;
                    }
                    next[j] = reach;
                    if p == b'%' && j < name.len() && name[j] == delim {
                        reach = false;
                    }
                }
            }
            c => {
                for j in 0..name.len() {
                    if cur[j] && name[j] == c {
                        next[j + 1] = true;
                    }
                }
            }
        }
        cur = next;
    }
    cur[name.len()]
}

/// One IMAP server connection. See the module docs.
pub struct Session {
    cfg: Arc<Config>,
    tls: bool,
    state: State,
    store: Option<Box<dyn MailStore>>,
    sel: Option<Sel>,
    inbuf: Vec<u8>,
    cmd: Vec<u8>,
    literals_in_cmd: usize,
    mode: Mode,
    wait: Option<Wait>,
    out: VecDeque<Bytes>,
    events: VecDeque<Event>,
    bad: u32,
    login_failures: u32,
    tokens: f64,
    last_refill: Instant,
    now: Instant,
    throttled_until: Option<Instant>,
    condstore: bool,
    rev2: bool,
    closing: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tls", &self.tls)
            .field("state", &self.state)
            .field("mode", &self.mode)
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new session; the greeting is queued. `tls_active` is true on implicit-TLS ports.
    pub fn new(cfg: Arc<Config>, tls_active: bool, now: Instant) -> Session {
        let mut s = Session {
            tokens: f64::from(cfg.command_burst),
            cfg,
            tls: tls_active,
            state: State::NotAuthenticated,
            store: None,
            sel: None,
            inbuf: Vec::new(),
            cmd: Vec::new(),
            literals_in_cmd: 0,
            mode: Mode::Line,
            wait: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            bad: 0,
            login_failures: 0,
            last_refill: now,
            now,
            throttled_until: None,
            condstore: false,
            rev2: false,
            closing: false,
        };
        let caps = s.capabilities().join(" ");
        let text = s.cfg.greeting.clone();
        s.raw(format!("* OK [CAPABILITY {caps}] {text}\r\n"));
        s
    }

    /// Feeds bytes from the client.
    pub fn receive(&mut self, data: &[u8], now: Instant) {
        self.now = now;
        if self.closing {
            return;
        }
        if matches!(self.wait, Some(Wait::Tls)) {
            // Plaintext after STARTTLS and before the handshake: injected, drop it.
            return;
        }
        if self.inbuf.len() + data.len() > self.cfg.max_pending_input + self.cfg.max_line
            && (self.wait.is_some() || self.throttled_until.is_some())
        {
            self.bye("Too much pipelined input");
            return;
        }
        self.inbuf.extend_from_slice(data);
        self.process();
    }

    /// Lets a rate-limited session go on; call at [`Session::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        self.process();
    }

    /// When the session wants [`Session::handle_timeout`] (it is rate-limiting the client).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.throttled_until
    }

    /// Next bytes for the client.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let b = self.out.pop_front();
        if b.is_none() && self.out.capacity() > 0 {
            // Drained: an idle session keeps no queue.
            self.out = VecDeque::new();
        }
        b
    }

    /// Next driver action.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the driver should close the connection once the output is flushed.
    pub fn should_close(&self) -> bool {
        self.closing
    }

    /// Whether the session is in IDLE.
    pub fn is_idling(&self) -> bool {
        matches!(self.mode, Mode::Idle(_))
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether a user is logged in.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated | State::Selected)
    }

    /// Octets of unprocessed input held by the session.
    pub fn buffered_len(&self) -> usize {
        self.inbuf.len() + self.cmd.len()
    }

    /// The TLS handshake after [`Event::StartTls`] succeeded.
    pub fn tls_established(&mut self) {
        if !matches!(self.wait, Some(Wait::Tls)) || self.closing {
            return;
        }
        self.wait = None;
        self.tls = true;
        self.inbuf.clear();
        self.cmd.clear();
        self.mode = Mode::Line;
    }

    /// The verdict on [`Event::Login`]: the user's store, or `None` for bad credentials.
    pub fn login_result(&mut self, store: Option<Box<dyn MailStore>>) {
        let Some(Wait::Login(tag)) = self.wait.take() else {
            return;
        };
        if self.closing {
            return;
        }
        match store {
            Some(store) => {
                self.store = Some(store);
                self.state = State::Authenticated;
                let caps = self.capabilities().join(" ");
                self.raw(format!("{tag} OK [CAPABILITY {caps}] Logged in\r\n"));
            }
            None => {
                self.login_failures += 1;
                self.finish(
                    &tag,
                    Done::no("AUTHENTICATIONFAILED", "Authentication failed"),
                );
                if self.login_failures >= self.cfg.max_login_failures {
                    self.bye("Too many failed logins");
                    return;
                }
            }
        }
        self.process();
    }

    /// The store may have changed (a timer or a notification): during IDLE the changes are
    /// sent at once; otherwise they wait for the next command.
    pub fn changes_available(&mut self) {
        if self.is_idling() && !self.closing {
            self.updates(true);
        }
    }

    /// The driver's inactivity timer fired: say BYE and close.
    pub fn timeout(&mut self) {
        if !self.closing {
            self.bye("Autologout; idle for too long");
        }
    }

    fn capabilities(&self) -> Vec<&'static str> {
        let mut c = vec!["IMAP4rev2", "IMAP4rev1"];
        if !self.is_authenticated() {
            if !self.tls && self.cfg.offer_starttls {
                c.push("STARTTLS");
            }
            if self.tls || self.cfg.allow_plaintext_auth {
                c.push("AUTH=PLAIN");
            } else {
                c.push("LOGINDISABLED");
            }
        }
        c.extend([
            "SASL-IR",
            "LITERAL+",
            "ID",
            "IDLE",
            "NAMESPACE",
            "UIDPLUS",
            "MOVE",
            "UNSELECT",
            "BINARY",
            "ENABLE",
            "CONDSTORE",
            "ESEARCH",
            "SEARCHRES",
            "STATUS=SIZE",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "SPECIAL-USE",
            "CHILDREN",
        ]);
        c
    }

    fn raw(&mut self, s: String) {
        self.out.push_back(Bytes::from(s));
    }

    fn send(&mut self, r: &Response<'_>) {
        self.out
            .push_back(Bytes::from(ResponseCodec::default().encode(r).dump()));
    }

    fn send_with(&mut self, r: &Response<'_>, extra: &str) {
        self.send_with_bytes(r, extra.as_bytes());
    }

    fn send_with_bytes(&mut self, r: &Response<'_>, extra: &[u8]) {
        // Appends items imap-codec 1.0 cannot express (MODSEQ, HIGHESTMODSEQ, BINARY) inside
        // the closing parenthesis of a FETCH/STATUS response, or before the CRLF otherwise.
        let mut b = ResponseCodec::default().encode(r).dump();
        if !extra.is_empty() {
            let at = if b.ends_with(b")\r\n") {
                b.len() - 3
            } else {
                b.len() - 2
            };
            b.splice(at..at, extra.iter().copied());
        }
        self.out.push_back(Bytes::from(b));
    }

    fn finish(&mut self, tag: &str, d: Done) {
        let tag = Tag::try_from(tag.to_owned()).ok();
        let code = d.code.as_deref().map(other_code);
        let text = Text::try_from(d.text).unwrap_or_else(|_| Text::unvalidated("done"));
        let st = match d.kind {
            Kind::Ok | Kind::StartTls => Status::Ok { tag, code, text },
            Kind::Later => return,
            Kind::No => Status::No { tag, code, text },
            Kind::Bad => {
                self.bad += 1;
                Status::Bad { tag, code, text }
            }
        };
        self.send(&Response::Status(st));
        if self.bad >= self.cfg.max_bad_commands && !self.closing {
            self.bye("Too many invalid commands");
        }
    }

    fn bye(&mut self, text: &'static str) {
        self.send(&Response::Status(Status::Bye {
            code: None,
            text: Text::unvalidated(text),
        }));
        self.closing = true;
        self.state = State::Logout;
        self.inbuf.clear();
        self.cmd.clear();
    }

    /// Takes one token from the bucket, or sets `throttled_until`.
    fn take_token(&mut self) -> bool {
        let rate = f64::from(self.cfg.commands_per_second.max(1));
        let elapsed = self.now.saturating_duration_since(self.last_refill);
        self.last_refill = self.now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() * rate).min(f64::from(self.cfg.command_burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.throttled_until = None;
            true
        } else {
            let wait = (1.0 - self.tokens) / rate;
            self.throttled_until = Some(self.now + Duration::from_secs_f64(wait));
            false
        }
    }

    fn process(&mut self) {
        let mut pos = 0;
        while !self.closing && self.wait.is_none() {
            let avail = self.inbuf.len() - pos;
            match self.mode {
                Mode::Literal(n) | Mode::Skip(n) => {
                    let k = n.min(avail);
                    if k == 0 && n > 0 {
                        break;
                    }
                    if matches!(self.mode, Mode::Literal(_)) {
                        self.cmd.extend_from_slice(&self.inbuf[pos..pos + k]);
                    }
                    pos += k;
                    self.mode = match (&self.mode, n - k) {
                        (Mode::Literal(_), 0) => Mode::Line,
                        (Mode::Literal(_), r) => Mode::Literal(r),
                        (_, 0) => Mode::DiscardRest,
                        (_, r) => Mode::Skip(r),
                    };
                }
                _ => {
                    let starts_command = matches!(self.mode, Mode::Line) && self.cmd.is_empty();
                    let Some(nl) = self.inbuf[pos..].iter().position(|&b| b == b'\n') else {
                        if avail > self.cfg.max_line {
                            let tag = self.overlong_tag(&self.inbuf[pos..]);
                            self.line_too_long(tag);
                            pos = self.inbuf.len();
                        }
                        break;
                    };
                    if nl + 1 > self.cfg.max_line {
                        let tag = self.overlong_tag(&self.inbuf[pos..]);
                        pos += nl + 1;
                        self.line_too_long(tag);
                        if !self.closing {
                            self.mode = Mode::Line;
                        }
                        continue;
                    }
                    if starts_command && !self.take_token() {
                        break;
                    }
                    let line = self.inbuf[pos..pos + nl + 1].to_vec();
                    pos += nl + 1;
                    self.line(line);
                }
            }
        }
        if self.closing {
            self.inbuf.clear();
        } else if pos > 0 {
            let pos = pos.min(self.inbuf.len());
            self.inbuf.drain(..pos);
        }
    }

    /// The tag to answer an overlong line with: the tag of the command it belongs to (the
    /// line's own first word, the command that announced a literal before it, or the IDLE or
    /// AUTHENTICATE in progress), or `None` if there is no usable one. `None` while the rest of
    /// an overlong line is being dropped (it has been answered).
    fn overlong_tag(&self, line: &[u8]) -> Option<String> {
        let tag = match &self.mode {
            Mode::SkipLine => return None,
            Mode::Idle(t) | Mode::AuthData(t) => return Some(t.clone()),
            _ if !self.cmd.is_empty() => tag_of(&self.cmd),
            _ => tag_of(&line[..line.len().min(MAX_TAG)]),
        };
        // `tag_of` only sees the first MAX_TAG octets: a tag that fills them may go on.
        (tag != "*" && tag.len() < MAX_TAG).then_some(tag)
    }

    /// An overlong line: a tagged BAD for its command and the rest of the line is dropped,
    /// or BYE if the command's tag is unknown (the client could not match an answer).
    fn line_too_long(&mut self, tag: Option<String>) {
        self.cmd.clear();
        self.literals_in_cmd = 0;
        if matches!(self.mode, Mode::SkipLine) {
            return;
        }
        self.mode = Mode::SkipLine;
        match tag {
            Some(tag) => {
                self.bad += 1;
                self.raw(format!("{tag} BAD [TOOBIG] Line too long\r\n"));
                if self.bad >= self.cfg.max_bad_commands {
                    self.bye("Too many invalid commands");
                }
            }
            None => self.bye("Line too long"),
        }
    }

    /// Drops the `n` octets of a non-synchronising literal of a command that has been
    /// answered, then the rest of that command. Beyond twice the APPEND limit, hangs up.
    fn skip_literal(&mut self, n: usize) {
        if n as u64 > 2 * u64::from(self.cfg.max_append) {
            self.bye("Literal too large");
        } else if !self.closing {
            self.mode = Mode::Skip(n);
        }
    }

    fn line(&mut self, line: Vec<u8>) {
        let bare_lf = !line.ends_with(b"\r\n");
        match std::mem::replace(&mut self.mode, Mode::Line) {
            Mode::SkipLine => {}
            Mode::DiscardRest => {
                if let Some((n, non_sync)) = trailing_literal(&line) {
                    // A synchronising literal is not sent: the command was answered.
                    if non_sync {
                        self.skip_literal(n);
                    }
                }
            }
            Mode::Idle(tag) => {
                if line.trim_ascii().eq_ignore_ascii_case(b"DONE") {
                    self.finish(&tag, Done::ok("IDLE terminated"));
                } else {
                    self.finish(&tag, Done::bad("Expected DONE"));
                }
            }
            Mode::AuthData(tag) => self.auth_data(&tag, line.trim_ascii()),
            Mode::Line | Mode::Literal(_) | Mode::Skip(_) => {
                if bare_lf {
                    // CRLF only: a bare LF is not a line end in IMAP.
                    self.cmd.clear();
                    self.literals_in_cmd = 0;
                    self.finish("*", Done::bad("Lines must end in CRLF"));
                    if let Some((n, true)) = trailing_literal(&line) {
                        self.skip_literal(n);
                    }
                    return;
                }
                self.cmd.extend_from_slice(&line);
                self.command();
            }
        }
    }

    fn command(&mut self) {
        let buf = std::mem::take(&mut self.cmd);
        self.command_in(buf, false);
    }

    /// Parses and runs the command (so far) in `buf`; `utf8_done`: its quoted strings holding
    /// UTF-8 have been turned into literals already.
    fn command_in(&mut self, buf: Vec<u8>, utf8_done: bool) {
        let decoded = CommandCodec::default().decode(&buf);
        match decoded {
            Ok(([], cmd)) => {
                self.literals_in_cmd = 0;
                self.execute(cmd, Extras::default());
            }
            Err(CommandDecodeError::LiteralFound { tag, length, mode }) => {
                let tag = tag.inner().to_owned();
                self.literal_announced(buf, tag, length, mode);
            }
            _ => {
                // UTF-8 in quoted strings (RFC 9051 4.3), which imap-codec 1.0 does not
                // parse: as literals. IMAP4rev1 (RFC 3501) has 7-bit quoted strings only.
                if self.rev2
                    && !utf8_done
                    && let Some(b) = ext::utf8_quoted_as_literals(&buf)
                {
                    self.command_in(b, true);
                    return;
                }
                let tag = tag_of(&buf);
                // A `{n}` at the end of a command whose literals are all complete is the
                // end of a literal's octets, not an announcement.
                if let Some((n, non_sync)) =
                    trailing_literal(&buf).filter(|_| !ext::literals_complete(&buf))
                {
                    if ext::literal_may_follow(&buf) {
                        // Extension syntax before the literal (`SEARCH RETURN (…) SUBJECT
                        // {n}`): read the literal, then parse the whole command.
                        let mode = if non_sync {
                            LiteralMode::NonSync
                        } else {
                            LiteralMode::Sync
                        };
                        let n = u32::try_from(n).unwrap_or(u32::MAX);
                        self.literal_announced(buf, tag, n, mode);
                        return;
                    }
                    self.literals_in_cmd = 0;
                    // The command is bad before its end and announced a literal: answer it
                    // once now, and never read the literal's octets as commands. A
                    // synchronising literal is not sent (no `+`), a non-synchronising one is
                    // dropped together with the rest of the command.
                    if ext::search_saves(&buf) {
                        self.forget_saved();
                    }
                    self.finish(&tag, Done::bad("Syntax error or unknown command"));
                    if non_sync {
                        self.skip_literal(n);
                    }
                    return;
                }
                self.literals_in_cmd = 0;
                match ext::recognise(&buf) {
                    Some(Recognised::Namespace) => self.simple(&tag, Simple::Namespace),
                    Some(Recognised::Id) => self.simple(&tag, Simple::Id),
                    Some(Recognised::UidExpunge(set)) => self.simple(&tag, Simple::UidExpunge(set)),
                    Some(Recognised::Rewritten(b, extras)) => {
                        match CommandCodec::default().decode(&b) {
                            Ok(([], cmd)) => self.execute(cmd, extras),
                            _ => self.refuse(&tag, &buf, "Syntax error"),
                        }
                    }
                    None => self.refuse(&tag, &buf, "Syntax error or unknown command"),
                }
            }
        }
    }

    /// A literal of `length` octets follows the command so far (`buf`): checks the limits,
    /// then reads it (after a `+` for a synchronising literal).
    fn literal_announced(&mut self, buf: Vec<u8>, tag: String, length: u32, mode: LiteralMode) {
        let append = is_append(&buf);
        let limit = if append {
            self.cfg.max_append
        } else {
            self.cfg.max_literal
        };
        self.literals_in_cmd += 1;
        let too_many = self.literals_in_cmd > self.cfg.max_literals_per_command;
        if length > limit || too_many {
            self.literals_in_cmd = 0;
            let text = if too_many {
                "Too many literals"
            } else {
                "Literal too large"
            };
            self.finish(&tag, Done::no("TOOBIG", text));
            if mode == LiteralMode::NonSync {
                // The client sends the octets anyway (LITERAL+): drop them, then the
                // rest of the command.
                self.skip_literal(length as usize);
            }
            return;
        }
        if append && length == 0 {
            // An empty message: refused at once (as Dovecot does), its (empty)
            // literal and the rest of the command are dropped.
            self.literals_in_cmd = 0;
            self.finish(&tag, Done::no("", "Can't save a zero byte message"));
            if mode == LiteralMode::NonSync {
                self.skip_literal(0);
            }
            return;
        }
        if mode == LiteralMode::Sync {
            self.send(&Response::CommandContinuationRequest(
                CommandContinuationRequest::basic(None, "Ready for literal data")
                    .unwrap_or_else(|_| CommandContinuationRequest::base64(Vec::new())),
            ));
        }
        self.cmd = buf;
        self.mode = Mode::Literal(length as usize);
    }

    /// BAD for a command that did not parse. A SEARCH that asked to SAVE its result failed,
    /// so `$` becomes empty (RFC 5182 2.1).
    fn refuse(&mut self, tag: &str, buf: &[u8], text: &'static str) {
        if ext::search_saves(buf) {
            self.forget_saved();
        }
        self.finish(tag, Done::bad(text));
    }

    fn forget_saved(&mut self) {
        if let Some(sel) = self.sel.as_mut() {
            sel.saved = UidList::default();
        }
    }

    fn simple(&mut self, tag: &str, s: Simple) {
        let r = match s {
            Simple::Namespace => {
                if self.is_authenticated() {
                    self.raw("* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n".into());
                    Ok(Done::ok("NAMESPACE completed"))
                } else {
                    Err(Done::bad("Not authenticated"))
                }
            }
            Simple::Id => {
                self.raw("* ID (\"name\" \"ringmail\")\r\n".into());
                Ok(Done::ok("ID completed"))
            }
            Simple::UidExpunge(set) => self.expunge(Some(match &set {
                Some(set) => Target::Set(set),
                None => Target::Saved,
            })),
        };
        let allow = true;
        self.complete(tag, r, allow);
    }

    /// Sends pending updates, then the tagged reply.
    fn complete(&mut self, tag: &str, r: Reply<Done>, allow_expunge: bool) {
        let d = r.unwrap_or_else(|e| e);
        if !self.closing {
            self.updates(allow_expunge);
        }
        self.finish(tag, d);
    }

    fn execute(&mut self, cmd: Command<'_>, ex: Extras) {
        let tag = cmd.tag.inner().to_owned();
        let state = self.state;
        let authed = matches!(state, State::Authenticated | State::Selected);
        let selected = state == State::Selected;
        let need = |ok: bool| -> Reply<()> {
            if ok {
                Ok(())
            } else {
                Err(Done::bad("Command not valid in this state"))
            }
        };
        // Expunge announcements are allowed after everything but FETCH, STORE, SEARCH
        // without UID (and COPY, which RFC 3501 listed too).
        let mut allow_expunge = true;
        let is_close = matches!(cmd.body, CommandBody::Close);
        let r: Reply<Done> = (|| match cmd.body {
            CommandBody::Capability => {
                let caps = self.capabilities().join(" ");
                self.raw(format!("* CAPABILITY {caps}\r\n"));
                Ok(Done::ok("CAPABILITY completed"))
            }
            CommandBody::Noop => Ok(Done::ok("NOOP completed")),
            CommandBody::Logout => {
                self.raw("* BYE Logging out\r\n".into());
                self.state = State::Logout;
                Ok(Done::ok("LOGOUT completed"))
            }
            CommandBody::StartTLS => {
                need(state == State::NotAuthenticated)?;
                if self.tls || !self.cfg.offer_starttls {
                    return Err(Done::bad("STARTTLS not available"));
                }
                Ok(Done {
                    kind: Kind::StartTls,
                    code: None,
                    text: "Begin TLS negotiation now",
                })
            }
            CommandBody::Login { username, password } => {
                need(state == State::NotAuthenticated)?;
                self.privacy()?;
                let user = std::str::from_utf8(username.as_ref())
                    .map_err(|_| Done::no("AUTHENTICATIONFAILED", "Authentication failed"))?
                    .to_owned();
                let password = Secret::new(password.declassify().as_ref().to_vec());
                self.events.push_back(Event::Login { user, password });
                Err(Done::later())
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                need(state == State::NotAuthenticated)?;
                if !mechanism.to_string().eq_ignore_ascii_case("PLAIN") {
                    return Err(Done::no("CANNOT", "Unsupported mechanism"));
                }
                self.privacy()?;
                match initial_response {
                    Some(ir) => {
                        self.sasl_plain(ir.declassify().as_ref())?;
                        Err(Done::later())
                    }
                    None => {
                        self.send(&Response::CommandContinuationRequest(
                            CommandContinuationRequest::base64(Vec::new()),
                        ));
                        self.mode = Mode::AuthData(tag.clone());
                        Err(Done::later())
                    }
                }
            }
            CommandBody::Enable { capabilities } => {
                need(authed)?;
                let mut enabled = Vec::new();
                for c in capabilities.as_ref() {
                    match c {
                        CapabilityEnable::CondStore => {
                            self.condstore = true;
                            enabled.push("CONDSTORE");
                        }
                        // imap-types 1.0 has no accessor for other capabilities; Debug shows
                        // the atom.
                        CapabilityEnable::Other(o)
                            if format!("{o:?}")
                                .to_ascii_lowercase()
                                .contains("\"imap4rev2\"") =>
                        {
                            self.rev2 = true;
                            enabled.push("IMAP4rev2");
                        }
                        _ => {}
                    }
                }
                self.raw(format!("* ENABLED {}\r\n", enabled.join(" ")).replace(" \r\n", "\r\n"));
                Ok(Done::ok("ENABLE completed"))
            }
            CommandBody::Select { mailbox } => {
                need(authed)?;
                self.select(&mailbox, true, ex.condstore_select)
            }
            CommandBody::Examine { mailbox } => {
                need(authed)?;
                self.select(&mailbox, false, ex.condstore_select)
            }
            CommandBody::Create { mailbox } => {
                need(authed)?;
                let name = mailbox_name(&mailbox, self.rev2)?;
                let name = name.trim_end_matches('/');
                if name.eq_ignore_ascii_case("INBOX") {
                    return Err(Done::no("ALREADYEXISTS", "INBOX exists"));
                }
                self.store()?.create(name).map_err(|e| store_error(&e))?;
                Ok(Done::ok("CREATE completed"))
            }
            CommandBody::Delete { mailbox } => {
                need(authed)?;
                let name = mailbox_name(&mailbox, self.rev2)?;
                self.store()?.delete(&name).map_err(|e| store_error(&e))?;
                Ok(Done::ok("DELETE completed"))
            }
            CommandBody::Rename { from, to } => {
                need(authed)?;
                let (from, to) = (
                    mailbox_name(&from, self.rev2)?,
                    mailbox_name(&to, self.rev2)?,
                );
                self.store()?
                    .rename(&from, &to)
                    .map_err(|e| store_error(&e))?;
                Ok(Done::ok("RENAME completed"))
            }
            CommandBody::Subscribe { mailbox } => {
                need(authed)?;
                let name = mailbox_name(&mailbox, self.rev2)?;
                self.store()?
                    .subscribe(&name, true)
                    .map_err(|e| store_error(&e))?;
                Ok(Done::ok("SUBSCRIBE completed"))
            }
            CommandBody::Unsubscribe { mailbox } => {
                need(authed)?;
                let on = false;
                let name = mailbox_name(&mailbox, self.rev2)?;
                self.store()?
                    .subscribe(&name, on)
                    .map_err(|e| store_error(&e))?;
                Ok(Done::ok("Subscription changed"))
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => {
                need(authed)?;
                self.list(&reference, &mailbox_wildcard, &ex, false)
            }
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => {
                need(authed)?;
                self.list(&reference, &mailbox_wildcard, &ex, true)
            }
            CommandBody::Status {
                mailbox,
                item_names,
            } => {
                need(authed)?;
                let name = mailbox_name(&mailbox, self.rev2)?;
                let items = match ex.status_items {
                    Some(items) => items,
                    None => item_names.as_ref().iter().map(status_item).collect(),
                };
                if items.is_empty() {
                    // imap-codec 1.0 takes `()`; RFC 9051 wants at least one item.
                    return Err(Done::bad("Empty STATUS item list"));
                }
                self.status(&name, &items)?;
                Ok(Done::ok("STATUS completed"))
            }
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                need(authed)?;
                if flags.iter().any(|f| matches!(f, ImapFlag::Extension(_))) {
                    // As STORE: \Recent and unknown system flags cannot be stored (Dovecot:
                    // BAD).
                    return Err(Done::bad("Invalid system flag"));
                }
                let name = mailbox_name(&mailbox, self.rev2)?;
                let flags: Vec<Flag> = flags.iter().filter_map(from_imap_flag).collect();
                let date = date.map(|d| SystemTime::from(*d.as_ref()));
                let data = ex.literal8.as_deref().unwrap_or(message.data());
                if data.len() > self.cfg.max_append as usize {
                    return Err(Done::no("TOOBIG", "Message too large"));
                }
                // literal8 (RFC 3516 4.3): `binary` parts are stored base64-encoded; NUL
                // anywhere else cannot be stored.
                let converted = ex
                    .literal8
                    .as_ref()
                    .map(|_| message::encode_binary_parts(data));
                let data = converted.as_deref().unwrap_or(data);
                if data.contains(&0) {
                    return Err(Done::no("UNKNOWN-CTE", "Message contains NUL octets"));
                }
                let (validity, uid) =
                    self.store()?
                        .append(&name, data, &flags, date)
                        .map_err(|e| match e {
                            StoreError::NotFound => Done::no("TRYCREATE", "No such mailbox"),
                            e => store_error(&e),
                        })?;
                Ok(Done::ok("APPEND completed").code(format!("APPENDUID {validity} {uid}")))
            }
            CommandBody::Idle => {
                need(authed)?;
                self.updates(true);
                self.send(&Response::CommandContinuationRequest(
                    CommandContinuationRequest::basic(None, "idling")
                        .unwrap_or_else(|_| CommandContinuationRequest::base64(Vec::new())),
                ));
                self.mode = Mode::Idle(tag.clone());
                self.events.push_back(Event::Idle);
                Err(Done::later())
            }
            CommandBody::Check => {
                need(selected)?;
                Ok(Done::ok("CHECK completed"))
            }
            CommandBody::Close | CommandBody::Unselect => {
                need(selected)?;
                let close = is_close;
                if close && self.sel.as_ref().is_some_and(|s| s.writable) {
                    // Silent expunge.
                    let _ = self.store()?.expunge(None);
                }
                self.store()?.unselect();
                self.sel = None;
                self.state = State::Authenticated;
                Ok(Done::ok("Mailbox closed"))
            }
            CommandBody::Expunge => {
                need(selected)?;
                self.expunge(None)
            }
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                need(selected)?;
                allow_expunge = uid;
                let r = match charset {
                    Some(c) if !charset_ok(&c) => Err(Done::no(
                        "BADCHARSET (UTF-8 US-ASCII)",
                        "Unsupported charset",
                    )),
                    _ => self.search(&tag, &criteria, uid, &ex),
                };
                if r.is_err() && ex.search_return.is_some_and(|r| r.save) {
                    self.forget_saved();
                }
                r
            }
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
            } => {
                need(selected)?;
                allow_expunge = uid;
                let target = Target::of(&sequence_set, &ex);
                self.fetch(target, macro_or_item_names, uid, &ex)
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
            } => {
                need(selected)?;
                allow_expunge = uid;
                let target = Target::of(&sequence_set, &ex);
                self.store_cmd(target, &kind, &response, &flags, uid, &ex)
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => {
                need(selected)?;
                allow_expunge = uid;
                self.copy_move(Target::of(&sequence_set, &ex), &mailbox, uid, false)
            }
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => {
                need(selected)?;
                self.copy_move(Target::of(&sequence_set, &ex), &mailbox, uid, true)
            }
            _ => Err(Done::bad("Command not supported")),
        })();
        if let Err(Done {
            kind: Kind::Later, ..
        }) = &r
        {
            if matches!(self.events.back(), Some(Event::Login { .. })) {
                self.wait = Some(Wait::Login(tag));
            }
            return;
        }
        let starttls = matches!(
            r,
            Ok(Done {
                kind: Kind::StartTls,
                ..
            })
        );
        let logout = self.state == State::Logout;
        self.complete(&tag, r, allow_expunge);
        if starttls {
            // Anything pipelined after STARTTLS was sent in plaintext: drop it.
            self.inbuf.clear();
            self.cmd.clear();
            self.wait = Some(Wait::Tls);
            self.events.push_back(Event::StartTls);
        }
        if logout {
            self.closing = true;
            self.inbuf.clear();
        }
    }

    fn privacy(&self) -> Reply<()> {
        if self.tls || self.cfg.allow_plaintext_auth {
            Ok(())
        } else {
            Err(Done::no(
                "PRIVACYREQUIRED",
                "Authentication requires TLS: use STARTTLS first",
            ))
        }
    }

    fn sasl_plain(&mut self, msg: &[u8]) -> Reply<()> {
        let mut parts = msg.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Done::bad("Malformed PLAIN response"));
        };
        let user = std::str::from_utf8(authc)
            .map_err(|_| Done::no("AUTHENTICATIONFAILED", "Authentication failed"))?;
        if !authz.is_empty() && authz != authc {
            return Err(Done::no(
                "AUTHORIZATIONFAILED",
                "Cannot act as another user",
            ));
        }
        self.events.push_back(Event::Login {
            user: user.to_owned(),
            password: Secret::new(pass.to_vec()),
        });
        Ok(())
    }

    fn auth_data(&mut self, tag: &str, line: &[u8]) {
        if line == b"*" {
            self.finish(tag, Done::bad("Authentication cancelled"));
            return;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(line);
        match decoded {
            Ok(d) => match self.sasl_plain(&d) {
                Ok(()) => self.wait = Some(Wait::Login(tag.to_owned())),
                Err(e) => self.finish(tag, e),
            },
            Err(_) => self.finish(tag, Done::bad("Invalid base64")),
        }
    }

    /// A message's metadata, from the store.
    fn meta(&self, uid: u32) -> Option<MessageMeta> {
        if let Some(m) = self
            .sel
            .as_ref()
            .and_then(|s| s.gone.iter().find(|m| m.uid == uid))
        {
            return Some(m.clone());
        }
        self.store.as_ref()?.meta(uid)
    }

    fn store(&mut self) -> Reply<&mut Box<dyn MailStore>> {
        self.store
            .as_mut()
            .ok_or_else(|| Done::bad("Not authenticated"))
    }

    fn select(&mut self, mailbox: &Mailbox<'_>, writable: bool, condstore: bool) -> Reply<Done> {
        let name = mailbox_name(mailbox, self.rev2)?;
        if self.sel.take().is_some() {
            self.state = State::Authenticated;
            self.store()?.unselect();
            self.raw("* OK [CLOSED] Previous mailbox closed\r\n".into());
        }
        let s = self.store()?.select(&name).map_err(|e| store_error(&e))?;
        if condstore {
            self.condstore = true;
        }
        let writable = writable && s.writable;
        let exists = s.uids.len();
        self.raw(format!("* {exists} EXISTS\r\n"));
        if !self.rev2 {
            self.raw("* 0 RECENT\r\n".into());
        }
        let mut keywords: Vec<String> = Vec::new();
        for k in s.keywords {
            if !keywords.iter().any(|x| x.eq_ignore_ascii_case(&k)) {
                keywords.push(k);
            }
        }
        self.send_flags(&keywords, writable);
        if let Some(v) = NonZeroU32::new(s.uidvalidity) {
            self.send(&Response::Status(Status::Ok {
                tag: None,
                code: Some(Code::UidValidity(v)),
                text: Text::unvalidated("UIDs valid"),
            }));
        }
        if let Some(n) = NonZeroU32::new(s.uidnext) {
            self.send(&Response::Status(Status::Ok {
                tag: None,
                code: Some(Code::UidNext(n)),
                text: Text::unvalidated("Predicted next UID"),
            }));
        }
        self.raw(format!(
            "* OK [HIGHESTMODSEQ {}] Highest\r\n",
            s.highestmodseq.max(1)
        ));
        self.sel = Some(Sel {
            writable,
            uidnext: s.uidnext,
            highestmodseq: s.highestmodseq,
            uids: UidList::from_sorted(&s.uids),
            pending_expunge: vec![],
            gone: vec![],
            told: vec![],
            saved: UidList::default(),
            keywords,
        });
        self.state = State::Selected;
        Ok(if writable {
            Done::ok("SELECT completed").code("READ-WRITE".into())
        } else {
            Done::ok("EXAMINE completed").code("READ-ONLY".into())
        })
    }

    /// The untagged FLAGS and PERMANENTFLAGS of the selected mailbox: the system flags and
    /// the mailbox's keywords, and `\*` (new keywords may be stored) if it is writable.
    fn send_flags(&mut self, keywords: &[String], writable: bool) {
        let mut flags: Vec<ImapFlag<'static>> =
            Flag::SYSTEM.iter().filter_map(to_imap_flag).collect();
        flags.extend(
            keywords
                .iter()
                .filter_map(|k| to_imap_flag(&Flag::Keyword(k.clone()))),
        );
        let perm = if writable {
            let mut p: Vec<FlagPerm> = flags.iter().cloned().map(FlagPerm::Flag).collect();
            p.push(FlagPerm::Asterisk);
            p
        } else {
            vec![]
        };
        self.send(&Response::Data(Data::Flags(flags)));
        self.send(&Response::Status(Status::Ok {
            tag: None,
            code: Some(Code::PermanentFlags(perm)),
            text: Text::unvalidated("Flags permitted"),
        }));
    }

    /// Keywords among `flags` the session has not announced for the selected mailbox are
    /// added to its list; true if there were any (a new FLAGS response is due: RFC 9051
    /// 7.3.5, as Dovecot sends it).
    fn learn_keywords<'a>(&mut self, flags: impl IntoIterator<Item = &'a Flag>) -> bool {
        let Some(sel) = self.sel.as_mut() else {
            return false;
        };
        let mut learned = false;
        for f in flags {
            if let Flag::Keyword(k) = f
                && !sel.keywords.iter().any(|x| x.eq_ignore_ascii_case(k))
            {
                sel.keywords.push(k.clone());
                learned = true;
            }
        }
        learned
    }

    /// Sends FLAGS and PERMANENTFLAGS again, with the keywords learned since.
    fn announce_flags(&mut self) {
        if let Some(sel) = self.sel.as_ref() {
            let (keywords, writable) = (sel.keywords.clone(), sel.writable);
            self.send_flags(&keywords, writable);
        }
    }

    fn list(
        &mut self,
        reference: &Mailbox<'_>,
        pattern: &ListMailbox<'_>,
        ex: &Extras,
        lsub: bool,
    ) -> Reply<Done> {
        let reference = match reference {
            Mailbox::Inbox => b"INBOX".to_vec(),
            Mailbox::Other(o) => o.as_ref().to_vec(),
        };
        let pattern = match pattern {
            ListMailbox::Token(t) => t.as_ref().to_vec(),
            ListMailbox::String(s) => s.as_ref().to_vec(),
        };
        // A UTF-8 session's reference and pattern are matched in the store's form (the
        // wildcards `*` and `%` encode as themselves).
        let (reference, pattern) = if self.rev2 {
            let enc = |b: Vec<u8>| match String::from_utf8(b) {
                Ok(s) => Ok(crate::utf7::encode(&s).into_bytes()),
                Err(_) => Err(Done::bad("Mailbox name is not UTF-8")),
            };
            (enc(reference)?, enc(pattern)?)
        } else {
            (reference, pattern)
        };
        let word = if lsub { "LSUB" } else { "LIST" };
        let done = if lsub {
            Done::ok("LSUB completed")
        } else {
            Done::ok("LIST completed")
        };
        if pattern.is_empty() {
            self.raw(format!("* {word} (\\Noselect) \"/\" \"\"\r\n"));
            return Ok(done);
        }
        let mut full = reference;
        if !full.is_empty() && !full.ends_with(b"/") && !pattern.starts_with(b"/") {
            full.push(b'/');
        }
        full.extend_from_slice(&pattern);
        let status_items = ex.list_status.as_deref();
        let sel_subscribed = lsub || ex.list_select.iter().any(|s| s == "SUBSCRIBED");
        let sel_special = ex.list_select.iter().any(|s| s == "SPECIAL-USE");
        let ret_subscribed = sel_subscribed || ex.list_return.iter().any(|s| s == "SUBSCRIBED");
        // (mailbox, exists): with the SUBSCRIBED selection (and LSUB), subscriptions whose
        // mailbox does not exist are listed too (RFC 5258 3.1, RFC 3501 6.3.9).
        let mut all: Vec<(MailboxInfo, bool)> = self
            .store()?
            .list()
            .map_err(|e| store_error(&e))?
            .into_iter()
            .map(|m| (m, true))
            .collect();
        if sel_subscribed {
            let mut known: HashSet<String> = all.iter().map(|(m, _)| m.name.clone()).collect();
            let subs = self.store()?.subscriptions().map_err(|e| store_error(&e))?;
            let before = all.len();
            for name in subs {
                if known.insert(name.clone()) {
                    let mb = MailboxInfo {
                        name,
                        delimiter: Some('/'),
                        special_use: None,
                        subscribed: true,
                        noselect: true,
                    };
                    all.push((mb, false));
                }
            }
            if all.len() > before {
                all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            }
        }
        // LSUB with `%` (RFC 3501 6.3.9): a subscribed mailbox the wildcard cannot reach
        // (it is below the level `%` stops at) shows its matching ancestor, when that one is
        // not subscribed itself, as `\Noselect`.
        let mut lsub_parents: Vec<String> = Vec::new();
        if lsub && full.contains(&b'%') {
            let subscribed: HashSet<&str> = all
                .iter()
                .filter(|(m, _)| m.subscribed)
                .map(|(m, _)| m.name.as_str())
                .collect();
            for name in &subscribed {
                if pattern_match(&full, name.as_bytes(), b'/') {
                    continue;
                }
                let mut end = 0;
                while let Some(i) = name[end..].find('/') {
                    let parent = &name[..end + i];
                    end += i + 1;
                    if pattern_match(&full, parent.as_bytes(), b'/')
                        && !subscribed.contains(parent)
                        && !lsub_parents.iter().any(|p| p == parent)
                    {
                        lsub_parents.push(parent.to_string());
                    }
                }
            }
            lsub_parents.sort();
        }
        for parent in &lsub_parents {
            if let Ok(name) = Mailbox::try_from(self.display_name(parent)) {
                let mut items = Vec::new();
                if let Ok(a) = Atom::try_from("Noselect".to_owned()) {
                    items.push(FlagNameAttribute::from(a));
                }
                self.send(&Response::Data(Data::Lsub {
                    items,
                    delimiter: QuotedChar::try_from('/').ok(),
                    mailbox: name,
                }));
            }
        }
        for (mb, exists) in &all {
            let exists = *exists;
            let matches = if mb.name == "INBOX" {
                pattern_match(&full.to_ascii_uppercase(), b"INBOX", b'/')
                    || pattern_match(&full, b"INBOX", b'/')
            } else {
                pattern_match(&full, mb.name.as_bytes(), b'/')
            };
            if !matches
                || (sel_subscribed && !mb.subscribed)
                || (sel_special && mb.special_use.is_none())
            {
                continue;
            }
            let prefix = format!("{}/", mb.name);
            let children = all.iter().any(|(o, e)| *e && o.name.starts_with(&prefix));
            let mut attrs: Vec<FlagNameAttribute> = Vec::new();
            let mut attr = |s: &str| {
                if let Ok(a) = Atom::try_from(s.to_owned()) {
                    attrs.push(FlagNameAttribute::from(a));
                }
            };
            if !exists && !lsub {
                // Implies \Noselect (RFC 5258).
                attr("NonExistent");
            } else if mb.noselect {
                attr("Noselect");
            }
            if !lsub {
                if children {
                    attr("HasChildren");
                } else if exists {
                    attr("HasNoChildren");
                }
                if let Some(su) = mb.special_use {
                    attr(&su.as_str()[1..]);
                }
                if ret_subscribed && mb.subscribed {
                    attr("Subscribed");
                }
            }
            let Ok(name) = Mailbox::try_from(self.display_name(&mb.name)) else {
                continue;
            };
            let data = if lsub {
                Data::Lsub {
                    items: attrs,
                    delimiter: mb.delimiter.and_then(|c| QuotedChar::try_from(c).ok()),
                    mailbox: name,
                }
            } else {
                Data::List {
                    items: attrs,
                    delimiter: mb.delimiter.and_then(|c| QuotedChar::try_from(c).ok()),
                    mailbox: name,
                }
            };
            self.send(&Response::Data(data));
            if let Some(items) = status_items
                && !mb.noselect
            {
                // LIST-STATUS: failures for one mailbox are left out.
                let _ = self.status(&mb.name, items);
            }
        }
        Ok(done)
    }

    /// A store name as this session shows it: UTF-8 after ENABLE IMAP4rev2, else as stored
    /// (modified UTF-7). A name that is not canonical modified UTF-7 (made by another tool)
    /// is shown as stored.
    fn display_name(&self, stored: &str) -> String {
        if self.rev2 {
            crate::utf7::decode(stored).unwrap_or_else(|_| stored.to_owned())
        } else {
            stored.to_owned()
        }
    }

    fn status(&mut self, name: &str, items: &[StatusItem]) -> Reply<()> {
        let st = self.store()?.status(name).map_err(|e| store_error(&e))?;
        let mut out = Vec::new();
        // Items imap-codec 1.0 cannot encode go after its items.
        let mut extra = String::new();
        for it in items {
            match it {
                StatusItem::Messages => out.push(StatusDataItem::Messages(st.messages)),
                StatusItem::Recent => out.push(StatusDataItem::Recent(st.recent)),
                StatusItem::UidNext => {
                    if let Some(n) = NonZeroU32::new(st.uidnext) {
                        out.push(StatusDataItem::UidNext(n));
                    }
                }
                StatusItem::UidValidity => {
                    if let Some(n) = NonZeroU32::new(st.uidvalidity) {
                        out.push(StatusDataItem::UidValidity(n));
                    }
                }
                StatusItem::Unseen => out.push(StatusDataItem::Unseen(st.unseen)),
                StatusItem::Deleted => out.push(StatusDataItem::Deleted(st.deleted)),
                StatusItem::DeletedStorage => {}
                StatusItem::Size => extra.push_str(&format!(" SIZE {}", st.size)),
                StatusItem::HighestModSeq => {
                    extra.push_str(&format!(" HIGHESTMODSEQ {}", st.highestmodseq.max(1)));
                }
            }
        }
        let mailbox =
            Mailbox::try_from(self.display_name(name)).map_err(|_| Done::bad("Bad name"))?;
        if out.is_empty() && !extra.is_empty() {
            extra.remove(0);
        }
        self.send_with(
            &Response::Data(Data::Status {
                mailbox,
                items: out.into(),
            }),
            &extra,
        );
        Ok(())
    }

    /// The messages a set names: (index into the UID list) in ascending order.
    fn resolve(&self, target: Target<'_>, uid: bool) -> Reply<Vec<usize>> {
        let sel = self
            .sel
            .as_ref()
            .ok_or_else(|| Done::bad("No mailbox selected"))?;
        let set = match target {
            Target::Set(set) => set,
            // `$` names messages, whatever the command's numbering; expunged ones are gone.
            Target::Saved => {
                return Ok(sel.saved.iter().filter_map(|u| sel.index_of(u)).collect());
            }
        };
        if uid {
            let largest = sel.uids.last().unwrap_or(0);
            let r = ranges(set, largest);
            Ok(sel
                .uids
                .iter()
                .enumerate()
                .filter(|&(_, u)| in_ranges(&r, u))
                .map(|(i, _)| i)
                .collect())
        } else {
            let n = u32::try_from(sel.uids.len()).unwrap_or(u32::MAX);
            let star = set.0.as_ref().iter().any(|s| {
                matches!(
                    s,
                    Sequence::Single(SeqOrUid::Asterisk)
                        | Sequence::Range(SeqOrUid::Asterisk, _)
                        | Sequence::Range(_, SeqOrUid::Asterisk)
                )
            });
            if n == 0 && star {
                // `1:*` in an empty mailbox names no message.
                return Ok(vec![]);
            }
            let r = ranges(set, n);
            if r.iter().any(|&(a, b)| a == 0 || b > n) {
                return Err(Done::bad("Invalid message sequence number"));
            }
            Ok(r.iter()
                .flat_map(|&(a, b)| (a..=b).map(|s| s as usize - 1))
                .collect())
        }
    }

    fn expunge(&mut self, set: Option<Target<'_>>) -> Reply<Done> {
        if self.state != State::Selected {
            return Err(Done::bad("No mailbox selected"));
        }
        let uids: Option<Vec<u32>> = match set {
            Some(set) => {
                let idx = self.resolve(set, true)?;
                let sel = self
                    .sel
                    .as_ref()
                    .ok_or_else(|| Done::bad("No mailbox selected"))?;
                Some(idx.iter().map(|&i| sel.uid_at(i)).collect())
            }
            None => None,
        };
        if !self.sel.as_ref().is_some_and(|s| s.writable) {
            return Err(Done::no("READ-ONLY", "Mailbox is read-only"));
        }
        let gone = self
            .store()?
            .expunge(uids.as_deref())
            .map_err(|e| store_error(&e))?;
        self.announce_expunged(&gone);
        Ok(Done::ok("EXPUNGE completed"))
    }

    fn announce_expunged(&mut self, uids: &[u32]) {
        let Some(sel) = self.sel.as_mut() else { return };
        let mut lines = Vec::new();
        for uid in uids {
            if let Some(i) = sel.index_of(*uid) {
                sel.uids.remove(i);
                lines.push(format!("* {} EXPUNGE\r\n", i + 1));
            }
        }
        sel.pending_expunge.retain(|u| !uids.contains(u));
        sel.gone.retain(|m| sel.pending_expunge.contains(&m.uid));
        if sel.pending_expunge.is_empty() {
            sel.pending_expunge = Vec::new();
            sel.gone = Vec::new();
        }
        for l in lines {
            self.raw(l);
        }
    }

    /// Folds store changes into the session and announces them.
    fn updates(&mut self, allow_expunge: bool) {
        if self.state != State::Selected {
            return;
        }
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let Ok(ch) = store.refresh() else { return };
        let Some(sel) = self.sel.as_mut() else { return };
        let mut lines = Vec::new();
        let mut told = std::mem::take(&mut sel.told);
        told.sort_unstable();
        let was_told = |uid: u32, modseq: u64| {
            told[told.partition_point(|t| t.0 < uid)..]
                .iter()
                .take_while(|t| t.0 == uid)
                .any(|t| t.1 >= modseq)
        };
        for (uid, flags, modseq) in &ch.flags {
            if let Some(i) = sel.index_of(*uid)
                && !was_told(*uid, *modseq)
            {
                lines.push((i + 1, *uid, flags.clone(), *modseq));
            }
        }
        for uid in &ch.expunged {
            if sel.index_of(*uid).is_some() && !sel.pending_expunge.contains(uid) {
                sel.pending_expunge.push(*uid);
                if let Some(m) = ch.gone.iter().find(|m| m.uid == *uid) {
                    sel.gone.push(m.clone());
                }
            }
        }
        let last = sel.uids.last().unwrap_or(0);
        let fresh: Vec<u32> = ch.new.iter().copied().filter(|&u| u > last).collect();
        sel.highestmodseq = sel.highestmodseq.max(ch.highestmodseq);
        sel.uidnext = sel.uidnext.max(ch.uidnext);
        let condstore = self.condstore;
        // Keywords another session (or a delivery, an APPEND, a COPY) brought in: a new FLAGS
        // before the messages that carry them.
        let mut learned = self.learn_keywords(lines.iter().flat_map(|l| l.2.iter()));
        for &u in &fresh {
            if let Some(m) = self.meta(u) {
                learned |= self.learn_keywords(m.flags.iter());
            }
        }
        if learned {
            self.announce_flags();
        }
        for (seq, uid, flags, modseq) in lines {
            let modseq = if condstore {
                format!(" MODSEQ ({modseq})")
            } else {
                String::new()
            };
            self.fetch_flags_line(seq, uid, &flags, &modseq);
        }
        if allow_expunge {
            let pending = self
                .sel
                .as_mut()
                .map(|s| std::mem::take(&mut s.pending_expunge))
                .unwrap_or_default();
            self.announce_expunged(&pending);
        }
        if !fresh.is_empty()
            && let Some(sel) = self.sel.as_mut()
        {
            for u in fresh {
                sel.uids.push(u);
            }
            let n = sel.uids.len();
            self.raw(format!("* {n} EXISTS\r\n"));
        }
    }

    fn fetch_flags_line(&mut self, seq: usize, uid: u32, flags: &[Flag], extra: &str) {
        let Some(seq) = u32::try_from(seq).ok().and_then(NonZeroU32::new) else {
            return;
        };
        let mut items = vec![MessageDataItem::Flags(
            flags
                .iter()
                .filter_map(to_imap_flag)
                .map(FlagFetch::Flag)
                .collect(),
        )];
        if let Some(u) = NonZeroU32::new(uid) {
            items.push(MessageDataItem::Uid(u));
        }
        if let Ok(items) = NonEmptyVec::try_from(items) {
            self.send_with(&Response::Data(Data::Fetch { seq, items }), extra);
        }
    }

    fn fetch(
        &mut self,
        set: Target<'_>,
        items: MacroOrMessageDataItemNames<'_>,
        uid: bool,
        ex: &Extras,
    ) -> Reply<Done> {
        let mut names = match items {
            MacroOrMessageDataItemNames::Macro(m) => {
                use MessageDataItemName as N;
                use imap_codec::imap_types::fetch::Macro;
                match m {
                    Macro::All => vec![N::Flags, N::InternalDate, N::Rfc822Size, N::Envelope],
                    Macro::Fast => vec![N::Flags, N::InternalDate, N::Rfc822Size],
                    _ => vec![
                        N::Flags,
                        N::InternalDate,
                        N::Rfc822Size,
                        N::Envelope,
                        N::Body,
                    ],
                }
            }
            MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
        };
        if ex.fetch_ext_only {
            // Only a placeholder for imap-codec.
            names.clear();
        }
        if uid && !names.contains(&MessageDataItemName::Uid) {
            names.insert(0, MessageDataItemName::Uid);
        }
        let want_modseq = ex.fetch_modseq || ex.changed_since.is_some();
        if want_modseq {
            self.condstore = true;
        }
        let sets_seen = names.iter().any(|n| {
            matches!(
                n,
                MessageDataItemName::BodyExt { peek: false, .. }
                    | MessageDataItemName::Rfc822
                    | MessageDataItemName::Rfc822Text
            )
        }) || ex.fetch_binary.iter().any(|b| !b.peek && !b.size);
        let needs_content = !ex.fetch_binary.is_empty()
            || names.iter().any(|n| {
                !matches!(
                    n,
                    MessageDataItemName::Flags
                        | MessageDataItemName::Uid
                        | MessageDataItemName::InternalDate
                        | MessageDataItemName::Rfc822Size
                )
            });
        let idx = self.resolve(set, uid)?;
        let writable = self.sel.as_ref().is_some_and(|s| s.writable);
        let mut missing = false;
        let mut unknown_cte = false;
        for i in idx {
            let Some(meta) = self
                .sel
                .as_ref()
                .map(|s| s.uid_at(i))
                .and_then(|u| self.meta(u))
            else {
                missing = true;
                continue;
            };
            if ex.changed_since.is_some_and(|c| meta.modseq <= c) {
                continue;
            }
            let mut meta = meta;
            let content = if needs_content {
                match self.store()?.read(meta.uid) {
                    Ok(c) => Some(c),
                    Err(_) => {
                        missing = true;
                        continue;
                    }
                }
            } else {
                None
            };
            let parsed = content.as_deref().map(Parsed::new);
            // BINARY items first: a part the server cannot decode fails the message.
            let mut binary = Vec::new();
            if let Some(p) = &parsed {
                match binary_items(p, &ex.fetch_binary) {
                    Ok(b) => binary = b,
                    Err(UnknownCte) => {
                        unknown_cte = true;
                        continue;
                    }
                }
            }
            let mut add_flags = false;
            if sets_seen && writable && !meta.flags.contains(&Flag::Seen) {
                if let Ok(res) =
                    self.store()?
                        .store_flags(&[meta.uid], FlagOp::Add, &[Flag::Seen], None)
                    && let Some((_, f, m)) = res.into_iter().next()
                {
                    meta.flags = f;
                    meta.modseq = m;
                    if let Some(s) = self.sel.as_mut() {
                        s.told.push((meta.uid, m));
                        s.highestmodseq = s.highestmodseq.max(m);
                    }
                }
                add_flags = !names.contains(&MessageDataItemName::Flags);
            }
            let mut out = Vec::new();
            for n in &names {
                if let Some(item) = fetch_item(n, &meta, parsed.as_ref()) {
                    out.push(item);
                }
            }
            if add_flags {
                out.push(fetch_item(&MessageDataItemName::Flags, &meta, None).expect("flags"));
            }
            let mut extra = if want_modseq {
                format!(" MODSEQ ({})", meta.modseq).into_bytes()
            } else {
                Vec::new()
            };
            extra.extend_from_slice(&binary);
            let Some(seq) = u32::try_from(i + 1).ok().and_then(NonZeroU32::new) else {
                continue;
            };
            match NonEmptyVec::try_from(out) {
                Ok(items) => {
                    self.send_with_bytes(&Response::Data(Data::Fetch { seq, items }), &extra)
                }
                Err(_) if !extra.is_empty() => {
                    let mut line = format!("* {seq} FETCH (").into_bytes();
                    line.extend_from_slice(&extra[1..]);
                    line.extend_from_slice(b")\r\n");
                    self.out.push_back(Bytes::from(line));
                }
                Err(_) => {}
            }
        }
        if unknown_cte {
            return Ok(Done::no("UNKNOWN-CTE", "Unknown Content-Transfer-Encoding"));
        }
        if missing {
            return Ok(Done::no("EXPUNGEISSUED", "Some messages were expunged"));
        }
        Ok(Done::ok("FETCH completed"))
    }

    fn store_cmd(
        &mut self,
        set: Target<'_>,
        kind: &StoreType,
        response: &StoreResponse,
        flags: &[ImapFlag<'_>],
        uid: bool,
        ex: &Extras,
    ) -> Reply<Done> {
        if flags.iter().any(|f| matches!(f, ImapFlag::Extension(_))) {
            // \Recent and unknown system flags cannot be stored (as Dovecot: BAD).
            return Err(Done::bad("Invalid system flag"));
        }
        let idx = self.resolve(set, uid)?;
        if !self.sel.as_ref().is_some_and(|s| s.writable) {
            return Err(Done::no("READ-ONLY", "Mailbox is read-only"));
        }
        if ex.unchanged_since.is_some() {
            self.condstore = true;
        }
        let flags: Vec<Flag> = flags.iter().filter_map(from_imap_flag).collect();
        let op = match kind {
            StoreType::Add => FlagOp::Add,
            StoreType::Remove => FlagOp::Remove,
            StoreType::Replace => FlagOp::Replace,
        };
        let uids: Vec<u32> = {
            let sel = self
                .sel
                .as_ref()
                .ok_or_else(|| Done::bad("No mailbox selected"))?;
            idx.iter().map(|&i| sel.uid_at(i)).collect()
        };
        let res = self
            .store()?
            .store_flags(&uids, op, &flags, ex.unchanged_since)
            .map_err(|e| store_error(&e))?;
        let silent = matches!(response, StoreResponse::Silent);
        if self.learn_keywords(res.iter().flat_map(|r| r.1.iter())) {
            // A new keyword: FLAGS and PERMANENTFLAGS again (also for .SILENT), before the
            // FETCH responses that show it.
            self.announce_flags();
        }
        let mut changed = Vec::new();
        for (u, f, m) in &res {
            let Some(sel) = self.sel.as_mut() else { break };
            if let Some(i) = sel.index_of(*u) {
                sel.told.push((*u, *m));
                sel.highestmodseq = sel.highestmodseq.max(*m);
                changed.push((i + 1, *u, f.clone(), *m));
            }
        }
        for (seq, u, f, m) in changed {
            if !silent {
                let extra = if self.condstore {
                    format!(" MODSEQ ({m})")
                } else {
                    String::new()
                };
                self.fetch_flags_line_uid(seq, u, &f, uid, &extra);
            }
        }
        let done_uids: Vec<u32> = res.iter().map(|r| r.0).collect();
        let mut modified: Vec<u32> = Vec::new();
        if let Some(sel) = self.sel.as_ref().filter(|_| ex.unchanged_since.is_some()) {
            for (k, u) in uids.iter().enumerate() {
                if !done_uids.contains(u) && sel.index_of(*u).is_some() {
                    modified.push(if uid { *u } else { idx[k] as u32 + 1 });
                }
            }
        }
        if !modified.is_empty() {
            return Ok(Done::ok("Conditional STORE failed")
                .code(format!("MODIFIED {}", compact_set(&modified))));
        }
        Ok(Done::ok("STORE completed"))
    }

    fn fetch_flags_line_uid(
        &mut self,
        seq: usize,
        uid: u32,
        flags: &[Flag],
        with_uid: bool,
        extra: &str,
    ) {
        if with_uid {
            self.fetch_flags_line(seq, uid, flags, extra);
        } else {
            self.fetch_flags_line(seq, 0, flags, extra);
        }
    }

    fn copy_move(
        &mut self,
        set: Target<'_>,
        mailbox: &Mailbox<'_>,
        uid: bool,
        mv: bool,
    ) -> Reply<Done> {
        let dest = mailbox_name(mailbox, self.rev2)?;
        let idx = self.resolve(set, uid)?;
        if mv && !self.sel.as_ref().is_some_and(|s| s.writable) {
            return Err(Done::no("READ-ONLY", "Mailbox is read-only"));
        }
        let uids: Vec<u32> = {
            let sel = self
                .sel
                .as_ref()
                .ok_or_else(|| Done::bad("No mailbox selected"))?;
            idx.iter().map(|&i| sel.uid_at(i)).collect()
        };
        if uids.is_empty() {
            return Ok(Done::ok("No messages"));
        }
        let store = self.store()?;
        let r = if mv {
            store.move_to(&uids, &dest)
        } else {
            store.copy(&uids, &dest)
        };
        let (validity, map) = r.map_err(|e| match e {
            StoreError::NotFound => Done::no("TRYCREATE", "No such mailbox"),
            e => store_error(&e),
        })?;
        let code = if map.is_empty() {
            None
        } else {
            let src: Vec<String> = map.iter().map(|m| m.0.to_string()).collect();
            let dst: Vec<String> = map.iter().map(|m| m.1.to_string()).collect();
            Some(format!(
                "COPYUID {validity} {} {}",
                src.join(","),
                dst.join(",")
            ))
        };
        if mv {
            if let Some(c) = code {
                self.raw(format!("* OK [{c}] Moved\r\n"));
            }
            let moved: Vec<u32> = map.iter().map(|m| m.0).collect();
            self.announce_expunged(&moved);
            return Ok(Done::ok("MOVE completed"));
        }
        let d = Done::ok("COPY completed");
        Ok(match code {
            Some(c) => d.code(c),
            None => d,
        })
    }

    fn search(&mut self, tag: &str, key: &SearchKey<'_>, uid: bool, ex: &Extras) -> Reply<Done> {
        let n = self.sel.as_ref().map_or(0, |s| s.uids.len());
        // `$` in the criteria: the saved result as it is before this search replaces it.
        let saved = self
            .sel
            .as_ref()
            .map(|s| s.saved.clone())
            .unwrap_or_default();
        let mut hits: Vec<(u32, u32, u64)> = Vec::new();
        let content_needed = needs_content(key);
        if depth(key) > 64 {
            return Err(Done::bad("Search criteria too deeply nested"));
        }
        let (largest_seq, largest_uid) = {
            let sel = self
                .sel
                .as_ref()
                .ok_or_else(|| Done::bad("No mailbox selected"))?;
            (
                u32::try_from(sel.uids.len()).unwrap_or(u32::MAX),
                sel.uids.last().unwrap_or(0),
            )
        };
        for i in 0..n {
            let Some(uid) = self.sel.as_ref().and_then(|s| s.uids.get(i)) else {
                break;
            };
            // Expunged by another session, not announced yet: matches nothing.
            let Some(meta) = self.meta(uid) else {
                continue;
            };
            let content = if content_needed {
                self.store()?.read(meta.uid).ok()
            } else {
                None
            };
            let view = content.as_deref().map(SearchView::new);
            let ctx = Ctx {
                seq: i as u32 + 1,
                meta: &meta,
                largest_seq,
                largest_uid,
                view: view.as_ref(),
                saved: &saved,
            };
            if eval(key, &ctx) {
                hits.push((i as u32 + 1, meta.uid, meta.modseq));
            }
        }
        let nums: Vec<u32> = hits.iter().map(|h| if uid { h.1 } else { h.0 }).collect();
        let max_modseq = hits.iter().map(|h| h.2).max();
        if let Some(r) = ex.search_return.filter(|r| r.save)
            && let Some(sel) = self.sel.as_mut()
        {
            // RFC 5182 2.1: with MIN and/or MAX but neither ALL nor COUNT, only those.
            let kept: Vec<u32> = if (r.min || r.max) && !r.all && !r.count {
                let mut v = Vec::new();
                if let (true, Some(h)) = (r.min, hits.first()) {
                    v.push(h.1);
                }
                if let (true, Some(h)) = (r.max, hits.last()) {
                    v.push(h.1);
                }
                v.dedup();
                v
            } else {
                hits.iter().map(|h| h.1).collect()
            };
            sel.saved = UidList::from_sorted(&kept);
        }
        // IMAP4rev2 has no SEARCH response: ESEARCH (ALL) is the default.
        let ret = ex.search_return.or(self.rev2.then_some(ext::SearchReturn {
            all: true,
            ..Default::default()
        }));
        if ret.is_some_and(|r| !r.reports()) {
            // SAVE alone: no ESEARCH response (RFC 5182 2.1, as Dovecot).
        } else if let Some(r) = ret {
            let mut line = format!("* ESEARCH (TAG \"{}\")", tag.replace(['"', '\\'], ""));
            if uid {
                line.push_str(" UID");
            }
            if !nums.is_empty() {
                if r.min {
                    line.push_str(&format!(" MIN {}", nums[0]));
                }
                if r.max {
                    line.push_str(&format!(" MAX {}", nums[nums.len() - 1]));
                }
                if r.all {
                    line.push_str(&format!(" ALL {}", compact_set(&nums)));
                }
            }
            if r.count {
                line.push_str(&format!(" COUNT {}", nums.len()));
            }
            if ex.search_modseq
                && let Some(m) = max_modseq
            {
                line.push_str(&format!(" MODSEQ {m}"));
            }
            line.push_str("\r\n");
            self.raw(line);
        } else {
            let extra = match max_modseq {
                Some(m) if ex.search_modseq => format!(" (MODSEQ {m})"),
                _ => String::new(),
            };
            let found: Vec<NonZeroU32> = nums.iter().filter_map(|&n| NonZeroU32::new(n)).collect();
            self.send_with(&Response::Data(Data::Search(found)), &extra);
        }
        Ok(Done::ok("SEARCH completed"))
    }
}

enum Simple {
    Namespace,
    Id,
    /// `None`: `UID EXPUNGE $`.
    UidExpunge(Option<SequenceSet>),
}

fn is_append(buf: &[u8]) -> bool {
    let mut words = buf.split(|&b| b == b' ');
    let _tag = words.next();
    words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"APPEND"))
}

fn tag_of(buf: &[u8]) -> String {
    let first = buf
        .split(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(b"");
    match Tag::try_from(first) {
        Ok(t) if !first.is_empty() => t.inner().to_owned(),
        _ => "*".into(),
    }
}

/// Longest tag the session echoes in a reply to an overlong line.
const MAX_TAG: usize = 256;

/// `{n}` / `{n+}` (or literal8 `~{n}` / `~{n+}`) at the end of a line or command buffer
/// (CRLF or a bare LF): (n, non-synchronising). A count too large for `usize` comes back as `usize::MAX`.
fn trailing_literal(line: &[u8]) -> Option<(usize, bool)> {
    let l = line.strip_suffix(b"\n")?;
    let l = l.strip_suffix(b"\r").unwrap_or(l).strip_suffix(b"}")?;
    let open = l.iter().rposition(|&b| b == b'{')?;
    let inner = &l[open + 1..];
    let (digits, plus) = match inner.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (inner, false),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits)
        .ok()?
        .parse()
        .unwrap_or(usize::MAX);
    Some((n, plus))
}

fn chrono_date(t: SystemTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::from(t)
}

fn fetch_item(
    n: &MessageDataItemName<'_>,
    meta: &MessageMeta,
    parsed: Option<&Parsed<'_>>,
) -> Option<MessageDataItem<'static>> {
    use imap_codec::imap_types::datetime::DateTime as ImapDateTime;
    Some(match n {
        MessageDataItemName::Flags => MessageDataItem::Flags(
            meta.flags
                .iter()
                .filter_map(to_imap_flag)
                .map(FlagFetch::Flag)
                .collect(),
        ),
        MessageDataItemName::Uid => MessageDataItem::Uid(NonZeroU32::new(meta.uid)?),
        MessageDataItemName::InternalDate => {
            let d = chrono_date(meta.internal_date).fixed_offset();
            MessageDataItem::InternalDate(ImapDateTime::try_from(d).ok()?)
        }
        MessageDataItemName::Rfc822Size => MessageDataItem::Rfc822Size(meta.size),
        MessageDataItemName::Envelope => {
            MessageDataItem::Envelope(message::envelope(parsed?.header()))
        }
        MessageDataItemName::BodyStructure => {
            MessageDataItem::BodyStructure(parsed?.body_structure(true))
        }
        MessageDataItemName::Body => MessageDataItem::Body(parsed?.body_structure(false)),
        MessageDataItemName::Rfc822 => {
            MessageDataItem::Rfc822(message::nstring_bytes(parsed?.raw.to_vec()))
        }
        MessageDataItemName::Rfc822Header => {
            MessageDataItem::Rfc822Header(message::nstring_bytes(parsed?.header().to_vec()))
        }
        MessageDataItemName::Rfc822Text => {
            MessageDataItem::Rfc822Text(message::nstring_bytes(parsed?.text().to_vec()))
        }
        MessageDataItemName::BodyExt {
            section, partial, ..
        } => {
            let p = parsed?;
            let mut data = p.section(section.as_ref()).unwrap_or_default();
            let origin = partial.map(|(o, len)| {
                let start = (o as usize).min(data.len());
                let end = start.saturating_add(len.get() as usize).min(data.len());
                data = data[start..end].to_vec();
                o
            });
            MessageDataItem::BodyExt {
                section: section.as_ref().map(owned_section),
                origin,
                data: message::nstring_bytes(data),
            }
        }
    })
}

/// The BINARY items of one message, each with a leading space, as they go into its FETCH
/// response: decoded data as a literal (literal8 `~{n}` when it holds NUL), `NIL` for a part
/// that does not exist, `BINARY.SIZE[...] n`.
fn binary_items(p: &Parsed<'_>, items: &[ext::BinaryItem]) -> Result<Vec<u8>, UnknownCte> {
    let mut out = Vec::new();
    for b in items {
        let data = p.binary(&b.part)?;
        out.push(b' ');
        out.extend_from_slice(b.response_name().as_bytes());
        if b.size {
            let n = data.as_ref().map_or(0, Vec::len);
            out.extend_from_slice(format!(" {n}").as_bytes());
            continue;
        }
        let Some(mut data) = data else {
            out.extend_from_slice(b" NIL");
            continue;
        };
        if let Some((origin, len)) = b.partial {
            let start = (origin as usize).min(data.len());
            let end = start.saturating_add(len.get() as usize).min(data.len());
            data = data[start..end].to_vec();
        }
        let tilde = if data.contains(&0) { "~" } else { "" };
        out.extend_from_slice(format!(" {tilde}{{{}}}\r\n", data.len()).as_bytes());
        out.extend_from_slice(&data);
    }
    Ok(out)
}

fn owned_section(
    s: &imap_codec::imap_types::fetch::Section<'_>,
) -> imap_codec::imap_types::fetch::Section<'static> {
    use imap_codec::imap_types::fetch::Section;
    let names = |v: &NonEmptyVec<AString<'_>>| -> NonEmptyVec<AString<'static>> {
        NonEmptyVec::unvalidated(
            v.as_ref()
                .iter()
                .map(|a| AString::try_from(a.as_ref().to_vec()).expect("valid astring"))
                .collect(),
        )
    };
    match s {
        Section::Part(p) => Section::Part(p.clone()),
        Section::Header(p) => Section::Header(p.clone()),
        Section::HeaderFields(p, n) => Section::HeaderFields(p.clone(), names(n)),
        Section::HeaderFieldsNot(p, n) => Section::HeaderFieldsNot(p.clone(), names(n)),
        Section::Text(p) => Section::Text(p.clone()),
        Section::Mime(p) => Section::Mime(p.clone()),
    }
}

struct Ctx<'a> {
    seq: u32,
    meta: &'a MessageMeta,
    largest_seq: u32,
    largest_uid: u32,
    view: Option<&'a SearchView<'a>>,
    saved: &'a UidList,
}

fn depth(k: &SearchKey<'_>) -> usize {
    match k {
        SearchKey::And(v) => 1 + v.as_ref().iter().map(depth).max().unwrap_or(0),
        SearchKey::Not(k) => 1 + depth(k),
        SearchKey::Or(a, b) => 1 + depth(a).max(depth(b)),
        _ => 1,
    }
}

fn needs_content(k: &SearchKey<'_>) -> bool {
    match k {
        SearchKey::And(v) => v.as_ref().iter().any(needs_content),
        SearchKey::Not(k) => needs_content(k),
        SearchKey::Or(a, b) => needs_content(a) || needs_content(b),
        SearchKey::Header(name, _) => {
            let name = name.as_ref();
            !name.eq_ignore_ascii_case(ext::MODSEQ_HEADER.as_bytes())
                && !name.eq_ignore_ascii_case(ext::SAVED_HEADER.as_bytes())
        }
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        _ => false,
    }
}

fn eval(k: &SearchKey<'_>, c: &Ctx<'_>) -> bool {
    let has = |f: Flag| c.meta.flags.contains(&f);
    let hdr =
        |name: &str, v: &AString<'_>| c.view.is_some_and(|w| w.header_contains(name, v.as_ref()));
    let idate = || chrono_date(c.meta.internal_date).date_naive();
    let sent = || c.view.and_then(|w| w.sent_date());
    match k {
        SearchKey::And(v) => v.as_ref().iter().all(|k| eval(k, c)),
        SearchKey::SequenceSet(s) => in_ranges(&ranges(s, c.largest_seq), c.seq),
        SearchKey::Uid(s) => in_ranges(&ranges(s, c.largest_uid), c.meta.uid),
        SearchKey::All => true,
        SearchKey::Answered => has(Flag::Answered),
        SearchKey::Unanswered => !has(Flag::Answered),
        SearchKey::Deleted => has(Flag::Deleted),
        SearchKey::Undeleted => !has(Flag::Deleted),
        SearchKey::Draft => has(Flag::Draft),
        SearchKey::Undraft => !has(Flag::Draft),
        SearchKey::Flagged => has(Flag::Flagged),
        SearchKey::Unflagged => !has(Flag::Flagged),
        SearchKey::Seen => has(Flag::Seen),
        SearchKey::Unseen => !has(Flag::Seen),
        SearchKey::New | SearchKey::Recent => false,
        SearchKey::Old => true,
        SearchKey::Keyword(a) => c
            .meta
            .flags
            .iter()
            .any(|f| matches!(f, Flag::Keyword(k) if k.eq_ignore_ascii_case(a.as_ref()))),
        SearchKey::Unkeyword(a) => !c
            .meta
            .flags
            .iter()
            .any(|f| matches!(f, Flag::Keyword(k) if k.eq_ignore_ascii_case(a.as_ref()))),
        SearchKey::Larger(n) => c.meta.size > *n,
        SearchKey::Smaller(n) => c.meta.size < *n,
        SearchKey::Before(d) => idate() < *d.as_ref(),
        SearchKey::On(d) => idate() == *d.as_ref(),
        SearchKey::Since(d) => idate() >= *d.as_ref(),
        SearchKey::SentBefore(d) => sent().is_some_and(|s| s < *d.as_ref()),
        SearchKey::SentOn(d) => sent().is_some_and(|s| s == *d.as_ref()),
        SearchKey::SentSince(d) => sent().is_some_and(|s| s >= *d.as_ref()),
        SearchKey::From(v) => hdr("From", v),
        SearchKey::To(v) => hdr("To", v),
        SearchKey::Cc(v) => hdr("Cc", v),
        SearchKey::Bcc(v) => hdr("Bcc", v),
        SearchKey::Subject(v) => hdr("Subject", v),
        SearchKey::Header(name, v) => {
            let name = String::from_utf8_lossy(name.as_ref()).into_owned();
            if name.eq_ignore_ascii_case(ext::SAVED_HEADER) {
                return c.saved.index_of(c.meta.uid).is_some();
            }
            if name.eq_ignore_ascii_case(ext::MODSEQ_HEADER) {
                let min: u64 = std::str::from_utf8(v.as_ref())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u64::MAX);
                return c.meta.modseq >= min;
            }
            hdr(&name, v)
        }
        SearchKey::Body(v) => c.view.is_some_and(|w| w.body_contains(v.as_ref())),
        SearchKey::Text(v) => c.view.is_some_and(|w| w.text_contains(v.as_ref())),
        SearchKey::Not(k) => !eval(k, c),
        SearchKey::Or(a, b) => eval(a, c) || eval(b, c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_match(b"*", b"a/b", b'/'));
        assert!(!pattern_match(b"%", b"a/b", b'/'));
        assert!(pattern_match(b"a/%", b"a/b", b'/'));
        assert!(pattern_match(b"INBOX", b"INBOX", b'/'));
        assert!(!pattern_match(b"*a*a*a*a*a*a*a*a*b", &[b'a'; 200], b'/'));
    }

    #[test]
    fn sets() {
        assert_eq!(compact_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        let s = SequenceSet::try_from("5:*,1").unwrap();
        assert_eq!(ranges(&s, 7), vec![(1, 1), (5, 7)]);
        assert!(in_ranges(&ranges(&s, 7), 6));
        assert!(!in_ranges(&ranges(&s, 7), 3));
    }
}
