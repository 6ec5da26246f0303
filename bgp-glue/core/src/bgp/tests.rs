//! In-memory tests: a fake peer built from the wire codec, fake time from one `Instant` base.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustbgpd_wire::{
    Afi, AsPathSegment, Capability, Message, NotificationCode, NotificationMessage, OpenMessage,
    PathAttribute, Prefix, RouteRefreshMessage, Safi, UpdateMessage, decode_message,
    encode_message, peek_message_length,
};

use super::*;
use crate::route::{Announcement, Community, GRACEFUL_SHUTDOWN};

const LOCAL_V4: &str = "192.0.2.1:40000";
const PEER_V4: &str = "192.0.2.2:179";
const LOCAL_V6: &str = "[2001:db8::1]:40000";
const PEER_V6: &str = "[2001:db8::2]:179";
const PEER_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const OUR_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().unwrap())
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().unwrap())
}

fn ann(prefix: IpAddr, graceful: bool) -> Announcement {
    Announcement { prefix, graceful }
}

fn ebgp() -> SessionConfig {
    SessionConfig::new(65001, 65000, OUR_ID)
}

fn ibgp() -> SessionConfig {
    SessionConfig::new(65000, 65000, OUR_ID)
}

fn peer_caps(asn: u32) -> Vec<Capability> {
    vec![
        Capability::MultiProtocol {
            afi: Afi::Ipv4,
            safi: Safi::Unicast,
        },
        Capability::MultiProtocol {
            afi: Afi::Ipv6,
            safi: Safi::Unicast,
        },
        Capability::RouteRefresh,
        Capability::FourOctetAs { asn },
    ]
}

fn peer_open(asn: u32, hold: u16) -> OpenMessage {
    OpenMessage {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
        hold_time: hold,
        bgp_identifier: PEER_ID,
        capabilities: peer_caps(asn),
    }
}

fn only_open(msgs: Vec<Message>) -> OpenMessage {
    match <[Message; 1]>::try_from(msgs) {
        Ok([Message::Open(open)]) => open,
        other => panic!("expected one OPEN, got {other:?}"),
    }
}

fn enc(msg: &Message) -> Vec<u8> {
    encode_message(msg).unwrap().to_vec()
}

/// Splits a byte stream into messages, checking the 4096-byte limit.
fn frames(mut buf: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = usize::from(
            peek_message_length(buf, 4096)
                .expect("session sent a bad header")
                .expect("session sent a partial header"),
        );
        assert!(len <= MAX_MESSAGE_LEN);
        let mut frame = Bytes::copy_from_slice(&buf[..len]);
        out.push(decode_message(&mut frame, 4096).expect("session sent an undecodable message"));
        buf = &buf[len..];
    }
    out
}

/// The fake peer's view of one session, with a fake clock.
struct Harness {
    s: Session,
    now: Instant,
}

impl Harness {
    fn new(cfg: SessionConfig) -> Harness {
        Harness::with_addrs(cfg, LOCAL_V4, PEER_V4)
    }

    fn with_addrs(cfg: SessionConfig, local: &str, peer: &str) -> Harness {
        let mut h = Harness {
            s: Session::new(cfg),
            now: Instant::now(),
        };
        h.connect(local, peer);
        h
    }

    fn connect(&mut self, local: &str, peer: &str) {
        self.s
            .connected(local.parse().unwrap(), peer.parse().unwrap(), self.now);
    }

    fn raw_sent(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = self.s.poll_transmit() {
            assert!(!b.is_empty());
            out.extend_from_slice(&b);
        }
        out
    }

    fn sent(&mut self) -> Vec<Message> {
        let raw = self.raw_sent();
        frames(&raw)
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.s.poll_event()).collect()
    }

    fn feed(&mut self, msg: &Message) {
        let bytes = enc(msg);
        self.s.receive(&bytes, self.now);
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.s.handle_timeout(self.now);
    }

    /// Answers our OPEN with `open` and a KEEPALIVE; returns what the session sent after its
    /// own OPEN (its KEEPALIVE, then any UPDATEs).
    fn establish_with(&mut self, open: OpenMessage) -> Vec<Message> {
        let sent = self.sent();
        assert!(matches!(sent.as_slice(), [Message::Open(_)]), "{sent:?}");
        self.feed(&Message::Open(open));
        assert_eq!(self.s.state(), State::OpenConfirm);
        self.feed(&Message::Keepalive);
        assert_eq!(self.s.state(), State::Established);
        let sent = self.sent();
        assert_eq!(sent.first(), Some(&Message::Keepalive));
        sent[1..].to_vec()
    }

    fn establish(&mut self) -> Vec<Message> {
        let asn = self.s.config().remote_as;
        self.establish_with(peer_open(asn, 90))
    }

    /// Expects the session to have sent exactly one NOTIFICATION and closed.
    fn expect_notification(&mut self, code: u8, subcode: u8) -> NotificationMessage {
        let sent = self.sent();
        let n = match sent.last() {
            Some(Message::Notification(n)) => n.clone(),
            other => panic!("expected NOTIFICATION {code}/{subcode}, got {other:?}"),
        };
        assert_eq!((n.code.as_u8(), n.subcode), (code, subcode), "{n:?}");
        assert_eq!(self.s.state(), State::Closing);
        assert!(self.s.should_close());
        assert!(self.s.advertised().is_empty());
        assert_eq!(self.s.poll_timeout(), None);
        let closed = self
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::Closed { .. }))
            .count();
        assert_eq!(closed, 1);
        n
    }
}

/// One decoded UPDATE.
#[derive(Debug, Default)]
struct Upd {
    attrs: Vec<PathAttribute>,
    v4: Vec<Ipv4Addr>,
    v4_withdrawn: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    v6_next_hop: Option<IpAddr>,
    v6_withdrawn: Vec<Ipv6Addr>,
}

