//! LDAP / Active Directory account store (read-only).
//!
//! Logins are checked by finding the user's entry with the service bind (or anonymously), then
//! binding *as that entry* with the given password (simple bind), so passwords never leave the
//! directory. Use StartTLS or `ldaps://` for anything but loopback.
//!
//! # URL
//!
//! ```text
//! ldap://host:389/?base=dc=example,dc=test&starttls=true&bind_dn=cn=svc,dc=example,dc=test
//!     &bind_password=secret&user_filter=(mail={address})&domains=example.test,example.org
//! ldaps://dc1.corp.example:636/?base=dc=corp,dc=example&user_filter=(userPrincipalName={address})
//!     &alias_attr=proxyAddresses&disabled_filter=(userAccountControl:1.2.840.113556.1.4.803:=2)
//! ```
//!
//! Query parameters (values percent-decoded; write a literal `&` in a filter as `%26`):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `base` | required | search base DN |
//! | `user_filter` | `(mail={address})` | finds the account by login / primary address |
//! | `alias_filter` | `({alias_attr}={address})`, for `proxyAddresses` `(proxyAddresses=smtp:{address})` | finds the account by one of its aliases |
//! | `mail_attr` | `mail` | primary address: the attribute's first value |
//! | `alias_attr` | `mail` | aliases: the other values of `mail_attr` when the same attribute, else all its values; AD `proxyAddresses`: `smtp:`/`SMTP:` values, prefix removed, other types ignored |
//! | `quota_attr` | none | mailbox quota in bytes |
//! | `disabled_filter` | none | an entry that also matches this filter is disabled |
//! | `starttls` | `false` | StartTLS on `ldap://` |
//! | `bind_dn`, `bind_password` | anonymous | service account for the lookups |
//! | `ca_file` | system roots | PEM CA bundle to verify the server with |
//! | `danger_skip_verify` | `false` | do not verify the server certificate (tests only) |
//! | `domains` | none | comma-separated local domains (`is_local_domain`, `domain_list`) |
//! | `timeout` | `10` | seconds per LDAP operation / connect |
//!
//! In filters, `{address}` is the normalized address, `{user}` its local part and `{domain}`
//! its domain, each escaped per RFC 4515. By default (plain `inetOrgPerson`, no extra schema)
//! an account's aliases are the second and later values of `mail`.
//!
//! Administration (adding domains, accounts, aliases, passwords) is done in the directory
//! itself: those calls return [`AccountError::ReadOnly`].

use std::sync::Arc;
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use tokio::sync::Mutex;

use crate::{Account, AccountError, AuthOutcome};

/// LDAP result code: invalidCredentials.
const RC_INVALID_CREDENTIALS: u32 = 49;
/// LDAP result code: sizeLimitExceeded.
const RC_SIZE_LIMIT: u32 = 4;

/// Settings of an [`LdapStore`]; [`LdapConfig::from_url`] documents the URL form.
#[derive(Clone)]
pub struct LdapConfig {
    /// `ldap://host:port` or `ldaps://host:port` (no path or query).
    pub url: String,
    pub starttls: bool,
    pub base_dn: String,
    pub user_filter: String,
    pub alias_filter: String,
    pub mail_attr: String,
    pub alias_attr: String,
    pub quota_attr: Option<String>,
    pub disabled_filter: Option<String>,
    pub bind_dn: Option<String>,
    pub bind_password: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub danger_skip_verify: bool,
    pub domains: Vec<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for LdapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapConfig")
            .field("url", &self.url)
            .field("starttls", &self.starttls)
            .field("base_dn", &self.base_dn)
            .field("user_filter", &self.user_filter)
            .field("alias_filter", &self.alias_filter)
            .field("bind_dn", &self.bind_dn)
            .field("bind_password", &self.bind_password.as_ref().map(|_| "***"))
            .field("domains", &self.domains)
            .finish_non_exhaustive()
    }
}

