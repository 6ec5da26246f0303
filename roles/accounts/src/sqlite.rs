//! SQLite backend: the embedded default (`sqlite:/var/lib/ringmail/accounts.db`).
//!
//! One connection behind a mutex, used only from `spawn_blocking` threads so no runtime thread
//! ever waits on SQLite. The lock is held for the queries only: password verification (the
//! expensive part of a login) runs after it is released, so logins verify in parallel.
//!
//! The database is created on first use (with its parent directory), in WAL mode with foreign
//! keys on and a busy timeout, so the admin CLI can write while a server reads. The schema is
//! [`crate::SCHEMA_V1`]; [`MIGRATIONS`] are applied in one transaction at open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use crate::addr::{domain_of, normalize_address, normalize_domain};
use crate::{Account, AccountError, AuthOutcome, password};

/// Schema migrations: `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[crate::SCHEMA_V1];

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite account store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> AccountError {
    AccountError::Unavailable(e.to_string())
}

/// Maps a SQLite error: constraint violations are the caller's fault, the rest is the store's.
fn db_err(e: rusqlite::Error) -> AccountError {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => {
            AccountError::Invalid(format!("refused by the account store: {e}"))
        }
        _ => AccountError::Unavailable(format!("sqlite: {e}")),
    }
}

fn invalid(msg: impl Into<String>) -> AccountError {
    AccountError::Invalid(msg.into())
}

fn quota_to_db(q: Option<u64>) -> Result<Option<i64>, AccountError> {
    q.map(|q| i64::try_from(q).map_err(|_| invalid("quota too large")))
        .transpose()
}

fn quota_from_db(q: Option<i64>) -> Option<u64> {
    q.and_then(|q| u64::try_from(q).ok())
}

/// Applies the pending migrations in one transaction; refuses a newer schema.
fn migrate(conn: &mut Connection) -> Result<u32, AccountError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let has_table: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let current: u32 = if has_table {
        tx.query_row("SELECT MAX(version) FROM schema_version", [], |r| {
            r.get::<_, Option<u32>>(0)
        })
        .map_err(db_err)?
        .unwrap_or(0)
    } else {
        0
    };
    let latest = MIGRATIONS.len() as u32;
    if current > latest {
        return Err(AccountError::Config(format!(
            "account database schema version {current} is newer than this build knows ({latest}); upgrade ringmail"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(db_err)?;
        tx.execute("DELETE FROM schema_version", [])
            .map_err(db_err)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![i as u32 + 1],
        )
        .map_err(db_err)?;
    }
    tx.commit().map_err(db_err)?;
    Ok(latest)
}

fn aliases_of(conn: &Connection, address: &str) -> rusqlite::Result<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT alias FROM aliases WHERE target = ?1 ORDER BY alias")?;
    st.query_map(params![address], |r| r.get(0))?.collect()
}

/// (account, stored password hash) by primary address.
fn load(conn: &Connection, address: &str) -> rusqlite::Result<Option<(Account, String)>> {
    let row = conn
        .prepare_cached(
            "SELECT address, password, quota_bytes, disabled FROM accounts WHERE address = ?1",
        )?
        .query_row(params![address], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .optional()?;
    let Some((address, hash, quota, disabled)) = row else {
        return Ok(None);
    };
    let aliases = aliases_of(conn, &address)?;
    Ok(Some((
        Account {
            address,
            aliases,
            quota_bytes: quota_from_db(quota),
            disabled,
        },
        hash,
    )))
}

fn exists(conn: &Connection, sql: &str, key: &str) -> Result<bool, AccountError> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.exists(params![key]))
        .map_err(db_err)
}

fn changed(n: usize, what: &str) -> Result<(), AccountError> {
    if n == 0 {
        Err(invalid(format!("no such {what}")))
    } else {
        Ok(())
    }
}

