//! Originate-only BGP session state machine (RFC 4271), without I/O.
//!
//! One [`Session`] per neighbour. It announces the anycast host routes it is given with
//! [`Session::set_routes`] and ignores whatever the peer announces (no RIB, no best path): the
//! proxy only needs routers to send it traffic for its service addresses, and to stop doing so
//! the moment it goes away.
//!
//! Like `quinn-proto`, the session never touches a socket or a clock. The driver feeds it TCP
//! bytes and the current time, and carries out bytes, events and the next deadline:
//!
//! ```text
//!             connected(local, peer, now)         set_routes(&[Announcement])
//!                        │                                   │
//!   TCP bytes ──► receive(data, now) ──►┌─────────┐◄─────────┘
//!   deadline ───► handle_timeout(now) ─►│ Session │──► poll_transmit() ──► TCP bytes
//!                                       │  (FSM)  │──► poll_event()    ──► Established / Closed / Warning
//!   TCP closed ─► disconnected(now) ───►└─────────┘──► poll_timeout()  ──► next deadline
//!                                                  └─► should_close()  ──► flush, then close the socket
//!
//!   Idle ─connected─► OpenSent ─OPEN ok─► OpenConfirm ─KEEPALIVE─► Established
//!     ▲                  │                    │                         │
//!     │                  └──── error / NOTIFICATION / hold expiry / shutdown()
//!     │                                       ▼
//!     └──────── disconnected ────────── Closing (should_close)
//! ```
//!
//! # What goes on the wire
//!
//! * OPEN: version 4, My AS (or `AS_TRANS` 23456 above 65535), the configured hold time, and
//!   the capabilities 4-octet AS (RFC 6793), Multiprotocol IPv4/IPv6 unicast as configured
//!   (RFC 4760) and Route Refresh (RFC 2918). **Never Graceful Restart**: a dead proxy must not
//!   keep attracting traffic while the router holds its stale routes. Extended messages are
//!   not negotiated; every message is at most 4096 bytes.
//! * The peer's OPEN must carry the 4-octet AS capability, otherwise the session is refused
//!   with NOTIFICATION 2/7 (Unsupported Capability). Every router that matters has supported
//!   it for well over a decade, and requiring it keeps the AS_PATH encoding to one form.
//! * A family is used when both sides advertise it; a peer without any Multiprotocol capability
//!   implicitly does IPv4 unicast only.
//! * UPDATE: ORIGIN IGP; AS_PATH empty on iBGP, `local_as` (plus `graceful_prepend` extra copies
//!   while graceful) on eBGP; MED if configured; LOCAL_PREF on iBGP (0 while graceful,
//!   RFC 8326); COMMUNITIES as configured plus GRACEFUL_SHUTDOWN (65535:0) while graceful.
//!   IPv4 routes use the classic NLRI fields and NEXT_HOP, IPv6 routes MP_REACH_NLRI /
//!   MP_UNREACH_NLRI with a 16-byte global next hop. Prefixes sharing attributes are packed
//!   into as few UPDATEs as fit in 4096 bytes.
//! * Next hop: the family's configured override, else the local address of the TCP session
//!   when it is of that family. A family without a usable next hop is not announced and a
//!   [`Event::Warning`] says so.
//!
//! Collision detection (RFC 4271 §6.8) is the driver's business: it should run one transport
//! per neighbour.

mod backoff;
mod session;
mod update;

#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bytes::Bytes;

pub use backoff::Backoff;
pub use rustbgpd_wire::DecodeError;
pub use session::Session;

use crate::route::Community;

/// The maximum BGP message length (RFC 4271 §4.1); extended messages are never negotiated.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// `AS_TRANS` (RFC 6793), sent in the OPEN's 2-octet My AS field when `local_as` > 65535.
pub const AS_TRANS: u16 = 23456;
/// The hold time proposed unless configured otherwise.
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(9);
/// The most communities a configuration may attach (keeps every UPDATE well within 4096 bytes).
pub const MAX_COMMUNITIES: usize = 256;