impl Upd {
    fn as_path(&self) -> Option<Vec<u32>> {
        self.attrs.iter().find_map(|a| match a {
            PathAttribute::AsPath(p) => {
                assert!(
                    p.segments
                        .iter()
                        .all(|s| matches!(s, AsPathSegment::AsSequence(_)))
                );
                Some(p.asns().collect())
            }
            _ => None,
        })
    }
    fn next_hop(&self) -> Option<Ipv4Addr> {
        self.attrs.iter().find_map(|a| match a {
            PathAttribute::NextHop(n) => Some(*n),
            _ => None,
        })
    }
    fn local_pref(&self) -> Option<u32> {
        self.attrs.iter().find_map(|a| match a {
            PathAttribute::LocalPref(n) => Some(*n),
            _ => None,
        })
    }
    fn med(&self) -> Option<u32> {
        self.attrs.iter().find_map(|a| match a {
            PathAttribute::Med(n) => Some(*n),
            _ => None,
        })
    }
    fn communities(&self) -> Option<Vec<u32>> {
        self.attrs.iter().find_map(|a| match a {
            PathAttribute::Communities(c) => Some(c.clone()),
            _ => None,
        })
    }
    fn origin_igp(&self) -> bool {
        self.attrs
            .iter()
            .any(|a| matches!(a, PathAttribute::Origin(rustbgpd_wire::Origin::Igp)))
    }
    fn is_announcement(&self) -> bool {
        !self.v4.is_empty() || !self.v6.is_empty()
    }
}

fn upd(m: &Message) -> Upd {
    let Message::Update(u) = m else {
        panic!("expected UPDATE, got {m:?}")
    };
    let p = u.parse(true, false, &[]).expect("our UPDATE parses");
    let mut out = Upd {
        v4: p.announced.iter().map(|e| e.prefix.addr).collect(),
        v4_withdrawn: p.withdrawn.iter().map(|e| e.prefix.addr).collect(),
        ..Upd::default()
    };
    assert!(p.announced.iter().all(|e| e.prefix.len == 32));
    assert!(p.withdrawn.iter().all(|e| e.prefix.len == 32));
    for a in p.attributes {
        match a {
            PathAttribute::MpReachNlri(mp) => {
                assert_eq!((mp.afi, mp.safi), (Afi::Ipv6, Safi::Unicast));
                assert_eq!(mp.link_local_next_hop, None);
                out.v6_next_hop = Some(mp.next_hop);
                for e in &mp.announced {
                    let Prefix::V6(p) = e.prefix else {
                        panic!("v4 in MP_REACH")
                    };
                    assert_eq!(p.len, 128);
                    out.v6.push(p.addr);
                }
            }
            PathAttribute::MpUnreachNlri(mp) => {
                assert_eq!((mp.afi, mp.safi), (Afi::Ipv6, Safi::Unicast));
                for e in &mp.withdrawn {
                    let Prefix::V6(p) = e.prefix else {
                        panic!("v4 in MP_UNREACH")
                    };
                    out.v6_withdrawn.push(p.addr);
                }
            }
            other => out.attrs.push(other),
        }
    }
    out
}

fn upds(msgs: &[Message]) -> Vec<Upd> {
    msgs.iter().map(upd).collect()
}

fn closed_reason(events: &[Event]) -> Option<&CloseReason> {
    events.iter().find_map(|e| match e {
        Event::Closed { reason } => Some(reason),
        _ => None,
    })
}

fn warnings(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.as_str()),
            _ => None,
        })
        .collect()
}

// ---- OPEN and negotiation ------------------------------------------------------------------

#[test]
fn ebgp_happy_path() {
    let mut h = Harness::new(ebgp());
    assert_eq!(h.s.state(), State::OpenSent);
    let raw = h.raw_sent();
    let open = only_open(frames(&raw));
    assert_eq!(open.version, 4);
    assert_eq!(open.my_as, 65001);
    assert_eq!(open.hold_time, 9);
    assert_eq!(open.bgp_identifier, OUR_ID);
    for cap in [
        Capability::FourOctetAs { asn: 65001 },
        Capability::MultiProtocol {
            afi: Afi::Ipv4,
            safi: Safi::Unicast,
        },
        Capability::MultiProtocol {
            afi: Afi::Ipv6,
            safi: Safi::Unicast,
        },
        Capability::RouteRefresh,
    ] {
        assert!(open.capabilities.contains(&cap), "{cap:?} missing");
    }
    assert_eq!(open.capabilities.len(), 4);

    // Routes set before Established are remembered.
    h.s.set_routes(&[ann(v4("198.51.100.10"), false)]);
    assert!(h.sent().is_empty());

    h.feed(&Message::Open(peer_open(65000, 90)));
    assert_eq!(h.s.state(), State::OpenConfirm);
    assert_eq!(h.sent(), vec![Message::Keepalive]);
    assert!(h.events().is_empty());
    h.feed(&Message::Keepalive);
    assert_eq!(h.s.state(), State::Established);
    assert_eq!(
        h.events(),
        vec![Event::Established {
            hold_time: secs(9),
            families: (true, true)
        }]
    );
    let sent = upds(&h.sent());
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].v4,
        vec!["198.51.100.10".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(sent[0].next_hop(), Some("192.0.2.1".parse().unwrap()));
    assert_eq!(sent[0].as_path(), Some(vec![65001]));
    assert_eq!(sent[0].local_pref(), None, "no LOCAL_PREF on eBGP");
    assert_eq!(sent[0].med(), None);
    assert_eq!(sent[0].communities(), None);
    assert!(sent[0].origin_igp());
    assert_eq!(h.s.advertised(), vec![ann(v4("198.51.100.10"), false)]);
    assert_eq!(h.s.hold_time(), secs(9));
    assert!(!h.s.should_close());
}

#[test]
fn ibgp_happy_path() {
    let mut h = Harness::new(ibgp());
    h.s.set_routes(&[ann(v4("198.51.100.10"), false)]);
    let sent = upds(&h.establish());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].as_path(), Some(vec![]), "empty AS_PATH on iBGP");
    assert_eq!(sent[0].local_pref(), Some(100));
    assert_eq!(sent[0].next_hop(), Some("192.0.2.1".parse().unwrap()));
}

