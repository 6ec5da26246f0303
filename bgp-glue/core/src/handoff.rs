//! Connection hand-off between the LB hosts of a site: the nftables rules, rendered.
//!
//! Per-flow ECMP keeps no state. When a host drains (its routes depreferenced, then withdrawn),
//! the routers hash the flows it still serves onto the remaining hosts, which hold no socket
//! for them and would answer with a reset. With a hand-off every host passes such *orphan*
//! packets on to its peers on the shared segment, unchanged but for a DSCP mark, and the peer
//! that owns the flow carries on serving it:
//!
//! ```text
//!  client ──▶ router ──(ECMP, draining host left out)──▶ LB 1: conntrack knows the flow? ─ yes ─▶ its socket
//!                                                         │ no (TCP, not a SYN, to a VIP)
//!                                                         ▼
//!                                         DSCP mark, `dup` to each peer on the segment, drop
//!                                                         │
//!                         LB 2 (draining): its own flow ◀─┘  (a peer that does not own it
//!                         ─▶ its socket; replies go          sees the mark and drops it:
//!                         straight to the client             nothing is passed on twice)
//! ```
//!
//! A packet is an orphan when its TCP flags are not a bare SYN and the host's conntrack has no
//! established entry for it (`ct state new` is a mid-stream pickup, `invalid` covers FIN and
//! RST of unknown flows). A SYN always stays: new connections are the host's own. The rules run
//! in `prerouting` after conntrack (priority -140), in one `ip` and one `ip6` table of their
//! own, which loading replaces atomically and [`removal`] deletes.

use std::fmt::Write as _;
use std::net::IpAddr;

/// The name of the nftables tables (one per family).
pub const TABLE: &str = "ringmail_handoff";

/// The comment of the rule that passes orphan packets on (its counter is read back).
pub const PASSED_COMMENT: &str = "passed on to the peers";
/// The comment of the rule that drops a peer's hand-off this host does not own.
pub const DROPPED_COMMENT: &str = "handed off by a peer and not ours either";

/// What the rules need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffRules<'a> {
    /// The VIPs whose orphan packets are passed on.
    pub vips: &'a [IpAddr],
    /// The peers' addresses on `device`.
    pub peers: &'a [IpAddr],
    /// The interface shared with the peers.
    pub device: &'a str,
    /// The mark (1..=63) of a handed-off packet.
    pub dscp: u8,
}

/// The `nft -f` script that installs (or replaces) the hand-off tables. A family gets a table
/// only when it has VIPs; its packets go to the peers of that family.
pub fn ruleset(r: &HandoffRules<'_>) -> String {
    let mut out = String::from(
        "# ringmail: connection hand-off between LB hosts ([announce.handoff]); removed at exit.\n",
    );
    for (family, v4, addr_type, dscp_key) in [
        ("ip", true, "ipv4_addr", "ip dscp"),
        ("ip6", false, "ipv6_addr", "ip6 dscp"),
    ] {
        let vips: Vec<String> = r
            .vips
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(IpAddr::to_string)
            .collect();
        if vips.is_empty() {
            continue;
        }
        let dups: String = r
            .peers
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(|p| format!(" dup to {p} device {}", quote(r.device)))
            .collect();
        // The empty declaration lets the delete succeed on the first load; the three statements
        // apply as one transaction.
        let _ = write!(
            out,
            "table {family} {TABLE} {{}}\n\
             delete table {family} {TABLE}\n\
             table {family} {TABLE} {{\n\
             \tset vips {{\n\t\ttype {addr_type}\n\t\telements = {{ {vips} }}\n\t}}\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority -140; policy accept;\n\
             \t\t{family} daddr @vips tcp flags & (syn | ack) != syn ct state {{ new, invalid }} jump orphan\n\
             \t}}\n\
             \tchain orphan {{\n\
             \t\t{dscp_key} {dscp} counter drop comment \"{DROPPED_COMMENT}\"\n\
             \t\t{dscp_key} set {dscp}{dups} counter drop comment \"{PASSED_COMMENT}\"\n\
             \t}}\n\
             }}\n",
            vips = vips.join(", "),
            dscp = r.dscp,
        );
    }
    out
}

/// The `nft -f` script that deletes the hand-off tables (whether or not they exist).
pub fn removal() -> String {
    let mut out = String::new();
    for family in ["ip", "ip6"] {
        let _ = writeln!(
            out,
            "table {family} {TABLE} {{}}\ndelete table {family} {TABLE}"
        );
    }
    out
}

/// An nftables quoted string. Interface names are checked when the configuration is loaded
/// (letters, digits, `-_.@`), so this only guards against a quote ending the string early.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\\', '\n'], ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn both_families_with_their_own_peers() {
        let vips = [ip("192.0.2.1"), ip("2001:db8::1"), ip("192.0.2.2")];
        let peers = [ip("198.51.100.12"), ip("3fff::12"), ip("198.51.100.13")];
        let s = ruleset(&HandoffRules {
            vips: &vips,
            peers: &peers,
            device: "up0",
            dscp: 45,
        });
        assert!(s.contains("table ip ringmail_handoff {}\ndelete table ip ringmail_handoff\n"));
        assert!(s.contains("elements = { 192.0.2.1, 192.0.2.2 }"), "{s}");
        assert!(s.contains("elements = { 2001:db8::1 }"), "{s}");
        assert!(
            s.contains(
                "ip dscp set 45 dup to 198.51.100.12 device \"up0\" dup to 198.51.100.13 device \"up0\" counter drop"
            ),
            "{s}"
        );
        assert!(
            s.contains("ip6 dscp set 45 dup to 3fff::12 device \"up0\" counter drop"),
            "{s}"
        );
        // A marked packet is never passed on again; SYNs are never orphans.
        let ip4 = s.split("table ip6").next().unwrap();
        let marked = ip4.find("ip dscp 45 counter drop").unwrap();
        let pass = ip4.find("ip dscp set 45").unwrap();
        assert!(marked < pass, "the mark check comes first: {s}");
        assert!(s.contains("tcp flags & (syn | ack) != syn ct state { new, invalid } jump orphan"));
    }

    #[test]
    fn a_family_without_vips_gets_no_table() {
        let vips = [ip("192.0.2.1")];
        let peers = [ip("198.51.100.12"), ip("3fff::12")];
        let s = ruleset(&HandoffRules {
            vips: &vips,
            peers: &peers,
            device: "eth0",
            dscp: 7,
        });
        assert!(!s.contains("table ip6"), "{s}");
        assert!(s.contains("ip dscp set 7 dup to 198.51.100.12 device \"eth0\""));
    }

    #[test]
    fn removal_deletes_both_tables_even_when_absent() {
        assert_eq!(
            removal(),
            "table ip ringmail_handoff {}\ndelete table ip ringmail_handoff\n\
             table ip6 ringmail_handoff {}\ndelete table ip6 ringmail_handoff\n"
        );
    }

    #[test]
    fn a_quote_cannot_end_the_device_string() {
        assert_eq!(quote("a\"b\\c\nd"), "\"abcd\"");
    }
}
