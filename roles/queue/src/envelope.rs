//! The envelope: everything the queue knows about a message besides its content.
//!
//! Stored as versioned JSON (`"version": 1`); fields added later carry `#[serde(default)]`, so
//! old envelopes stay readable, and an envelope with a newer version is refused rather than
//! misread.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::QueueId;

/// Version written by this crate.
pub const ENVELOPE_VERSION: u32 = 1;

/// The queue's record of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version, [`ENVELOPE_VERSION`].
    pub version: u32,
    /// Queue id (also the file name).
    pub id: QueueId,
    /// MAIL FROM; `None` is the null sender `<>` (bounces).
    pub sender: Option<String>,
    /// RCPT TO, with delivery state.
    pub recipients: Vec<RecipientState>,
    /// DSN RET parameter.
    pub ret: Option<Ret>,
    /// DSN ENVID parameter.
    pub envid: Option<String>,
    /// BODY parameter.
    pub body: BodyType,
    /// SMTPUTF8 was given.
    pub smtputf8: bool,
    /// Arrival time (serialized as unix seconds).
    #[serde(with = "unix_secs")]
    pub received_at: SystemTime,
    /// The SMTP client that handed the message over; `None` for locally generated mail.
    pub client: Option<ClientInfo>,
    /// Size of the message content in bytes (the data file's length).
    pub size: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Next attempt, unix seconds.
    pub next_attempt: u64,
    /// After this (unix seconds) temporary failures become permanent.
    pub expires_at: u64,
    /// Next-hop class, e.g. `"mda"` or `"mta"`.
    pub route: String,
    /// Held: never due until thawed.
    pub frozen: bool,
    /// A delay warning DSN has been sent.
    #[serde(default)]
    pub delay_warned: bool,
    /// Trace header lines (Received, Authentication-Results), CRLF-terminated, sent in front of
    /// the content at delivery. They are decided only when the content is complete (DKIM and
    /// DMARC need all of it), so they live here instead of being written into the data file.
    #[serde(default)]
    pub headers: String,
    /// For a DSN this queue wrote: the message and recipients it reports on (for the logs,
    /// should the DSN itself fail). `None` for everything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_of: Option<ReportOf>,
}

/// What a DSN reports on: the original message and its recipients in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportOf {
    /// The queue id of the original message.
    pub id: String,
    /// The recipients the DSN is about.
    pub recipients: Vec<String>,
}

/// One recipient and its delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    /// The forward path.
    pub address: String,
    /// DSN ORCPT parameter, as given (`rfc822;user@example.org`).
    pub orcpt: Option<String>,
    /// DSN NOTIFY parameter.
    pub notify: Notify,
    /// Where delivery stands.
    pub status: RcptStatus,
    /// Temporary failures so far.
    pub attempts: u32,
    /// The last reply seen for this recipient.
    pub last_reply: Option<String>,
}

/// DSN NOTIFY. All `false` means the parameter was not given (RFC 3461: then failures, and at
/// the MTA's option delays, are reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// NOTIFY=NEVER.
    pub never: bool,
    /// NOTIFY=SUCCESS.
    pub success: bool,
    /// NOTIFY=FAILURE.
    pub failure: bool,
    /// NOTIFY=DELAY.
    pub delay: bool,
}

impl Notify {
    fn unspecified(&self) -> bool {
        !(self.never || self.success || self.failure || self.delay)
    }
    /// Whether a permanent failure is reported to the sender.
    pub fn wants_failure(&self) -> bool {
        !self.never && (self.failure || self.unspecified())
    }
    /// Whether a delay warning is sent (when the spool is configured to send them).
    pub fn wants_delay(&self) -> bool {
        !self.never && (self.delay || self.unspecified())
    }
}

/// Delivery state of one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RcptStatus {
    /// Not delivered yet.
    Pending,
    /// Delivered (unix seconds, the accepting reply).
    Delivered {
        /// When, unix seconds.
        at: u64,
        /// The reply of the next hop.
        reply: String,
    },
    /// Failed permanently (unix seconds, the reply).
    Failed {
        /// When, unix seconds.
        at: u64,
        /// The reply of the next hop, or why the queue gave up.
        reply: String,
    },
}

impl RcptStatus {
    /// Still to be delivered.
    pub fn is_pending(&self) -> bool {
        matches!(self, RcptStatus::Pending)
    }
}

/// DSN RET parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ret {
    /// Return the full message.
    Full,
    /// Return only the headers.
    Hdrs,
}

/// BODY parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyType {
    /// 7BIT (default).
    #[default]
    SevenBit,
    /// 8BITMIME.
    EightBitMime,
    /// BINARYMIME (via BDAT).
    BinaryMime,
}

