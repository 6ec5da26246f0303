//! ringmail-accounts: who our users are, and what they may send as.
//!
//! ```text
//!   MSA (AUTH, sender authorisation) ─┐                 ┌─ sqlite.rs   (embedded default)
//!   MX  (unknown users at RCPT)      ─┼─▶ Accounts ─────┼─ postgres.rs (shared store, pooled)
//!   `ringmail accounts` (admin)      ─┘   + cache       └─ ldap.rs     (AD/OpenLDAP, bind as user)
//! ```
//!
//! - [`Accounts`] is the facade the roles use: it picks the backend from a URL, caches
//!   lookups and logins ([`cache`]), and hashes passwords for the admin operations
//!   ([`password`], argon2id).
//! - [`scram`]: the `{SCRAM-SHA-256}` stored secret (Dovecot 2.3 form) and an I/O-free
//!   SCRAM-SHA-256 server exchange; [`Accounts::scram_secret`] hands the secret to the MSA.
//! - [`normalize_address`] / [`normalize_domain`] ([`addr`]) are the one definition of
//!   address equality; every backend normalizes every address it is given.
//! - Each backend is a struct with the same inherent async methods (no trait, so no boxing):
//!
//! ```text
//! authenticate(user, password) -> AuthOutcome      (uncached; user = primary address)
//! stored_password(address) -> Option<(Account, String)>  (SQL only: SCRAM needs the secret;
//!                                                   LDAP authenticates by bind and refuses)
//! account(address)  -> Option<Account>              (by primary address)
//! resolve(address)  -> Option<Account>              (primary address or alias)
//! domain_add / domain_del (refused while the domain has accounts) / domain_list / is_local_domain
//! account_add(address, password_hash, quota)        (the domain must exist)
//! account_del / set_password(address, hash) / set_disabled / account_list(Option<domain>)
//! alias_add(alias, target)                          (target an account, alias domain local)
//! alias_del / alias_list(Option<domain>) -> Vec<(alias, target)>
//! ```
//!
//! ## SQL schema (SQLite and PostgreSQL)
//!
//! ```sql
//! CREATE TABLE schema_version (version INTEGER NOT NULL);
//! CREATE TABLE domains  (name TEXT PRIMARY KEY);
//! CREATE TABLE accounts (address TEXT PRIMARY KEY, domain TEXT NOT NULL REFERENCES domains(name),
//!                        password TEXT NOT NULL, quota_bytes BIGINT, disabled BOOLEAN NOT NULL DEFAULT FALSE);
//! CREATE TABLE aliases  (alias TEXT PRIMARY KEY, target TEXT NOT NULL REFERENCES accounts(address) ON DELETE CASCADE);
//! ```
//!
//! `schema_version` holds one row: the version of the schema (1 = the above). Migrations are
//! applied in one transaction when the store is opened; a database with a newer version than
//! the build knows is refused ([`AccountError::Config`]). Addresses and domain names are stored
//! normalized; `password` is a Dovecot-style `{SCHEME}hash` ([`password`]).
#![forbid(unsafe_code)]

use std::sync::Arc;

pub mod addr;
pub mod cache;
#[cfg(test)]
mod fake;
pub mod ldap;
pub mod password;
pub mod postgres;
pub mod scram;
pub mod sqlite;
#[cfg(test)]
mod tests;

pub use addr::{normalize_address, normalize_domain};

/// Schema version 1 (see the crate documentation), as executed by the SQL backends.
pub const SCHEMA_V1: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE domains  (name TEXT PRIMARY KEY);
CREATE TABLE accounts (address TEXT PRIMARY KEY, domain TEXT NOT NULL REFERENCES domains(name),
                       password TEXT NOT NULL, quota_bytes BIGINT, disabled BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE aliases  (alias TEXT PRIMARY KEY, target TEXT NOT NULL REFERENCES accounts(address) ON DELETE CASCADE);
";

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

/// How `ringmail accounts` stores a new password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PasswordScheme {
    /// `{ARGON2ID}`: the default, the strongest against offline cracking; PLAIN/LOGIN only.
    #[default]
    Argon2id,
    /// `{SCRAM-SHA-256}` (Dovecot format): also usable by SASL SCRAM-SHA-256, weaker against
    /// offline cracking (see [`scram`]).
    ScramSha256 {
        /// PBKDF2 iterations, [`scram::MIN_ITERATIONS`]..=[`scram::MAX_ITERATIONS`].
        iterations: u32,
    },
}

