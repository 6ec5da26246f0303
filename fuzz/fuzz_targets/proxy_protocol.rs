//! Fuzzes the PROXY protocol parser.
//!
//! For arbitrary bytes: parsing never panics; every prefix parses as `Incomplete` or exactly as
//! the whole input does (the parser is incremental and monotonic); a complete header never claims
//! more bytes than it was given. Addresses derived from the input are encoded in v1 and v2 and
//! must parse back to the same addresses (with mixed families widened to IPv4-mapped IPv6).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ringmail_proxy_core::proxy_protocol::{
    Command, Parsed, Tlv, Version, encode, encode_local_v2, encode_v2_with_tlvs, parse,
};

fn take<const N: usize>(data: &[u8], at: &mut usize) -> [u8; N] {
    let mut out = [0u8; N];
    for b in out.iter_mut() {
        *b = data.get(*at).copied().unwrap_or(0);
        *at += 1;
    }
    out
}

fn addr(data: &[u8], at: &mut usize, v6: bool) -> SocketAddr {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(take::<16>(data, at)))
    } else {
        IpAddr::V4(Ipv4Addr::from(take::<4>(data, at)))
    };
    SocketAddr::new(ip, u16::from_be_bytes(take::<2>(data, at)))
}

fn widen(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

fn expect_round_trip(bytes: &[u8], src: SocketAddr, dst: SocketAddr) {
    let (src, dst) = if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (widen(src), widen(dst))
    };
    match parse(bytes) {
        Ok(Parsed::Complete { header, len }) => {
            assert_eq!(len, bytes.len());
            assert_eq!(header.command, Command::Proxy);
            assert_eq!(header.addresses, Some((src, dst)));
        }
        other => panic!("encoded header did not parse back: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. Arbitrary bytes, whole and split at every point.
    let full = parse(data);
    if let Ok(Parsed::Complete { len, .. }) = &full {
        assert!(*len <= data.len() && *len > 0);
    }
    for i in 0..data.len() {
        let part = parse(&data[..i]);
        if part != Ok(Parsed::Incomplete) {
            assert_eq!(
                part, full,
                "prefix of {i} bytes disagrees with the whole input"
            );
        }
    }

    // 2. Round trips for addresses taken from the input.
    let flags = data.first().copied().unwrap_or(0);
    let mut at = 1;
    let src = addr(data, &mut at, flags & 1 != 0);
    let dst = addr(data, &mut at, flags & 2 != 0);
    for version in [Version::V1, Version::V2] {
        let mut out = Vec::new();
        encode(version, src, dst, &mut out);
        expect_round_trip(&out, src, dst);
    }
    let tlvs: Vec<Tlv> = data
        .get(at..)
        .unwrap_or_default()
        .chunks(7)
        .filter(|c| c.first() != Some(&0x03))
        .map(|c| Tlv {
            kind: c[0],
            value: c[1..].to_vec(),
        })
        .collect();
    let mut out = Vec::new();
    if encode_v2_with_tlvs(src, dst, &tlvs, flags & 4 != 0, &mut out).is_ok() && out.len() <= 4096 {
        expect_round_trip(&out, src, dst);
        if let Ok(Parsed::Complete { header, .. }) = parse(&out) {
            assert_eq!(&header.tlvs[..tlvs.len()], &tlvs[..]);
        }
    }
    let mut local = Vec::new();
    encode_local_v2(&mut local);
    assert!(matches!(
        parse(&local),
        Ok(Parsed::Complete { len: 16, .. })
    ));
});
