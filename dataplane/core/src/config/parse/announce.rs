//! The `[announce]` section: anycast VIPs and how they are announced.
//!
//! ```toml
//! [announce]
//! mode = "bgp"                   # bgp | kernel-table                          (default bgp)
//! kernel_table = 100             # kernel-table mode: routing table ringmail writes; 1..=2^32-1,
//!                                #   not 253/254/255 (default, main, local)   (default 100)
//! loopback = "address"           # how the host accepts the VIPs' traffic     (default address):
//!                                #   address: /32 and /128 on lo, removed at exit if ringmail added them
//!                                #   local-route: `local` routes in the local table, no address
//!                                #     (for FRR, whose zebra shadows table routes with lo's
//!                                #     connected routes); none: configured by the operator
//! min_healthy = 1                # default for every VIP                      (default 1)
//! announce_delay = "2s"          # healthy this long before announcing        (default 2s)
//! max_announce_delay = "60s"     # cap of the delay doubled by each flap      (default 60s)
//! flap_window = "5m"             # withdrawals this recent count as flaps     (default 5m)
//! graceful_wait = "10s"          # drain: GRACEFUL_SHUTDOWN before withdrawal (default 10s)
//! drain_prepend = 3              # drain: AS-path prepends, 0..=10            (default 3)
//!
//! [[announce.vip]]               # at least one
//! address = "192.0.2.1"          # required; an IPv4 or IPv6 host address; unique
//! pools = ["imap"]               # default: the pools of the listeners bound to this address
//! min_healthy = 2                # default: announce.min_healthy
//!
//! [announce.bgp]                 # required in bgp mode, refused in kernel-table mode
//! local_as = 65001               # required; 1..=4294967295
//! router_id = "10.0.0.2"         # required; IPv4 address, not 0.0.0.0
//! hold_time = "9s"               # "0s" (no keepalives) or 3s..=65535s        (default 9s)
//! connect_retry = "1s"           # first reconnect delay                      (default 1s)
//! max_connect_retry = "30s"      # reconnect delay cap                        (default 30s)
//!
//! [[announce.bgp.neighbor]]      # at least one
//! address = "10.0.0.1"           # required; the router (IP, or "IP:PORT"; port default 179)
//! remote_as = 65000              # required; equal to local_as means iBGP
//! name = "r1"                    # default: the address
//! local_address = "10.0.0.2"     # session source address; default: chosen by the kernel
//! families = ["ipv4", "ipv6"]    # default: the family of `address`
//! med = 10                       # MULTI_EXIT_DISC; default: none
//! local_pref = 100               # iBGP LOCAL_PREF                             (default 100)
//! communities = ["65001:100"]    # attached to every route
//! next_hop_v4 = "10.0.0.2"       # default: the session's own IPv4 address (next-hop self)
//! next_hop_v6 = "2001:db8::2"    # default: the session's own IPv6 address
//!
//! [announce.handoff]             # optional: pass on the flows a draining peer still serves
//! peers = ["198.51.100.12"]      # required; the other LB hosts' addresses on `device`, one per
//!                                #   VIP family at least (a packet goes out in its own family)
//! device = "eth0"                # required; the interface shared with the peers (one segment)
//! dscp = 45                      # 1..=63: marks handed-off packets; never passed on (default 45)
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use toml::de::{DeArray, DeTable, DeValue};

use super::{
    Ctx, NameKind, Span, Value, check_keys, check_name, choice, duration, integer, mismatch, quote,
    required, set, string, table,
};
use crate::config::model::{
    Announce, AnnounceMode, Bgp, Handoff, Listener, Loopback, Neighbor, Vip, is_interface_name,
};

/// Communities per neighbour (the speaker refuses more: they must fit its UPDATEs).
const MAX_COMMUNITIES: usize = 256;