#[test]
fn four_octet_as_numbers() {
    let mut cfg = SessionConfig::new(4_200_000_001, 4_200_000_002, OUR_ID);
    cfg.graceful_prepend = 1;
    let mut h = Harness::new(cfg);
    h.s.set_routes(&[ann(v4("198.51.100.10"), true)]);
    let raw = h.raw_sent();
    let open = only_open(frames(&raw));
    assert_eq!(open.my_as, AS_TRANS);
    assert!(
        open.capabilities
            .contains(&Capability::FourOctetAs { asn: 4_200_000_001 })
    );
    h.feed(&Message::Open(peer_open(4_200_000_002, 90)));
    h.feed(&Message::Keepalive);
    assert_eq!(h.s.state(), State::Established);
    let sent = upds(&h.sent()[1..]);
    assert_eq!(sent[0].as_path(), Some(vec![4_200_000_001; 2]));
}

#[test]
fn graceful_restart_never_advertised() {
    for cfg in [ebgp(), ibgp(), SessionConfig::new(4_200_000_001, 1, OUR_ID)] {
        let mut h = Harness::new(cfg);
        let raw = h.raw_sent();
        let open = only_open(frames(&raw));
        for cap in &open.capabilities {
            assert!(
                !matches!(
                    cap,
                    Capability::GracefulRestart { .. }
                        | Capability::LongLivedGracefulRestart(_)
                        | Capability::ExtendedMessage
                ),
                "{cap:?}"
            );
        }
        // Code 64 (GR) and 71 (LLGR) do not appear in the optional parameters either.
        let params = &raw[29..];
        let mut i = 0;
        while i + 2 <= params.len() {
            let (ptype, plen) = (params[i], usize::from(params[i + 1]));
            assert_eq!(ptype, 2, "only capability parameters");
            let mut j = i + 2;
            while j + 2 <= i + 2 + plen {
                assert!(
                    ![64, 71, 6].contains(&params[j]),
                    "capability {}",
                    params[j]
                );
                j += 2 + usize::from(params[j + 1]);
            }
            i += 2 + plen;
        }
    }
}

#[test]
fn families_follow_config() {
    let mut cfg = ebgp();
    cfg.ipv6 = false;
    let mut h = Harness::new(cfg);
    let open = only_open(h.sent());
    assert!(!open.capabilities.contains(&Capability::MultiProtocol {
        afi: Afi::Ipv6,
        safi: Safi::Unicast
    }));
    h.feed(&Message::Open(peer_open(65000, 90)));
    h.feed(&Message::Keepalive);
    assert_eq!(h.s.families(), (true, false));
}

#[test]
fn v6_not_negotiated_means_no_v6_routes() {
    let mut open = peer_open(65000, 90);
    open.capabilities
        .retain(|c| !matches!(c, Capability::MultiProtocol { afi: Afi::Ipv6, .. }));
    let mut cfg = ebgp();
    cfg.next_hop_v4 = Some("192.0.2.1".parse().unwrap());
    let mut h = Harness::with_addrs(cfg, LOCAL_V6, PEER_V6);
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v6("2001:db8:1::10"), false),
    ]);
    let sent = upds(&h.establish_with(open));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].v4.len(), 1);
    assert!(sent[0].v6.is_empty());
    let events = h.events();
    assert!(matches!(
        events[0],
        Event::Established {
            families: (true, false),
            ..
        }
    ));
    let w = warnings(&events);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("IPv6") && w[0].contains("not negotiated"),
        "{w:?}"
    );
    assert_eq!(h.s.advertised(), vec![ann(v4("198.51.100.10"), false)]);

    // Further changes do not repeat the warning.
    h.s.set_routes(&[ann(v6("2001:db8:1::11"), false)]);
    assert!(warnings(&h.events()).is_empty());
    let sent = upds(&h.sent());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].v4_withdrawn.len(), 1);
}

#[test]
fn peer_without_mp_capability_implies_ipv4_unicast() {
    let mut h = Harness::new(ebgp());
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v6("2001:db8:1::10"), false),
    ]);
    let mut open = peer_open(65000, 90);
    open.capabilities = vec![Capability::FourOctetAs { asn: 65000 }];
    let sent = upds(&h.establish_with(open));
    assert_eq!(h.s.families(), (true, false));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].v4.len(), 1);
}

#[test]
fn bad_peer_as() {
    let mut h = Harness::new(ebgp());
    h.sent();
    h.feed(&Message::Open(peer_open(65099, 90)));
    h.expect_notification(2, 2);
    // 4-octet capability value wins over My AS.
    let mut h = Harness::new(ebgp());
    h.sent();
    let mut open = peer_open(65000, 90);
    open.capabilities = vec![Capability::FourOctetAs { asn: 65099 }];
    h.feed(&Message::Open(open));
    h.expect_notification(2, 2);
}

#[test]
fn unacceptable_hold_time() {
    for hold in [1, 2] {
        let mut h = Harness::new(ebgp());
        h.sent();
        h.feed(&Message::Open(peer_open(65000, hold)));
        h.expect_notification(2, 6);
    }
}

#[test]
fn bad_bgp_identifier() {
    let mut h = Harness::new(ebgp());
    h.sent();
    let mut open = peer_open(65000, 90);
    open.bgp_identifier = Ipv4Addr::UNSPECIFIED;
    h.feed(&Message::Open(open));
    h.expect_notification(2, 3);

    // Our own identifier: refused on iBGP, fine on eBGP.
    let mut h = Harness::new(ibgp());
    h.sent();
    let mut open = peer_open(65000, 90);
    open.bgp_identifier = OUR_ID;
    h.feed(&Message::Open(open.clone()));
    h.expect_notification(2, 3);

    let mut h = Harness::new(ebgp());
    open.my_as = 65000;
    h.establish_with(open);
}

#[test]
fn peer_without_four_octet_capability() {
    let mut h = Harness::new(ebgp());
    h.sent();
    let mut open = peer_open(65000, 90);
    open.capabilities
        .retain(|c| !matches!(c, Capability::FourOctetAs { .. }));
    h.feed(&Message::Open(open));
    let n = h.expect_notification(2, 7);
    assert_eq!(&n.data[..], &[65, 4, 0, 0, 0xFD, 0xE9]);
}