/// Per-neighbour session configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Our AS number. iBGP when equal to `remote_as`.
    pub local_as: u32,
    /// The neighbour's AS number; its OPEN must match (else NOTIFICATION 2/2).
    pub remote_as: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// The proposed hold time, whole seconds: 0 (no keepalives) or 3..=65535 s. The negotiated
    /// hold time is the smaller of both proposals; keepalives go out every third of it.
    pub hold_time: Duration,
    /// Negotiate IPv4 unicast.
    pub ipv4: bool,
    /// Negotiate IPv6 unicast.
    pub ipv6: bool,
    /// MULTI_EXIT_DISC attached to every announcement, if set.
    pub med: Option<u32>,
    /// LOCAL_PREF on iBGP sessions (0 while graceful). Ignored on eBGP.
    pub local_pref: u32,
    /// Communities attached to every announcement.
    pub communities: Vec<Community>,
    /// IPv4 next hop; `None` = the session's local address if it is IPv4.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// IPv6 next hop (global); `None` = the session's local address if it is a global IPv6
    /// address.
    pub next_hop_v6: Option<Ipv6Addr>,
    /// Extra copies of `local_as` prepended while a route is graceful. eBGP only.
    pub graceful_prepend: u8,
}

impl SessionConfig {
    /// A configuration with the defaults: hold time 9 s, IPv4 and IPv6, no MED, LOCAL_PREF 100,
    /// no communities, next-hop self, no graceful prepend.
    pub fn new(local_as: u32, remote_as: u32, router_id: Ipv4Addr) -> SessionConfig {
        SessionConfig {
            local_as,
            remote_as,
            router_id,
            hold_time: DEFAULT_HOLD_TIME,
            ipv4: true,
            ipv6: true,
            med: None,
            local_pref: 100,
            communities: Vec::new(),
            next_hop_v4: None,
            next_hop_v6: None,
            graceful_prepend: 0,
        }
    }

    /// Whether this is an iBGP session (`local_as == remote_as`).
    pub fn is_ibgp(&self) -> bool {
        self.local_as == self.remote_as
    }

    /// The hold time as it goes into the OPEN (whole seconds).
    pub fn hold_time_secs(&self) -> u16 {
        u16::try_from(self.hold_time.as_secs()).unwrap_or(u16::MAX)
    }

    /// Checks what the session cannot work around. [`Session::connected`] refuses to start
    /// with an invalid configuration (it closes with [`CloseReason::InvalidConfig`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.local_as == 0 {
            return Err(ConfigError::ReservedAs { which: "local" });
        }
        if self.remote_as == 0 {
            return Err(ConfigError::ReservedAs { which: "remote" });
        }
        if self.router_id.is_unspecified() {
            return Err(ConfigError::ZeroRouterId);
        }
        let secs = self.hold_time.as_secs();
        if secs == 1 || secs == 2 || secs > u64::from(u16::MAX) {
            return Err(ConfigError::HoldTime(self.hold_time));
        }
        if !self.ipv4 && !self.ipv6 {
            return Err(ConfigError::NoFamily);
        }
        if self.communities.len() > MAX_COMMUNITIES {
            return Err(ConfigError::TooManyCommunities(self.communities.len()));
        }
        Ok(())
    }
}

/// Why a [`SessionConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{which} AS 0 is reserved (RFC 7607)")]
    ReservedAs { which: &'static str },
    #[error("router id 0.0.0.0 is not a valid BGP identifier")]
    ZeroRouterId,
    #[error("hold time {0:?} must be 0 or 3..=65535 seconds")]
    HoldTime(Duration),
    #[error("neither IPv4 nor IPv6 unicast is enabled")]
    NoFamily,
    #[error("{0} communities configured, at most {MAX_COMMUNITIES} are supported")]
    TooManyCommunities(usize),
}

/// Session state (RFC 4271 §8.2.2, without Connect/Active: the driver owns the transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// No transport.
    Idle,
    /// Transport up, our OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for the peer's KEEPALIVE.
    OpenConfirm,
    /// Routes are exchanged.
    Established,
    /// The session is over (NOTIFICATION sent or received); flush transmit, close the transport
    /// and report [`Session::disconnected`].
    Closing,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Idle => "Idle",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
            State::Closing => "Closing",
        })
    }
}

