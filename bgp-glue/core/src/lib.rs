//! ringmail-announce-core: the I/O-free half of the anycast glue.
//!
//! ```text
//!  backend health ──► announce::Announcer ──► desired Announcements per VIP
//!  (LB pools or own     (min_healthy, hysteresis,        │
//!   checks), SIGTERM     drain sequence, fake time)       ├──► bgp::Session (per neighbour):
//!                                                         │      bytes in/out, timers, UPDATE diffs
//!                                                         └──► kernel-table routes (BIRD/FRR mode)
//! ```
//!
//! Nothing here touches a socket or a clock: the caller passes `Instant`s in and carries bytes and
//! deadlines out, so every state machine runs the same in production and in memory tests.
#![forbid(unsafe_code)]

pub mod announce;
pub mod bgp;
pub mod handoff;
pub mod route;

pub use route::{Announcement, Community, GRACEFUL_SHUTDOWN};