#[test]
fn unsupported_version() {
    let mut h = Harness::new(ebgp());
    h.sent();
    let mut bytes = enc(&Message::Open(peer_open(65000, 90)));
    bytes[19] = 3;
    h.s.receive(&bytes, h.now);
    let n = h.expect_notification(2, 1);
    assert_eq!(&n.data[..], &[0, 4]);
}

#[test]
fn negotiated_hold_time_is_the_smaller() {
    let mut h = Harness::new(ebgp());
    h.establish_with(peer_open(65000, 3));
    assert_eq!(h.s.hold_time(), secs(3));
    let mut cfg = ebgp();
    cfg.hold_time = secs(30);
    let mut h = Harness::new(cfg);
    h.establish_with(peer_open(65000, 90));
    assert_eq!(h.s.hold_time(), secs(30));
}

#[test]
fn invalid_config_refuses_to_start() {
    let mut cfg = ebgp();
    cfg.hold_time = secs(2);
    let mut h = Harness::new(cfg);
    assert!(h.sent().is_empty());
    assert!(h.s.should_close());
    assert!(matches!(
        closed_reason(&h.events()),
        Some(CloseReason::InvalidConfig(ConfigError::HoldTime(_)))
    ));
    assert_eq!(
        SessionConfig::new(0, 1, OUR_ID).validate(),
        Err(ConfigError::ReservedAs { which: "local" })
    );
    assert_eq!(
        SessionConfig::new(1, 1, Ipv4Addr::UNSPECIFIED).validate(),
        Err(ConfigError::ZeroRouterId)
    );
    let mut cfg = ebgp();
    cfg.ipv4 = false;
    cfg.ipv6 = false;
    assert_eq!(cfg.validate(), Err(ConfigError::NoFamily));
    cfg.ipv4 = true;
    cfg.communities = vec![Community(1); MAX_COMMUNITIES + 1];
    assert!(cfg.validate().is_err());
    cfg.communities.truncate(MAX_COMMUNITIES);
    cfg.hold_time = Duration::ZERO;
    assert_eq!(cfg.validate(), Ok(()));
}

// ---- UPDATE contents ------------------------------------------------------------------------

#[test]
fn ebgp_update_attributes() {
    let mut cfg = ebgp();
    cfg.med = Some(50);
    cfg.communities = vec![Community::new(65001, 100), Community::new(65001, 200)];
    cfg.graceful_prepend = 3;
    cfg.next_hop_v6 = Some("2001:db8::99".parse().unwrap());
    cfg.local_pref = 300; // ignored on eBGP
    let mut h = Harness::new(cfg);
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v4("198.51.100.11"), false),
        ann(v4("198.51.100.12"), true),
        ann(v6("2001:db8:1::10"), false),
        ann(v6("2001:db8:1::11"), true),
    ]);
    let sent = upds(&h.establish());
    assert_eq!(sent.len(), 4, "one UPDATE per (family, graceful)");
    let plain = [65001 << 16 | 100, 65001 << 16 | 200];
    let graceful = [65001 << 16 | 100, 65001 << 16 | 200, 0xFFFF_0000];
    for u in &sent {
        assert!(u.origin_igp());
        assert_eq!(u.med(), Some(50));
        assert_eq!(u.local_pref(), None);
        let is_graceful = u.v4.contains(&"198.51.100.12".parse().unwrap())
            || u.v6.contains(&"2001:db8:1::11".parse().unwrap());
        if is_graceful {
            assert_eq!(u.as_path(), Some(vec![65001; 4]));
            assert_eq!(u.communities(), Some(graceful.to_vec()));
        } else {
            assert_eq!(u.as_path(), Some(vec![65001]));
            assert_eq!(u.communities(), Some(plain.to_vec()));
        }
        if u.v6.is_empty() {
            assert_eq!(u.next_hop(), Some("192.0.2.1".parse().unwrap()));
            assert_eq!(u.v6_next_hop, None);
        } else {
            assert!(u.v4.is_empty());
            assert_eq!(u.next_hop(), None, "no classic NEXT_HOP with only MP_REACH");
            assert_eq!(u.v6_next_hop, Some(v6("2001:db8::99")));
        }
    }
    let v4_plain = sent.iter().find(|u| u.v4.len() == 2).expect("grouped");
    assert_eq!(
        v4_plain.v4,
        vec![
            "198.51.100.10".parse::<Ipv4Addr>().unwrap(),
            "198.51.100.11".parse().unwrap()
        ]
    );
    assert_eq!(h.s.advertised().len(), 5);
}

#[test]
fn ibgp_graceful_sets_local_pref_zero_without_prepend() {
    let mut cfg = ibgp();
    cfg.graceful_prepend = 3;
    cfg.local_pref = 200;
    cfg.communities = vec![GRACEFUL_SHUTDOWN];
    let mut h = Harness::new(cfg);
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v4("198.51.100.11"), true),
    ]);
    let sent = upds(&h.establish());
    assert_eq!(sent.len(), 2);
    for u in &sent {
        assert_eq!(u.as_path(), Some(vec![]));
        if u.v4[0] == "198.51.100.11".parse::<Ipv4Addr>().unwrap() {
            assert_eq!(u.local_pref(), Some(0));
        } else {
            assert_eq!(u.local_pref(), Some(200));
        }
        // Configured GRACEFUL_SHUTDOWN is not duplicated.
        assert_eq!(u.communities(), Some(vec![0xFFFF_0000]));
    }
}

#[test]
fn v6_next_hop_self_over_v6_session() {
    let mut h = Harness::with_addrs(ebgp(), LOCAL_V6, PEER_V6);
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v6("2001:db8:1::10"), false),
    ]);
    let sent = upds(&h.establish());
    // No IPv4 next hop on an IPv6 session without an override: IPv4 is held back.
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].v6_next_hop, Some(v6("2001:db8::1")));
    let w = h.events();
    let w = warnings(&w);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("IPv4 next hop"), "{w:?}");
    assert_eq!(h.s.advertised(), vec![ann(v6("2001:db8:1::10"), false)]);
}

