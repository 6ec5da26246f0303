//! ringmail-accounts: who our users are, and what they may send as.
//!
//! ```text
//!   MSA (AUTH, sender authorisation) ─┐                 ┌─ sqlite.rs   (embedded default)
//!   MX  (unknown users at RCPT)      ─┼─▶ Accounts ─────┼─ postgres.rs (shared store, pooled)
//!   `ringmail accounts` (admin)      ─┘   + cache       └─ ldap.rs     (AD/OpenLDAP, bind as user)
//! ```
//!
//! To be written: see the module plan in this crate's modules.
#![forbid(unsafe_code)]

pub mod addr;
pub mod ldap;
pub mod password;
pub mod postgres;
pub mod sqlite;

pub use addr::{normalize_address, normalize_domain};

/// One account. Addresses are stored and compared in lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The primary address, `user@domain`, which is also the login name.
    pub address: String,
    /// Other addresses the account receives mail for and may send as.
    pub aliases: Vec<String>,
    /// Mailbox quota in bytes; `None`: unlimited.
    pub quota_bytes: Option<u64>,
    /// A disabled account cannot log in and receives no mail.
    pub disabled: bool,
}

/// Result of a login attempt (no error detail leaks whether the user exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Ok(Account),
    /// Unknown user or wrong password.
    BadCredentials,
    /// The account exists and the password is right, but it is disabled.
    Disabled,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The store cannot be reached or failed (retryable: 4xx / 454 to the client).
    #[error("account store unavailable: {0}")]
    Unavailable(String),
    /// The operation is not possible on this store (e.g. adding accounts to LDAP).
    #[error("not supported by this account store: {0}")]
    ReadOnly(&'static str),
    /// Bad input (address syntax, unknown domain, duplicate...).
    #[error("{0}")]
    Invalid(String),
    /// The store URL or settings are wrong.
    #[error("account store configuration: {0}")]
    Config(String),
}
