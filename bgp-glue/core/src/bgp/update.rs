//! UPDATE encoding: path attributes for our host routes and packing into ≤ 4096-byte messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;
use rustbgpd_wire::{
    Afi, AsPath, AsPathSegment, EncodeError, Ipv4NlriEntry, Ipv4Prefix, Ipv4UnicastMode,
    Ipv6Prefix, Message, MpReachNlri, MpUnreachNlri, NlriEntry, Origin, PathAttribute, Prefix,
    Safi, UpdateMessage, encode_message,
};

use super::{MAX_MESSAGE_LEN, SessionConfig};
use crate::route::GRACEFUL_SHUTDOWN;

/// Bytes one host route takes in NLRI: length octet plus the address.
const V4_NLRI_LEN: usize = 1 + 4;
const V6_NLRI_LEN: usize = 1 + 16;

/// The path attributes for one group of routes (same family, same graceful flag), ordered by
/// type code. `next_hop_v4` is `Some` for IPv4 routes (classic NEXT_HOP); IPv6 routes carry
/// their next hop in MP_REACH_NLRI, added by [`announce_v6`].
pub(super) fn path_attributes(
    cfg: &SessionConfig,
    graceful: bool,
    next_hop_v4: Option<Ipv4Addr>,
) -> Vec<PathAttribute> {
    let mut attrs = Vec::with_capacity(7);
    attrs.push(PathAttribute::Origin(Origin::Igp));
    let segments = if cfg.is_ibgp() {
        Vec::new()
    } else {
        let copies = 1 + if graceful {
            usize::from(cfg.graceful_prepend)
        } else {
            0
        };
        vec![AsPathSegment::AsSequence(vec![cfg.local_as; copies])]
    };
    attrs.push(PathAttribute::AsPath(AsPath { segments }));
    if let Some(nh) = next_hop_v4 {
        attrs.push(PathAttribute::NextHop(nh));
    }
    if let Some(med) = cfg.med {
        attrs.push(PathAttribute::Med(med));
    }
    if cfg.is_ibgp() {
        attrs.push(PathAttribute::LocalPref(if graceful {
            0
        } else {
            cfg.local_pref
        }));
    }
    let mut communities: Vec<u32> = Vec::with_capacity(cfg.communities.len() + 1);
    for c in &cfg.communities {
        if !communities.contains(&c.0) {
            communities.push(c.0);
        }
    }
    if graceful && !communities.contains(&GRACEFUL_SHUTDOWN.0) {
        communities.push(GRACEFUL_SHUTDOWN.0);
    }
    if !communities.is_empty() {
        attrs.push(PathAttribute::Communities(communities));
    }
    attrs
}

/// Encoded UPDATEs announcing IPv4 host routes with `attrs` (which include NEXT_HOP).
pub(super) fn announce_v4(
    attrs: &[PathAttribute],
    prefixes: &[Ipv4Addr],
) -> Result<Vec<Bytes>, EncodeError> {
    pack(prefixes, V4_NLRI_LEN, |chunk| {
        let nlri = v4_entries(chunk);
        UpdateMessage::try_build(&nlri, &[], attrs, true, false, Ipv4UnicastMode::Body)
    })
}

/// Encoded UPDATEs withdrawing IPv4 host routes.
pub(super) fn withdraw_v4(prefixes: &[Ipv4Addr]) -> Result<Vec<Bytes>, EncodeError> {
    pack(prefixes, V4_NLRI_LEN, |chunk| {
        let nlri = v4_entries(chunk);
        UpdateMessage::try_build(&[], &nlri, &[], true, false, Ipv4UnicastMode::Body)
    })
}

/// Encoded UPDATEs announcing IPv6 host routes with `attrs` plus MP_REACH_NLRI (global next
/// hop only, 16 bytes).
pub(super) fn announce_v6(
    attrs: &[PathAttribute],
    next_hop: Ipv6Addr,
    prefixes: &[Ipv6Addr],
) -> Result<Vec<Bytes>, EncodeError> {
    pack(prefixes, V6_NLRI_LEN, |chunk| {
        let mp = PathAttribute::MpReachNlri(Box::new(MpReachNlri {
            afi: Afi::Ipv6,
            safi: Safi::Unicast,
            next_hop: IpAddr::V6(next_hop),
            link_local_next_hop: None,
            announced: v6_entries(chunk),
            flowspec_announced: Vec::new(),
            evpn_announced: Vec::new(),
            bgpls_announced: Vec::new(),
            vpn_announced: Vec::new(),
            labeled_announced: Vec::new(),
            rtc_announced: Vec::new(),
        }));
        UpdateMessage::try_build_from_attribute_iter(
            &[],
            &[],
            attrs.iter().chain(std::iter::once(&mp)),
            true,
            false,
            Ipv4UnicastMode::Body,
        )
    })
}

/// Encoded UPDATEs withdrawing IPv6 host routes (MP_UNREACH_NLRI only).
pub(super) fn withdraw_v6(prefixes: &[Ipv6Addr]) -> Result<Vec<Bytes>, EncodeError> {
    pack(prefixes, V6_NLRI_LEN, |chunk| {
        let mp = PathAttribute::MpUnreachNlri(Box::new(MpUnreachNlri {
            afi: Afi::Ipv6,
            safi: Safi::Unicast,
            withdrawn: v6_entries(chunk),
            flowspec_withdrawn: Vec::new(),
            evpn_withdrawn: Vec::new(),
            bgpls_withdrawn: Vec::new(),
            vpn_withdrawn: Vec::new(),
            labeled_withdrawn: Vec::new(),
            rtc_withdrawn: Vec::new(),
        }));
        UpdateMessage::try_build(
            &[],
            &[],
            std::slice::from_ref(&mp),
            true,
            false,
            Ipv4UnicastMode::Body,
        )
    })
}

fn v4_entries(prefixes: &[Ipv4Addr]) -> Vec<Ipv4NlriEntry> {
    prefixes
        .iter()
        .map(|&a| Ipv4NlriEntry {
            path_id: 0,
            prefix: Ipv4Prefix::new(a, 32),
        })
        .collect()
}

fn v6_entries(prefixes: &[Ipv6Addr]) -> Vec<NlriEntry> {
    prefixes
        .iter()
        .map(|&a| NlriEntry {
            path_id: 0,
            prefix: Prefix::V6(Ipv6Prefix::new(a, 128)),
        })
        .collect()
}

/// Splits `prefixes` into as few messages as fit in [`MAX_MESSAGE_LEN`]. The fixed part is
/// measured by building an UPDATE without prefixes; one spare byte covers an MP attribute
/// switching to the extended (2-byte) length once it grows past 255 bytes.
fn pack<A>(
    prefixes: &[A],
    per_prefix: usize,
    build: impl Fn(&[A]) -> Result<UpdateMessage, EncodeError>,
) -> Result<Vec<Bytes>, EncodeError> {
    if prefixes.is_empty() {
        return Ok(Vec::new());
    }
    let base = build(&[])?.encoded_len() + 1;
    let per_message = MAX_MESSAGE_LEN.saturating_sub(base) / per_prefix;
    if per_message == 0 {
        return Err(EncodeError::MessageTooLong {
            size: base + per_prefix,
        });
    }
    prefixes
        .chunks(per_message)
        .map(|chunk| {
            let update = build(chunk)?;
            Ok(encode_message(&Message::Update(update))?.freeze())
        })
        .collect()
}