impl LdapConfig {
    /// Parse the store URL (see the module documentation).
    pub fn from_url(url: &str) -> Result<Self, AccountError> {
        let cfg_err = |m: String| AccountError::Config(format!("ldap url: {m}"));
        let (server, query) = url.split_once('?').unwrap_or((url, ""));
        let server = server.trim_end_matches('/');
        let rest = server
            .strip_prefix("ldap://")
            .or_else(|| server.strip_prefix("ldaps://"))
            .ok_or_else(|| cfg_err("must start with ldap:// or ldaps://".into()))?;
        if rest.is_empty() || rest.contains('/') {
            return Err(cfg_err("expected ldap[s]://host[:port]/?params".into()));
        }
        let mut cfg = LdapConfig {
            url: server.to_owned(),
            starttls: false,
            base_dn: String::new(),
            user_filter: "(mail={address})".into(),
            alias_filter: String::new(),
            mail_attr: "mail".into(),
            alias_attr: "mail".into(),
            quota_attr: None,
            disabled_filter: None,
            bind_dn: None,
            bind_password: None,
            ca_file: None,
            danger_skip_verify: false,
            domains: Vec::new(),
            timeout: Duration::from_secs(10),
        };
        let boolean = |k: &str, v: &str| match v {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(cfg_err(format!("{k}: expected true or false"))),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| cfg_err(format!("{k}: bad %-escape")))?;
            match k {
                "base" => cfg.base_dn = v,
                "user_filter" => cfg.user_filter = v,
                "alias_filter" => cfg.alias_filter = v,
                "mail_attr" => cfg.mail_attr = v,
                "alias_attr" => cfg.alias_attr = v,
                "quota_attr" => cfg.quota_attr = Some(v),
                "disabled_filter" => cfg.disabled_filter = Some(v),
                "starttls" => cfg.starttls = boolean(k, &v)?,
                "bind_dn" => cfg.bind_dn = Some(v),
                "bind_password" => cfg.bind_password = Some(v),
                "ca_file" => cfg.ca_file = Some(v.into()),
                "danger_skip_verify" => cfg.danger_skip_verify = boolean(k, &v)?,
                "domains" => {
                    cfg.domains = v
                        .split(',')
                        .map(|d| d.trim().trim_end_matches('.').to_lowercase())
                        .filter(|d| !d.is_empty())
                        .collect()
                }
                "timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| cfg_err("timeout: expected seconds".into()))?;
                    cfg.timeout = Duration::from_secs(secs.max(1));
                }
                _ => return Err(cfg_err(format!("unknown parameter {k}"))),
            }
        }
        if cfg.base_dn.is_empty() {
            return Err(cfg_err("base= is required".into()));
        }
        if cfg.alias_filter.is_empty() {
            cfg.alias_filter = if cfg.alias_attr.eq_ignore_ascii_case("proxyAddresses") {
                // AD matches proxyAddresses case-insensitively: covers "SMTP:" (primary) too.
                format!("({}=smtp:{{address}})", cfg.alias_attr)
            } else {
                format!("({}={{address}})", cfg.alias_attr)
            };
        }
        if cfg.url.starts_with("ldaps://") && cfg.starttls {
            return Err(cfg_err("starttls=true makes no sense with ldaps://".into()));
        }
        if cfg.bind_dn.is_some() != cfg.bind_password.is_some() {
            return Err(cfg_err("bind_dn and bind_password go together".into()));
        }
        for f in [&cfg.user_filter, &cfg.alias_filter] {
            if !f.contains("{address}") && !f.contains("{user}") {
                return Err(cfg_err(format!(
                    "filter {f} has no {{address}} or {{user}}"
                )));
            }
        }
        Ok(cfg)
    }
}

/// A read-only account store backed by an LDAP directory.
pub struct LdapStore {
    config: LdapConfig,
    settings: LdapConnSettings,
    /// The service connection, shared (ldap3 multiplexes operations on one connection) and
    /// re-established after an error.
    service: Mutex<Option<Ldap>>,
}

impl std::fmt::Debug for LdapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One directory entry seen as an account.
struct Found {
    dn: String,
    account: Account,
}

impl LdapStore {
    /// Parse `url`, connect and (if configured) bind the service account.
    pub async fn connect(url: &str) -> Result<Self, AccountError> {
        Self::with_config(LdapConfig::from_url(url)?).await
    }

