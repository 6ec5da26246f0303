//! Health checking, I/O-free.
//!
//! Two pieces live here; the runner in the engine crate owns the sockets, the timers and TLS.
//!
//! **[`RiseFall`]** turns a stream of single check results into a stable up/down state. An up
//! backend goes down after `fall` consecutive failures; a down backend comes back after `rise`
//! consecutive successes; a result that agrees with the current state resets the opposite streak.
//! At process start a backend is *up but unconfirmed* ([`RiseFall::initial`]): the very first
//! result decides at once, so a dead backend is not offered traffic for `fall` intervals.
//!
//! **[`Dialogue`]** is the conversation of one protocol check as a state machine. The runner
//! connects and calls [`Dialogue::on_connected`], then obeys the returned [`Step`]:
//!
//! - `Send(bytes)`: write the bytes, then read and feed what arrives to [`Dialogue::on_bytes`];
//! - `Recv`: read more and feed it to [`Dialogue::on_bytes`] (an empty slice, or
//!   [`Dialogue::on_eof`], reports end of stream);
//! - `StartTls`: run a TLS client handshake on the connection, then call
//!   [`Dialogue::on_tls_done`] (a failed handshake is the runner's [`CheckFailure::Tls`]);
//! - `Done(result)`: close the connection; the check is decided.
//!
//! Bytes may arrive split anywhere. Lines are buffered; a line longer than [`MAX_LINE`] or a
//! conversation reading more than [`MAX_TOTAL`] bytes fails the check, so a hostile or broken
//! server can never make the checker buffer without bound. Only CRLF-terminated commands are
//! sent. The SMTP checks always try to end politely with `QUIT`, even when the check has
//! already failed on a refusing banner or a missing extension; the recorded reason is the
//! original failure (see [`Dialogue::pending_failure`]).
//!
//! | kind | conversation |
//! |------|--------------|
//! | `Tcp` | connect |
//! | `Tls` | connect, TLS handshake |
//! | `Smtp` | 2xx banner, `EHLO` → 250, `QUIT` → 221 (or EOF) |
//! | `SmtpStarttls` | banner, `EHLO` advertising `STARTTLS`, `STARTTLS` → 220, TLS, `EHLO` → 250, `QUIT` |
//! | `Imap` | `* OK` / `* PREAUTH` greeting, `a1 LOGOUT` → `a1 OK` (or EOF after `* BYE`) |

use std::fmt::Write as _;

/// The longest reply line accepted, in bytes, without its line end.
pub const MAX_LINE: usize = 4096;
/// The most bytes one check reads from a server, over the whole conversation.
pub const MAX_TOTAL: usize = 16 * 1024;
/// Reply text quoted in failure reasons is cut to this many characters.
const MAX_QUOTE: usize = 120;

/// What a health check does against a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckKind {
    /// TCP connect succeeds.
    #[default]
    Tcp,
    /// Read the 220 banner, EHLO, QUIT.
    Smtp,
    /// Banner, EHLO, STARTTLS, TLS handshake, QUIT.
    SmtpStarttls,
    /// Read the `* OK` greeting, LOGOUT.
    Imap,
    /// TLS handshake (IMAPS, submissions).
    Tls,
}

/// Rise/fall hysteresis for one backend.
#[derive(Debug, Clone)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive results disagreeing with `up`.
    streak: u32,
    /// False until the first result of a backend started with [`RiseFall::initial`].
    confirmed: bool,
}

