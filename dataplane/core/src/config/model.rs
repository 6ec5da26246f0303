//! The validated configuration the engine runs on. Every value here has already been checked:
//! a `LbConfig` cannot hold an unknown pool, a zero rise count or a listener without a pool.

use std::net::SocketAddr;
use std::time::Duration;

use crate::balance::Algorithm;
use crate::health::CheckKind;
use crate::proxy_protocol::Version as ProxyVersion;

/// Which I/O engine runs the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when it can be set up, else epoll (logged and shown in metrics).
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// How bytes are moved between the two sockets of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Receive into user-space buffers (io_uring provided buffer rings / a per-worker scratch buffer)
    /// and send them on. Idle connections hold no buffer.
    #[default]
    Buffered,
    /// splice(2) through a per-connection pipe pair; the payload never enters user space.
    Splice,
}

/// The whole load balancer configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    pub global: Global,
    pub listeners: Vec<Listener>,
    pub pools: Vec<Pool>,
    /// The anycast glue (`[announce]`); `None` when this host announces nothing.
    pub announce: Option<Announce>,
}

/// Process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Worker threads; `None` means one per online CPU.
    pub workers: Option<usize>,
    /// Pin worker N to CPU N (modulo the CPUs the process may run on).
    pub pin_workers: bool,
    pub engine: EngineChoice,
    pub relay: RelayMode,
    /// Global cap on concurrently proxied client connections.
    pub maxconn: u32,
    /// On SIGTERM: how long established connections may go on before they are closed.
    pub drain_timeout: Duration,
    /// Admin listener (`/metrics`, backend API); `None` disables it.
    pub admin: Option<SocketAddr>,
    /// Per-source-address connection rate limit, checked at accept.
    pub source_rate: Option<SourceRate>,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            workers: None,
            pin_workers: true,
            engine: EngineChoice::Auto,
            relay: RelayMode::Buffered,
            maxconn: 100_000,
            drain_timeout: Duration::from_secs(30),
            admin: None,
            source_rate: None,
        }
    }
}

/// At most `max` new connections per source address per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRate {
    pub max: u32,
    pub period: Duration,
}

/// One listening address (typically an anycast VIP and port) and the pool it feeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    /// Index into [`LbConfig::pools`].
    pub pool: usize,
}

/// A pool of interchangeable backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
    pub health: HealthCheck,
    /// PROXY protocol header sent to this pool's backends.
    pub proxy_protocol: Option<ProxyVersion>,
    pub connect_timeout: Duration,
    /// A connection with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// How many other backends to try after a failed connect (bounded by the pool size).
    pub connect_retries: u32,
}

/// One backend server.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Display name; defaults to the address.
    pub name: String,
    pub addr: SocketAddr,
    /// Relative weight, 1..=256; weight 0 is not allowed (use drain instead).
    pub weight: u32,
    /// Per-backend cap on concurrent connections; `None` is unlimited.
    pub maxconn: Option<u32>,
}

/// Health checking of one pool's backends.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before a down backend is put back in rotation.
    pub rise: u32,
    /// Consecutive failures before an up backend is taken out.
    pub fall: u32,
    /// EHLO name used by SMTP checks.
    pub ehlo_name: String,
    /// SNI sent by TLS checks; `None` sends none.
    pub tls_server_name: Option<String>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            ehlo_name: "ringmail-lb.invalid".to_string(),
            tls_server_name: None,
        }
    }
}

impl Pool {
    /// A pool with the defaults used by quick mode (`ringmail lb --listen … --backend …`).
    pub fn quick(name: &str, backends: Vec<SocketAddr>) -> Pool {
        Pool {
            name: name.to_string(),
            algorithm: Algorithm::LeastConn,
            backends: backends
                .into_iter()
                .map(|addr| Backend {
                    name: addr.to_string(),
                    addr,
                    weight: 1,
                    maxconn: None,
                })
                .collect(),
            health: HealthCheck::default(),
            proxy_protocol: None,
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(1800),
            connect_retries: 2,
        }
    }
}