    pub async fn with_config(config: LdapConfig) -> Result<Self, AccountError> {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(config.timeout)
            .set_starttls(config.starttls);
        if config.danger_skip_verify {
            settings = settings.set_no_tls_verify(true);
        } else if let Some(ca) = &config.ca_file {
            settings = settings.set_config(tls_config(ca)?);
        }
        let store = LdapStore {
            config,
            settings,
            service: Mutex::new(None),
        };
        store.service().await?;
        Ok(store)
    }

    async fn open(&self) -> Result<Ldap, AccountError> {
        let (conn, ldap) = LdapConnAsync::with_settings(self.settings.clone(), &self.config.url)
            .await
            .map_err(unavailable)?;
        ldap3::drive!(conn);
        Ok(ldap)
    }

    /// The shared service connection, (re)connected and bound if needed.
    async fn service(&self) -> Result<Ldap, AccountError> {
        let mut guard = self.service.lock().await;
        if let Some(ldap) = guard.as_mut()
            && !ldap.is_closed()
        {
            return Ok(ldap.clone());
        }
        *guard = None;
        let mut ldap = self.open().await?;
        if let (Some(dn), Some(pw)) = (&self.config.bind_dn, &self.config.bind_password) {
            let res = ldap
                .with_timeout(self.config.timeout)
                .simple_bind(dn, pw)
                .await
                .map_err(unavailable)?;
            if res.rc != 0 {
                let _ = ldap.unbind().await;
                // A wrong service password is an operator problem, not the user's.
                return Err(AccountError::Unavailable(format!(
                    "ldap service bind as {dn} failed: rc={} {}",
                    res.rc, res.text
                )));
            }
        }
        *guard = Some(ldap.clone());
        Ok(ldap)
    }

    async fn drop_service(&self) {
        *self.service.lock().await = None;
    }

    /// Search with the service connection, retrying once on a fresh connection.
    async fn search(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: Vec<String>,
    ) -> Result<Vec<SearchEntry>, AccountError> {
        let mut last = None;
        for _ in 0..2 {
            let mut ldap = self.service().await?;
            match ldap
                .with_timeout(self.config.timeout)
                .search(base, scope, filter, attrs.clone())
                .await
            {
                Ok(res) => {
                    let ldap3::SearchResult(entries, result) = res;
                    // noSuchObject (32): the base or entry is gone: no match.
                    if result.rc == 32 {
                        return Ok(Vec::new());
                    }
                    if result.rc != 0 && result.rc != RC_SIZE_LIMIT {
                        return Err(AccountError::Unavailable(format!(
                            "ldap search failed: rc={} {}",
                            result.rc, result.text
                        )));
                    }
                    return Ok(entries.into_iter().map(SearchEntry::construct).collect());
                }
                Err(e) => {
                    self.drop_service().await;
                    last = Some(e);
                }
            }
        }
        Err(unavailable(last.expect("an error")))
    }

    fn attrs(&self) -> Vec<String> {
        let mut attrs = vec![self.config.mail_attr.clone()];
        if self.config.alias_attr != self.config.mail_attr {
            attrs.push(self.config.alias_attr.clone());
        }
        if let Some(q) = &self.config.quota_attr {
            attrs.push(q.clone());
        }
        attrs
    }

    /// Entries matching `filter` (a template), as accounts.
    async fn find(&self, template: &str, address: &str) -> Result<Vec<Found>, AccountError> {
        let filter = fill(template, address);
        let entries = self
            .search(&self.config.base_dn, Scope::Subtree, &filter, self.attrs())
            .await?;
        let mut found = Vec::with_capacity(entries.len());
        for entry in entries {
            let disabled = self.is_disabled(&entry.dn).await?;
            if let Some(account) = self.to_account(&entry, disabled) {
                found.push(Found {
                    dn: entry.dn,
                    account,
                });
            }
        }
        Ok(found)
    }

    async fn is_disabled(&self, dn: &str) -> Result<bool, AccountError> {
        let Some(filter) = &self.config.disabled_filter else {
            return Ok(false);
        };
        let hits = self
            .search(dn, Scope::Base, filter, vec!["1.1".into()])
            .await?;
        Ok(!hits.is_empty())
    }

