//! ringmail-imap: an I/O-free IMAP4rev2 (RFC 9051) / IMAP4rev1 (RFC 3501) server protocol
//! core: bytes in, replies and events out, against a synchronous [`MailStore`].
//!
//! ```text
//!   ┌──────────────────────────── driver (tokio, tests, fuzzer…) ────────────────────────────┐
//!   │ socket bytes ──receive(bytes, now)──▶ ┌─────────┐ ──poll_transmit()──▶ socket          │
//!   │                                       │ Session │                                      │
//!   │ TLS, password check ◀──poll_event()── │         │ ◀──tls_established()/login_result()  │
//!   │ store changed / timer ──changes_available()──▶  │ ──▶ MailStore (one per user session) │
//!   │                                       └─────────┘                                      │
//!   └────────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! * [`Session`]: one connection; states, framing (CRLF lines, `{n}` literals with `+`
//!   continuations, LITERAL+), limits (line, literal, APPEND size, literals per command,
//!   commands per second with a token bucket on the caller's clock, invalid commands before
//!   BYE), STARTTLS with the plaintext-injection defence, LOGIN and AUTHENTICATE PLAIN only
//!   under TLS, IDLE, and consistent sequence numbers.
//! * [`MailStore`] and its types ([`store`]): what a mailbox backend implements; a Maildir
//!   implementation lives in its own crate.
//! * [`MemoryStore`]: an in-memory store shared by sessions, for tests and fuzzing.
//! * `server` (cargo feature `server`): a tokio driver with implicit TLS and STARTTLS.
//!
//! Commands are parsed and responses encoded with `imap-codec`/`imap-types` 1.0; the few
//! extensions that 1.0 lacks (NAMESPACE, ID, UID EXPUNGE, CONDSTORE modifiers, ESEARCH
//! `RETURN`, SEARCHRES `SAVE` and `$`, STATUS `SIZE`, BINARY fetch items and literal8
//! APPEND, LIST-EXTENDED options) are cut out by a small tokenizer before imap-codec parses
//! the rest, and their response items are appended to imap-codec's output. Message structure
//! (ENVELOPE, BODYSTRUCTURE, body sections, SEARCH on headers and text) comes from
//! `mail-parser`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cte;
mod ext;
pub mod memory;
mod message;
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod store;
mod uids;
pub mod utf7;

pub use memory::{MemorySession, MemoryStore};
pub use secret::Secret;
pub use session::{Config, Event, Session};
pub use store::{
    Changes, Flag, FlagOp, MailStore, MailboxInfo, MessageMeta, Selected, SpecialUse, Status,
    StoreError,
};
