//! What is announced: host routes for the anycast service addresses.

use std::net::IpAddr;

/// One anycast service address as it should be (or is) announced to the routers: a /32 or
/// /128 host route. `graceful` marks the drain phase: the route is re-announced with the
/// GRACEFUL_SHUTDOWN community (65535:0, RFC 8326) and the configured AS-path prepend so the
/// routers move traffic away before the withdrawal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Announcement {
    pub prefix: IpAddr,
    pub graceful: bool,
}

/// The well-known GRACEFUL_SHUTDOWN community, 65535:0 (RFC 8326).
pub const GRACEFUL_SHUTDOWN: Community = Community(0xFFFF_0000);

/// A standard BGP community (RFC 1997), `asn:value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Community(pub u32);

impl Community {
    pub fn new(asn: u16, value: u16) -> Community {
        Community((u32::from(asn) << 16) | u32::from(value))
    }
    pub fn asn(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub fn value(self) -> u16 {
        self.0 as u16
    }
}

impl std::fmt::Display for Community {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.asn(), self.value())
    }
}

impl std::str::FromStr for Community {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, v) = s
            .split_once(':')
            .ok_or_else(|| format!("community {s:?} is not ASN:VALUE"))?;
        let a: u16 = a
            .parse()
            .map_err(|_| format!("community {s:?}: {a:?} is not 0..=65535"))?;
        let v: u16 = v
            .parse()
            .map_err(|_| format!("community {s:?}: {v:?} is not 0..=65535"))?;
        Ok(Community::new(a, v))
    }
}