    fn to_account(&self, entry: &SearchEntry, disabled: bool) -> Option<Account> {
        let values = |attr: &str| -> Vec<String> {
            entry
                .attrs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(attr))
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let proxy_style = self
            .config
            .alias_attr
            .eq_ignore_ascii_case("proxyAddresses");
        let mails = values(&self.config.mail_attr);
        let address = mails.first()?.trim().to_lowercase();
        let mut aliases: Vec<String> = if self.config.alias_attr == self.config.mail_attr {
            mails.iter().skip(1).cloned().collect()
        } else {
            values(&self.config.alias_attr)
        };
        if proxy_style {
            aliases = aliases
                .into_iter()
                .filter_map(|v| {
                    v.get(..5)
                        .filter(|p| p.eq_ignore_ascii_case("smtp:"))
                        .map(|_| v[5..].to_owned())
                })
                .collect();
        }
        let mut aliases: Vec<String> = aliases
            .iter()
            .map(|a| a.trim().to_lowercase())
            .filter(|a| a.contains('@') && *a != address)
            .collect();
        aliases.sort();
        aliases.dedup();
        let quota_bytes = self
            .config
            .quota_attr
            .as_deref()
            .and_then(|q| values(q).first().and_then(|v| v.trim().parse().ok()));
        Some(Account {
            address,
            aliases,
            quota_bytes,
            disabled,
        })
    }

    /// Exactly one entry, or none (ambiguous matches are refused, not guessed).
    async fn find_one(&self, template: &str, address: &str) -> Result<Option<Found>, AccountError> {
        let mut found = self.find(template, address).await?;
        if found.len() > 1 {
            tracing::warn!(
                address,
                entries = found.len(),
                "ldap: several entries match; refusing"
            );
            return Ok(None);
        }
        Ok(found.pop())
    }

    /// Check a login by binding as the user's entry.
    pub async fn authenticate(
        &self,
        user: &str,
        password: &str,
    ) -> Result<AuthOutcome, AccountError> {
        // An empty password would be an unauthenticated bind, which "succeeds" (RFC 4513 5.1.2).
        if password.is_empty() {
            return Ok(AuthOutcome::BadCredentials);
        }
        let Ok(address) = normalize(user) else {
            return Ok(AuthOutcome::BadCredentials);
        };
        let Some(found) = self.find_one(&self.config.user_filter, &address).await? else {
            return Ok(AuthOutcome::BadCredentials);
        };
        // Bind on a connection of its own: the shared one stays bound as the service account.
        let mut ldap = self.open().await?;
        let res = ldap
            .with_timeout(self.config.timeout)
            .simple_bind(&found.dn, password)
            .await;
        let _ = ldap.unbind().await;
        let res = res.map_err(unavailable)?;
        match res.rc {
            0 => {}
            RC_INVALID_CREDENTIALS => return Ok(AuthOutcome::BadCredentials),
            // 53 unwillingToPerform etc.: locked or expired accounts on some servers.
            50 | 53 => return Ok(AuthOutcome::BadCredentials),
            rc => {
                return Err(AccountError::Unavailable(format!(
                    "ldap bind failed: rc={rc} {}",
                    res.text
                )));
            }
        }
        if found.account.disabled {
            return Ok(AuthOutcome::Disabled);
        }
        Ok(AuthOutcome::Ok(found.account))
    }

    /// The account whose primary address is `address`.
    /// Not available: LDAP accounts authenticate by bind, and the directory's password
    /// attribute is normally unreadable (and not in a SCRAM form). SCRAM-SHA-256 is therefore
    /// not offered with an LDAP store.
    pub async fn stored_password(
        &self,
        _address: &str,
    ) -> Result<Option<(Account, String)>, AccountError> {
        Err(AccountError::ReadOnly(
            "LDAP accounts authenticate by bind; stored secrets (SCRAM) are not readable",
        ))
    }

    pub async fn account(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let Ok(address) = normalize(address) else {
            return Ok(None);
        };
        Ok(self
            .find_one(&self.config.user_filter, &address)
            .await?
            .map(|f| f.account)
            .filter(|a| a.address == address))
    }