impl SqliteStore {
    /// Opens (creating it and its parent directory if needed) the database at `path` and
    /// brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, AccountError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(path))
            .await
            .map_err(unavailable)?
    }

    fn open_blocking(path: PathBuf) -> Result<SqliteStore, AccountError> {
        if path.as_os_str().is_empty() {
            return Err(AccountError::Config("empty sqlite path".into()));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                AccountError::Config(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let mut conn = Connection::open(&path)
            .map_err(|e| AccountError::Config(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode = %mode, "sqlite account store: WAL mode not available");
        }
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
            .map_err(db_err)?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn with<T, F>(&self, f: F) -> Result<T, AccountError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, AccountError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| unavailable("sqlite connection lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(unavailable)?
    }

    /// Checks a login (`user` is the primary address). Not cached.
    pub async fn authenticate(
        &self,
        user: &str,
        password: &str,
    ) -> Result<AuthOutcome, AccountError> {
        let Ok(user) = normalize_address(user) else {
            return Ok(AuthOutcome::BadCredentials);
        };
        let conn = Arc::clone(&self.conn);
        let password = password.to_string();
        tokio::task::spawn_blocking(move || {
            let row = {
                let guard = conn
                    .lock()
                    .map_err(|_| unavailable("sqlite connection lock poisoned"))?;
                load(&guard, &user).map_err(db_err)?
            };
            // Verify outside the lock.
            Ok(match row {
                None => AuthOutcome::BadCredentials,
                Some((account, hash)) => {
                    if !password::verify(&hash, &password) {
                        AuthOutcome::BadCredentials
                    } else if account.disabled {
                        AuthOutcome::Disabled
                    } else {
                        AuthOutcome::Ok(account)
                    }
                }
            })
        })
        .await
        .map_err(unavailable)?
    }

    /// The account with primary address `address` and its stored password hash.
    pub async fn stored_password(
        &self,
        address: &str,
    ) -> Result<Option<(Account, String)>, AccountError> {
        let Ok(address) = normalize_address(address) else {
            return Ok(None);
        };
        self.with(move |c| load(c, &address).map_err(db_err)).await
    }

    /// The account whose primary address is `address`.
    pub async fn account(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let address = normalize_address(address)?;
        self.with(move |c| Ok(load(c, &address).map_err(db_err)?.map(|(a, _)| a)))
            .await
    }

    /// The account `address` delivers to: its own, or the target of the alias.
    pub async fn resolve(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let address = normalize_address(address)?;
        self.with(move |c| {
            if let Some((a, _)) = load(c, &address).map_err(db_err)? {
                return Ok(Some(a));
            }
            let target: Option<String> = c
                .prepare_cached("SELECT target FROM aliases WHERE alias = ?1")
                .and_then(|mut st| st.query_row(params![address], |r| r.get(0)).optional())
                .map_err(db_err)?;
            match target {
                Some(t) => Ok(load(c, &t).map_err(db_err)?.map(|(a, _)| a)),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn domain_add(&self, domain: &str) -> Result<(), AccountError> {
        let domain = normalize_domain(domain)?;
        self.with(move |c| {
            if exists(c, "SELECT 1 FROM domains WHERE name = ?1", &domain)? {
                return Err(invalid(format!("domain {domain} already exists")));
            }
            c.execute("INSERT INTO domains (name) VALUES (?1)", params![domain])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Deletes a domain; refused while it has accounts or aliases.
    pub async fn domain_del(&self, domain: &str) -> Result<(), AccountError> {
        let domain = normalize_domain(domain)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            if exists(&tx, "SELECT 1 FROM accounts WHERE domain = ?1", &domain)? {
                return Err(invalid(format!(
                    "domain {domain} still has accounts; delete them first"
                )));
            }
            if exists(
                &tx,
                "SELECT 1 FROM aliases WHERE substr(alias, length(alias) - length(?1)) = '@' || ?1",
                &domain,
            )? {
                return Err(invalid(format!(
                    "domain {domain} still has aliases; delete them first"
                )));
            }
            let n = tx
                .execute("DELETE FROM domains WHERE name = ?1", params![domain])
                .map_err(db_err)?;
            changed(n, "domain")?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn domain_list(&self) -> Result<Vec<String>, AccountError> {
        self.with(|c| {
            let mut st = c
                .prepare_cached("SELECT name FROM domains ORDER BY name")
                .map_err(db_err)?;
            st.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(db_err)
        })
        .await
    }

    pub async fn is_local_domain(&self, domain: &str) -> Result<bool, AccountError> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(false);
        };
        self.with(move |c| exists(c, "SELECT 1 FROM domains WHERE name = ?1", &domain))
            .await
    }

    /// Adds an account; `password_hash` is stored as given (see [`crate::password`]).
    pub async fn account_add(
        &self,
        address: &str,
        password_hash: &str,
        quota_bytes: Option<u64>,
    ) -> Result<(), AccountError> {
        let address = normalize_address(address)?;
        let quota = quota_to_db(quota_bytes)?;
        let hash = password_hash.to_string();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let domain = domain_of(&address).to_string();
            if !exists(&tx, "SELECT 1 FROM domains WHERE name = ?1", &domain)? {
                return Err(invalid(format!("domain {domain} is not a local domain")));
            }
            if exists(&tx, "SELECT 1 FROM accounts WHERE address = ?1", &address)? {
                return Err(invalid(format!("account {address} already exists")));
            }
            if exists(&tx, "SELECT 1 FROM aliases WHERE alias = ?1", &address)? {
                return Err(invalid(format!("{address} is already an alias")));
            }
            tx.execute(
                "INSERT INTO accounts (address, domain, password, quota_bytes, disabled) VALUES (?1, ?2, ?3, ?4, FALSE)",
                params![address, domain, hash, quota],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    /// Deletes an account and (cascade) its aliases.
    pub async fn account_del(&self, address: &str) -> Result<(), AccountError> {
        let address = normalize_address(address)?;
        self.with(move |c| {
            let n = c
                .execute("DELETE FROM accounts WHERE address = ?1", params![address])
                .map_err(db_err)?;
            changed(n, "account")
        })
        .await
    }

    pub async fn set_password(
        &self,
        address: &str,
        password_hash: &str,
    ) -> Result<(), AccountError> {
        let address = normalize_address(address)?;
        let hash = password_hash.to_string();
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE accounts SET password = ?2 WHERE address = ?1",
                    params![address, hash],
                )
                .map_err(db_err)?;
            changed(n, "account")
        })
        .await
    }

    pub async fn set_disabled(&self, address: &str, disabled: bool) -> Result<(), AccountError> {
        let address = normalize_address(address)?;
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE accounts SET disabled = ?2 WHERE address = ?1",
                    params![address, disabled],
                )
                .map_err(db_err)?;
            changed(n, "account")
        })
        .await
    }

    /// All accounts (of one domain), ordered by address, with their aliases.
    pub async fn account_list(&self, domain: Option<&str>) -> Result<Vec<Account>, AccountError> {
        let domain = domain.map(normalize_domain).transpose()?;
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT address, quota_bytes, disabled FROM accounts
                     WHERE ?1 IS NULL OR domain = ?1 ORDER BY address",
                )
                .map_err(db_err)?;
            let rows: Vec<(String, Option<i64>, bool)> = st
                .query_map(params![domain], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .and_then(|rows| rows.collect())
                .map_err(db_err)?;
            rows.into_iter()
                .map(|(address, quota, disabled)| {
                    let aliases = aliases_of(c, &address).map_err(db_err)?;
                    Ok(Account {
                        address,
                        aliases,
                        quota_bytes: quota_from_db(quota),
                        disabled,
                    })
                })
                .collect()
        })
        .await
    }

    /// Adds `alias` -> `target`: the target must be an account, the alias's domain local, and
    /// the alias must not already be an account or an alias.
    pub async fn alias_add(&self, alias: &str, target: &str) -> Result<(), AccountError> {
        let alias = normalize_address(alias)?;
        let target = normalize_address(target)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let domain = domain_of(&alias).to_string();
            if !exists(&tx, "SELECT 1 FROM domains WHERE name = ?1", &domain)? {
                return Err(invalid(format!("domain {domain} is not a local domain")));
            }
            if !exists(&tx, "SELECT 1 FROM accounts WHERE address = ?1", &target)? {
                return Err(invalid(format!("no such account {target}")));
            }
            if exists(&tx, "SELECT 1 FROM accounts WHERE address = ?1", &alias)? {
                return Err(invalid(format!("{alias} is already an account")));
            }
            if exists(&tx, "SELECT 1 FROM aliases WHERE alias = ?1", &alias)? {
                return Err(invalid(format!("alias {alias} already exists")));
            }
            tx.execute(
                "INSERT INTO aliases (alias, target) VALUES (?1, ?2)",
                params![alias, target],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    pub async fn alias_del(&self, alias: &str) -> Result<(), AccountError> {
        let alias = normalize_address(alias)?;
        self.with(move |c| {
            let n = c
                .execute("DELETE FROM aliases WHERE alias = ?1", params![alias])
                .map_err(db_err)?;
            changed(n, "alias")
        })
        .await
    }

    /// (alias, target) pairs (of aliases in one domain), ordered by alias.
    pub async fn alias_list(
        &self,
        domain: Option<&str>,
    ) -> Result<Vec<(String, String)>, AccountError> {
        let domain = domain.map(normalize_domain).transpose()?;
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT alias, target FROM aliases
                     WHERE ?1 IS NULL OR substr(alias, length(alias) - length(?1)) = '@' || ?1
                     ORDER BY alias",
                )
                .map_err(db_err)?;
            st.query_map(params![domain], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(db_err)
        })
        .await
    }
}
