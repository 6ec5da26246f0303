//! The session state machine proper.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustbgpd_wire::notification::decode_shutdown_communication;
use rustbgpd_wire::{
    Afi, Capability, Message, NotificationCode, NotificationMessage, OpenMessage,
    RouteRefreshMessage, Safi, decode_message, encode_message, peek_message_length,
};

use super::update;
use super::{AS_TRANS, CloseReason, Event, MAX_MESSAGE_LEN, SessionConfig, SessionError, State};
use crate::route::Announcement;

/// Wire limit as the codec wants it.
const MAX_LEN_U16: u16 = MAX_MESSAGE_LEN as u16;
/// Longest NOTIFICATION data that still fits in one message (header 19 + code + subcode).
const MAX_NOTIFICATION_DATA: usize = MAX_MESSAGE_LEN - 21;
/// Largest chunk [`Session::poll_transmit`] coalesces queued messages into.
const MAX_TRANSMIT_CHUNK: usize = 64 * 1024;
/// Upper bound for the wait for the peer's OPEN (RFC 4271 suggests 4 minutes).
const OPEN_WAIT_MAX: Duration = Duration::from_secs(240);
/// Lower bound for the wait for the peer's OPEN.
const OPEN_WAIT_MIN: Duration = Duration::from_secs(30);

/// Address family index into per-family arrays.
const V4: usize = 0;
const V6: usize = 1;
const FAMILY_NAME: [&str; 2] = ["IPv4", "IPv6"];

fn family_of(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => V4,
        IpAddr::V6(_) => V6,
    }
}

/// An originate-only BGP session with one neighbour; see the [module docs](super).
///
/// ```
/// use std::time::Instant;
/// use ringmail_announce_core::Announcement;
/// use ringmail_announce_core::bgp::{Session, SessionConfig, State};
///
/// let cfg = SessionConfig::new(65001, 65000, "192.0.2.1".parse().unwrap());
/// let mut s = Session::new(cfg);
/// s.set_routes(&[Announcement { prefix: "198.51.100.10".parse().unwrap(), graceful: false }]);
/// let now = Instant::now();
/// s.connected("192.0.2.1:40000".parse().unwrap(), "192.0.2.2:179".parse().unwrap(), now);
/// assert_eq!(s.state(), State::OpenSent);
/// let open = s.poll_transmit().unwrap(); // our OPEN, for the socket
/// assert_eq!(open[18], 1); // BGP message type 1
/// assert!(s.poll_timeout().is_some()); // waiting for the peer's OPEN
/// ```
///
/// A driver loop, in outline:
///
/// ```text
/// loop {
///     while let Some(bytes) = s.poll_transmit() { socket.write_all(&bytes) }
///     while let Some(event) = s.poll_event() { log / update backoff }
///     if s.should_close() { close socket; s.disconnected(now); break }
///     select {
///         bytes = socket.read()              => s.receive(&bytes, now),
///         _ = sleep_until(s.poll_timeout())  => s.handle_timeout(now),
///         routes = desired.changed()         => s.set_routes(&routes),
///         _ = sigterm                        => s.shutdown(now),
///         eof / error                        => { s.disconnected(now); break }
///     }
/// }
/// ```
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    state: State,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    rx: BytesMut,
    tx: VecDeque<Bytes>,
    events: VecDeque<Event>,
    should_close: bool,
    /// Negotiated hold time (zero: no hold timer, no keepalives).
    hold_time: Duration,
    hold_deadline: Option<Instant>,
    keepalive_deadline: Option<Instant>,
    /// Negotiated (IPv4 unicast, IPv6 unicast).
    families: [bool; 2],
    /// What the driver wants announced: prefix → graceful.
    desired: BTreeMap<IpAddr, bool>,
    /// What the peer has from us on this connection: prefix → graceful.
    advertised: BTreeMap<IpAddr, bool>,
    /// A warning about an unannounceable family was emitted on this connection.
    family_warned: [bool; 2],
}