#[test]
fn no_v6_next_hop_over_v4_session_or_link_local() {
    let mut h = Harness::new(ebgp());
    h.s.set_routes(&[ann(v6("2001:db8:1::10"), false)]);
    assert!(h.establish().is_empty());
    assert_eq!(warnings(&h.events()).len(), 1);
    assert!(h.s.advertised().is_empty());

    let mut h = Harness::with_addrs(ebgp(), "[fe80::1%2]:40000", "[fe80::2%2]:179");
    h.s.set_routes(&[ann(v6("2001:db8:1::10"), false)]);
    assert!(h.establish().is_empty());
    assert_eq!(warnings(&h.events()).len(), 1);
}

#[test]
fn v4_mapped_local_address_is_an_ipv4_next_hop() {
    let mut h = Harness::with_addrs(ebgp(), "[::ffff:192.0.2.1]:40000", "[::ffff:192.0.2.2]:179");
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v6("2001:db8:1::10"), false),
    ]);
    let sent = upds(&h.establish());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].next_hop(), Some("192.0.2.1".parse().unwrap()));
}

#[test]
fn withdraw_and_change_diffs() {
    let mut cfg = ebgp();
    cfg.next_hop_v4 = Some("192.0.2.1".parse().unwrap());
    let mut h = Harness::with_addrs(cfg, LOCAL_V6, PEER_V6);
    let (a, b, c) = (v4("198.51.100.1"), v4("198.51.100.2"), v6("2001:db8:1::1"));
    h.s.set_routes(&[ann(a, false), ann(b, false), ann(c, false)]);
    assert_eq!(upds(&h.establish()).len(), 2);

    // Same set again: nothing to send.
    h.s.set_routes(&[ann(c, false), ann(b, false), ann(a, false)]);
    assert!(h.sent().is_empty());

    // Drop b and c: only those are withdrawn, v4 in the classic field, v6 in MP_UNREACH.
    h.s.set_routes(&[ann(a, false)]);
    let sent = upds(&h.sent());
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].v4_withdrawn,
        vec!["198.51.100.2".parse::<Ipv4Addr>().unwrap()]
    );
    assert!(sent[0].attrs.is_empty() && !sent[0].is_announcement());
    assert_eq!(
        sent[1].v6_withdrawn,
        vec!["2001:db8:1::1".parse::<Ipv6Addr>().unwrap()]
    );
    assert!(sent[1].attrs.is_empty() && !sent[1].is_announcement());
    assert_eq!(h.s.advertised(), vec![ann(a, false)]);

    // a turns graceful: re-announced with the graceful attributes, nothing withdrawn.
    h.s.set_routes(&[ann(a, true)]);
    let sent = upds(&h.sent());
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].v4,
        vec!["198.51.100.1".parse::<Ipv4Addr>().unwrap()]
    );
    assert!(sent[0].communities().unwrap().contains(&0xFFFF_0000));
    assert_eq!(h.s.advertised(), vec![ann(a, true)]);

    // A duplicate entry counts once, graceful if any copy is.
    h.s.set_routes(&[ann(a, true), ann(a, false)]);
    assert!(h.sent().is_empty());

    // Empty set: withdraw everything.
    h.s.set_routes(&[]);
    let sent = upds(&h.sent());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].v4_withdrawn.len(), 1);
    assert!(h.s.advertised().is_empty());
}

#[test]
fn many_routes_split_within_message_limit() {
    let mut cfg = ebgp();
    cfg.communities = (0..40).map(|i| Community::new(65001, i)).collect();
    cfg.next_hop_v6 = Some("2001:db8::1".parse().unwrap());
    let mut h = Harness::new(cfg);
    let mut routes = Vec::new();
    for i in 0..3000u32 {
        routes.push(ann(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)), i % 3 == 0));
    }
    for i in 0..1000u128 {
        routes.push(ann(
            IpAddr::V6(Ipv6Addr::from(0x2001_0db8_0001_u128 << 80 | i)),
            false,
        ));
    }
    h.s.set_routes(&routes);
    h.sent();
    h.feed(&Message::Open(peer_open(65000, 90)));
    h.feed(&Message::Keepalive);
    let raw = h.raw_sent();
    let msgs = frames(&raw); // checks every message is <= 4096 bytes
    let sent = upds(&msgs[1..]);
    assert!(sent.len() >= 6, "{} UPDATEs", sent.len());
    let mut v4: Vec<Ipv4Addr> = sent.iter().flat_map(|u| u.v4.clone()).collect();
    let mut v6: Vec<Ipv6Addr> = sent.iter().flat_map(|u| u.v6.clone()).collect();
    v4.sort();
    v6.sort();
    v4.dedup();
    v6.dedup();
    assert_eq!(v4.len(), 3000);
    assert_eq!(v6.len(), 1000);
    assert_eq!(
        sent.iter().map(|u| u.v4.len() + u.v6.len()).sum::<usize>(),
        4000
    );
    // Messages are reasonably full, not one prefix each.
    assert!(sent.len() < 20, "{} UPDATEs", sent.len());
    assert_eq!(h.s.advertised().len(), 4000);

    h.s.set_routes(&[]);
    let raw = h.raw_sent();
    let sent = upds(&frames(&raw));
    assert_eq!(
        sent.iter()
            .map(|u| u.v4_withdrawn.len() + u.v6_withdrawn.len())
            .sum::<usize>(),
        4000
    );
    assert!(sent.len() >= 9, "{} withdrawals", sent.len()); // 3000/814 + 1000/239
    assert!(h.s.advertised().is_empty());
}

// ---- timers ---------------------------------------------------------------------------------

