//! # ringmail-dataplane
//!
//! The thread-per-core TCP proxy engine behind `ringmail lb`, the part of an anycast LB host
//! that replaces HAProxy in TCP mode in front of IMAPS (993) and submission (587).
//!
//! ```text
//!                 ┌──────────── worker 0 (pinned to CPU 0) ────────────┐
//!  SO_REUSEPORT ─▶│ own listening sockets ─▶ own io_uring (or epoll)   │──▶ backends
//!                 │ Ctx: admit, pick (proxy core) ─ Session per conn   │
//!                 └─────────────────────────────────────────────────────┘
//!                 ┌──────────── worker 1 (pinned to CPU 1) ────────────┐
//!  SO_REUSEPORT ─▶│                  …                                 │──▶ backends
//!                 └─────────────────────────────────────────────────────┘
//!  control thread: config reload, drain ─▶ messages to workers (eventfd wake-up)
//!  health thread:  checks ─▶ backend atomics (up/down) ─▶ read by workers at pick time
//!  admin thread:   /metrics, /api/backends ◀─ per-worker counters (atomics, no locks)
//! ```
//!
//! - [`uring`]: the io_uring engine (multishot accept, connect with linked timeout, provided
//!   buffer ring + multishot receive, send; splice mode driven by ring polls).
//! - [`epoll`]: the fallback engine, chosen when io_uring cannot be set up.
//! - [`worker`]: what both engines share: admission, balancing, bookkeeping.
//! - [`lb`]: starting, reloading and draining the whole thing.
//! - [`healthcheck`], [`admin`], [`stats`], [`runtime`]: control plane and observability.
//!
//! This is the only crate of the workspace with `unsafe` code: system calls and the io_uring
//! submission/buffer-ring contracts, each block with a `SAFETY` comment.

pub mod admin;
pub mod epoll;
pub mod healthcheck;
pub mod lb;
pub mod relay;
pub mod runtime;
pub mod stats;
pub mod sys;
pub mod uring;
pub mod worker;

pub use lb::{Lb, LbError, Options};