const ANNOUNCE_KEYS: &[&str] = &[
    "mode",
    "kernel_table",
    "loopback",
    "min_healthy",
    "announce_delay",
    "max_announce_delay",
    "flap_window",
    "graceful_wait",
    "drain_prepend",
    "vip",
    "bgp",
    "handoff",
];
const HANDOFF_KEYS: &[&str] = &["peers", "device", "dscp"];
const LOOPBACKS: &[(&str, Loopback)] = &[
    ("address", Loopback::Address),
    ("local-route", Loopback::LocalRoute),
    ("none", Loopback::None),
];
const VIP_KEYS: &[&str] = &["address", "pools", "min_healthy"];
const BGP_KEYS: &[&str] = &[
    "local_as",
    "router_id",
    "hold_time",
    "connect_retry",
    "max_connect_retry",
    "neighbor",
];
const NEIGHBOR_KEYS: &[&str] = &[
    "address",
    "remote_as",
    "name",
    "local_address",
    "families",
    "med",
    "local_pref",
    "communities",
    "next_hop_v4",
    "next_hop_v6",
];

/// Parses `[announce]`. `listeners` may be incomplete when they had errors; a VIP without
/// `pools` takes the pools of the listeners bound to its address.
pub(super) fn parse_announce(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    pool_names: &[String],
    listeners: Option<&[Listener]>,
) -> Option<Announce> {
    let t = table(ctx, v, "announce")?;
    check_keys(ctx, t, ANNOUNCE_KEYS, "[announce]");
    let mut ok = true;
    let mut a = Announce {
        mode: AnnounceMode::KernelTable { table: 100 },
        loopback: Loopback::Address,
        announce_delay: Duration::from_secs(2),
        max_announce_delay: Duration::from_secs(60),
        flap_window: Duration::from_secs(300),
        graceful_wait: Duration::from_secs(10),
        drain_prepend: 3,
        vips: Vec::new(),
        handoff: None,
    };
    let mode = match t.get("mode") {
        None => Some("bgp"),
        Some(m) => match string(ctx, m, "announce.mode") {
            Some(s @ ("bgp" | "kernel-table")) => Some(s),
            Some(other) => {
                ctx.error(
                    m.span(),
                    format!(
                        "`announce.mode`: unknown value {}; allowed: bgp | kernel-table",
                        quote(other)
                    ),
                );
                None
            }
            None => None,
        },
    };
    ok &= mode.is_some();
    ok &= set(
        &mut a.loopback,
        t.get("loopback")
            .map(|x| choice(ctx, x, "announce.loopback", LOOPBACKS)),
    );
    let mut min_healthy = 1usize;
    ok &= set(
        &mut min_healthy,
        t.get("min_healthy").map(|x| {
            integer(ctx, x, "announce.min_healthy", 1, 100_000)
                .and_then(|n| usize::try_from(n).ok())
        }),
    );
    for (key, field, zero) in [
        ("announce_delay", &mut a.announce_delay, true),
        ("max_announce_delay", &mut a.max_announce_delay, true),
        ("flap_window", &mut a.flap_window, true),
        ("graceful_wait", &mut a.graceful_wait, true),
    ] {
        ok &= set(
            field,
            t.get(key)
                .map(|x| duration(ctx, x, &format!("announce.{key}"), zero)),
        );
    }
    ok &= set(
        &mut a.drain_prepend,
        t.get("drain_prepend").map(|x| {
            integer(ctx, x, "announce.drain_prepend", 0, 10).and_then(|n| u8::try_from(n).ok())
        }),
    );
    if a.max_announce_delay < a.announce_delay
        && let Some(x) = t.get("max_announce_delay")
    {
        ctx.error(
            x.span(),
            "`announce.max_announce_delay` is shorter than `announce.announce_delay`",
        );
        ok = false;
    }

    let table_no = match t.get("kernel_table") {
        None => Some(100),
        Some(x) => {
            let n = integer(ctx, x, "announce.kernel_table", 1, u64::from(u32::MAX))
                .and_then(|n| u32::try_from(n).ok());
            match n {
                Some(n @ 253..=255) => {
                    ctx.error(
                        x.span(),
                        format!(
                            "`announce.kernel_table` {n} is the kernel's own {} table; pick a dedicated table",
                            match n {
                                253 => "default",
                                254 => "main",
                                _ => "local",
                            }
                        ),
                    );
                    None
                }
                n => n,
            }
        }
    };
    ok &= table_no.is_some();

    let bgp = match (mode, t.get("bgp")) {
        (Some("bgp"), None) => {
            ctx.error(
                v.span(),
                "`announce.mode` is bgp but there is no [announce.bgp] section with local_as, router_id and neighbors",
            );
            None
        }
        (Some("bgp"), Some(b)) => {
            table(ctx, b, "announce.bgp").and_then(|bt| parse_bgp(ctx, b, bt))
        }
        (Some(_), Some(b)) => {
            ctx.error(
                b.span(),
                "[announce.bgp] is only used with announce.mode = \"bgp\"",
            );
            None
        }
        _ => None,
    };
    if t.get("kernel_table").is_some() && mode == Some("bgp") {
        let span = t.get("kernel_table").map_or(0..0, |x| x.span());
        ctx.error(
            span,
            "`announce.kernel_table` is only used with announce.mode = \"kernel-table\"",
        );
        ok = false;
    }
    a.mode = match (mode, bgp, table_no) {
        (Some("bgp"), Some(b), _) => AnnounceMode::Bgp(b),
        (Some("kernel-table"), _, Some(table)) => AnnounceMode::KernelTable { table },
        _ => {
            ok = false;
            a.mode
        }
    };

    match t.get("vip") {
        None => {
            ctx.error(
                v.span(),
                "[announce] has no VIPs: add [[announce.vip]] with an `address`",
            );
            ok = false;
        }
        Some(list) => match parse_vips(ctx, list, pool_names, listeners, min_healthy) {
            Some(vips) => a.vips = vips,
            None => ok = false,
        },
    }
    if let Some(h) = t.get("handoff") {
        match table(ctx, h, "announce.handoff").and_then(|ht| parse_handoff(ctx, h, ht, &a.vips)) {
            Some(handoff) => a.handoff = Some(handoff),
            None => ok = false,
        }
    }
    ok.then_some(a)
}

