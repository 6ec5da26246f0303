//! ringmail-store: mailbox storage for LMTP delivery (the MDA) and the IMAP server.
//!
//! ```text
//!   LMTP (MDA) ──deliver()──┐                 ┌── IMAP session: Mailbox (a UID list over
//!                           │                 │     the process's shared index version)
//!                           ▼                 ▼       refresh() -> Changes (EXISTS/EXPUNGE/FETCH)
//!                      UserStore ── open() ──►        store_flags / copy / move_to / expunge
//!                           │
//!     <root>/<domain>/<localpart>/Maildir/      Dovecot: mail_location = maildir:~/Maildir
//!         cur/ new/ tmp/                        INBOX
//!         .Work.Projects/{cur,new,tmp}          "Work/Projects" (+ empty maildirfolder file)
//!         ringmail-index, ringmail-index.lock   our index of INBOX, its flock
//!         dovecot-uidlist, dovecot-keywords     Dovecot's UID list and keyword letters
//!         subscriptions                         Dovecot's format, version 2
//!         ringmail-uidvalidity                  last UIDVALIDITY handed out in this Maildir
//! ```
//!
//! The API is synchronous (callers run it on a blocking thread) and safe to use from several
//! threads and several processes at once.
//!
//! # Names
//!
//! Users are `localpart@domain`, lower-cased and restricted to dot-atom characters, so a
//! home can never leave the root ([`UserAddress`]). Mailbox names are the IMAP names
//! (modified UTF-7, `/` as delimiter) and are stored on disk unchanged except for `/` -> `.`,
//! as Dovecot's Maildir++ layout does. A `.` inside a name cannot be represented and is
//! refused, as are empty levels, control characters, 8-bit bytes, wildcards and names over
//! [`MAX_NAME_LEN`] bytes ([`MailboxName`]). Every folder directory starts with `.`, so no
//! name can map to `cur`, `new`, `tmp` or a control file.
//!
//! # Messages and flags
//!
//! Message files are named `<secs>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>:2,<flags>`;
//! the flags live only in the name (`D F R S T`, then keyword letters `a`..`z` defined in
//! `dovecot-keywords`), so any Maildir reader agrees on them. Messages are stored as
//! received (no line-end conversion); `W=` is the size with CRLF line ends.
//!
//! # The index
//!
//! `ringmail-index` (per mailbox, see the format in `index.rs`) holds UIDVALIDITY, UIDNEXT,
//! HIGHESTMODSEQ, the first UID not yet seen by a session (`\Recent`), the mtimes of `new/`
//! and `cur/` at the last scan, and per message UID, MODSEQ, size, vsize, internal date and
//! file name, closed by a CRC-32. `dovecot-uidlist` (version 3) is written next to it in the
//! same commit, so UIDs survive a migration in either direction:
//!
//! * index missing or damaged: rebuilt from the directory, with UIDVALIDITY and UIDs from
//!   `dovecot-uidlist` when it parses, else with a new UIDVALIDITY (flags always come from
//!   the file names; MODSEQs restart above the current time in microseconds);
//! * files the index does not know (another MDA, Dovecot, a restore): new UIDs, or the UID
//!   `dovecot-uidlist` gives them if that UID was never used here (>= UIDNEXT);
//! * files gone: expunged; files renamed: flags changed (new MODSEQ);
//! * files in `new/` are moved to `cur/` with `:2,` on the next scan.
//!
//! Every change takes the mailbox's flock (`ringmail-index.lock`; flock excludes other
//! threads too, as each operation opens its own descriptor), loads the index, changes files,
//! and commits: both index files written to tmp files and fsynced, renamed, then one fsync of
//! the mailbox directory. A flag change (STORE) commits the same way without the fsyncs, as
//! Dovecot's `fsync_mode = optimized` does: the flags are in the renamed file names already,
//! and an index that lost them in a power loss is rebuilt from those names. Readers need no
//! lock: the index is only ever replaced whole.
//!
//! # Delivery and crash safety
//!
//! [`UserStore::deliver`] and [`Mailbox::append`] write `tmp/<unique>` and fsync it (no
//! lock held), check the quota with the real size, then under the lock rename the file into
//! `cur/` (`:2,` plus flags), fsync `cur/`, assign `UIDNEXT` and commit the index before
//! returning `Ok`. A crash before the rename leaves only a tmp file; after it, the file is in
//! `cur/` and the next scan gives it a UID (a message that was not acknowledged may thus be
//! delivered, never an acknowledged one lost); after the commit, the UID reported is the one
//! the message keeps. `tests/crash.rs` kills two delivering processes with SIGKILL and checks
//! exactly that.
//!
//! # Noticing changes
//!
//! [`Mailbox::refresh`] is cheap when nothing changed: it compares the index file with the
//! version the view was built from and the mtimes of `new/` and `cur/` with those recorded
//! at the last scan (three stats). Directory mtimes younger than two seconds at the scan are
//! not trusted (a change in the same timestamp tick would not move them), so the directories
//! are rescanned until they are older; within a process, at most once a second per mailbox
//! (other sessions meanwhile trust the mtimes they recorded). A change this process makes
//! under the lock records the mtimes it leaves if they were the recorded ones before it.
//! Within a process, [`ChangeSignal`] wakes IDLE sessions on every change; other processes'
//! changes are found by polling `refresh` (every ~500 ms).
//!
//! The views of one process share the decoded index: one copy per mailbox, with the open
//! file it came from (`shared.rs`). A version this process committed or read is reused as
//! long as a stat shows the same file (inode, size, mtime), so a session picks up another
//! session's change without reading or decoding anything, in one pass over its UID list.
//! Another process's commit replaces the file and is read. Each view keeps only its UIDs in
//! sequence order and its `\Recent` UIDs.
//!
//! # Quota
//!
//! [`StoreOptions::quota_bytes`] / [`StoreOptions::quota_messages`] limit the sum over all
//! mailboxes, computed from the indexes. Deliveries, appends and copies over the limit get
//! [`StoreError::QuotaExceeded`] (the MDA answers `552 5.2.2`, IMAP `NO [OVERQUOTA]`). The
//! check is not atomic with the write: concurrent deliveries can overshoot by one message
//! each, as with Dovecot's Maildir++ quota.
//!
//! # Not supported
//!
//! Dovecot itself running on the same Maildir at the same time (it locks with
//! `dovecot-uidlist.lock`, which this crate does not take): migrations are offline, in either
//! direction. QRESYNC's VANISHED history (expunged UIDs are not kept).
#![forbid(unsafe_code)]

mod error;
mod index;
mod mailbox;
mod maildir;
mod names;
mod shared;
mod store;
mod sync;
mod uids;

pub use error::StoreError;
pub use mailbox::{Changes, Copied, Expunged, FlagOp, FlagUpdate, Mailbox, MessageMeta};
pub use maildir::{FileName, Flag, VsizeCounter, valid_keyword};
pub use names::{MAX_NAME_LEN, MailboxName, SpecialUse, UserAddress};
pub use store::{ChangeSignal, Delivered, MailboxInfo, Status, Store, StoreOptions, UserStore};

#[cfg(test)]
mod tests;