/// What the session reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session is up. `hold_time` is the negotiated hold time (zero: no keepalives);
    /// `families` is (IPv4 unicast, IPv6 unicast) as negotiated with the peer.
    Established {
        hold_time: Duration,
        families: (bool, bool),
    },
    /// The session ended; every route the peer had from us is gone.
    Closed { reason: CloseReason },
    /// Something the operator should know that does not end the session (e.g. routes of a
    /// family that cannot be announced).
    Warning(String),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The peer sent a NOTIFICATION. `message` is the RFC 9003 shutdown communication, if any.
    #[error("peer sent NOTIFICATION {code}/{subcode}{}", message.as_deref().map(|m| format!(": {m:?}")).unwrap_or_default())]
    PeerNotification {
        code: u8,
        subcode: u8,
        data: Bytes,
        message: Option<String>,
    },
    /// We sent a NOTIFICATION because of a protocol error.
    #[error("{0}")]
    Error(#[from] SessionError),
    /// Nothing heard from the peer within the hold time; we sent NOTIFICATION 4/0.
    #[error("hold timer expired")]
    HoldTimerExpired,
    /// [`Session::shutdown`]: we sent Cease / Administrative Shutdown.
    #[error("administrative shutdown")]
    Shutdown,
    /// The transport went away ([`Session::disconnected`]).
    #[error("transport closed")]
    TransportClosed,
    /// [`Session::connected`] with a configuration that does not validate.
    #[error("invalid configuration: {0}")]
    InvalidConfig(ConfigError),
}

/// A protocol error that made us send a NOTIFICATION and close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A message did not decode (header, length, or body); the wire error carries the
    /// NOTIFICATION code.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// The peer's AS (4-octet capability, else My AS) is not the configured one (2/2).
    #[error("peer AS {got} is not the configured remote AS {expected}")]
    BadPeerAs { expected: u32, got: u32 },
    /// The peer's BGP identifier is 0.0.0.0 or, on iBGP, ours (2/3).
    #[error("unacceptable peer BGP identifier {0}")]
    BadBgpId(Ipv4Addr),
    /// The peer proposed a hold time of 1 or 2 seconds, or 0 while we want keepalives (2/6).
    #[error("unacceptable hold time {0} s")]
    UnacceptableHoldTime(u16),
    /// An UPDATE we must send could not be encoded; the session ends so the peer drops our
    /// routes rather than keep one we no longer want announced (Cease, 6/8 Out of Resources).
    #[error("cannot encode an UPDATE: {0}")]
    Encode(String),
    /// The peer's OPEN lacks the 4-octet AS capability, which we require (2/7).
    #[error("peer does not support 4-octet AS numbers (RFC 6793), which this speaker requires")]
    NoFourOctetAs { local_as: u32 },
    /// A message that is not allowed in the current state (5/x, RFC 6608 subcodes).
    #[error("unexpected {message} in state {state}")]
    UnexpectedMessage { message: &'static str, state: State },
}

impl SessionError {
    /// The NOTIFICATION (code, subcode, data) this error is reported with.
    pub fn notification(&self) -> (u8, u8, Bytes) {
        match self {
            SessionError::Decode(e) => {
                let (code, subcode, data) = e.to_notification();
                (code.as_u8(), subcode, data)
            }
            SessionError::BadPeerAs { .. } => (2, 2, Bytes::new()),
            SessionError::BadBgpId(_) => (2, 3, Bytes::new()),
            SessionError::UnacceptableHoldTime(_) => (2, 6, Bytes::new()),
            SessionError::Encode(_) => (6, 8, Bytes::new()),
            SessionError::NoFourOctetAs { local_as } => {
                // The capability we need, as a TLV: code 65, length 4, value.
                let mut data = vec![65, 4];
                data.extend_from_slice(&local_as.to_be_bytes());
                (2, 7, Bytes::from(data))
            }
            SessionError::UnexpectedMessage { state, .. } => {
                let subcode = match state {
                    State::OpenSent => 1,
                    State::OpenConfirm => 2,
                    State::Established => 3,
                    State::Idle | State::Closing => 0,
                };
                (5, subcode, Bytes::new())
            }
        }
    }
}
