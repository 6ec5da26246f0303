//! ringmail-queue: the durable mail spool.
//!
//! A [`Spool`] receives messages ([`Spool::begin`], [`Incoming::write`], [`Incoming::commit`]),
//! keeps them across crashes, tells the delivery side what is due ([`Spool::due`],
//! [`Spool::claim`]), records attempts with exponential backoff and expiry
//! ([`Spool::record_attempt`]), and bounces permanent failures as RFC 3464 DSNs.
//!
//! # On-disk format
//!
//! ```text
//! <dir>/
//!   lock                  flock(2)ed by the process that has the spool open
//!   seg/                  small messages, never attempted yet (see `segment.rs`)
//!     <n:016x>.seg          records appended by group-commit rounds: each message's content
//!                           and envelope, then a done record once it is delivered or moved
//!     next.spare            the next segment, zeroed ahead of use; garbage after a crash
//!   tmp/                  envelope writes in progress; garbage after a crash
//!     <id>.<rand>.env       envelope being written (new message or replacement)
//!   msg/                  committed messages with files of their own: always a pair
//!     <id>.data             content as received (trace headers first), never rewritten;
//!                           written here from the start (32 KiB buffered writes): without
//!                           its envelope it is a message being received, garbage after a crash
//!     <id>.env              envelope, versioned JSON (see [`Envelope`]); replaced atomically
//!   corrupt/              unparsable envelopes moved aside at open (never deleted)
//! ```
//!
//! Queue ids are 19 characters of `[0-9a-z]` ([`QueueId`]), sortable by arrival. One flat
//! `msg/` directory means a group commit needs exactly one directory fsync.
//!
//! **Where a message lives.** A message whose content fits in [`QueueConfig::inline_max`]
//! (32 KiB by default: the write buffer every message had anyway, so memory per session does
//! not grow) is kept in memory while it is received and committed as one record appended to
//! the current segment: a group commit round is then one `pwrite` of all its records and one
//! `fdatasync` of a file whose blocks were zeroed and flushed in advance, so no metadata
//! changes (no file created, no rename, no directory fsync, no journal commit per round). When
//! it is delivered or bounced, a done record is appended (no flush, as an unlink would not be
//! flushed). Its first change of envelope (deferred, held, rescheduled) moves it to a file
//! pair in `msg/` first, so a segment only ever waits for first delivery attempts and is
//! deleted, with one unlink for thousands of messages, once every message in it is done. A
//! larger message streams to its own data file from the point it outgrows the buffer.
//!
//! # Commit protocol and crash safety
//!
//! ```text
//!  caller (async)                   committer thread                    disk
//!  ------------------------------   --------------------------------    -------------------
//!  begin: create msg/ID.data
//!  write, write, ... (buffered)
//!  commit: flush, write
//!    tmp/ID.R.env, send job ──────► round n:   fdatasync data + env ──► contents durable
//!    (await oneshot)                round n+1: rename env into msg/
//!                                              fsync(msg/) ─────────► names durable
//!                                              index += ID
//!    Ok(ID) ◄──────────────────────            reply
//! ```
//!
//! Every job of a round shares that round's fsyncs: the fdatasyncs run in parallel on a thread
//! pool and `msg/` is fsynced once per round, and phase 1 of new jobs overlaps phase 2 of the
//! previous ones. The caller's future resolves `Ok` only after the directory fsync, so an
//! acknowledged message has its content and its envelope on stable storage under their final
//! names.
//!
//! The protocol above is that of a message with files of its own; a small message's record is
//! appended in round n and acknowledged after that round's flush (it renames nothing). A
//! segment record is checksummed: a torn round at a segment's end (never acknowledged) is
//! found at open and ignored, and a segment is never appended to after a restart.
//!
//! **For a file pair, the envelope in `msg/` is the commit record.** A message exists iff
//! `msg/ID.env` parses and `msg/ID.data` exists with the envelope's `size`, or its segment
//! record has no done record and no such pair took it over. [`Spool::open`] enforces this:
//!
//! * everything in `tmp/` is removed (envelope writes that never finished);
//! * a data file without envelope, an envelope without data file or a size mismatch is a
//!   reception, commit or deletion interrupted before its directory fsync (the names of one
//!   round may reach the disk in any order before that fsync): never acknowledged, removed;
//! * an envelope that does not parse cannot come from a crash (envelopes are fdatasynced before
//!   their rename), so it is damage: moved to `corrupt/` for a human, not deleted.
//!
//! Why nothing half-written is ever delivered: an envelope is renamed into `msg/` only after
//! its own and its data file's fdatasync returned (with one syncfs per round on a spool file
//! system of its own: in the same round, see the committer), so any envelope visible in `msg/`
//! after a crash has complete content beside it; a data file alone is never delivered.
//!
//! Envelope updates ([`Spool::record_attempt`], [`Spool::retry_now`], ...) write a new
//! `tmp/ID.R.env`, fdatasync it and rename it over `msg/ID.env` (atomic), then fsync `msg/`:
//! after a crash either the old or the new envelope is there, never a mix. Deletion unlinks the
//! envelope first, then the data, without a directory fsync (as Postfix): an unlink survives
//! `kill -9` at once, and only a power loss within the file system's commit interval can bring
//! a delivered message back, to be delivered again (at least once, never lost). A crash
//! between the two unlinks leaves a data file without envelope, removed at open.
//!
//! A DSN is committed (durably) before the failed message's envelope is updated: a crash in
//! between re-attempts the failed recipients and may send a second DSN, but never loses one.
//!
//! After a failed fsync the page cache can no longer be trusted to match the disk, so the spool
//! becomes fail-stop: every later write returns [`QueueError::Poisoned`] until restart.
//!
//! # Duplicates
//!
//! Delivery is at least once. A commit can succeed and the client still not learn it (the
//! connection breaks before the 250 reply is read); the client then sends the message again
//! and it is delivered twice, as RFC 5321 section 6.1 accepts. The SMTP server reports such
//! cases with [`Spool::note_ack_maybe_lost`]; [`QueueStats::acks_maybe_lost`] counts them.
//! Likewise a crash after a delivery but before its [`Spool::record_attempt`] is durable
//! repeats that delivery.
//!
//! # Concurrency
//!
//! The in-memory index (rebuilt at open) holds the schedule as a `BTreeSet` of
//! `(next_attempt, id)`, so [`Spool::due`] touches no files. [`Spool::claim`] is an in-memory
//! lease: a claimed message is not due, cannot be claimed again, deleted or rescheduled, and
//! [`Spool::record_attempt`] requires it, so envelope rewrites of one message never race. One
//! process per spool directory (the `lock` file); [`inspect`] reads a spool another process
//! has open.
#![forbid(unsafe_code)]

mod committer;
mod dsn;
mod envelope;
mod error;
mod id;
mod segment;
mod spool;

pub use dsn::dsn_status;
pub use envelope::{
    BodyType, ClientInfo, ENVELOPE_VERSION, Envelope, NewEnvelope, NewRecipient, Notify,
    RcptStatus, RecipientState, ReportOf, Ret, from_unix, rfc5322_date, summary_line, to_unix,
};
pub use error::QueueError;
pub use id::{ID_LEN, QueueId};
pub use spool::{
    AttemptSummary, Body, Claim, DeliveryStatus, Incoming, Outcome, QueueConfig, QueueStats,
    RecipientResult, RecoveryReport, Spool, SyncMode, backoff, inspect,
};

#[cfg(test)]
mod tests;
