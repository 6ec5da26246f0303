//! The mail store seen by one authenticated IMAP session: [`MailStore`] and its value types.
//!
//! One [`MailStore`] value belongs to one session and one user. It is synchronous; a driver
//! on an async runtime runs the session's `receive` (which calls the store) on a blocking
//! thread. Mailbox names are opaque keys: the session has already refused empty names,
//! NUL and other control characters, but the store must still refuse anything that does not
//! fit its own storage (path traversal such as `..`, names that are too long, …) with
//! [`StoreError::InvalidName`].
//!
//! The session keeps only the UIDs of the selected mailbox (in ascending order, stored as
//! runs of consecutive UIDs): sequence numbers are positions in that list. Flags, modseqs,
//! sizes and dates are asked of the store when a command needs them ([`MailStore::meta`]),
//! so that a store can keep them once for all the sessions of a mailbox. [`MailStore::refresh`]
//! tells what changed since the previous `select`/`refresh`; the session folds changes in at
//! the points where IMAP allows it (RFC 9051 7.5.1), so a store may report its own session's
//! changes again: new UIDs already known, expunged UIDs already gone and flag updates the
//! session itself announced since the previous refresh (same UID, modseq not above) are
//! ignored.

use std::time::SystemTime;

/// A message flag. System flags are typed; anything else is a keyword (an IMAP atom).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    /// `\Seen`
    Seen,
    /// `\Answered`
    Answered,
    /// `\Flagged`
    Flagged,
    /// `\Deleted`
    Deleted,
    /// `\Draft`
    Draft,
    /// A keyword such as `$Forwarded` or `$Junk` (case is kept; compared case-insensitively
    /// by IMAP clients, so stores should keep the first spelling they saw).
    Keyword(String),
}

impl Flag {
    /// The five system flags, in the order `FLAGS` lists them.
    pub const SYSTEM: [Flag; 5] = [
        Flag::Answered,
        Flag::Flagged,
        Flag::Deleted,
        Flag::Seen,
        Flag::Draft,
    ];
}

/// How [`MailStore::store_flags`] combines the given flags with a message's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagOp {
    /// `+FLAGS`
    Add,
    /// `-FLAGS`
    Remove,
    /// `FLAGS`
    Replace,
}

/// RFC 6154 special-use attribute of a mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecialUse {
    /// `\All`
    All,
    /// `\Archive`
    Archive,
    /// `\Drafts`
    Drafts,
    /// `\Flagged`
    Flagged,
    /// `\Junk`
    Junk,
    /// `\Sent`
    Sent,
    /// `\Trash`
    Trash,
}

impl SpecialUse {
    /// The attribute as it appears in LIST responses.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecialUse::All => "\\All",
            SpecialUse::Archive => "\\Archive",
            SpecialUse::Drafts => "\\Drafts",
            SpecialUse::Flagged => "\\Flagged",
            SpecialUse::Junk => "\\Junk",
            SpecialUse::Sent => "\\Sent",
            SpecialUse::Trash => "\\Trash",
        }
    }
}

/// One mailbox as [`MailStore::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxInfo {
    /// Full name, hierarchy levels separated by [`MailboxInfo::delimiter`]. `INBOX` is spelled
    /// `INBOX`.
    pub name: String,
    /// Hierarchy delimiter (`/` for the in-memory store; `None` for a flat namespace).
    pub delimiter: Option<char>,
    /// Special use, if any.
    pub special_use: Option<SpecialUse>,
    /// Whether the user subscribed to it.
    pub subscribed: bool,
    /// `\Noselect`: exists only as a hierarchy level.
    pub noselect: bool,
}

/// What STATUS reports about a mailbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Number of messages.
    pub messages: u32,
    /// Number of messages with `\Recent` (0 is always a valid answer under IMAP4rev2).
    pub recent: u32,
    /// The UID the next message will get.
    pub uidnext: u32,
    /// UIDVALIDITY (never 0).
    pub uidvalidity: u32,
    /// Number of messages without `\Seen`.
    pub unseen: u32,
    /// Number of messages with `\Deleted`.
    pub deleted: u32,
    /// Highest modseq in the mailbox (CONDSTORE); 0 if the store keeps none.
    pub highestmodseq: u64,
    /// Total size of the messages in octets.
    pub size: u64,
}

/// One message in a selected mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageMeta {
    /// UID (never 0).
    pub uid: u32,
    /// Current flags.
    pub flags: Vec<Flag>,
    /// Modseq of the last change (CONDSTORE), at least 1.
    pub modseq: u64,
    /// Size in octets (what RFC822.SIZE reports; must equal the length of `read`).
    pub size: u32,
    /// When the message arrived.
    pub internal_date: SystemTime,
}

/// The mailbox a [`MailStore::select`] opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    /// UIDVALIDITY (never 0).
    pub uidvalidity: u32,
    /// The UID the next message will get.
    pub uidnext: u32,
    /// Highest modseq in the mailbox.
    pub highestmodseq: u64,
    /// The UIDs of the messages, in ascending order.
    pub uids: Vec<u32>,
    /// Whether the session may change the mailbox (false: SELECT answers `[READ-ONLY]`).
    pub writable: bool,
    /// The keywords of the mailbox, listed in the untagged FLAGS and PERMANENTFLAGS of
    /// SELECT: at least those its messages carry (a store that keeps a keyword table, as
    /// Maildir's `dovecot-keywords`, may give all of it). Keywords that come up later are
    /// announced by the session with a new FLAGS response.
    pub keywords: Vec<String>,
}