/// `[announce.handoff]`: `vips` may be incomplete when they had errors (the family check then
/// sees only the good ones).
fn parse_handoff(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    t: &DeTable<'_>,
    vips: &[Vip],
) -> Option<Handoff> {
    check_keys(ctx, t, HANDOFF_KEYS, "[announce.handoff]");
    let mut ok = true;
    let mut peers: Vec<IpAddr> = Vec::new();
    match required(ctx, v, t, "peers", "announce.handoff") {
        None => ok = false,
        Some(p) => match p.get_ref() {
            DeValue::Array(items) if !items.is_empty() => {
                for item in items {
                    let Some(addr) = ip(ctx, item, "announce.handoff.peers") else {
                        ok = false;
                        continue;
                    };
                    let why = if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback()
                    {
                        Some("not a unicast address of another host")
                    } else if vips.iter().any(|x| x.addr == addr) {
                        Some("a VIP, not a peer's own address")
                    } else if peers.contains(&addr) {
                        Some("listed twice")
                    } else {
                        None
                    };
                    match why {
                        Some(why) => {
                            ctx.error(
                                item.span(),
                                format!("`announce.handoff.peers`: {addr} is {why}"),
                            );
                            ok = false;
                        }
                        None => peers.push(addr),
                    }
                }
            }
            DeValue::Array(_) => {
                ctx.error(p.span(), "`announce.handoff.peers` is empty");
                ok = false;
            }
            _ => {
                mismatch(ctx, p, "announce.handoff.peers", "an array of IP addresses");
                ok = false;
            }
        },
    }
    let device = required(ctx, v, t, "device", "announce.handoff").and_then(|d| {
        let name = string(ctx, d, "announce.handoff.device")?;
        if is_interface_name(name) {
            Some(name.to_string())
        } else {
            ctx.error(
                d.span(),
                format!(
                    "`announce.handoff.device`: {} is not an interface name (1-15 letters, digits, `-_.@`)",
                    quote(name)
                ),
            );
            None
        }
    });
    ok &= device.is_some();
    let mut dscp = 45u8;
    ok &= set(
        &mut dscp,
        t.get("dscp").map(|x| {
            integer(ctx, x, "announce.handoff.dscp", 1, 63).and_then(|n| u8::try_from(n).ok())
        }),
    );
    if ok {
        for (family, is) in [("IPv4", true), ("IPv6", false)] {
            let vip = vips.iter().find(|x| x.addr.is_ipv4() == is);
            if let Some(vip) = vip
                && !peers.iter().any(|p| p.is_ipv4() == is)
            {
                ctx.error(
                    v.span(),
                    format!(
                        "`announce.handoff.peers` has no {family} address, but VIP {} is {family}: a packet is handed off in its own family",
                        vip.addr
                    ),
                );
                ok = false;
            }
        }
    }
    match (ok, device) {
        (true, Some(device)) => Some(Handoff {
            peers,
            device,
            dscp,
        }),
        _ => None,
    }
}

