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