impl PasswordScheme {
    /// Checks that `password` can be stored with this scheme, then hashes it (slow: call it
    /// from a blocking thread).
    pub fn hash(self, password: &str) -> Result<String, AccountError> {
        check_new_password(password)?;
        match self {
            PasswordScheme::Argon2id => Ok(password::hash(password)),
            PasswordScheme::ScramSha256 { iterations } => {
                if !(scram::MIN_ITERATIONS..=scram::MAX_ITERATIONS).contains(&iterations) {
                    return Err(AccountError::Invalid(format!(
                        "SCRAM iterations must be {}..={}",
                        scram::MIN_ITERATIONS,
                        scram::MAX_ITERATIONS
                    )));
                }
                scram::check_password(password)
                    .map_err(|e| AccountError::Invalid(format!("{e}; use argon2id")))?;
                Ok(scram::hash(password, iterations))
            }
        }
    }
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

/// The backend behind an [`Accounts`].
///
/// When merging the PostgreSQL and LDAP backends, add
/// `Postgres(postgres::PgStore)` and `Ldap(ldap::LdapStore)` here, one arm each in
/// `dispatch!` and [`Accounts::kind`], and the two URL schemes in [`Accounts::open`].
#[derive(Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
    Ldap(Box<ldap::LdapStore>),
    #[cfg(test)]
    Fake(fake::FakeStore),
}

/// `dispatch!(store, s => s.method(args))`: calls the same method on whichever backend.
macro_rules! dispatch {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
            Store::Ldap($s) => $call,
            #[cfg(test)]
            Store::Fake($s) => $call,
        }
    };
}

/// The account store as the roles see it: a backend plus a cache. Cheap to clone; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Accounts {
    store: Arc<Store>,
    cache: cache::Cache,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AccountError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AccountError::Unavailable(e.to_string()))
}

impl Accounts {
    /// Opens the store named by `url`:
    /// - `sqlite:PATH` (also `sqlite://PATH`; `sqlite:///abs/path`): created on first use;
    /// - `postgres://...`, `ldap://...`, `ldaps://...`: see [`Store`].
    pub async fn open(url: &str) -> Result<Accounts, AccountError> {
        Accounts::open_with_cache(url, cache::Cache::default()).await
    }