impl Session {
    /// A session in [`State::Idle`]. The configuration is checked by [`Session::connected`].
    pub fn new(cfg: SessionConfig) -> Session {
        Session {
            cfg,
            state: State::Idle,
            local: None,
            peer: None,
            rx: BytesMut::new(),
            tx: VecDeque::new(),
            events: VecDeque::new(),
            should_close: false,
            hold_time: Duration::ZERO,
            hold_deadline: None,
            keepalive_deadline: None,
            families: [false; 2],
            desired: BTreeMap::new(),
            advertised: BTreeMap::new(),
            family_warned: [false; 2],
        }
    }

    /// The configuration this session runs with.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The TCP connection to the peer is up: queue our OPEN and enter [`State::OpenSent`].
    /// Called in any other state than Idle, the old connection is forgotten first (as by
    /// [`disconnected`](Self::disconnected)).
    pub fn connected(&mut self, local: SocketAddr, peer: SocketAddr, now: Instant) {
        self.disconnected(now);
        self.local = Some(local);
        self.peer = Some(peer);
        if let Err(e) = self.cfg.validate() {
            self.close(CloseReason::InvalidConfig(e));
            return;
        }
        let open = self.open_message();
        self.queue(&Message::Open(open));
        self.state = State::OpenSent;
        self.hold_deadline = Some(now + self.open_wait());
    }

    /// Bytes received from the peer, in any chunking.
    pub fn receive(&mut self, data: &[u8], now: Instant) {
        if !self.is_active() {
            return;
        }
        self.rx.extend_from_slice(data);
        while self.is_active() {
            let len = match peek_message_length(&self.rx, MAX_LEN_U16) {
                Ok(Some(len)) => usize::from(len),
                Ok(None) => break,
                Err(e) => {
                    self.fail(e.into());
                    break;
                }
            };
            if self.rx.len() < len {
                break;
            }
            let mut frame = self.rx.split_to(len).freeze();
            match decode_message(&mut frame, MAX_LEN_U16) {
                Ok(msg) => self.handle_message(msg, now),
                Err(e) => self.fail(e.into()),
            }
        }
    }

