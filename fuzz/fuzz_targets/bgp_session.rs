//! Fuzzes the originate-only BGP session state machine.
//!
//! The first byte picks the configuration (iBGP/eBGP, 4-octet AS, families, graceful routes) and
//! whether a valid OPEN + KEEPALIVE from the peer comes first (so the fuzzer reaches Established
//! cheaply). The rest is a script: each step takes an opcode byte and either feeds the next
//! `n` bytes to `receive`, advances the fake clock and runs `handle_timeout`, changes the route
//! set, or calls `shutdown`/`disconnected`/`connected`.
//!
//! Invariants: nothing panics; everything the session transmits frames into well-formed BGP
//! messages of at most 4096 bytes that the codec decodes; a closing session reports
//! `should_close` and nothing advertised; `advertised()` is always a subset of the routes set
//! and empty unless Established; `poll_timeout` is never in the past after `handle_timeout`.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ringmail_announce_core::bgp::{Session, SessionConfig, State};
use ringmail_announce_core::{Announcement, Community};
use rustbgpd_wire::{
    Afi, Capability, Message, OpenMessage, Safi, decode_message, encode_message,
    peek_message_length,
};

fn check_transmit(s: &mut Session) {
    let mut out = Vec::new();
    while let Some(b) = s.poll_transmit() {
        assert!(!b.is_empty());
        out.extend_from_slice(&b);
    }
    let mut rest = &out[..];
    while !rest.is_empty() {
        let len = match peek_message_length(rest, 4096) {
            Ok(Some(len)) => usize::from(len),
            other => panic!("session sent a bad header: {other:?}"),
        };
        assert!(len <= 4096 && len <= rest.len(), "partial message sent");
        let mut frame = bytes::Bytes::copy_from_slice(&rest[..len]);
        if let Err(e) = decode_message(&mut frame, 4096) {
            panic!("session sent an undecodable message: {e}");
        }
        rest = &rest[len..];
    }
}

fn routes(seed: u8, graceful: bool) -> Vec<Announcement> {
    (0..seed % 8)
        .map(|i| {
            let prefix = if (seed >> 3) & (1 << (i % 4)) != 0 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(i)))
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, i))
            };
            Announcement {
                prefix,
                graceful: graceful && i % 2 == 0,
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut script)) = data.split_first() else {
        return;
    };
    let local_as = if flags & 1 != 0 { 4_200_000_001 } else { 65001 };
    let remote_as = if flags & 2 != 0 { local_as } else { 65000 };
    let mut cfg = SessionConfig::new(local_as, remote_as, Ipv4Addr::new(192, 0, 2, 1));
    cfg.ipv6 = flags & 4 == 0;
    cfg.med = (flags & 8 != 0).then_some(10);
    cfg.communities = vec![Community::new(65001, 1)];
    cfg.graceful_prepend = 2;
    cfg.next_hop_v6 = (flags & 16 != 0).then(|| "2001:db8::1".parse().unwrap());
    let local: SocketAddr = if flags & 32 != 0 {
        "[2001:db8::1]:40000".parse().unwrap()
    } else {
        "192.0.2.1:40000".parse().unwrap()
    };
    let peer: SocketAddr = "192.0.2.2:179".parse().unwrap();

    let base = Instant::now();
    let mut now = base;
    let mut s = Session::new(cfg);
    let mut desired = routes(flags, flags & 128 != 0);
    s.set_routes(&desired);
    s.connected(local, peer, now);

    if flags & 64 != 0 {
        let open = OpenMessage {
            version: 4,
            my_as: u16::try_from(remote_as).unwrap_or(23456),
            hold_time: 90,
            bgp_identifier: Ipv4Addr::new(192, 0, 2, 2),
            capabilities: vec![
                Capability::MultiProtocol {
                    afi: Afi::Ipv4,
                    safi: Safi::Unicast,
                },
                Capability::MultiProtocol {
                    afi: Afi::Ipv6,
                    safi: Safi::Unicast,
                },
                Capability::FourOctetAs { asn: remote_as },
            ],
        };
        let mut hello = encode_message(&Message::Open(open)).unwrap().to_vec();
        hello.extend_from_slice(&encode_message(&Message::Keepalive).unwrap());
        s.receive(&hello, now);
        assert_eq!(s.state(), State::Established);
    }

    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        match op % 8 {
            // Half the steps feed bytes: up to 30 of them, or everything left.
            0..=3 => {
                let n = if op >> 3 == 31 {
                    script.len()
                } else {
                    usize::from(op >> 3).min(script.len())
                };
                let (chunk, rest) = script.split_at(n);
                script = rest;
                s.receive(chunk, now);
            }
            4 => {
                now += Duration::from_millis(u64::from(op >> 3) * 500);
                s.handle_timeout(now);
                if let Some(t) = s.poll_timeout() {
                    assert!(
                        t > now,
                        "deadline {t:?} not after handle_timeout at {now:?}"
                    );
                }
            }
            5 => {
                desired = routes(op >> 3 | (op & 0x80), op & 0x40 != 0);
                s.set_routes(&desired);
            }
            6 => match op >> 3 {
                0 => s.shutdown(now),
                1 => s.shutdown_with_message("fuzz", now),
                2 => s.disconnected(now),
                3 => s.connected(local, peer, now),
                _ => {}
            },
            _ => while s.poll_event().is_some() {},
        }
        check_transmit(&mut s);
        if s.state() == State::Closing {
            assert!(s.should_close());
        }
        let advertised = s.advertised();
        if s.state() != State::Established {
            assert!(advertised.is_empty());
        }
        for a in &advertised {
            assert!(
                desired.iter().any(|d| d.prefix == a.prefix),
                "{a:?} advertised but not desired"
            );
        }
    }
});
