//! PostgreSQL account store: one database shared by every role host, pooled connections.
//!
//! URL: anything `tokio_postgres::Config` parses, e.g.
//! `postgres://user:pass@host:5432/db` or the key/value form
//! `host=/run/postgresql user=ringmail dbname=ringmail` (a `host` starting with `/` is a
//! Unix-socket directory). The schema is the same as the SQLite store's; it is created (or
//! migrated) at `connect`, in one transaction under an advisory lock so that several hosts
//! starting at once do not race.
//!
//! Connection failures map to [`AccountError::Unavailable`] (retryable); constraint
//! violations (duplicate, unknown domain or target) to [`AccountError::Invalid`].

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::{Account, AccountError, AuthOutcome};

/// Current schema version written to `schema_version`.
const SCHEMA_VERSION: i32 = 1;
/// Key of the advisory lock held while creating or migrating the schema ("ringmail" in ASCII).
const MIGRATION_LOCK: i64 = 0x7269_6e67_6d61_696c;
const POOL_SIZE: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_WAIT: Duration = Duration::from_secs(10);

const SCHEMA_V1: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE domains  (name TEXT PRIMARY KEY);
CREATE TABLE accounts (address TEXT PRIMARY KEY, domain TEXT NOT NULL REFERENCES domains(name), password TEXT NOT NULL, quota_bytes BIGINT, disabled BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE aliases  (alias TEXT PRIMARY KEY, target TEXT NOT NULL REFERENCES accounts(address) ON DELETE CASCADE);
";

/// A pooled PostgreSQL account store.
pub struct PgStore {
    pool: Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's config holds the password: never print it.
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connect, create the pool and create/migrate the schema.
    pub async fn connect(url: &str) -> Result<Self, AccountError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| AccountError::Config(format!("postgres url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("ringmail-accounts");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| AccountError::Config(format!("postgres pool: {e}")))?;
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, AccountError> {
        self.pool
            .get()
            .await
            .map_err(|e| AccountError::Unavailable(format!("postgres: {e}")))
    }

    async fn migrate(&self) -> Result<(), AccountError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db_err)?;
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = 'schema_version')",
                &[],
            )
            .await
            .map_err(db_err)?
            .get(0);
        if !exists {
            tx.batch_execute(SCHEMA_V1).await.map_err(db_err)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(db_err)?;
        } else {
            let version: Option<i32> = tx
                .query_one("SELECT max(version) FROM schema_version", &[])
                .await
                .map_err(db_err)?
                .get(0);
            match version {
                Some(v) if v == SCHEMA_VERSION => {}
                // Later migrations go here, each bumping schema_version in this transaction.
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(AccountError::Config(format!(
                        "postgres schema version {v} is newer than this build ({SCHEMA_VERSION})"
                    )));
                }
                other => {
                    return Err(AccountError::Config(format!(
                        "postgres schema version {other:?} not recognised"
                    )));
                }
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    /// Check a login. Unknown user and wrong password both give `BadCredentials`.
    pub async fn authenticate(
        &self,
        user: &str,
        password: &str,
    ) -> Result<AuthOutcome, AccountError> {
        if password.is_empty() {
            return Ok(AuthOutcome::BadCredentials);
        }
        let Ok(address) = normalize(user) else {
            return Ok(AuthOutcome::BadCredentials);
        };
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT password, disabled FROM accounts WHERE address = $1",
                &[&address],
            )
            .await
            .map_err(db_err)?;
        drop(client);
        let Some(row) = row else {
            return Ok(AuthOutcome::BadCredentials);
        };
        let stored: String = row.get(0);
        let disabled: bool = row.get(1);
        let password = password.to_owned();
        // Password hashing is deliberately slow: keep it off the async workers.
        let ok = tokio::task::spawn_blocking(move || verify_password(&stored, &password))
            .await
            .map_err(|e| AccountError::Unavailable(format!("password check: {e}")))?;
        if !ok {
            return Ok(AuthOutcome::BadCredentials);
        }
        if disabled {
            return Ok(AuthOutcome::Disabled);
        }
        match self.account(&address).await? {
            Some(account) => Ok(AuthOutcome::Ok(account)),
            // Deleted between the two queries.
            None => Ok(AuthOutcome::BadCredentials),
        }
    }

    /// The account with primary address `address` and its stored password hash.
    pub async fn stored_password(
        &self,
        address: &str,
    ) -> Result<Option<(Account, String)>, AccountError> {
        let Ok(address) = normalize(address) else {
            return Ok(None);
        };
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT password FROM accounts WHERE address = $1",
                &[&address],
            )
            .await
            .map_err(db_err)?;
        drop(client);
        let Some(row) = row else {
            return Ok(None);
        };
        let stored: String = row.get(0);
        Ok(self.account(&address).await?.map(|a| (a, stored)))
    }

    /// The account whose primary address is `address`.
    pub async fn account(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let Ok(address) = normalize(address) else {
            return Ok(None);
        };
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT address, quota_bytes, disabled FROM accounts WHERE address = $1",
                &[&address],
            )
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let aliases = client
            .query(
                "SELECT alias FROM aliases WHERE target = $1 ORDER BY alias",
                &[&address],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let quota: Option<i64> = row.get(1);
        Ok(Some(Account {
            address: row.get(0),
            aliases,
            quota_bytes: quota.map(|q| q.max(0) as u64),
            disabled: row.get(2),
        }))
    }

    /// The account `address` belongs to: its primary address or one of its aliases.
    pub async fn resolve(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let Ok(address) = normalize(address) else {
            return Ok(None);
        };
        if let Some(account) = self.account(&address).await? {
            return Ok(Some(account));
        }
        let client = self.client().await?;
        let target = client
            .query_opt("SELECT target FROM aliases WHERE alias = $1", &[&address])
            .await
            .map_err(db_err)?;
        drop(client);
        match target {
            Some(row) => self.account(&row.get::<_, String>(0)).await,
            None => Ok(None),
        }
    }

    pub async fn domain_add(&self, domain: &str) -> Result<(), AccountError> {
        let domain = normalize_domain(domain)?;
        let client = self.client().await?;
        client
            .execute("INSERT INTO domains (name) VALUES ($1)", &[&domain])
            .await
            .map_err(|e| constraint_err(e, "domain already exists", "domain"))?;
        Ok(())
    }

    /// Remove a domain; refused while it has accounts or aliases.
    pub async fn domain_del(&self, domain: &str) -> Result<(), AccountError> {
        let domain = normalize_domain(domain)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let aliases: i64 = tx
            .query_one(
                "SELECT count(*) FROM aliases WHERE substr(alias, strpos(alias, '@') + 1) = $1",
                &[&domain],
            )
            .await
            .map_err(db_err)?
            .get(0);
        if aliases > 0 {
            return Err(AccountError::Invalid(format!(
                "domain {domain} still has {aliases} alias(es)"
            )));
        }
        let n = tx
            .execute("DELETE FROM domains WHERE name = $1", &[&domain])
            .await
            .map_err(|e| constraint_err(e, "domain in use", "domain still has accounts"))?;
        if n == 0 {
            return Err(AccountError::Invalid(format!("no such domain: {domain}")));
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    pub async fn domain_list(&self) -> Result<Vec<String>, AccountError> {
        let client = self.client().await?;
        Ok(client
            .query("SELECT name FROM domains ORDER BY name", &[])
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub async fn is_local_domain(&self, domain: &str) -> Result<bool, AccountError> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(false);
        };
        let client = self.client().await?;
        Ok(client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM domains WHERE name = $1)",
                &[&domain],
            )
            .await
            .map_err(db_err)?
            .get(0))
    }

    /// Add an account; `password_hash` is stored as given (already hashed).
    pub async fn account_add(
        &self,
        address: &str,
        password_hash: &str,
        quota_bytes: Option<u64>,
    ) -> Result<(), AccountError> {
        let address = normalize(address)?;
        if password_hash.is_empty() {
            return Err(AccountError::Invalid("empty password hash".into()));
        }
        let quota = quota_to_sql(quota_bytes)?;
        let domain = domain_of(&address).to_owned();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let is_alias: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM aliases WHERE alias = $1)",
                &[&address],
            )
            .await
            .map_err(db_err)?
            .get(0);
        if is_alias {
            return Err(AccountError::Invalid(format!(
                "{address} is already an alias"
            )));
        }
        tx.execute(
            "INSERT INTO accounts (address, domain, password, quota_bytes) VALUES ($1, $2, $3, $4)",
            &[&address, &domain, &password_hash, &quota],
        )
        .await
        .map_err(|e| {
            constraint_err(
                e,
                "account already exists",
                &format!("unknown domain {domain}"),
            )
        })?;
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    /// Delete an account and (by cascade) its aliases.
    pub async fn account_del(&self, address: &str) -> Result<(), AccountError> {
        let address = normalize(address)?;
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM accounts WHERE address = $1", &[&address])
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(no_such_account(&address));
        }
        Ok(())
    }

    pub async fn set_password(
        &self,
        address: &str,
        password_hash: &str,
    ) -> Result<(), AccountError> {
        let address = normalize(address)?;
        if password_hash.is_empty() {
            return Err(AccountError::Invalid("empty password hash".into()));
        }
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE accounts SET password = $2 WHERE address = $1",
                &[&address, &password_hash],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(no_such_account(&address));
        }
        Ok(())
    }

    pub async fn set_disabled(&self, address: &str, disabled: bool) -> Result<(), AccountError> {
        let address = normalize(address)?;
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE accounts SET disabled = $2 WHERE address = $1",
                &[&address, &disabled],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(no_such_account(&address));
        }
        Ok(())
    }

    /// All accounts (of one domain), by address, with their aliases.
    pub async fn account_list(&self, domain: Option<&str>) -> Result<Vec<Account>, AccountError> {
        let domain = domain.map(normalize_domain).transpose()?;
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT address, quota_bytes, disabled FROM accounts \
                 WHERE $1::TEXT IS NULL OR domain = $1 ORDER BY address",
                &[&domain],
            )
            .await
            .map_err(db_err)?;
        let alias_rows = client
            .query(
                "SELECT a.target, a.alias FROM aliases a JOIN accounts c ON c.address = a.target \
                 WHERE $1::TEXT IS NULL OR c.domain = $1 ORDER BY a.alias",
                &[&domain],
            )
            .await
            .map_err(db_err)?;
        let mut aliases: std::collections::HashMap<String, Vec<String>> = Default::default();
        for r in &alias_rows {
            aliases.entry(r.get(0)).or_default().push(r.get(1));
        }
        Ok(rows
            .iter()
            .map(|r| {
                let address: String = r.get(0);
                let quota: Option<i64> = r.get(1);
                Account {
                    aliases: aliases.remove(&address).unwrap_or_default(),
                    address,
                    quota_bytes: quota.map(|q| q.max(0) as u64),
                    disabled: r.get(2),
                }
            })
            .collect())
    }

    /// Add `alias` for the account `target`. The alias must be in a local domain and must not
    /// be an account itself.
    pub async fn alias_add(&self, alias: &str, target: &str) -> Result<(), AccountError> {
        let alias = normalize(alias)?;
        let target = normalize(target)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM accounts WHERE address = $1), \
                        EXISTS (SELECT 1 FROM domains WHERE name = $2)",
                &[&alias, &domain_of(&alias)],
            )
            .await
            .map_err(db_err)?;
        if row.get::<_, bool>(0) {
            return Err(AccountError::Invalid(format!("{alias} is an account")));
        }
        if !row.get::<_, bool>(1) {
            return Err(AccountError::Invalid(format!(
                "unknown domain {}",
                domain_of(&alias)
            )));
        }
        tx.execute(
            "INSERT INTO aliases (alias, target) VALUES ($1, $2)",
            &[&alias, &target],
        )
        .await
        .map_err(|e| {
            constraint_err(
                e,
                "alias already exists",
                &format!("no such account: {target}"),
            )
        })?;
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    pub async fn alias_del(&self, alias: &str) -> Result<(), AccountError> {
        let alias = normalize(alias)?;
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM aliases WHERE alias = $1", &[&alias])
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(AccountError::Invalid(format!("no such alias: {alias}")));
        }
        Ok(())
    }

    /// `(alias, target)` pairs, by alias; `domain` filters on the alias's domain.
    pub async fn alias_list(
        &self,
        domain: Option<&str>,
    ) -> Result<Vec<(String, String)>, AccountError> {
        let domain = domain.map(normalize_domain).transpose()?;
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT alias, target FROM aliases \
                 WHERE $1::TEXT IS NULL OR substr(alias, strpos(alias, '@') + 1) = $1 \
                 ORDER BY alias",
                &[&domain],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

fn no_such_account(address: &str) -> AccountError {
    AccountError::Invalid(format!("no such account: {address}"))
}

fn quota_to_sql(quota: Option<u64>) -> Result<Option<i64>, AccountError> {
    quota
        .map(|q| i64::try_from(q).map_err(|_| AccountError::Invalid("quota too large".into())))
        .transpose()
}

/// Any database error that is not a constraint violation: the store is failing.
fn db_err(e: tokio_postgres::Error) -> AccountError {
    AccountError::Unavailable(format!("postgres: {e}"))
}

/// Map unique / foreign-key violations to `Invalid`, anything else to `Unavailable`.
fn constraint_err(e: tokio_postgres::Error, unique: &str, foreign: &str) -> AccountError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => AccountError::Invalid(unique.to_owned()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            AccountError::Invalid(foreign.to_owned())
        }
        _ => db_err(e),
    }
}

fn normalize_domain(domain: &str) -> Result<String, AccountError> {
    crate::normalize_domain(domain)
}

fn normalize(address: &str) -> Result<String, AccountError> {
    crate::normalize_address(address)
}

fn verify_password(stored: &str, password: &str) -> bool {
    crate::password::verify(stored, password)
}