/// The SMTP client of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Peer address.
    pub addr: String,
    /// EHLO/HELO argument.
    pub helo: String,
    /// The session used TLS.
    pub tls: bool,
    /// Authenticated identity.
    pub auth: Option<String>,
}

/// What the receiver knows at commit time; the spool adds id, size and schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnvelope {
    /// MAIL FROM; `None` is `<>`.
    pub sender: Option<String>,
    /// RCPT TO.
    pub recipients: Vec<NewRecipient>,
    /// DSN RET.
    pub ret: Option<Ret>,
    /// DSN ENVID.
    pub envid: Option<String>,
    /// BODY.
    pub body: BodyType,
    /// SMTPUTF8.
    pub smtputf8: bool,
    /// The SMTP client.
    pub client: Option<ClientInfo>,
    /// Next-hop class.
    pub route: String,
    /// Trace header lines to send in front of the content (see [`Envelope::headers`]).
    pub headers: String,
    /// For a DSN: what it reports on (see [`Envelope::report_of`]).
    pub report_of: Option<ReportOf>,
}

/// A recipient as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecipient {
    /// The forward path.
    pub address: String,
    /// DSN ORCPT.
    pub orcpt: Option<String>,
    /// DSN NOTIFY.
    pub notify: Notify,
}

impl NewRecipient {
    /// A recipient without DSN parameters.
    pub fn new(address: impl Into<String>) -> Self {
        NewRecipient {
            address: address.into(),
            orcpt: None,
            notify: Notify::default(),
        }
    }
}

impl NewEnvelope {
    /// An envelope with default parameters.
    pub fn new(
        sender: Option<String>,
        recipients: impl IntoIterator<Item = NewRecipient>,
        route: impl Into<String>,
    ) -> Self {
        NewEnvelope {
            sender,
            recipients: recipients.into_iter().collect(),
            ret: None,
            envid: None,
            body: BodyType::SevenBit,
            smtputf8: false,
            client: None,
            route: route.into(),
            headers: String::new(),
            report_of: None,
        }
    }
}

impl Envelope {
    /// Recipients still pending.
    pub fn pending(&self) -> impl Iterator<Item = &RecipientState> {
        self.recipients.iter().filter(|r| r.status.is_pending())
    }
}

/// Unix seconds of a time (0 before the epoch).
pub fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The time of unix seconds.
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

mod unix_secs {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::to_unix(*t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(super::from_unix)
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An RFC 5322 date in UTC: `Tue, 10 Mar 2026 12:00:00 +0000`.
pub fn rfc5322_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A `postqueue -p` style entry: a header line (id, size, arrival, sender; `!` after the id
/// marks a frozen message), then one line per recipient with its state and the last reply.
///
/// ```text
/// 0pbv3k2x9q40001a7kz!    2048 Tue, 10 Mar 2026 12:00:00 +0000  alice@example.org
///     bob@example.net  pending (2 attempts): 451 4.7.1 try later
///     carol@example.net  delivered: 250 2.0.0 ok
/// ```
pub fn summary_line(env: &Envelope) -> String {
    let mut s = format!(
        "{}{} {:>8} {}  {}",
        env.id,
        if env.frozen { "!" } else { " " },
        env.size,
        rfc5322_date(to_unix(env.received_at)),
        env.sender.as_deref().unwrap_or("MAILER-DAEMON"),
    );
    if env.pending().next().is_some() && env.attempts > 0 {
        let _ = write!(
            s,
            "\n    next attempt {} (after {} attempts)",
            rfc5322_date(env.next_attempt),
            env.attempts
        );
    }
    for r in &env.recipients {
        let _ = match &r.status {
            RcptStatus::Pending => match &r.last_reply {
                Some(reply) => write!(
                    s,
                    "\n    {}  pending ({} attempts): {}",
                    r.address,
                    r.attempts,
                    one_line(reply)
                ),
                None => write!(s, "\n    {}  pending", r.address),
            },
            RcptStatus::Delivered { reply, .. } => {
                write!(s, "\n    {}  delivered: {}", r.address, one_line(reply))
            }
            RcptStatus::Failed { reply, .. } => {
                write!(s, "\n    {}  failed: {}", r.address, one_line(reply))
            }
        };
    }
    s
}

/// A reply on one line: CR/LF and other controls become spaces.
pub(crate) fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    while out.contains("  ") {
        out = out.replace("  ", " ");
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn notify_defaults() {
        let n = Notify::default();
        assert!(n.wants_failure() && n.wants_delay());
        let never = Notify {
            never: true,
            ..Notify::default()
        };
        assert!(!never.wants_failure() && !never.wants_delay());
        let success = Notify {
            success: true,
            ..Notify::default()
        };
        assert!(!success.wants_failure());
    }
}
