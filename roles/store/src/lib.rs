//! ringmail-store: mailbox storage for LMTP delivery (MDA) and the IMAP server.
#![forbid(unsafe_code)]

mod error;
mod index;
mod mailbox;
mod maildir;
mod names;
mod store;
mod sync;

pub use error::StoreError;
pub use mailbox::{Changes, Copied, Expunged, FlagOp, FlagUpdate, Mailbox, MessageMeta};
pub use maildir::{FileName, Flag, VsizeCounter, valid_keyword};
pub use names::{MAX_NAME_LEN, MailboxName, SpecialUse, UserAddress};
pub use store::{ChangeSignal, Delivered, MailboxInfo, Status, Store, StoreOptions, UserStore};

#[cfg(test)]
mod tests;
