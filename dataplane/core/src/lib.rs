//! # ringmail-proxy-core
//!
//! The I/O-free heart of ringmail's anycast load balancer. Nothing in this crate touches a socket, a
//! file descriptor or a clock: bytes, addresses and the current time go in; decisions come out. The
//! same code runs under the io_uring engine, the epoll fallback engine and in-memory tests.
//!
//! ```text
//!            accept                       pick backend            connect / retry
//!  client ───────────▶ [ratelimit] ──▶ [balance] ──────────▶ [session] ─────────▶ backend
//!                                          ▲                      │ PROXY v1/v2 header
//!                           [health] rise/fall state              ▼ relay, half-close, idle timeout
//! ```
//!
//! - [`config`]: the TOML configuration, validated into runtime types, every error with file:line.
//! - [`balance`]: least-connections, round-robin, smooth weighted round-robin, Maglev source hashing.
//! - [`health`]: rise/fall hysteresis and the check dialogues (TCP, SMTP, SMTP+STARTTLS, IMAP, TLS).
//! - [`proxy_protocol`]: HAProxy PROXY protocol v1 and v2, encoder and strict parser.
//! - [`ratelimit`]: a lock-free per-source connection rate limiter shared by all workers.
//! - [`session`]: one proxied connection's lifecycle (connect, retries, header, relay, close).
#![forbid(unsafe_code)]

pub mod balance;
pub mod config;
pub mod health;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod session;
