//! Typed errors of the store.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed (our side; usually retryable: 4xx / `NO [SERVERBUG]`).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("create", "fsync", "rename", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The address is not a valid `localpart@domain` (peer's fault, permanent).
    #[error("invalid user address {0:?}: {1}")]
    InvalidUser(String, &'static str),
    /// The mailbox name is refused (client's fault, permanent: `NO [CANNOT]`).
    #[error("invalid mailbox name {0:?}: {1}")]
    InvalidName(String, &'static str),
    /// No such mailbox (`NO [NONEXISTENT]`).
    #[error("mailbox {0:?} does not exist")]
    NoSuchMailbox(String),
    /// The mailbox already exists (`NO [ALREADYEXISTS]`).
    #[error("mailbox {0:?} already exists")]
    MailboxExists(String),
    /// INBOX cannot be deleted.
    #[error("INBOX cannot be deleted")]
    InboxProtected,
    /// The message with this UID is not (or no longer) in the mailbox.
    #[error("no message with UID {0}")]
    NoSuchMessage(u32),
    /// The user's quota would be exceeded (permanent for the sender: `552 5.2.2`,
    /// IMAP `NO [OVERQUOTA]`).
    #[error(
        "quota exceeded: {used} + {adding} bytes / {messages} + {adding_messages} messages over the limit"
    )]
    QuotaExceeded {
        /// Bytes in use before this operation.
        used: u64,
        /// Bytes this operation would add.
        adding: u64,
        /// Messages stored before this operation.
        messages: u64,
        /// Messages this operation would add.
        adding_messages: u64,
    },
    /// A keyword is not a valid IMAP atom, or the mailbox has all 26 Maildir keyword letters
    /// in use already.
    #[error("keyword {0:?} refused: {1}")]
    InvalidKeyword(String, &'static str),
    /// The mailbox has run out of UIDs (2^32 - 1 reached): it needs a new UIDVALIDITY.
    #[error("mailbox UIDs exhausted")]
    UidsExhausted,
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True if retrying later may succeed (I/O trouble on our side); false for errors that will
    /// recur for the same input (bad names, quota, missing mailbox or message).
    pub fn is_temporary(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }
}