    /// The account `address` belongs to: its primary address or one of its aliases.
    pub async fn resolve(&self, address: &str) -> Result<Option<Account>, AccountError> {
        let Ok(address) = normalize(address) else {
            return Ok(None);
        };
        if let Some(f) = self.find_one(&self.config.user_filter, &address).await? {
            return Ok(Some(f.account));
        }
        Ok(self
            .find_one(&self.config.alias_filter, &address)
            .await?
            .map(|f| f.account))
    }

    pub async fn domain_add(&self, _domain: &str) -> Result<(), AccountError> {
        Err(AccountError::ReadOnly(
            "domains of an LDAP store are set in its URL (domains=)",
        ))
    }

    pub async fn domain_del(&self, _domain: &str) -> Result<(), AccountError> {
        Err(AccountError::ReadOnly(
            "domains of an LDAP store are set in its URL (domains=)",
        ))
    }

    pub async fn domain_list(&self) -> Result<Vec<String>, AccountError> {
        let mut d = self.config.domains.clone();
        d.sort();
        d.dedup();
        Ok(d)
    }

    pub async fn is_local_domain(&self, domain: &str) -> Result<bool, AccountError> {
        let domain = domain.trim().trim_end_matches('.').to_lowercase();
        Ok(self.config.domains.contains(&domain))
    }

    pub async fn account_add(
        &self,
        _address: &str,
        _password_hash: &str,
        _quota_bytes: Option<u64>,
    ) -> Result<(), AccountError> {
        Err(READ_ONLY)
    }

    pub async fn account_del(&self, _address: &str) -> Result<(), AccountError> {
        Err(READ_ONLY)
    }

    pub async fn set_password(&self, _address: &str, _hash: &str) -> Result<(), AccountError> {
        Err(READ_ONLY)
    }

    pub async fn set_disabled(&self, _address: &str, _disabled: bool) -> Result<(), AccountError> {
        Err(READ_ONLY)
    }