fn array_of_tables<'t, 'i>(
    ctx: &mut Ctx<'_>,
    v: &'t Value<'i>,
    what: &str,
) -> Option<&'t DeArray<'i>> {
    match v.get_ref() {
        DeValue::Array(items) if !items.is_empty() => Some(items),
        DeValue::Array(_) => {
            ctx.error(v.span(), format!("`{what}` is empty"));
            None
        }
        other => {
            let hint = if matches!(other, DeValue::Table(_)) {
                format!("; write [[{what}]], not [{what}]")
            } else {
                String::new()
            };
            ctx.error(
                v.span(),
                format!(
                    "`{what}` must be an array of tables, found {}{hint}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

fn parse_vips(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    pool_names: &[String],
    listeners: Option<&[Listener]>,
    default_min: usize,
) -> Option<Vec<Vip>> {
    let items = array_of_tables(ctx, v, "announce.vip")?;
    let mut ok = true;
    let mut out = Vec::new();
    let mut seen: HashMap<IpAddr, Span> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("announce.vip[{i}]");
        let Some(t) = table(ctx, item, &at) else {
            ok = false;
            continue;
        };
        check_keys(ctx, t, VIP_KEYS, &format!("[[announce.vip]] #{}", i + 1));
        let addr_v = required(ctx, item, t, "address", &at);
        let addr = addr_v.and_then(|a| host_ip(ctx, a, &format!("{at}.address")));
        if let (Some(addr), Some(a)) = (addr, addr_v) {
            if let Some(first) = seen.get(&addr) {
                let line = ctx.line(first.start);
                ctx.error(
                    a.span(),
                    format!("`{at}.address`: VIP {addr} is already listed (line {line})"),
                );
                ok = false;
            }
            seen.insert(addr, a.span());
        }
        let mut min_healthy = default_min;
        ok &= set(
            &mut min_healthy,
            t.get("min_healthy").map(|x| {
                integer(ctx, x, &format!("{at}.min_healthy"), 1, 100_000)
                    .and_then(|n| usize::try_from(n).ok())
            }),
        );
        let pools = match t.get("pools") {
            Some(p) => pool_list(ctx, p, &format!("{at}.pools"), pool_names),
            None => addr.and_then(|addr| {
                let listeners = listeners?;
                let mut idx: Vec<usize> = listeners
                    .iter()
                    .filter(|l| l.bind.ip() == addr)
                    .map(|l| l.pool)
                    .collect();
                idx.sort_unstable();
                idx.dedup();
                if idx.is_empty() {
                    ctx.error(
                        item.span(),
                        format!(
                            "VIP {addr} has no `pools` and no [[listener]] binds it; name the pools whose health decides its announcement"
                        ),
                    );
                    None
                } else {
                    Some(idx)
                }
            }),
        };
        match (addr, pools) {
            (Some(addr), Some(pools)) => out.push(Vip {
                addr,
                pools,
                min_healthy,
            }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn pool_list(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    what: &str,
    pool_names: &[String],
) -> Option<Vec<usize>> {
    let DeValue::Array(items) = v.get_ref() else {
        mismatch(ctx, v, what, "an array of pool names");
        return None;
    };
    if items.is_empty() {
        ctx.error(v.span(), format!("`{what}` is empty"));
        return None;
    }
    let mut ok = true;
    let mut out = Vec::new();
    for item in items {
        let Some(name) = string(ctx, item, what) else {
            ok = false;
            continue;
        };
        match pool_names.iter().position(|n| n == name) {
            Some(i) if !out.contains(&i) => out.push(i),
            Some(_) => {}
            None => {
                ctx.error(
                    item.span(),
                    format!(
                        "`{what}`: unknown pool {}; defined pools: {}",
                        quote(name),
                        if pool_names.is_empty() {
                            "none".to_string()
                        } else {
                            pool_names.join(", ")
                        }
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn parse_bgp(ctx: &mut Ctx<'_>, v: &Value<'_>, t: &DeTable<'_>) -> Option<Bgp> {
    check_keys(ctx, t, BGP_KEYS, "[announce.bgp]");
    let mut ok = true;
    let local_as = required(ctx, v, t, "local_as", "announce.bgp")
        .and_then(|x| asn(ctx, x, "announce.bgp.local_as"));
    let router_id = required(ctx, v, t, "router_id", "announce.bgp").and_then(|x| {
        let ip = ip(ctx, x, "announce.bgp.router_id")?;
        match ip {
            IpAddr::V4(a) if !a.is_unspecified() => Some(a),
            _ => {
                ctx.error(
                    x.span(),
                    "`announce.bgp.router_id` must be a non-zero IPv4 address (a 32-bit BGP identifier)",
                );
                None
            }
        }
    });
    let mut b = Bgp {
        local_as: 0,
        router_id: Ipv4Addr::UNSPECIFIED,
        hold_time: Duration::from_secs(9),
        connect_retry: Duration::from_secs(1),
        max_connect_retry: Duration::from_secs(30),
        neighbors: Vec::new(),
    };
    if let Some(h) = t.get("hold_time") {
        match duration(ctx, h, "announce.bgp.hold_time", true) {
            Some(d) if d.is_zero() || (d >= Duration::from_secs(3) && d.as_secs() <= 65535) => {
                if d.subsec_nanos() != 0 {
                    ctx.error(h.span(), "`announce.bgp.hold_time` must be whole seconds");
                    ok = false;
                } else {
                    b.hold_time = d;
                }
            }
            Some(_) => {
                ctx.error(
                    h.span(),
                    "`announce.bgp.hold_time` must be \"0s\" or between 3s and 65535s (RFC 4271)",
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    ok &= set(
        &mut b.connect_retry,
        t.get("connect_retry")
            .map(|x| duration(ctx, x, "announce.bgp.connect_retry", false)),
    );
    ok &= set(
        &mut b.max_connect_retry,
        t.get("max_connect_retry")
            .map(|x| duration(ctx, x, "announce.bgp.max_connect_retry", false)),
    );
    if b.max_connect_retry < b.connect_retry {
        let span = t.get("max_connect_retry").map_or(v.span(), |x| x.span());
        ctx.error(
            span,
            "`announce.bgp.max_connect_retry` is shorter than `connect_retry`",
        );
        ok = false;
    }
    let neighbors = match t.get("neighbor") {
        None => {
            ctx.error(
                v.span(),
                "[announce.bgp] has no neighbours: add [[announce.bgp.neighbor]] with `address` and `remote_as`",
            );
            None
        }
        Some(n) => parse_neighbors(ctx, n),
    };
    match (local_as, router_id, neighbors, ok) {
        (Some(local_as), Some(router_id), Some(neighbors), true) => Some(Bgp {
            local_as,
            router_id,
            neighbors,
            ..b
        }),
        _ => None,
    }
}

fn parse_neighbors(ctx: &mut Ctx<'_>, v: &Value<'_>) -> Option<Vec<Neighbor>> {
    let items = array_of_tables(ctx, v, "announce.bgp.neighbor")?;
    let mut ok = true;
    let mut out: Vec<Neighbor> = Vec::new();
    let mut seen: HashMap<SocketAddr, Span> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("announce.bgp.neighbor[{i}]");
        let Some(t) = table(ctx, item, &at) else {
            ok = false;
            continue;
        };
        check_keys(
            ctx,
            t,
            NEIGHBOR_KEYS,
            &format!("[[announce.bgp.neighbor]] #{}", i + 1),
        );
        let key = |k: &str| format!("{at}.{k}");
        let addr_v = required(ctx, item, t, "address", &at);
        let addr = addr_v.and_then(|a| {
            let s = string(ctx, a, &key("address"))?;
            let parsed = s
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 179)));
            match parsed {
                Some(sa) if sa.port() != 0 && !sa.ip().is_unspecified() => Some(sa),
                _ => {
                    ctx.error(
                        a.span(),
                        format!(
                            "`{}`: {} is not an IP address or IP:PORT (IPv6 with a port as \"[2001:db8::1]:179\")",
                            key("address"),
                            quote(s)
                        ),
                    );
                    None
                }
            }
        });
        if let (Some(sa), Some(a)) = (addr, addr_v) {
            if let Some(first) = seen.get(&sa) {
                let line = ctx.line(first.start);
                ctx.error(
                    a.span(),
                    format!(
                        "`{}`: neighbour {sa} is already listed (line {line})",
                        key("address")
                    ),
                );
                ok = false;
            }
            seen.insert(sa, a.span());
        }
        let remote_as =
            required(ctx, item, t, "remote_as", &at).and_then(|x| asn(ctx, x, &key("remote_as")));
        let name = match t.get("name") {
            None => addr.map(|a| a.ip().to_string()),
            Some(n) => string(ctx, n, &key("name"))
                .filter(|s| check_name(ctx, n.span(), s, &key("name"), NameKind::Simple))
                .map(str::to_string),
        };
        let local_address = match t.get("local_address") {
            None => Some(None),
            Some(x) => ip(ctx, x, &key("local_address")).map(Some),
        };
        if let (Some(Some(local)), Some(sa), Some(x)) =
            (local_address, addr, t.get("local_address"))
            && local.is_ipv4() != sa.is_ipv4()
        {
            ctx.error(
                x.span(),
                format!(
                    "`{}` {local} is not of the same family as the neighbour address {}",
                    key("local_address"),
                    sa.ip()
                ),
            );
            ok = false;
        }
        let families = match t.get("families") {
            None => addr.map(|a| (a.is_ipv4(), a.is_ipv6())),
            Some(f) => families(ctx, f, &key("families")),
        };
        let mut med = None;
        if let Some(x) = t.get("med") {
            match integer(ctx, x, &key("med"), 0, u64::from(u32::MAX)) {
                Some(n) => med = u32::try_from(n).ok(),
                None => ok = false,
            }
        }
        let mut local_pref = 100u32;
        ok &= set(
            &mut local_pref,
            t.get("local_pref").map(|x| {
                integer(ctx, x, &key("local_pref"), 0, u64::from(u32::MAX))
                    .and_then(|n| u32::try_from(n).ok())
            }),
        );
        let mut communities = Vec::new();
        if let Some(c) = t.get("communities") {
            match community_list(ctx, c, &key("communities")) {
                Some(list) => communities = list,
                None => ok = false,
            }
        }
        let next_hop_v4 = match t.get("next_hop_v4") {
            None => Some(None),
            Some(x) => match ip(ctx, x, &key("next_hop_v4")) {
                Some(IpAddr::V4(a)) if !a.is_unspecified() => Some(Some(a)),
                Some(_) => {
                    ctx.error(
                        x.span(),
                        format!("`{}` must be an IPv4 address", key("next_hop_v4")),
                    );
                    None
                }
                None => None,
            },
        };
        let next_hop_v6: Option<Option<Ipv6Addr>> = match t.get("next_hop_v6") {
            None => Some(None),
            Some(x) => match ip(ctx, x, &key("next_hop_v6")) {
                Some(IpAddr::V6(a)) if !a.is_unspecified() => Some(Some(a)),
                Some(_) => {
                    ctx.error(
                        x.span(),
                        format!("`{}` must be an IPv6 address", key("next_hop_v6")),
                    );
                    None
                }
                None => None,
            },
        };
        match (
            addr,
            remote_as,
            name,
            local_address,
            families,
            next_hop_v4,
            next_hop_v6,
        ) {
            (
                Some(addr),
                Some(remote_as),
                Some(name),
                Some(local_address),
                Some((ipv4, ipv6)),
                Some(next_hop_v4),
                Some(next_hop_v6),
            ) => out.push(Neighbor {
                name,
                addr,
                remote_as,
                local_address,
                ipv4,
                ipv6,
                med,
                local_pref,
                communities,
                next_hop_v4,
                next_hop_v6,
            }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn families(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<(bool, bool)> {
    let DeValue::Array(items) = v.get_ref() else {
        mismatch(ctx, v, what, "an array of \"ipv4\" / \"ipv6\"");
        return None;
    };
    let (mut v4, mut v6, mut ok) = (false, false, true);
    for item in items {
        match string(ctx, item, what) {
            Some("ipv4") => v4 = true,
            Some("ipv6") => v6 = true,
            Some(other) => {
                ctx.error(
                    item.span(),
                    format!(
                        "`{what}`: unknown family {}; allowed: ipv4, ipv6",
                        quote(other)
                    ),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if ok && !v4 && !v6 {
        ctx.error(v.span(), format!("`{what}` is empty"));
        ok = false;
    }
    ok.then_some((v4, v6))
}

fn community_list(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<Vec<u32>> {
    let DeValue::Array(items) = v.get_ref() else {
        mismatch(ctx, v, what, "an array of \"ASN:VALUE\" strings");
        return None;
    };
    if items.len() > MAX_COMMUNITIES {
        ctx.error(
            v.span(),
            format!(
                "`{what}` has {} communities; at most {MAX_COMMUNITIES} fit the speaker's UPDATEs",
                items.len()
            ),
        );
        return None;
    }
    let mut ok = true;
    let mut out = Vec::new();
    for item in items {
        let Some(s) = string(ctx, item, what) else {
            ok = false;
            continue;
        };
        let parsed = s.split_once(':').and_then(|(a, b)| {
            Some((u32::from(a.parse::<u16>().ok()?) << 16) | u32::from(b.parse::<u16>().ok()?))
        });
        match parsed {
            Some(c) => out.push(c),
            None => {
                ctx.error(
                    item.span(),
                    format!(
                        "`{what}`: {} is not a community ASN:VALUE with both parts in 0..=65535",
                        quote(s)
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn asn(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<u32> {
    let n = integer(ctx, v, what, 1, u64::from(u32::MAX)).and_then(|n| u32::try_from(n).ok())?;
    if n == 23456 {
        ctx.error(
            v.span(),
            format!("`{what}`: 23456 is AS_TRANS (RFC 6793), not a real AS number"),
        );
        return None;
    }
    Some(n)
}

fn ip(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<IpAddr> {
    let s = string(ctx, v, what)?;
    match s.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            ctx.error(
                v.span(),
                format!("`{what}`: {} is not an IP address", quote(s)),
            );
            None
        }
    }
}

/// A unicast host address usable as an anycast VIP.
fn host_ip(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<IpAddr> {
    let addr = ip(ctx, v, what)?;
    let why = match addr {
        a if a.is_unspecified() => Some("unspecified"),
        a if a.is_multicast() => Some("multicast"),
        a if a.is_loopback() => Some("a loopback address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("IPv4-mapped; write the IPv4 address")
        }
        _ => None,
    };
    if let Some(why) = why {
        ctx.error(
            v.span(),
            format!("`{what}`: {addr} cannot be announced as a VIP ({why})"),
        );
        return None;
    }
    Some(addr)
}
