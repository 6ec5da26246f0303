//! ringmail-queue: the durable spool.
#![forbid(unsafe_code)]

mod committer;
mod dsn;
mod envelope;
mod error;
mod id;
mod spool;

pub use dsn::dsn_status;
pub use envelope::{
    BodyType, ClientInfo, ENVELOPE_VERSION, Envelope, NewEnvelope, NewRecipient, Notify,
    RcptStatus, RecipientState, Ret, from_unix, rfc5322_date, summary_line, to_unix,
};
pub use error::QueueError;
pub use id::{ID_LEN, QueueId};
pub use spool::{
    AttemptSummary, Claim, Incoming, Outcome, QueueConfig, QueueStats, RecoveryReport, Spool,
    backoff, inspect,
};

#[cfg(test)]
mod tests;
