//! Typed errors of the spool.

use std::io;
use std::path::PathBuf;

use crate::QueueId;

/// Everything that can go wrong in the spool.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A file-system operation failed.
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
    /// Another process holds the spool lock.
    #[error("spool {0} is in use by another process")]
    Locked(PathBuf),
    /// An envelope file could not be parsed.
    #[error("corrupt envelope {path}: {reason}")]
    CorruptEnvelope {
        /// The envelope file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// An envelope was written by a newer version of this crate.
    #[error("envelope version {0} is not supported")]
    UnsupportedVersion(u32),
    /// A string is not a valid queue id.
    #[error("invalid queue id {0:?}")]
    InvalidId(String),
    /// No message with this id is queued.
    #[error("message {0} is not in the queue")]
    NotFound(QueueId),
    /// The message is claimed by a delivery worker.
    #[error("message {0} is being delivered")]
    Busy(QueueId),
    /// `record_attempt` was called without holding the message's [`crate::Claim`].
    #[error("message {0} is not claimed")]
    NotClaimed(QueueId),
    /// A message needs at least one recipient.
    #[error("a message needs at least one recipient")]
    NoRecipients,
    /// The committer thread is gone (the spool is shutting down).
    #[error("the spool committer has stopped")]
    CommitterGone,
    /// An earlier fsync failed; the spool refuses further writes (fail-stop: after a failed
    /// fsync the kernel's page cache can no longer be trusted to reflect the disk).
    #[error("the spool stopped accepting writes after an fsync failure")]
    Poisoned,
}

impl QueueError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        QueueError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A copy for fanning one batch failure out to every waiter of the batch.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            QueueError::Io { op, path, source } => QueueError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            QueueError::Locked(p) => QueueError::Locked(p.clone()),
            QueueError::CorruptEnvelope { path, reason } => QueueError::CorruptEnvelope {
                path: path.clone(),
                reason: reason.clone(),
            },
            QueueError::UnsupportedVersion(v) => QueueError::UnsupportedVersion(*v),
            QueueError::InvalidId(s) => QueueError::InvalidId(s.clone()),
            QueueError::NotFound(id) => QueueError::NotFound(id.clone()),
            QueueError::Busy(id) => QueueError::Busy(id.clone()),
            QueueError::NotClaimed(id) => QueueError::NotClaimed(id.clone()),
            QueueError::NoRecipients => QueueError::NoRecipients,
            QueueError::CommitterGone => QueueError::CommitterGone,
            QueueError::Poisoned => QueueError::Poisoned,
        }
    }
}