    /// Accounts found with the user filter (`{address}` matching `*@domain`, or `*`).
    pub async fn account_list(&self, domain: Option<&str>) -> Result<Vec<Account>, AccountError> {
        let pattern = match domain {
            Some(d) => format!("*@{}", escape(&d.trim().to_lowercase())),
            None => "*".to_owned(),
        };
        let filter = self
            .config
            .user_filter
            .replace("{address}", &pattern)
            .replace("{user}", "*")
            .replace("{domain}", "*");
        let entries = self
            .search(&self.config.base_dn, Scope::Subtree, &filter, self.attrs())
            .await?;
        let mut out = Vec::new();
        for entry in entries {
            let disabled = self.is_disabled(&entry.dn).await?;
            if let Some(a) = self.to_account(&entry, disabled)
                && domain.is_none_or(|d| a.address.ends_with(&format!("@{}", d.to_lowercase())))
            {
                out.push(a);
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    pub async fn alias_add(&self, _alias: &str, _target: &str) -> Result<(), AccountError> {
        Err(READ_ONLY)
    }

    pub async fn alias_del(&self, _alias: &str) -> Result<(), AccountError> {
        Err(READ_ONLY)
    }

    /// `(alias, target)` pairs of the listed accounts; `domain` filters on the alias's domain.
    pub async fn alias_list(
        &self,
        domain: Option<&str>,
    ) -> Result<Vec<(String, String)>, AccountError> {
        let suffix = domain.map(|d| format!("@{}", d.trim().to_lowercase()));
        let mut out: Vec<(String, String)> = self
            .account_list(None)
            .await?
            .into_iter()
            .flat_map(|a| {
                let target = a.address;
                a.aliases.into_iter().map(move |al| (al, target.clone()))
            })
            .filter(|(al, _)| suffix.as_ref().is_none_or(|s| al.ends_with(s.as_str())))
            .collect();
        out.sort();
        Ok(out)
    }
}

const READ_ONLY: AccountError =
    AccountError::ReadOnly("accounts of an LDAP store are managed in the directory");

fn unavailable(e: ldap3::LdapError) -> AccountError {
    AccountError::Unavailable(format!("ldap: {e}"))
}

/// Escape a value for an LDAP search filter (RFC 4515 section 3): `*`, `(`, `)`, `\` and NUL
/// become `\2a`, `\28`, `\29`, `\5c`, `\00`.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// Fill a filter template with the escaped address and its parts.
fn fill(template: &str, address: &str) -> String {
    let (user, domain) = address.rsplit_once('@').unwrap_or((address, ""));
    template
        .replace("{address}", &escape(address))
        .replace("{user}", &escape(user))
        .replace("{domain}", &escape(domain))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// rustls client configuration trusting the CAs in `ca_file` (PEM).
fn tls_config(ca_file: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, AccountError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let cfg_err =
        |m: String| AccountError::Config(format!("ldap ca_file {}: {m}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| cfg_err(e.to_string()))? {
        let cert = cert.map_err(|e| cfg_err(e.to_string()))?;
        roots.add(cert).map_err(|e| cfg_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(cfg_err("no certificates".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| cfg_err(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

fn normalize(address: &str) -> Result<String, AccountError> {
    crate::normalize_address(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_rfc4515() {
        assert_eq!(escape("alice@example.test"), "alice@example.test");
        assert_eq!(escape("admin*"), "admin\\2a");
        assert_eq!(
            escape("*)(uid=*))(|(uid=*"),
            "\\2a\\29\\28uid=\\2a\\29\\29\\28|\\28uid=\\2a"
        );
        assert_eq!(escape("a\\b\0c"), "a\\5cb\\00c");
        assert_eq!(escape("é(ü)"), "é\\28ü\\29");
    }

    #[test]
    fn fill_escapes_every_placeholder() {
        let f = fill(
            "(&(mail={address})(uid={user})(dc={domain}))",
            "*)(uid=*))(|(uid=*@ex*.test",
        );
        assert_eq!(
            f,
            "(&(mail=\\2a\\29\\28uid=\\2a\\29\\29\\28|\\28uid=\\2a@ex\\2a.test)\
             (uid=\\2a\\29\\28uid=\\2a\\29\\29\\28|\\28uid=\\2a)(dc=ex\\2a.test))"
        );
        // Balanced parentheses: the value cannot close the filter early.
        let depth = f.chars().try_fold(0i32, |d, c| {
            let d = d + match c {
                '(' => 1,
                ')' => -1,
                _ => 0,
            };
            (d >= 0).then_some(d)
        });
        assert_eq!(depth, Some(0));
    }

    #[test]
    fn url_parsing() {
        let c = LdapConfig::from_url(
            "ldap://127.0.0.1:389/?base=dc=example,dc=test&starttls=true\
             &user_filter=(%26(objectClass=person)(mail={address}))&bind_dn=cn=svc,dc=example,dc=test\
             &bind_password=s%26cret&domains=Example.test,example.org.",
        )
        .unwrap();
        assert_eq!(c.url, "ldap://127.0.0.1:389");
        assert!(c.starttls);
        assert_eq!(c.base_dn, "dc=example,dc=test");
        assert_eq!(c.user_filter, "(&(objectClass=person)(mail={address}))");
        assert_eq!(c.alias_filter, "(mail={address})");
        assert_eq!(c.bind_password.as_deref(), Some("s&cret"));
        assert_eq!(c.domains, ["example.test", "example.org"]);
        assert!(!format!("{c:?}").contains("s&cret"));

        let ad = LdapConfig::from_url(
            "ldaps://dc1:636?base=dc=corp&alias_attr=proxyAddresses&user_filter=(userPrincipalName={address})",
        )
        .unwrap();
        assert_eq!(ad.alias_filter, "(proxyAddresses=smtp:{address})");

        for bad in [
            "http://x/?base=dc=x",
            "ldap://x/",
            "ldap://x/?base=dc=x&nope=1",
            "ldap://x/?base=dc=x&starttls=maybe",
            "ldap://x/?base=dc=x&bind_dn=cn=a",
            "ldap://x/?base=dc=x&user_filter=(uid=bob)",
            "ldaps://x/?base=dc=x&starttls=true",
            "ldap://x/?base=%zz",
        ] {
            assert!(
                matches!(LdapConfig::from_url(bad), Err(AccountError::Config(_))),
                "{bad}"
            );
        }
    }
}