/// What changed in the selected mailbox since the last `select` or `refresh`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// UIDs of messages that arrived, in ascending order.
    pub new: Vec<u32>,
    /// UIDs that were expunged.
    pub expunged: Vec<u32>,
    /// The last metadata of expunged messages, where the store still had it: the session
    /// shows these messages until it may announce the expunge.
    pub gone: Vec<MessageMeta>,
    /// Flag changes: UID, all flags now, new modseq.
    pub flags: Vec<(u32, Vec<Flag>, u64)>,
    /// Highest modseq now.
    pub highestmodseq: u64,
    /// UIDNEXT now.
    pub uidnext: u32,
}

/// Why a store call failed. The session maps each kind to a response code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The mailbox (or message) does not exist: `NO [NONEXISTENT]`.
    #[error("no such mailbox or message")]
    NotFound,
    /// The mailbox already exists: `NO [ALREADYEXISTS]`.
    #[error("mailbox already exists")]
    AlreadyExists,
    /// The store cannot hold a mailbox of that name: `NO [CANNOT]`.
    #[error("invalid mailbox name")]
    InvalidName,
    /// The operation is not allowed (e.g. deleting INBOX): `NO [CANNOT]`.
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    /// The user is over quota: `NO [OVERQUOTA]`.
    #[error("over quota")]
    OverQuota,
    /// The message is too large for the store: `NO [TOOBIG]`.
    #[error("message too large")]
    TooBig,
    /// Nothing is selected (a driver bug or a store that lost its selection).
    #[error("no mailbox selected")]
    NotSelected,
    /// A temporary failure (I/O, lock contention): `NO [UNAVAILABLE]`; the client may retry.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
}

/// The mailboxes and messages of one user, as one session sees them. See the module docs.
pub trait MailStore: Send {
    /// All mailboxes, including `INBOX`, each with its subscription state.
    fn list(&self) -> Result<Vec<MailboxInfo>, StoreError>;
    /// Creates a mailbox (and missing parent levels).
    fn create(&mut self, name: &str) -> Result<(), StoreError>;
    /// Deletes a mailbox. Deleting INBOX is refused with [`StoreError::NotAllowed`].
    fn delete(&mut self, name: &str) -> Result<(), StoreError>;
    /// Renames a mailbox and its children. Renaming INBOX moves its messages to a new
    /// mailbox and leaves INBOX empty (RFC 9051 6.3.6).
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StoreError>;
    /// Subscribes (`on`) or unsubscribes. The name need not exist.
    fn subscribe(&mut self, name: &str, on: bool) -> Result<(), StoreError>;
    /// Every subscribed name, whether the mailbox exists or not: a subscription outlives the
    /// mailbox it names (DELETE leaves it, as Dovecot does), and LSUB and
    /// `LIST (SUBSCRIBED)` still show it (`\Noselect`, `\NonExistent`).
    fn subscriptions(&self) -> Result<Vec<String>, StoreError>;
    /// Counters of one mailbox, without selecting it.
    fn status(&self, name: &str) -> Result<Status, StoreError>;
    /// Opens a mailbox and takes the snapshot that later `refresh` calls compare against.
    fn select(&mut self, name: &str) -> Result<Selected, StoreError>;
    /// Forgets the selection (UNSELECT, CLOSE, a failed SELECT).
    fn unselect(&mut self);
    /// Changes since the last `select`/`refresh`; advances the snapshot.
    fn refresh(&mut self) -> Result<Changes, StoreError>;
    /// Metadata of one message of the selected mailbox, as of the last `select`/`refresh`
    /// or a later change (flags may be newer than the last refresh reported). `None` for a
    /// UID the store no longer has (e.g. expunged, not yet announced by the session).
    fn meta(&self, uid: u32) -> Option<MessageMeta>;
    /// The full message (RFC 5322 bytes) with this UID in the selected mailbox.
    fn read(&mut self, uid: u32) -> Result<Vec<u8>, StoreError>;
    /// Changes flags of messages in the selected mailbox. With `unchanged_since`, messages
    /// whose modseq is above it are left alone (CONDSTORE). Returns, for each changed (or
    /// matched but unchanged) message: UID, all flags now, modseq now. UIDs that exist but
    /// are missing from the result failed the `unchanged_since` test.
    fn store_flags(
        &mut self,
        uids: &[u32],
        op: FlagOp,
        flags: &[Flag],
        unchanged_since: Option<u64>,
    ) -> Result<Vec<(u32, Vec<Flag>, u64)>, StoreError>;
    /// Adds a message to a mailbox; returns (UIDVALIDITY, UID) of the new message.
    fn append(
        &mut self,
        mailbox: &str,
        message: &[u8],
        flags: &[Flag],
        date: Option<SystemTime>,
    ) -> Result<(u32, u32), StoreError>;
    /// Copies messages of the selected mailbox; returns the destination's UIDVALIDITY and
    /// (source UID, destination UID) pairs.
    fn copy(&mut self, uids: &[u32], dest: &str) -> Result<(u32, Vec<(u32, u32)>), StoreError>;
    /// Moves messages (copy, then expunge from the selected mailbox); same result as `copy`.
    fn move_to(&mut self, uids: &[u32], dest: &str) -> Result<(u32, Vec<(u32, u32)>), StoreError>;
    /// Removes messages flagged `\Deleted` from the selected mailbox (only those among `uids`
    /// when given). Returns the expunged UIDs.
    fn expunge(&mut self, uids: Option<&[u32]>) -> Result<Vec<u32>, StoreError>;
}