impl RiseFall {
    /// A backend in a known state. `rise` and `fall` of 0 act as 1.
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        RiseFall {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            streak: 0,
            confirmed: true,
        }
    }

    /// A backend at startup: up, but the first result decides at once (a failure takes it
    /// down immediately, a success confirms it). Afterwards the normal rise/fall rules apply.
    pub fn initial(rise: u32, fall: u32) -> Self {
        RiseFall {
            confirmed: false,
            ..RiseFall::new(rise, fall, true)
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check result; returns `Some(new_state)` when the state changes.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if !self.confirmed {
            self.confirmed = true;
            self.streak = 0;
            let changed = self.up != ok;
            self.up = ok;
            return changed.then_some(ok);
        }
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// Why a check failed. The `Display` text is what operators see in logs and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("timed out after {after_ms} ms waiting for {phase}")]
    Timeout { phase: &'static str, after_ms: u64 },
    #[error("I/O error during {phase}: {error}")]
    Io { phase: &'static str, error: String },
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("connection closed while waiting for {phase}")]
    Closed { phase: &'static str },
    #[error("banner {0}")]
    Banner(String),
    #[error("EHLO rejected: {0}")]
    EhloRejected(String),
    #[error("no STARTTLS in EHLO reply")]
    NoStartTls,
    #[error("STARTTLS refused: {0}")]
    StartTlsRefused(String),
    #[error("server sent data after the STARTTLS reply, before the TLS handshake")]
    DataAfterStartTls,
    #[error("server sent unsolicited data after the {phase}")]
    Unsolicited { phase: &'static str },
    #[error("QUIT answered with {0}")]
    QuitRejected(String),
    #[error("IMAP greeting was BYE: {0}")]
    ImapBye(String),
    #[error("unexpected IMAP greeting: {0}")]
    ImapGreeting(String),
    #[error("LOGOUT answered with {0}")]
    ImapLogout(String),
    #[error("malformed reply line: {0}")]
    Malformed(String),
    #[error("reply line too long (over {MAX_LINE} bytes)")]
    LineTooLong,
    #[error("server sent more than {MAX_TOTAL} bytes")]
    TooMuchData,
    #[error("check driven out of order: {0}")]
    OutOfOrder(&'static str),
}

/// What the runner does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes, then read.
    Send(Vec<u8>),
    /// Read more bytes.
    Recv,
    /// Run a TLS client handshake, then call [`Dialogue::on_tls_done`].
    StartTls,
    /// The check is decided; close the connection.
    Done(Result<(), CheckFailure>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Banner,
    Ehlo,
    StartTlsReply,
    Handshake,
    EhloTls,
    Quit,
    ImapGreeting,
    ImapLogout,
    Finished,
}

impl State {
    fn phase(self) -> &'static str {
        match self {
            State::Idle => "connect",
            State::Banner => "the banner",
            State::Ehlo => "the EHLO reply",
            State::StartTlsReply => "the STARTTLS reply",
            State::Handshake => "the TLS handshake",
            State::EhloTls => "the EHLO reply after STARTTLS",
            State::Quit => "the QUIT reply",
            State::ImapGreeting => "the IMAP greeting",
            State::ImapLogout => "the LOGOUT reply",
            State::Finished => "nothing (check finished)",
        }
    }
}

/// A multi-line SMTP reply being collected.
#[derive(Debug, Default)]
struct Reply {
    code: u16,
    /// The first line, verbatim (code included), for failure reasons.
    first: String,
    /// Text of every line after the code and separator.
    texts: Vec<String>,
}

/// One check's conversation with a backend. See the module documentation.
#[derive(Debug)]
pub struct Dialogue {
    kind: CheckKind,
    ehlo: Vec<u8>,
    state: State,
    buf: Vec<u8>,
    total: usize,
    reply: Reply,
    /// An IMAP `* BYE` was seen during LOGOUT.
    saw_bye: bool,
    /// A failure already decided while we still end the session politely with QUIT.
    pending: Option<CheckFailure>,
    outcome: Option<Result<(), CheckFailure>>,
}

impl Dialogue {
    /// A fresh dialogue. `ehlo_name` is used by the SMTP kinds; characters that could break the
    /// command line (controls, spaces) are dropped, and an empty name becomes `localhost`.
    pub fn new(kind: CheckKind, ehlo_name: &str) -> Self {
        let name: String = ehlo_name
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        let name = if name.is_empty() {
            "localhost".to_string()
        } else {
            name
        };
        Dialogue {
            kind,
            ehlo: format!("EHLO {name}\r\n").into_bytes(),
            state: State::Idle,
            buf: Vec::new(),
            total: 0,
            reply: Reply::default(),
            saw_bye: false,
            pending: None,
            outcome: None,
        }
    }

    /// What the dialogue is waiting for, for timeout and I/O error reasons.
    pub fn phase(&self) -> &'static str {
        self.state.phase()
    }

    /// The failure already decided while the dialogue still says goodbye. The runner reports it
    /// in preference to a later timeout or I/O error.
    pub fn pending_failure(&self) -> Option<&CheckFailure> {
        self.pending.as_ref()
    }

    /// True while only the goodbye is outstanding (`QUIT` / `LOGOUT` sent): a reset or an
    /// unclean close now is as good as an orderly end of stream.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Quit | State::ImapLogout)
    }

    /// The TCP connection is established.
    pub fn on_connected(&mut self) -> Step {
        if self.state != State::Idle {
            return self.finish(Err(CheckFailure::OutOfOrder("connected twice")));
        }
        match self.kind {
            CheckKind::Tcp => self.finish(Ok(())),
            CheckKind::Tls => {
                self.state = State::Handshake;
                Step::StartTls
            }
            CheckKind::Smtp | CheckKind::SmtpStarttls => {
                self.state = State::Banner;
                Step::Recv
            }
            CheckKind::Imap => {
                self.state = State::ImapGreeting;
                Step::Recv
            }
        }
    }

    /// The TLS handshake asked for by [`Step::StartTls`] completed.
    pub fn on_tls_done(&mut self) -> Step {
        if self.state != State::Handshake {
            return self.fail(CheckFailure::OutOfOrder("TLS completed when not asked for"));
        }
        if self.kind == CheckKind::Tls {
            return self.finish(Ok(()));
        }
        self.state = State::EhloTls;
        self.reply = Reply::default();
        Step::Send(self.ehlo.clone())
    }

    /// The server closed its side of the connection.
    pub fn on_eof(&mut self) -> Step {
        match self.state {
            State::Finished => self.done_again(),
            State::Quit => {
                let result = self.pending.take().map_or(Ok(()), Err);
                self.finish(result)
            }
            State::ImapLogout if self.saw_bye => self.finish(Ok(())),
            s => self.fail(CheckFailure::Closed { phase: s.phase() }),
        }
    }

    /// Bytes from the server, split anywhere. An empty slice means end of stream.
    pub fn on_bytes(&mut self, data: &[u8]) -> Step {
        if data.is_empty() {
            return self.on_eof();
        }
        match self.state {
            State::Finished => return self.done_again(),
            State::Idle => return self.fail(CheckFailure::OutOfOrder("data before connect")),
            State::Handshake => return self.fail(CheckFailure::DataAfterStartTls),
            _ => {}
        }
        self.total = self.total.saturating_add(data.len());
        if self.total > MAX_TOTAL {
            return self.fail(CheckFailure::TooMuchData);
        }
        self.buf.extend_from_slice(data);
        // Each pass consumes one line; the byte cap bounds the number of passes.
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > MAX_LINE {
                return self.fail(CheckFailure::LineTooLong);
            }
            let before = self.state;
            let step = match self.on_line(&line) {
                Ok(None) => continue,
                Ok(Some(step)) => step,
                Err(failure) => return self.fail(failure),
            };
            return match step {
                Step::Send(_) if !self.buf.is_empty() => self.fail(CheckFailure::Unsolicited {
                    phase: before.phase(),
                }),
                Step::StartTls if !self.buf.is_empty() => {
                    self.fail(CheckFailure::DataAfterStartTls)
                }
                step => step,
            };
        }
        if self.buf.len() > MAX_LINE {
            return self.fail(CheckFailure::LineTooLong);
        }
        Step::Recv
    }

    /// One complete line; `Ok(None)` means the reply continues.
    fn on_line(&mut self, line: &[u8]) -> Result<Option<Step>, CheckFailure> {
        match self.state {
            State::ImapGreeting => self.imap_greeting(line).map(Some),
            State::ImapLogout => self.imap_logout(line),
            _ => {
                if !self.smtp_line(line)? {
                    return Ok(None);
                }
                let reply = std::mem::take(&mut self.reply);
                self.smtp_reply(reply).map(Some)
            }
        }
    }

    /// Adds a line to the SMTP reply being collected; true when the reply is complete.
    fn smtp_line(&mut self, line: &[u8]) -> Result<bool, CheckFailure> {
        let malformed = || CheckFailure::Malformed(quote(line));
        let (digits, rest) = line.split_at_checked(3).ok_or_else(malformed)?;
        let code = match digits {
            [a @ b'2'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(malformed()),
        };
        let (last, text) = match rest.split_first() {
            None => (true, &[][..]),
            Some((b' ', text)) => (true, text),
            Some((b'-', text)) => (false, text),
            Some(_) => return Err(malformed()),
        };
        if self.reply.texts.is_empty() {
            self.reply.code = code;
            self.reply.first = quote(line);
        } else if self.reply.code != code {
            return Err(malformed());
        }
        self.reply
            .texts
            .push(String::from_utf8_lossy(text).into_owned());
        Ok(last)
    }

    fn smtp_reply(&mut self, reply: Reply) -> Result<Step, CheckFailure> {
        let positive = (200..300).contains(&reply.code);
        match self.state {
            State::Banner if positive => {
                self.state = State::Ehlo;
                Ok(Step::Send(self.ehlo.clone()))
            }
            State::Banner => Ok(self.quit_with(CheckFailure::Banner(reply.first))),
            State::Ehlo | State::EhloTls if reply.code != 250 => {
                Ok(self.quit_with(CheckFailure::EhloRejected(reply.first)))
            }
            State::Ehlo if self.kind == CheckKind::SmtpStarttls => {
                let offered = reply.texts.iter().skip(1).any(|t| {
                    t.split_ascii_whitespace()
                        .next()
                        .is_some_and(|kw| kw.eq_ignore_ascii_case("STARTTLS"))
                });
                if !offered {
                    return Ok(self.quit_with(CheckFailure::NoStartTls));
                }
                self.state = State::StartTlsReply;
                Ok(Step::Send(b"STARTTLS\r\n".to_vec()))
            }
            State::Ehlo | State::EhloTls => Ok(self.quit_with_none()),
            State::StartTlsReply if reply.code == 220 => {
                self.state = State::Handshake;
                Ok(Step::StartTls)
            }
            State::StartTlsReply => Ok(self.quit_with(CheckFailure::StartTlsRefused(reply.first))),
            State::Quit => {
                let result = match self.pending.take() {
                    Some(failure) => Err(failure),
                    None if positive => Ok(()),
                    None => Err(CheckFailure::QuitRejected(reply.first)),
                };
                Ok(self.finish(result))
            }
            _ => Err(CheckFailure::OutOfOrder("SMTP reply in a non-SMTP state")),
        }
    }

    fn quit_with(&mut self, failure: CheckFailure) -> Step {
        self.pending = Some(failure);
        self.quit_with_none()
    }

    fn quit_with_none(&mut self) -> Step {
        self.state = State::Quit;
        Step::Send(b"QUIT\r\n".to_vec())
    }

    fn imap_greeting(&mut self, line: &[u8]) -> Result<Step, CheckFailure> {
        let (word, text) = untagged(line).ok_or_else(|| CheckFailure::ImapGreeting(quote(line)))?;
        if word.eq_ignore_ascii_case(b"OK") || word.eq_ignore_ascii_case(b"PREAUTH") {
            self.state = State::ImapLogout;
            Ok(Step::Send(b"a1 LOGOUT\r\n".to_vec()))
        } else if word.eq_ignore_ascii_case(b"BYE") {
            Err(CheckFailure::ImapBye(quote(text)))
        } else {
            Err(CheckFailure::ImapGreeting(quote(line)))
        }
    }

    fn imap_logout(&mut self, line: &[u8]) -> Result<Option<Step>, CheckFailure> {
        if let Some((word, _)) = untagged(line) {
            if word.eq_ignore_ascii_case(b"BYE") {
                self.saw_bye = true;
            }
            return Ok(None);
        }
        let Some(rest) = line.strip_prefix(b"a1 ") else {
            return Err(CheckFailure::Malformed(quote(line)));
        };
        let word = rest.split(|&b| b == b' ').next().unwrap_or_default();
        if word.eq_ignore_ascii_case(b"OK") {
            Ok(Some(self.finish(Ok(()))))
        } else {
            Err(CheckFailure::ImapLogout(quote(line)))
        }
    }

    /// Decides the check with a failure (a pending polite-QUIT failure takes precedence).
    fn fail(&mut self, failure: CheckFailure) -> Step {
        let failure = self.pending.take().unwrap_or(failure);
        self.finish(Err(failure))
    }

    fn finish(&mut self, result: Result<(), CheckFailure>) -> Step {
        if self.state == State::Finished {
            return self.done_again();
        }
        self.state = State::Finished;
        self.buf = Vec::new();
        self.outcome = Some(result.clone());
        Step::Done(result)
    }

    fn done_again(&self) -> Step {
        Step::Done(
            self.outcome
                .clone()
                .unwrap_or(Err(CheckFailure::OutOfOrder("finished"))),
        )
    }
}

/// `* WORD text` → `(WORD, text)`.
fn untagged(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = line.strip_prefix(b"* ")?;
    let mut parts = rest.splitn(2, |&b| b == b' ');
    let word = parts.next()?;
    Some((word, parts.next().unwrap_or_default()))
}

/// Server text made safe and short for a log line: printable ASCII kept, the rest escaped.
fn quote(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(MAX_QUOTE) {
        if b == b' ' || b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if bytes.len() > MAX_QUOTE {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- rise / fall ----

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut rf = RiseFall::new(2, 3, true);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), Some(false));
        assert!(!rf.is_up());
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(true), Some(true));
        assert!(rf.is_up());
    }

    #[test]
    fn opposite_result_resets_the_streak() {
        let mut rf = RiseFall::new(2, 3, true);
        for _ in 0..10 {
            assert_eq!(rf.record(false), None);
            assert_eq!(rf.record(false), None);
            assert_eq!(rf.record(true), None);
        }
        assert!(rf.is_up());
        let mut rf = RiseFall::new(3, 1, false);
        for _ in 0..10 {
            assert_eq!(rf.record(true), None);
            assert_eq!(rf.record(true), None);
            assert_eq!(rf.record(false), None);
        }
        assert!(!rf.is_up());
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut rf = RiseFall::new(0, 0, true);
        assert_eq!(rf.record(false), Some(false));
        assert_eq!(rf.record(true), Some(true));
    }

    #[test]
    fn initial_first_failure_decides_at_once() {
        let mut rf = RiseFall::initial(2, 3);
        assert!(rf.is_up());
        assert_eq!(rf.record(false), Some(false));
        assert!(!rf.is_up());
        // Then normal rules: rise successes needed.
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(true), Some(true));
    }

    #[test]
    fn initial_first_success_confirms_then_normal_rules() {
        let mut rf = RiseFall::initial(2, 3);
        assert_eq!(rf.record(true), None);
        assert!(rf.is_up());
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), Some(false));
    }

    // ---- dialogue driver ----

    /// Runs a dialogue against a scripted server. Each time the dialogue waits for bytes the
    /// next response is fed, cut into pieces by `cut`; an exhausted script is end of stream.
    /// `tls_ok` decides what a StartTls step does. Returns what was sent and the outcome.
    fn drive(
        kind: CheckKind,
        responses: &[&[u8]],
        cut: &dyn Fn(&[u8]) -> Vec<Vec<u8>>,
    ) -> (Vec<String>, Result<(), CheckFailure>) {
        let mut d = Dialogue::new(kind, "lb.example");
        let mut sent = Vec::new();
        let mut script = responses.iter();
        let mut step = d.on_connected();
        for _ in 0..1000 {
            step = match step {
                Step::Done(result) => return (sent, result),
                Step::StartTls => {
                    sent.push("<tls>".to_string());
                    d.on_tls_done()
                }
                Step::Send(bytes) => {
                    assert!(bytes.ends_with(b"\r\n"));
                    assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
                    sent.push(String::from_utf8(bytes).unwrap());
                    feed(&mut d, script.next().copied(), cut)
                }
                Step::Recv => feed(&mut d, script.next().copied(), cut),
            };
        }
        panic!("dialogue did not finish");
    }

    fn feed(d: &mut Dialogue, resp: Option<&[u8]>, cut: &dyn Fn(&[u8]) -> Vec<Vec<u8>>) -> Step {
        let Some(resp) = resp else { return d.on_eof() };
        let mut step = Step::Recv;
        for piece in cut(resp) {
            if piece.is_empty() {
                continue;
            }
            step = d.on_bytes(&piece);
            if step != Step::Recv {
                return step;
            }
        }
        step
    }

    /// Drives with every split of every response, and byte by byte; all must agree.
    fn drive_all_splits(
        kind: CheckKind,
        responses: &[&[u8]],
    ) -> (Vec<String>, Result<(), CheckFailure>) {
        let whole = drive(kind, responses, &|r| vec![r.to_vec()]);
        let longest = responses.iter().map(|r| r.len()).max().unwrap_or(0);
        for k in 0..=longest {
            let split = drive(kind, responses, &|r| {
                let at = k.min(r.len());
                vec![r[..at].to_vec(), r[at..].to_vec()]
            });
            assert_eq!(split, whole, "split at {k}");
        }
        let bytes = drive(kind, responses, &|r| r.iter().map(|&b| vec![b]).collect());
        assert_eq!(bytes, whole, "byte by byte");
        whole
    }

    const EHLO: &str = "EHLO lb.example\r\n";

    #[test]
    fn tcp_is_done_on_connect() {
        let mut d = Dialogue::new(CheckKind::Tcp, "x");
        assert_eq!(d.on_connected(), Step::Done(Ok(())));
        // Finished dialogues keep their answer.
        assert_eq!(d.on_bytes(b"junk"), Step::Done(Ok(())));
    }

    #[test]
    fn tls_is_done_after_handshake() {
        let mut d = Dialogue::new(CheckKind::Tls, "x");
        assert_eq!(d.on_connected(), Step::StartTls);
        assert!(matches!(
            d.on_bytes(b"x"),
            Step::Done(Err(CheckFailure::DataAfterStartTls))
        ));
        let mut d = Dialogue::new(CheckKind::Tls, "x");
        d.on_connected();
        assert_eq!(d.on_tls_done(), Step::Done(Ok(())));
    }

    #[test]
    fn smtp_happy_path_multiline() {
        let (sent, result) = drive_all_splits(
            CheckKind::Smtp,
            &[
                b"220-mx.example ESMTP\r\n220-second line\r\n220 ready\r\n",
                b"250-mx.example hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
                b"221 2.0.0 bye\r\n",
            ],
        );
        assert_eq!(result, Ok(()));
        assert_eq!(sent, vec![EHLO, "QUIT\r\n"]);
    }

    #[test]
    fn smtp_accepts_bare_lf_and_eof_after_quit() {
        let (sent, result) = drive_all_splits(CheckKind::Smtp, &[b"220 hi\n", b"250 ok\n"]);
        assert_eq!(result, Ok(()));
        assert_eq!(sent, vec![EHLO, "QUIT\r\n"]);
    }

    #[test]
    fn smtp_refusing_banner_fails_but_quits_politely() {
        let (sent, result) = drive_all_splits(
            CheckKind::Smtp,
            &[b"554 5.3.2 not accepting\r\n", b"221 bye\r\n"],
        );
        assert_eq!(sent, vec!["QUIT\r\n"]);
        let err = result.unwrap_err();
        assert_eq!(err.to_string(), "banner 554 5.3.2 not accepting");
        let (_, result) = drive_all_splits(CheckKind::Smtp, &[b"421-busy\r\n421 try later\r\n"]);
        assert_eq!(result.unwrap_err().to_string(), "banner 421-busy");
    }

    #[test]
    fn smtp_ehlo_rejected() {
        let (sent, result) = drive_all_splits(
            CheckKind::Smtp,
            &[b"220 hi\r\n", b"550 go away\r\n", b"221 bye\r\n"],
        );
        assert_eq!(sent, vec![EHLO, "QUIT\r\n"]);
        assert_eq!(
            result,
            Err(CheckFailure::EhloRejected("550 go away".into()))
        );
    }

    #[test]
    fn smtp_quit_rejected() {
        let (_, result) = drive_all_splits(
            CheckKind::Smtp,
            &[b"220 hi\r\n", b"250 ok\r\n", b"500 what\r\n"],
        );
        assert_eq!(result, Err(CheckFailure::QuitRejected("500 what".into())));
    }

    #[test]
    fn smtp_garbage_and_malformed() {
        for bad in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"22\r\n",
            b"220x\r\n",
            b"\x00\x01\x02\r\n",
            b"\r\n",
            b"099 low\r\n",
            b"220-a\r\n250 b\r\n",
        ] {
            let (sent, result) = drive_all_splits(CheckKind::Smtp, &[bad]);
            assert!(sent.is_empty());
            assert!(
                matches!(result, Err(CheckFailure::Malformed(_))),
                "{bad:?}: {result:?}"
            );
        }
        let (_, result) = drive(CheckKind::Smtp, &[b"\x00\xff\r\n"], &|r| vec![r.to_vec()]);
        assert_eq!(
            result.unwrap_err().to_string(),
            "malformed reply line: \\x00\\xff"
        );
    }

    #[test]
    fn smtp_eof_before_banner() {
        let (_, result) = drive_all_splits(CheckKind::Smtp, &[b"220-partial\r\n220 no newl"]);
        assert_eq!(
            result,
            Err(CheckFailure::Closed {
                phase: "the banner"
            })
        );
    }

    #[test]
    fn oversized_line_fails() {
        let mut long = b"220 ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
        long.extend_from_slice(b"\r\n");
        let (_, result) = drive(CheckKind::Smtp, &[&long], &|r| vec![r.to_vec()]);
        assert_eq!(result, Err(CheckFailure::LineTooLong));
        // Without a line end, detected as soon as the buffer passes the cap.
        let mut d = Dialogue::new(CheckKind::Imap, "x");
        d.on_connected();
        let chunk = [b'a'; 1000];
        let mut steps = 0;
        loop {
            steps += 1;
            match d.on_bytes(&chunk) {
                Step::Recv => assert!(steps < 10),
                other => {
                    assert_eq!(other, Step::Done(Err(CheckFailure::LineTooLong)));
                    break;
                }
            }
        }
        assert_eq!(
            CheckFailure::LineTooLong.to_string(),
            "reply line too long (over 4096 bytes)"
        );
    }

    #[test]
    fn endless_multiline_reply_hits_total_cap() {
        let mut d = Dialogue::new(CheckKind::Smtp, "x");
        d.on_connected();
        let mut outcome = None;
        for _ in 0..10_000 {
            match d.on_bytes(b"220-still going\r\n") {
                Step::Recv => {}
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        assert_eq!(outcome, Some(Step::Done(Err(CheckFailure::TooMuchData))));
    }

    #[test]
    fn unsolicited_data_after_banner_fails() {
        let mut d = Dialogue::new(CheckKind::Smtp, "x");
        d.on_connected();
        assert_eq!(
            d.on_bytes(b"220 hi\r\n250 early\r\n"),
            Step::Done(Err(CheckFailure::Unsolicited {
                phase: "the banner"
            }))
        );
    }

    const STARTTLS_EHLO: &[u8] =
        b"250-mx.example\r\n250-SIZE 10\r\n250-starttls\r\n250 8BITMIME\r\n";

    #[test]
    fn starttls_happy_path() {
        let (sent, result) = drive_all_splits(
            CheckKind::SmtpStarttls,
            &[
                b"220 mx ESMTP\r\n",
                STARTTLS_EHLO,
                b"220 2.0.0 go ahead\r\n",
                b"250-mx.example\r\n250 8BITMIME\r\n",
                b"221 bye\r\n",
            ],
        );
        assert_eq!(result, Ok(()));
        assert_eq!(sent, vec![EHLO, "STARTTLS\r\n", "<tls>", EHLO, "QUIT\r\n"]);
    }

    #[test]
    fn starttls_missing() {
        let (sent, result) = drive_all_splits(
            CheckKind::SmtpStarttls,
            &[
                b"220 mx\r\n",
                b"250-mx\r\n250-SIZE 10\r\n250 X-STARTTLS-NOT\r\n",
                b"221 bye\r\n",
            ],
        );
        assert_eq!(sent, vec![EHLO, "QUIT\r\n"]);
        assert_eq!(result.unwrap_err().to_string(), "no STARTTLS in EHLO reply");
        // The greeting line (first) does not count as an extension.
        let (_, result) = drive_all_splits(
            CheckKind::SmtpStarttls,
            &[b"220 mx\r\n", b"250 STARTTLS\r\n"],
        );
        assert_eq!(result, Err(CheckFailure::NoStartTls));
    }

    #[test]
    fn starttls_refused_and_injection() {
        let (sent, result) = drive_all_splits(
            CheckKind::SmtpStarttls,
            &[
                b"220 mx\r\n",
                STARTTLS_EHLO,
                b"454 4.7.0 TLS not available\r\n",
                b"221 bye\r\n",
            ],
        );
        assert_eq!(sent, vec![EHLO, "STARTTLS\r\n", "QUIT\r\n"]);
        assert_eq!(
            result.unwrap_err().to_string(),
            "STARTTLS refused: 454 4.7.0 TLS not available"
        );
        let mut d = Dialogue::new(CheckKind::SmtpStarttls, "x");
        d.on_connected();
        d.on_bytes(b"220 mx\r\n");
        d.on_bytes(STARTTLS_EHLO);
        assert_eq!(
            d.on_bytes(b"220 go\r\n250 injected\r\n"),
            Step::Done(Err(CheckFailure::DataAfterStartTls))
        );
    }

    #[test]
    fn pending_failure_survives_a_closed_connection() {
        let mut d = Dialogue::new(CheckKind::Smtp, "x");
        d.on_connected();
        assert_eq!(d.on_bytes(b"554 no\r\n"), Step::Send(b"QUIT\r\n".to_vec()));
        assert!(d.is_closing());
        assert_eq!(
            d.pending_failure(),
            Some(&CheckFailure::Banner("554 no".into()))
        );
        assert_eq!(
            d.on_bytes(b"garbage\r\n"),
            Step::Done(Err(CheckFailure::Banner("554 no".into())))
        );
    }

    #[test]
    fn imap_happy_paths() {
        for greeting in [
            &b"* OK [CAPABILITY IMAP4rev1] ready\r\n"[..],
            b"* PREAUTH hi\r\n",
        ] {
            let (sent, result) = drive_all_splits(
                CheckKind::Imap,
                &[greeting, b"* BYE logging out\r\na1 OK LOGOUT completed\r\n"],
            );
            assert_eq!(result, Ok(()));
            assert_eq!(sent, vec!["a1 LOGOUT\r\n"]);
        }
        // EOF right after BYE is fine.
        let (_, result) = drive_all_splits(CheckKind::Imap, &[b"* ok hi\r\n", b"* BYE\r\n"]);
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn imap_failures() {
        let (sent, result) =
            drive_all_splits(CheckKind::Imap, &[b"* BYE too many connections\r\n"]);
        assert!(sent.is_empty());
        assert_eq!(
            result.unwrap_err().to_string(),
            "IMAP greeting was BYE: too many connections"
        );
        let (_, result) = drive_all_splits(CheckKind::Imap, &[b"220 this is smtp\r\n"]);
        assert_eq!(
            result,
            Err(CheckFailure::ImapGreeting("220 this is smtp".into()))
        );
        let (_, result) = drive_all_splits(CheckKind::Imap, &[b"* OK hi\r\n", b"a1 BAD no\r\n"]);
        assert_eq!(result, Err(CheckFailure::ImapLogout("a1 BAD no".into())));
        let (_, result) = drive_all_splits(CheckKind::Imap, &[b"* OK hi\r\n"]);
        assert_eq!(
            result,
            Err(CheckFailure::Closed {
                phase: "the LOGOUT reply"
            })
        );
        let (_, result) = drive_all_splits(CheckKind::Imap, &[b"* OK hi\r\n", b"+ what\r\n"]);
        assert!(matches!(result, Err(CheckFailure::Malformed(_))));
    }

    #[test]
    fn out_of_order_calls_do_not_panic() {
        let mut d = Dialogue::new(CheckKind::Smtp, "x");
        assert!(matches!(d.on_bytes(b"220 hi\r\n"), Step::Done(Err(_))));
        let mut d = Dialogue::new(CheckKind::Smtp, "x");
        d.on_connected();
        assert!(matches!(
            d.on_tls_done(),
            Step::Done(Err(CheckFailure::OutOfOrder(_)))
        ));
        assert!(matches!(d.on_connected(), Step::Done(Err(_))));
    }

    #[test]
    fn ehlo_name_is_sanitised() {
        let mut d = Dialogue::new(CheckKind::Smtp, "bad name\r\nRCPT TO:<x>");
        d.on_connected();
        assert_eq!(
            d.on_bytes(b"220 hi\r\n"),
            Step::Send(b"EHLO badnameRCPTTO:<x>\r\n".to_vec())
        );
        let mut d = Dialogue::new(CheckKind::Smtp, "");
        d.on_connected();
        assert_eq!(
            d.on_bytes(b"220 hi\r\n"),
            Step::Send(b"EHLO localhost\r\n".to_vec())
        );
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for kind in [CheckKind::Smtp, CheckKind::SmtpStarttls, CheckKind::Imap] {
            for _ in 0..300 {
                let mut d = Dialogue::new(kind, "x");
                d.on_connected();
                for _ in 0..20 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let alphabet = b"0123456789 -*\r\nOKBYEa1STARTTLS\xff";
                    let data: Vec<u8> = (0..(seed % 40) as usize)
                        .map(|i| {
                            alphabet[((seed >> (i % 56)) as usize).wrapping_add(i) % alphabet.len()]
                        })
                        .collect();
                    match d.on_bytes(&data) {
                        Step::Done(_) => break,
                        Step::StartTls => {
                            d.on_tls_done();
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