/// The anycast glue: which service addresses (VIPs) this host announces, when, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    pub mode: AnnounceMode,
    /// How the host is made to accept the VIPs' traffic.
    pub loopback: Loopback,
    /// A VIP must be healthy this long before it is announced.
    pub announce_delay: Duration,
    /// Cap of the announce delay, which doubles with each withdrawal in `flap_window`.
    pub max_announce_delay: Duration,
    pub flap_window: Duration,
    /// Drain: how long routes carry GRACEFUL_SHUTDOWN before they are withdrawn.
    pub graceful_wait: Duration,
    /// Drain: extra copies of the local AS prepended to the AS path (eBGP).
    pub drain_prepend: u8,
    pub vips: Vec<Vip>,
    /// Hand-off of the flows the routers move here from a draining peer.
    pub handoff: Option<Handoff>,
}

/// True for a name the kernel and `nft` accept as an interface name, as the hand-off's
/// `device` must be: 1-15 bytes of letters, digits and `-_.@` (nothing that could end a
/// quoted string in the rules).
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Connection hand-off between the LB hosts of a site.
///
/// When a peer drains, the routers stop sending it traffic: per-flow ECMP then hashes the
/// peer's established connections to the remaining hosts, which hold no socket for them. With
/// a hand-off, a host passes such packets (TCP, not a SYN, to a VIP, unknown to its conntrack)
/// on to its peers over the shared segment, so the draining peer keeps serving them until they
/// end. The peers drop what they do not own, so nothing is ever passed on twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The other LB hosts' addresses on `device` (one family or both).
    pub peers: Vec<std::net::IpAddr>,
    /// The interface on which the peers are neighbours (same layer-2 segment).
    pub device: String,
    /// DSCP value that marks a handed-off packet (a peer never passes such a packet on).
    pub dscp: u8,
}

/// How the VIPs become local addresses of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loopback {
    /// Addresses on `lo` (/32, /128), added at start, removed at exit when ringmail added them.
    Address,
    /// `local` routes in the kernel's local table, no interface address (for FRR, whose zebra
    /// would shadow the kernel-table routes with connected routes of `lo` addresses).
    LocalRoute,
    /// Left to the operator.
    None,
}

/// How routes reach the routers.
#[derive(Debug, Clone, PartialEq)]
pub enum AnnounceMode {
    /// The built-in, originate-only BGP speaker.
    Bgp(Bgp),
    /// Host routes in a kernel routing table, exported by BIRD or FRR.
    KernelTable { table: u32 },
}

/// One anycast service address.
#[derive(Debug, Clone, PartialEq)]
pub struct Vip {
    pub addr: std::net::IpAddr,
    /// Indexes into [`LbConfig::pools`]; healthy backends are summed over them.
    pub pools: Vec<usize>,
    /// Healthy backends needed to announce, at least 1.
    pub min_healthy: usize,
}

/// The built-in speaker's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Bgp {
    pub local_as: u32,
    pub router_id: std::net::Ipv4Addr,
    /// Proposed hold time (keepalives every third of the negotiated one); zero disables both.
    pub hold_time: Duration,
    /// First reconnect delay after a session fails; doubles up to `max_connect_retry`.
    pub connect_retry: Duration,
    pub max_connect_retry: Duration,
    pub neighbors: Vec<Neighbor>,
}

/// One BGP neighbour (a site router).
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbor {
    pub name: String,
    pub addr: SocketAddr,
    pub remote_as: u32,
    /// Source address of the session; the kernel picks one when absent.
    pub local_address: Option<std::net::IpAddr>,
    pub ipv4: bool,
    pub ipv6: bool,
    pub med: Option<u32>,
    /// LOCAL_PREF sent on iBGP sessions.
    pub local_pref: u32,
    /// Standard communities (`ASN:VALUE`) attached to every route, as `ASN << 16 | VALUE`.
    pub communities: Vec<u32>,
    /// Next-hop overrides; absent: the session's own address of that family (next-hop self).
    pub next_hop_v4: Option<std::net::Ipv4Addr>,
    pub next_hop_v6: Option<std::net::Ipv6Addr>,
}