#[test]
fn keepalive_cadence() {
    let mut h = Harness::new(ebgp());
    let t0 = h.now;
    h.establish_with(peer_open(65000, 90));
    // Negotiated 9 s: keepalives every 3 s, counted from the KEEPALIVE that answered the OPEN.
    assert_eq!(h.s.poll_timeout(), Some(t0 + secs(3)));
    let mut keepalives = 0;
    for step in 1..=30 {
        h.advance(secs(1));
        if step % 2 == 0 {
            h.feed(&Message::Keepalive); // the peer keeps the hold timer alive
        }
        let sent = h.sent();
        assert!(sent.iter().all(|m| *m == Message::Keepalive));
        if step % 3 == 0 {
            assert_eq!(sent.len(), 1, "keepalive due at {step} s");
        } else {
            assert!(sent.is_empty(), "early keepalive at {step} s");
        }
        keepalives += sent.len();
    }
    assert_eq!(keepalives, 10);
    assert_eq!(h.s.state(), State::Established);
    // Calling early does nothing.
    h.s.handle_timeout(h.now);
    assert!(h.sent().is_empty());
}

#[test]
fn hold_timer_expiry() {
    let mut h = Harness::new(ebgp());
    h.establish();
    // A message at 8 s pushes expiry to 17 s.
    h.advance(secs(8));
    h.feed(&Message::Keepalive);
    h.advance(secs(8));
    assert_eq!(h.s.state(), State::Established);
    h.sent();
    let deadline = h.s.poll_timeout().unwrap();
    assert!(deadline <= h.now + secs(1));
    h.advance(secs(1));
    let sent = h.sent();
    let Some(Message::Notification(n)) = sent.last() else {
        panic!("{sent:?}")
    };
    assert_eq!((n.code, n.subcode), (NotificationCode::HoldTimerExpired, 0));
    assert_eq!(h.s.state(), State::Closing);
    assert!(h.s.should_close());
    assert_eq!(
        closed_reason(&h.events()),
        Some(&CloseReason::HoldTimerExpired)
    );
    // Nothing more happens once closing.
    h.advance(secs(100));
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
}

#[test]
fn open_wait_expiry() {
    let mut h = Harness::new(ebgp());
    h.sent();
    // 4 × 9 s = 36 s to get the peer's OPEN.
    assert_eq!(h.s.poll_timeout(), Some(h.now + secs(36)));
    h.advance(secs(35));
    assert_eq!(h.s.state(), State::OpenSent);
    h.advance(secs(1));
    h.expect_notification(4, 0);
}

#[test]
fn zero_hold_time_means_no_keepalives() {
    // Only when we propose 0 ourselves: see peer_zero_hold_time_is_refused.
    let mut cfg = ebgp();
    cfg.hold_time = Duration::ZERO;
    let mut h = Harness::new(cfg);
    h.establish_with(peer_open(65000, 0));
    assert_eq!(h.s.hold_time(), Duration::ZERO);
    assert!(matches!(
        h.events()[0],
        Event::Established {
            hold_time: Duration::ZERO,
            ..
        }
    ));
    assert_eq!(h.s.poll_timeout(), None);
    h.advance(secs(3600));
    assert!(h.sent().is_empty());
    assert_eq!(h.s.state(), State::Established);
}

#[test]
fn peer_zero_hold_time_is_refused() {
    // We want keepalives; a peer proposing 0 would switch liveness detection off on both
    // sides, and a powered-off host would keep its routes. Refused with 2/6.
    let mut h = Harness::new(ebgp());
    let sent = h.sent();
    assert!(matches!(sent.as_slice(), [Message::Open(_)]));
    h.feed(&Message::Open(peer_open(65000, 0)));
    h.expect_notification(2, 6);
    assert!(h.s.should_close());
    assert!(h.s.advertised().is_empty());
}

// ---- robustness -----------------------------------------------------------------------------

/// A deterministic byte generator (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_input_is_refused_without_panicking() {
    for seed in 0..200 {
        let mut h = Harness::new(ebgp());
        h.sent();
        let garbage = noise(seed, 1 + (seed as usize * 37) % 3000);
        h.s.receive(&garbage, h.now);
        if garbage.len() >= 19 {
            h.expect_notification(1, 1);
        } else {
            assert_eq!(h.s.state(), State::OpenSent);
        }
    }
    // Garbage after Established, with a valid marker in front.
    for seed in 0..200 {
        let mut h = Harness::new(ebgp());
        h.establish();
        let mut bytes = vec![0xFF; 16];
        bytes.extend(noise(seed, 3 + seed as usize % 200));
        h.s.receive(&bytes, h.now);
        h.s.handle_timeout(h.now);
        while h.s.poll_transmit().is_some() {}
        // Either waiting for more bytes or closed with a NOTIFICATION; never a panic.
        if h.s.state() == State::Closing {
            assert!(h.s.should_close());
        }
    }
}

/// A full conversation from the peer, as one byte stream.
fn peer_stream() -> Vec<u8> {
    let mut update = BytesMut::new();
    UpdateMessage::build(
        &[rustbgpd_wire::Ipv4NlriEntry {
            path_id: 0,
            prefix: rustbgpd_wire::Ipv4Prefix::new("203.0.113.0".parse().unwrap(), 24),
        }],
        &[],
        &[
            PathAttribute::Origin(rustbgpd_wire::Origin::Igp),
            PathAttribute::AsPath(rustbgpd_wire::AsPath {
                segments: vec![AsPathSegment::AsSequence(vec![65000])],
            }),
            PathAttribute::NextHop("192.0.2.2".parse().unwrap()),
        ],
        true,
        false,
        rustbgpd_wire::Ipv4UnicastMode::Body,
    )
    .encode(&mut update)
    .unwrap();
    let mut s = enc(&Message::Open(peer_open(65000, 90)));
    s.extend(enc(&Message::Keepalive));
    s.extend(&update);
    s.extend(enc(&Message::Keepalive));
    s.extend(enc(&Message::RouteRefresh(RouteRefreshMessage::new(
        Afi::Ipv4,
        Safi::Unicast,
    ))));
    s
}