    /// [`Accounts::open`] with the given cache (the login benchmark uses a zero TTL to measure
    /// the backend itself).
    pub async fn open_with_cache(url: &str, cache: cache::Cache) -> Result<Accounts, AccountError> {
        let url = url.trim();
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(AccountError::Config("sqlite: URL without a path".into()));
            }
            let store = sqlite::SqliteStore::open(path).await?;
            return Ok(Accounts::with_cache(Store::Sqlite(store), cache));
        }
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => Ok(Accounts::with_cache(
                Store::Postgres(postgres::PgStore::connect(url).await?),
                cache,
            )),
            "ldap" | "ldaps" => Ok(Accounts::with_cache(
                Store::Ldap(Box::new(ldap::LdapStore::connect(url).await?)),
                cache,
            )),
            _ => Err(AccountError::Config(
                "unknown account store URL scheme (expected sqlite:, postgres:// or ldap(s)://)"
                    .into(),
            )),
        }
    }

    /// Wraps an opened backend with a fresh cache.
    pub fn new(store: Store) -> Accounts {
        Accounts::with_cache(store, cache::Cache::default())
    }

    /// Wraps an opened backend with the given cache (e.g. other TTLs).
    pub fn with_cache(store: Store, cache: cache::Cache) -> Accounts {
        Accounts {
            store: Arc::new(store),
            cache,
        }
    }

    /// `"sqlite"`, `"postgres"` or `"ldap"`.
    pub fn kind(&self) -> &'static str {
        match &*self.store {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
            Store::Ldap(_) => "ldap",
            #[cfg(test)]
            Store::Fake(_) => "fake",
        }
    }

    /// The backend.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The cache.
    pub fn cache(&self) -> &cache::Cache {
        &self.cache
    }

    /// Checks a login, cached (see [`cache`]): repeated logins with the same password and
    /// logins for users that do not exist do not reach the store within the TTLs.
    ///
    /// Note: the cached paths are faster than a store round trip plus a hash verification, so
    /// timing shows whether a user exists; the MX already tells that at RCPT time.
    pub async fn authenticate(
        &self,
        user: &str,
        password: &str,
    ) -> Result<AuthOutcome, AccountError> {
        let Ok(user) = normalize_address(user) else {
            return Ok(AuthOutcome::BadCredentials);
        };
        if password.is_empty() || password.len() > 4096 {
            return Ok(AuthOutcome::BadCredentials);
        }
        // Unknown user (cached negative resolve): refuse without touching the store.
        if let Some(None) = self.cache.get_resolve(&user) {
            return Ok(AuthOutcome::BadCredentials);
        }
        let key = self.cache.login_key(&user, password);
        match self.cache.get_login(&key) {
            Some(Some(account)) => return Ok(AuthOutcome::Ok(account)),
            Some(None) => return Ok(AuthOutcome::BadCredentials),
            None => {}
        }
        let outcome = dispatch!(&*self.store, s => s.authenticate(&user, password).await)?;
        match &outcome {
            AuthOutcome::Ok(account) => self.cache.put_login(key, Some(account.clone())),
            AuthOutcome::BadCredentials => {
                self.cache.put_login(key, None);
                // Remember unknown users so a flood for them stops here.
                if self.cache.get_resolve(&user).is_none() {
                    let found = dispatch!(&*self.store, s => s.account(&user).await)?;
                    if found.is_none() {
                        self.cache.put_resolve(&user, None);
                    }
                }
            }
            // Not cached: the account may be re-enabled at any time.
            AuthOutcome::Disabled => {}
        }
        Ok(outcome)
    }

    /// The SCRAM-SHA-256 secret of the account with primary address `user`, for a SASL
    /// SCRAM exchange ([`scram::ScramServer`]). `None` for an unknown user, an invalid address
    /// and an account whose password is stored with another scheme: the caller answers all
    /// three with [`scram::ScramSecret::fake`], so none is told apart from a wrong password.
    /// Disabled accounts are returned (with `disabled` set): the caller refuses them only
    /// after a correct proof, as [`Accounts::authenticate`] does.
    ///
    /// Not cached, except that an unknown user in the negative resolve cache does not reach
    /// the store (the login cache is keyed by the password, which SCRAM never sees). LDAP
    /// stores authenticate by bind and cannot hand out a secret: [`AccountError::ReadOnly`].
    pub async fn scram_secret(
        &self,
        user: &str,
    ) -> Result<Option<(Account, scram::ScramSecret)>, AccountError> {
        let Ok(user) = normalize_address(user) else {
            return Ok(None);
        };
        if let Some(None) = self.cache.get_resolve(&user) {
            return Ok(None);
        }
        let found = dispatch!(&*self.store, s => s.stored_password(&user).await)?;
        let Some((account, stored)) = found else {
            self.cache.put_resolve(&user, None);
            return Ok(None);
        };
        Ok(scram::from_stored(&stored).map(|secret| (account, secret)))
    }

    /// Whether the store can hand out stored secrets (SQL stores; not LDAP).
    pub fn holds_secrets(&self) -> bool {
        !matches!(&*self.store, Store::Ldap(_))
    }

    /// The account `address` (primary or alias) belongs to; cached, positive and negative.
    /// An invalid address resolves to `None`.
    pub async fn resolve(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let Ok(address) = normalize_address(address) else {
            return Ok(None);
        };
        if let Some(hit) = self.cache.get_resolve(&address) {
            return Ok(hit);
        }
        let found = dispatch!(&*self.store, s => s.resolve(&address).await)?;
        self.cache.put_resolve(&address, found.clone());
        Ok(found)
    }

    /// Whether `address` is `account`'s own address or one of its aliases (also aliases added
    /// since `account` was fetched, within the cache TTL). Store errors count as "no".
    pub async fn owns(&self, account: &Account, address: &str) -> bool {
        let Ok(address) = normalize_address(address) else {
            return false;
        };
        let own = normalize_address(&account.address).unwrap_or_default();
        if address == own
            || account
                .aliases
                .iter()
                .any(|a| normalize_address(a).is_ok_and(|a| a == address))
        {
            return true;
        }
        matches!(self.resolve(&address).await, Ok(Some(a)) if a.address == own)
    }

    /// Whether we receive mail for `domain` (uncached: domains are few and the check cheap).
    pub async fn is_local_domain(&self, domain: &str) -> Result<bool, AccountError> {
        dispatch!(&*self.store, s => s.is_local_domain(domain).await)
    }

    /// The account with primary address `address` (uncached).
    pub async fn account(&self, address: &str) -> Result<Option<Account>, AccountError> {
        dispatch!(&*self.store, s => s.account(address).await)
    }

    /// Forgets every cached lookup and login.
    pub fn invalidate_cache(&self) {
        self.cache.clear();
    }

    fn written<T>(&self, r: Result<T, AccountError>) -> Result<T, AccountError> {
        // Clear even on failure: a failed write may have raced with a successful one.
        self.cache.clear();
        r
    }

    pub async fn domain_add(&self, domain: &str) -> Result<(), AccountError> {
        let r = dispatch!(&*self.store, s => s.domain_add(domain).await);
        self.written(r)
    }

    /// Refused while the domain has accounts (or aliases).
    pub async fn domain_del(&self, domain: &str) -> Result<(), AccountError> {
        let r = dispatch!(&*self.store, s => s.domain_del(domain).await);
        self.written(r)
    }

    pub async fn domain_list(&self) -> Result<Vec<String>, AccountError> {
        dispatch!(&*self.store, s => s.domain_list().await)
    }

    /// Adds an account with an argon2id hash of `password`.
    pub async fn account_add(
        &self,
        address: &str,
        password: &str,
        quota: Option<u64>,
    ) -> Result<(), AccountError> {
        self.account_add_with(address, password, quota, PasswordScheme::Argon2id)
            .await
    }

    /// Adds an account, storing `password` with `scheme`.
    pub async fn account_add_with(
        &self,
        address: &str,
        password: &str,
        quota: Option<u64>,
        scheme: PasswordScheme,
    ) -> Result<(), AccountError> {
        check_new_password(password)?;
        let pw = password.to_string();
        let hash = blocking(move || scheme.hash(&pw)).await??;
        self.account_add_hashed(address, &hash, quota).await
    }

    /// Adds an account with an already hashed password (e.g. imported from Dovecot); the hash
    /// must be in a format [`password::verify`] understands.
    pub async fn account_add_hashed(
        &self,
        address: &str,
        password_hash: &str,
        quota: Option<u64>,
    ) -> Result<(), AccountError> {
        check_hash(password_hash)?;
        let r = dispatch!(&*self.store, s => s.account_add(address, password_hash, quota).await);
        self.written(r)
    }

    /// Deletes an account and its aliases.
    pub async fn account_del(&self, address: &str) -> Result<(), AccountError> {
        let r = dispatch!(&*self.store, s => s.account_del(address).await);
        self.written(r)
    }

    /// Sets a new password (stored as an argon2id hash).
    pub async fn set_password(&self, address: &str, password: &str) -> Result<(), AccountError> {
        self.set_password_with(address, password, PasswordScheme::Argon2id)
            .await
    }

    /// Sets a new password, stored with `scheme`.
    pub async fn set_password_with(
        &self,
        address: &str,
        password: &str,
        scheme: PasswordScheme,
    ) -> Result<(), AccountError> {
        check_new_password(password)?;
        let pw = password.to_string();
        let hash = blocking(move || scheme.hash(&pw)).await??;
        self.set_password_hashed(address, &hash).await
    }

    /// Sets an already hashed password.
    pub async fn set_password_hashed(
        &self,
        address: &str,
        password_hash: &str,
    ) -> Result<(), AccountError> {
        check_hash(password_hash)?;
        let r = dispatch!(&*self.store, s => s.set_password(address, password_hash).await);
        self.written(r)
    }

    pub async fn set_disabled(&self, address: &str, disabled: bool) -> Result<(), AccountError> {
        let r = dispatch!(&*self.store, s => s.set_disabled(address, disabled).await);
        self.written(r)
    }

    pub async fn account_list(&self, domain: Option<&str>) -> Result<Vec<Account>, AccountError> {
        dispatch!(&*self.store, s => s.account_list(domain).await)
    }

    pub async fn alias_add(&self, alias: &str, target: &str) -> Result<(), AccountError> {
        let r = dispatch!(&*self.store, s => s.alias_add(alias, target).await);
        self.written(r)
    }

    pub async fn alias_del(&self, alias: &str) -> Result<(), AccountError> {
        let r = dispatch!(&*self.store, s => s.alias_del(alias).await);
        self.written(r)
    }

    pub async fn alias_list(
        &self,
        domain: Option<&str>,
    ) -> Result<Vec<(String, String)>, AccountError> {
        dispatch!(&*self.store, s => s.alias_list(domain).await)
    }
}

fn check_new_password(password: &str) -> Result<(), AccountError> {
    if password.is_empty() {
        return Err(AccountError::Invalid("empty password".into()));
    }
    if password.len() > 4096 {
        return Err(AccountError::Invalid("password too long".into()));
    }
    if password
        .chars()
        .any(|c| c == '\0' || c == '\r' || c == '\n')
    {
        return Err(AccountError::Invalid(
            "password contains NUL, CR or LF (unusable with SASL PLAIN / IMAP LOGIN)".into(),
        ));
    }
    Ok(())
}

fn check_hash(hash: &str) -> Result<(), AccountError> {
    if password::is_supported(hash) {
        Ok(())
    } else {
        Err(AccountError::Invalid(
            "password hash in an unsupported format".into(),
        ))
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Accounts>();
};