    /// Runs the timers: hold timer expiry (NOTIFICATION 4/0 and close) and keepalives. Call
    /// when [`poll_timeout`](Self::poll_timeout) has passed; calling early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.is_active() {
            return;
        }
        if self.hold_deadline.is_some_and(|d| now >= d) {
            self.send_notification(NotificationCode::HoldTimerExpired.as_u8(), 0, Bytes::new());
            self.close(CloseReason::HoldTimerExpired);
            return;
        }
        if let Some(deadline) = self.keepalive_deadline
            && now >= deadline
        {
            self.queue(&Message::Keepalive);
            self.keepalive_deadline = Some(now + self.keepalive_interval());
        }
    }

    /// The next instant [`handle_timeout`](Self::handle_timeout) has work to do, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.is_active() {
            return None;
        }
        match (self.hold_deadline, self.keepalive_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next bytes to write to the socket (queued messages, coalesced up to 64 KiB).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let first = self.tx.pop_front()?;
        if self
            .tx
            .front()
            .is_none_or(|next| first.len() + next.len() > MAX_TRANSMIT_CHUNK)
        {
            return Some(first);
        }
        let mut out = BytesMut::from(&first[..]);
        while let Some(next) = self.tx.front() {
            if out.len() + next.len() > MAX_TRANSMIT_CHUNK {
                break;
            }
            if let Some(next) = self.tx.pop_front() {
                out.extend_from_slice(&next);
            }
        }
        Some(out.freeze())
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The routes that should be announced. Remembered across connections; when Established,
    /// the difference to what the peer has is sent right away (withdrawals first, then new
    /// routes and routes whose graceful flag changed). A prefix listed twice counts once,
    /// graceful if any entry is.
    pub fn set_routes(&mut self, routes: &[Announcement]) {
        let mut desired = BTreeMap::new();
        for r in routes {
            *desired.entry(r.prefix).or_insert(false) |= r.graceful;
        }
        self.desired = desired;
        if self.state == State::Established {
            self.sync();
        }
    }

    /// Ends the session with Cease / Administrative Shutdown (6/2) and enters
    /// [`State::Closing`]. Nothing happens when there is no session.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutdown_with_message("", now);
    }

    /// Like [`shutdown`](Self::shutdown), with an RFC 9003 shutdown communication (at most 128
    /// bytes of it are sent; empty sends none).
    pub fn shutdown_with_message(&mut self, message: &str, _now: Instant) {
        if !self.is_active() {
            return;
        }
        let data = if message.is_empty() {
            Bytes::new()
        } else {
            rustbgpd_wire::notification::encode_shutdown_communication(message)
        };
        self.send_notification(NotificationCode::Cease.as_u8(), 2, data);
        self.close(CloseReason::Shutdown);
    }

    /// The transport is gone (closed by either side or failed): back to [`State::Idle`]. The
    /// peer dropped whatever we announced, so all desired routes go out again on the next
    /// connection. Reports [`CloseReason::TransportClosed`] unless the session had already
    /// reported its end.
    pub fn disconnected(&mut self, _now: Instant) {
        let was_active = self.is_active();
        self.reset_connection();
        if was_active {
            self.events.push_back(Event::Closed {
                reason: CloseReason::TransportClosed,
            });
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The driver should flush [`poll_transmit`](Self::poll_transmit), then close the socket
    /// and call [`disconnected`](Self::disconnected).
    pub fn should_close(&self) -> bool {
        self.should_close
    }

    /// What the peer currently has from us, in prefix order.
    pub fn advertised(&self) -> Vec<Announcement> {
        self.advertised
            .iter()
            .map(|(&prefix, &graceful)| Announcement { prefix, graceful })
            .collect()
    }

    /// The negotiated hold time (zero until OpenConfirm, or when no keepalives are used).
    pub fn hold_time(&self) -> Duration {
        self.hold_time
    }

    /// The negotiated (IPv4 unicast, IPv6 unicast) families.
    pub fn families(&self) -> (bool, bool) {
        (self.families[V4], self.families[V6])
    }

    /// The addresses given to [`connected`](Self::connected) (local, peer), while connected.
    pub fn addresses(&self) -> Option<(SocketAddr, SocketAddr)> {
        self.local.zip(self.peer)
    }

    // ---- internals -------------------------------------------------------------------------

    fn is_active(&self) -> bool {
        matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        )
    }

    fn reset_connection(&mut self) {
        self.state = State::Idle;
        self.local = None;
        self.peer = None;
        self.rx = BytesMut::new();
        self.tx.clear();
        self.should_close = false;
        self.hold_time = Duration::ZERO;
        self.hold_deadline = None;
        self.keepalive_deadline = None;
        self.families = [false; 2];
        self.advertised.clear();
        self.family_warned = [false; 2];
    }

    /// How long to wait for the peer's OPEN: 4 × the proposed hold time, within 30..=240 s.
    fn open_wait(&self) -> Duration {
        if self.cfg.hold_time.is_zero() {
            return OPEN_WAIT_MAX;
        }
        self.cfg
            .hold_time
            .saturating_mul(4)
            .clamp(OPEN_WAIT_MIN, OPEN_WAIT_MAX)
    }

    fn keepalive_interval(&self) -> Duration {
        self.hold_time / 3
    }

    fn open_message(&self) -> OpenMessage {
        let mut capabilities = Vec::with_capacity(4);
        if self.cfg.ipv4 {
            capabilities.push(Capability::MultiProtocol {
                afi: Afi::Ipv4,
                safi: Safi::Unicast,
            });
        }
        if self.cfg.ipv6 {
            capabilities.push(Capability::MultiProtocol {
                afi: Afi::Ipv6,
                safi: Safi::Unicast,
            });
        }
        capabilities.push(Capability::RouteRefresh);
        capabilities.push(Capability::FourOctetAs {
            asn: self.cfg.local_as,
        });
        OpenMessage {
            version: 4,
            my_as: u16::try_from(self.cfg.local_as).unwrap_or(AS_TRANS),
            hold_time: self.cfg.hold_time_secs(),
            bgp_identifier: self.cfg.router_id,
            capabilities,
        }
    }

    fn queue(&mut self, msg: &Message) {
        match encode_message(msg) {
            Ok(bytes) => self.tx.push_back(bytes.freeze()),
            // Only oversized messages fail to encode, and none of ours can be.
            Err(e) => self
                .events
                .push_back(Event::Warning(format!("could not encode {msg}: {e}"))),
        }
    }

    fn send_notification(&mut self, code: u8, subcode: u8, mut data: Bytes) {
        data.truncate(MAX_NOTIFICATION_DATA);
        let msg = NotificationMessage::new(NotificationCode::from_u8(code), subcode, data);
        self.queue(&Message::Notification(msg));
    }

    /// Ends the session: nothing more is received or sent apart from what is queued.
    fn close(&mut self, reason: CloseReason) {
        self.state = State::Closing;
        self.should_close = true;
        self.hold_deadline = None;
        self.keepalive_deadline = None;
        self.rx = BytesMut::new();
        self.advertised.clear();
        self.events.push_back(Event::Closed { reason });
    }

    /// A protocol error: NOTIFICATION, then close.
    fn fail(&mut self, err: SessionError) {
        let (code, subcode, data) = err.notification();
        self.send_notification(code, subcode, data);
        self.close(CloseReason::Error(err));
    }

    fn handle_message(&mut self, msg: Message, now: Instant) {
        if self.state != State::OpenSent && !self.hold_time.is_zero() {
            self.hold_deadline = Some(now + self.hold_time);
        }
        match (self.state, msg) {
            (_, Message::Notification(n)) => {
                let code = n.code.as_u8();
                let message = if code == 6 && matches!(n.subcode, 2 | 4) {
                    decode_shutdown_communication(&n.data)
                } else {
                    None
                };
                self.close(CloseReason::PeerNotification {
                    code,
                    subcode: n.subcode,
                    data: n.data,
                    message,
                });
            }
            (State::OpenSent, Message::Open(open)) => self.handle_open(&open, now),
            (State::OpenConfirm, Message::Keepalive) => self.establish(),
            (State::Established, Message::Keepalive) => {}
            (State::Established, Message::Update(u)) => {
                // Originate-only: received routes are checked, then dropped. RFC 7606 revised
                // handling keeps recoverable attribute errors from resetting the session.
                if let Err(e) = u.parse_revised(true, self.cfg.is_ibgp(), false, &[]) {
                    self.fail(e.into());
                }
            }
            (State::Established, Message::RouteRefresh(rr)) => self.handle_route_refresh(&rr),
            (state, msg) => self.fail(SessionError::UnexpectedMessage {
                message: message_name(&msg),
                state,
            }),
        }
    }

    fn handle_open(&mut self, open: &OpenMessage, now: Instant) {
        let peer_as = open.four_byte_as();
        if peer_as != self.cfg.remote_as {
            return self.fail(SessionError::BadPeerAs {
                expected: self.cfg.remote_as,
                got: peer_as,
            });
        }
        let four_octet = open
            .capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs { .. }));
        if !four_octet {
            return self.fail(SessionError::NoFourOctetAs {
                local_as: self.cfg.local_as,
            });
        }
        let id = open.bgp_identifier;
        if id.is_unspecified() || (self.cfg.is_ibgp() && id == self.cfg.router_id) {
            return self.fail(SessionError::BadBgpId(id));
        }
        // A peer that proposes 0 while we want keepalives would turn off liveness detection on
        // both sides: a host that loses power would keep its routes for ever. Fail closed.
        if matches!(open.hold_time, 1 | 2)
            || (open.hold_time == 0 && self.cfg.hold_time_secs() != 0)
        {
            return self.fail(SessionError::UnacceptableHoldTime(open.hold_time));
        }

        let mut peer_families = [false; 2];
        let mut any_mp = false;
        for cap in &open.capabilities {
            if let Capability::MultiProtocol { afi, safi } = cap {
                any_mp = true;
                match (afi, safi) {
                    (Afi::Ipv4, Safi::Unicast) => peer_families[V4] = true,
                    (Afi::Ipv6, Safi::Unicast) => peer_families[V6] = true,
                    _ => {}
                }
            }
        }
        if !any_mp {
            // RFC 4760 §8: a speaker without the capability does IPv4 unicast.
            peer_families[V4] = true;
        }
        self.families = [
            self.cfg.ipv4 && peer_families[V4],
            self.cfg.ipv6 && peer_families[V6],
        ];

        let ours = self.cfg.hold_time_secs();
        self.hold_time = Duration::from_secs(u64::from(ours.min(open.hold_time)));
        self.queue(&Message::Keepalive);
        self.state = State::OpenConfirm;
        if self.hold_time.is_zero() {
            // No hold timer, but do not wait forever for the peer's KEEPALIVE.
            self.hold_deadline = Some(now + self.open_wait());
            self.keepalive_deadline = None;
        } else {
            self.hold_deadline = Some(now + self.hold_time);
            self.keepalive_deadline = Some(now + self.keepalive_interval());
        }
    }

    fn establish(&mut self) {
        self.state = State::Established;
        if self.hold_time.is_zero() {
            self.hold_deadline = None;
        }
        self.events.push_back(Event::Established {
            hold_time: self.hold_time,
            families: self.families(),
        });
        if self.families == [false; 2] {
            self.events.push_back(Event::Warning(
                "no address family in common with the peer: nothing will be announced".into(),
            ));
            self.family_warned = [true; 2];
        }
        self.sync();
    }

    fn handle_route_refresh(&mut self, rr: &RouteRefreshMessage) {
        // RFC 2918: only a plain request for a family we negotiated is answered.
        if rr.subtype_raw != 0 || rr.safi_raw != Safi::Unicast as u8 {
            return;
        }
        let family = match rr.afi() {
            Some(Afi::Ipv4) => V4,
            Some(Afi::Ipv6) => V6,
            _ => return,
        };
        if !self.families[family] {
            return;
        }
        let routes: Vec<(IpAddr, bool)> = self
            .advertised
            .iter()
            .filter(|(p, _)| family_of(**p) == family)
            .map(|(&p, &g)| (p, g))
            .collect();
        self.announce(&routes);
    }

    /// The next hop for a family, if there is a usable one.
    fn next_hop(&self, family: usize) -> Option<IpAddr> {
        let local = self.local.map(|a| a.ip().to_canonical());
        match family {
            V4 => {
                let nh = self.cfg.next_hop_v4.or(match local {
                    Some(IpAddr::V4(a)) => Some(a),
                    _ => None,
                })?;
                usable_v4(nh).then_some(IpAddr::V4(nh))
            }
            _ => {
                let nh = self.cfg.next_hop_v6.or(match local {
                    Some(IpAddr::V6(a)) => Some(a),
                    _ => None,
                })?;
                usable_v6(nh).then_some(IpAddr::V6(nh))
            }
        }
    }

    /// Which desired routes can go to this peer; warns once per family about those that
    /// cannot.
    fn target(&mut self) -> BTreeMap<IpAddr, bool> {
        let mut usable = [false; 2];
        for family in [V4, V6] {
            usable[family] = self.families[family] && self.next_hop(family).is_some();
        }
        let mut target = BTreeMap::new();
        let mut dropped = [0usize; 2];
        for (&prefix, &graceful) in &self.desired {
            let family = family_of(prefix);
            if usable[family] {
                target.insert(prefix, graceful);
            } else {
                dropped[family] += 1;
            }
        }
        for family in [V4, V6] {
            if dropped[family] == 0 || self.family_warned[family] {
                continue;
            }
            self.family_warned[family] = true;
            let name = FAMILY_NAME[family];
            let why = if !self.families[family] {
                format!("{name} unicast was not negotiated with the peer")
            } else {
                format!(
                    "no usable {name} next hop (configure one, or peer over {name} with a \
                     global address)"
                )
            };
            self.events.push_back(Event::Warning(format!(
                "{why}: {} {name} route(s) not announced",
                dropped[family]
            )));
        }
        target
    }

    /// Sends the difference between what the peer has and what it should have.
    fn sync(&mut self) {
        let target = self.target();
        let mut withdraw_v4 = Vec::new();
        let mut withdraw_v6 = Vec::new();
        for prefix in self.advertised.keys() {
            if !target.contains_key(prefix) {
                match prefix {
                    IpAddr::V4(a) => withdraw_v4.push(*a),
                    IpAddr::V6(a) => withdraw_v6.push(*a),
                }
            }
        }
        if !withdraw_v4.is_empty() {
            self.withdraw(update::withdraw_v4(&withdraw_v4), &withdraw_v4.map_ip());
        }
        if !withdraw_v6.is_empty() {
            self.withdraw(update::withdraw_v6(&withdraw_v6), &withdraw_v6.map_ip());
        }
        let announce: Vec<(IpAddr, bool)> = target
            .iter()
            .filter(|(p, g)| self.advertised.get(p) != Some(g))
            .map(|(&p, &g)| (p, g))
            .collect();
        self.announce(&announce);
    }

    fn withdraw(
        &mut self,
        messages: Result<Vec<Bytes>, rustbgpd_wire::EncodeError>,
        prefixes: &[IpAddr],
    ) {
        match messages {
            Ok(messages) => {
                self.tx.extend(messages);
                for p in prefixes {
                    self.advertised.remove(p);
                }
            }
            // The peer would keep a route we no longer want announced: end the session, which
            // withdraws everything (fail closed).
            Err(e) => self.fail(SessionError::Encode(e.to_string())),
        }
    }

    /// (Re)announces `routes`, grouped by family and graceful flag.
    fn announce(&mut self, routes: &[(IpAddr, bool)]) {
        for graceful in [false, true] {
            let v4: Vec<Ipv4Addr> = routes
                .iter()
                .filter_map(|&(p, g)| match p {
                    IpAddr::V4(a) if g == graceful => Some(a),
                    _ => None,
                })
                .collect();
            if let (false, Some(IpAddr::V4(nh))) = (v4.is_empty(), self.next_hop(V4)) {
                let attrs = update::path_attributes(&self.cfg, graceful, Some(nh));
                let messages = update::announce_v4(&attrs, &v4);
                self.announced(messages, &v4.map_ip(), graceful);
            }
            let v6: Vec<Ipv6Addr> = routes
                .iter()
                .filter_map(|&(p, g)| match p {
                    IpAddr::V6(a) if g == graceful => Some(a),
                    _ => None,
                })
                .collect();
            if let (false, Some(IpAddr::V6(nh))) = (v6.is_empty(), self.next_hop(V6)) {
                let attrs = update::path_attributes(&self.cfg, graceful, None);
                let messages = update::announce_v6(&attrs, nh, &v6);
                self.announced(messages, &v6.map_ip(), graceful);
            }
        }
    }

    fn announced(
        &mut self,
        messages: Result<Vec<Bytes>, rustbgpd_wire::EncodeError>,
        prefixes: &[IpAddr],
        graceful: bool,
    ) {
        match messages {
            Ok(messages) => {
                self.tx.extend(messages);
                for &p in prefixes {
                    self.advertised.insert(p, graceful);
                }
            }
            Err(e) => self.events.push_back(Event::Warning(format!(
                "could not encode an announcement of {} route(s): {e}",
                prefixes.len()
            ))),
        }
    }
}

/// Widening a list of addresses of one family to `IpAddr`.
trait MapIp {
    fn map_ip(&self) -> Vec<IpAddr>;
}

impl<A: Copy + Into<IpAddr>> MapIp for Vec<A> {
    fn map_ip(&self) -> Vec<IpAddr> {
        self.iter().map(|&a| a.into()).collect()
    }
}

fn usable_v4(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
}

fn usable_v6(a: Ipv6Addr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some())
}

fn message_name(msg: &Message) -> &'static str {
    match msg {
        Message::Open(_) => "OPEN",
        Message::Update(_) => "UPDATE",
        Message::Notification(_) => "NOTIFICATION",
        Message::Keepalive => "KEEPALIVE",
        Message::RouteRefresh(_) => "ROUTE-REFRESH",
        _ => "message",
    }
}