fn run_chunked(chunks: &[&[u8]]) -> (Vec<Message>, Vec<Event>, State) {
    let mut h = Harness::new(ebgp());
    h.s.set_routes(&[ann(v4("198.51.100.10"), false)]);
    for c in chunks {
        h.s.receive(c, h.now);
    }
    (h.sent(), h.events(), h.s.state())
}

#[test]
fn input_split_at_every_byte_boundary() {
    let stream = peer_stream();
    let whole = run_chunked(&[&stream]);
    assert_eq!(whole.2, State::Established);
    // OPEN, KEEPALIVE, UPDATE, UPDATE again for the route refresh.
    assert_eq!(whole.0.len(), 4, "{:?}", whole.0);
    assert_eq!(whole.0[2], whole.0[3]);
    for at in 0..=stream.len() {
        let (a, b) = stream.split_at(at);
        assert_eq!(run_chunked(&[a, b]), whole, "split at {at}");
    }
    for at in 0..stream.len() {
        let (a, rest) = stream.split_at(at);
        let (b, c) = rest.split_at(rest.len().min(7));
        assert_eq!(run_chunked(&[a, b, c]), whole, "split at {at}+7");
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run_chunked(&bytes), whole, "byte by byte");
}

fn header(len: u16, ty: u8) -> Vec<u8> {
    let mut h = vec![0xFF; 16];
    h.extend(len.to_be_bytes());
    h.push(ty);
    h
}

#[test]
fn bad_lengths_and_types() {
    // (bytes, expected code/subcode)
    let cases: Vec<(Vec<u8>, (u8, u8))> = vec![
        (header(18, 4), (1, 2)),
        (header(0, 4), (1, 2)),
        (header(4097, 2), (1, 2)),
        (header(u16::MAX, 2), (1, 2)),
        ([header(20, 4), vec![0]].concat(), (1, 2)), // KEEPALIVE must be exactly 19
        (header(19, 9), (1, 3)),
        (header(19, 0), (1, 3)),
        (
            {
                let mut b = header(19, 4);
                b[3] = 0;
                b
            },
            (1, 1),
        ),
    ];
    for (bytes, (code, subcode)) in cases {
        let mut h = Harness::new(ebgp());
        h.establish();
        h.s.receive(&bytes, h.now);
        h.expect_notification(code, subcode);
    }
    // An oversized length reports the length in the data.
    let mut h = Harness::new(ebgp());
    h.establish();
    h.s.receive(&header(5000, 2), h.now);
    assert_eq!(
        &h.expect_notification(1, 2).data[..],
        &5000u16.to_be_bytes()
    );
}

#[test]
fn truncated_message_waits_for_more() {
    let mut h = Harness::new(ebgp());
    h.establish();
    let mut bytes = header(100, 2);
    bytes.extend([0xFF; 2]); // withdrawn routes length: far past the body
    bytes.extend([0u8; 38]);
    h.s.receive(&bytes, h.now);
    assert_eq!(h.s.state(), State::Established);
    assert!(h.sent().is_empty());
    // The rest of a malformed UPDATE arrives: withdrawn length runs past the body.
    h.s.receive(&[0xFF; 41], h.now);
    let n = h.expect_notification(3, 1);
    assert_eq!(n.code, NotificationCode::UpdateMessage);
}

#[test]
fn malformed_update_body() {
    // UPDATE whose NLRI has a prefix length of 33.
    let mut h = Harness::new(ebgp());
    h.establish();
    let mut bytes = header(19 + 4 + 2, 2);
    bytes.extend([0, 0, 0, 0, 33, 1]);
    h.s.receive(&bytes, h.now);
    h.expect_notification(3, 10);
}

#[test]
fn received_routes_are_ignored() {
    let mut h = Harness::new(ebgp());
    h.establish();
    h.events();
    let stream = peer_stream();
    // Skip OPEN (and the KEEPALIVE after it): feed UPDATE, KEEPALIVE.
    let open_len = enc(&Message::Open(peer_open(65000, 90))).len();
    let rr_len = 23;
    h.s.receive(&stream[open_len + 19..stream.len() - rr_len], h.now);
    assert_eq!(h.s.state(), State::Established);
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
}

#[test]
fn unexpected_messages_before_established() {
    let update = Message::Update(UpdateMessage {
        withdrawn_routes: Bytes::new(),
        path_attributes: Bytes::new(),
        nlri: Bytes::new(),
    });
    let rr = Message::RouteRefresh(RouteRefreshMessage::new(Afi::Ipv4, Safi::Unicast));
    for msg in [&update, &Message::Keepalive, &rr] {
        let mut h = Harness::new(ebgp());
        h.sent();
        h.feed(msg);
        h.expect_notification(5, 1);
    }
    for msg in [&update, &rr, &Message::Open(peer_open(65000, 90))] {
        let mut h = Harness::new(ebgp());
        h.sent();
        h.feed(&Message::Open(peer_open(65000, 90)));
        h.sent();
        h.feed(msg);
        h.expect_notification(5, 2);
    }
    let mut h = Harness::new(ebgp());
    h.establish();
    h.feed(&Message::Open(peer_open(65000, 90)));
    let n = h.expect_notification(5, 3);
    assert!(matches!(n.code, NotificationCode::FsmError));
}

#[test]
fn peer_notification_closes() {
    let mut h = Harness::new(ebgp());
    h.s.set_routes(&[ann(v4("198.51.100.10"), false)]);
    h.establish();
    assert_eq!(h.s.advertised().len(), 1);
    h.events();
    let data = rustbgpd_wire::notification::encode_shutdown_communication("maintenance");
    h.feed(&Message::Notification(NotificationMessage::new(
        NotificationCode::Cease,
        2,
        data.clone(),
    )));
    assert!(h.sent().is_empty(), "no NOTIFICATION in reply to one");
    assert_eq!(h.s.state(), State::Closing);
    assert!(h.s.should_close());
    assert!(h.s.advertised().is_empty());
    let events = h.events();
    assert_eq!(
        closed_reason(&events),
        Some(&CloseReason::PeerNotification {
            code: 6,
            subcode: 2,
            data,
            message: Some("maintenance".into()),
        })
    );
    // Further input is ignored.
    h.feed(&Message::Keepalive);
    assert!(h.sent().is_empty());

    // In OpenSent, too.
    let mut h = Harness::new(ebgp());
    h.sent();
    h.feed(&Message::Notification(NotificationMessage::new(
        NotificationCode::OpenMessage,
        2,
        Bytes::new(),
    )));
    assert!(matches!(
        closed_reason(&h.events()),
        Some(CloseReason::PeerNotification {
            code: 2,
            subcode: 2,
            message: None,
            ..
        })
    ));
}

