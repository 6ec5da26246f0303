//! ringmail-smtp: an I/O-free SMTP/LMTP protocol core, in the style of quinn-proto and rustls:
//! bytes in, events and bytes out. No sockets, no async runtime, no clock reads.
//!
//! ```text
//!            ┌─────────────────────── driver (tokio, mio, tests…) ───────────────────────┐
//!            │  socket bytes ──receive()──▶ ┌──────────┐ ──poll_transmit()──▶ socket     │
//!            │                              │  Server  │                                 │
//!            │  policy, spool ◀─poll_event()│  Client  │◀─accept()/reject()/…─ policy    │
//!            │                              └──────────┘                                 │
//!            └───────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! * [`server::Server`]: one inbound session (MX on port 25, MSA on 587/465 with AUTH, LMTP).
//!   Strict like a hardened Postfix: CRLF-only framing (SMTP smuggling cannot pass), STARTTLS
//!   injection defence, bounded buffers everywhere, typed events that wait for the driver's
//!   verdict.
//! * [`client::Client`]: one outbound session for relays (SMTP or LMTP), with PIPELINING,
//!   STARTTLS, AUTH PLAIN, DSN, DATA or BDAT, and per-recipient results.
//! * [`address`]: the RFC 5321 path grammar ([`Mailbox`], [`Domain`]) and xtext.
//! * [`reply`]: [`Reply`] formatting and strict parsing.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod client;
pub mod command;
pub mod reply;
pub mod secret;
pub mod server;

pub use address::{AddressError, Domain, Mailbox};
pub use client::{Client, ClientConfig, ClientError, ClientEvent, Envelope, StartTlsPolicy};
pub use command::{Body, DsnNotify, DsnRet, MailParams, Orcpt, RcptParams};
pub use reply::{EnhancedCode, Reply, ReplyError};
pub use secret::Secret;
pub use server::{AbortReason, AuthMechanism, Event, Server, ServerConfig};