// ---- route refresh, shutdown, reconnect ------------------------------------------------------

#[test]
fn route_refresh_resends_current_routes() {
    let mut cfg = ebgp();
    cfg.next_hop_v6 = Some("2001:db8::1".parse().unwrap());
    let mut h = Harness::new(cfg);
    h.s.set_routes(&[
        ann(v4("198.51.100.10"), false),
        ann(v4("198.51.100.11"), true),
        ann(v6("2001:db8:1::10"), false),
    ]);
    let first = h.establish();
    assert_eq!(first.len(), 3);
    h.feed(&Message::RouteRefresh(RouteRefreshMessage::new(
        Afi::Ipv4,
        Safi::Unicast,
    )));
    let again = h.sent();
    let v4_first: Vec<_> = first
        .iter()
        .filter(|m| upd(m).v6.is_empty())
        .cloned()
        .collect();
    assert_eq!(again, v4_first);
    h.feed(&Message::RouteRefresh(RouteRefreshMessage::new(
        Afi::Ipv6,
        Safi::Unicast,
    )));
    let again = upds(&h.sent());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].v6.len(), 1);
    // Unknown family or an enhanced-refresh marker: ignored, session stays up.
    h.feed(&Message::RouteRefresh(RouteRefreshMessage::new(
        Afi::L2Vpn,
        Safi::Evpn,
    )));
    h.feed(&Message::RouteRefresh(
        RouteRefreshMessage::new_with_subtype(
            Afi::Ipv4,
            Safi::Unicast,
            rustbgpd_wire::RouteRefreshSubtype::BoRR,
        ),
    ));
    assert!(h.sent().is_empty());
    assert_eq!(h.s.state(), State::Established);
}

#[test]
fn shutdown_sends_cease_administrative_shutdown() {
    let mut h = Harness::new(ebgp());
    h.s.set_routes(&[ann(v4("198.51.100.10"), false)]);
    h.establish();
    h.events();
    h.s.shutdown_with_message("draining", h.now);
    let n = h.expect_notification(6, 2);
    assert_eq!(
        rustbgpd_wire::notification::decode_shutdown_communication(&n.data).as_deref(),
        Some("draining")
    );
    // Shutting down twice, or while idle, does nothing.
    h.s.shutdown(h.now);
    assert!(h.sent().is_empty());
    let mut idle = Session::new(ebgp());
    idle.shutdown(h.now);
    assert_eq!(idle.state(), State::Idle);
    assert!(idle.poll_transmit().is_none());

    // Plain shutdown carries no data; works in OpenSent too.
    let mut h = Harness::new(ebgp());
    h.sent();
    h.s.shutdown(h.now);
    assert!(h.expect_notification(6, 2).data.is_empty());
}

#[test]
fn disconnect_then_reconnect_resends_everything() {
    let mut h = Harness::new(ebgp());
    let routes = [
        ann(v4("198.51.100.10"), false),
        ann(v4("198.51.100.11"), true),
    ];
    h.s.set_routes(&routes);
    let first = h.establish();
    assert_eq!(first.len(), 2);
    h.events();
    h.advance(secs(1));
    h.s.disconnected(h.now);
    assert_eq!(h.s.state(), State::Idle);
    assert!(h.s.advertised().is_empty());
    assert!(!h.s.should_close());
    assert_eq!(h.s.poll_timeout(), None);
    assert_eq!(
        h.events(),
        vec![Event::Closed {
            reason: CloseReason::TransportClosed
        }]
    );
    // Nothing happens while idle.
    h.s.receive(&enc(&Message::Keepalive), h.now);
    h.advance(secs(100));
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());

    h.connect(LOCAL_V4, PEER_V4);
    let again = h.establish();
    assert_eq!(again, first);
    assert_eq!(h.s.advertised(), routes.to_vec());

    // A new connection while one is up replaces it.
    h.events();
    h.connect(LOCAL_V4, PEER_V4);
    assert_eq!(
        h.events(),
        vec![Event::Closed {
            reason: CloseReason::TransportClosed
        }]
    );
    assert_eq!(h.s.state(), State::OpenSent);
    assert!(h.s.advertised().is_empty());
    assert_eq!(h.establish(), first);

    // After a close the session does not report the end twice.
    h.s.shutdown(h.now);
    h.events();
    h.s.disconnected(h.now);
    assert!(h.events().is_empty());
    assert_eq!(h.s.state(), State::Idle);
}

#[test]
fn transmit_coalesces_in_order() {
    let mut h = Harness::new(ebgp());
    h.s.set_routes(&[ann(v4("198.51.100.10"), false)]);
    h.sent();
    h.feed(&Message::Open(peer_open(65000, 90)));
    h.feed(&Message::Keepalive);
    let chunk = h.s.poll_transmit().unwrap();
    assert!(h.s.poll_transmit().is_none());
    let msgs = frames(&chunk);
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0], Message::Keepalive);
}

#[test]
fn errors_display() {
    let e = SessionError::BadPeerAs {
        expected: 1,
        got: 2,
    };
    assert_eq!(e.notification().0, 2);
    assert!(CloseReason::from(e).to_string().contains("peer AS 2"));
    let r = CloseReason::PeerNotification {
        code: 6,
        subcode: 2,
        data: Bytes::new(),
        message: Some("bye".into()),
    };
    assert_eq!(r.to_string(), "peer sent NOTIFICATION 6/2: \"bye\"");
    assert_eq!(State::OpenConfirm.to_string(), "OpenConfirm");
    let _: SocketAddr = PEER_V4.parse().unwrap();
}
