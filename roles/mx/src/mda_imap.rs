//! The MDA's IMAP server: the I/O-free IMAP core and its driver (`ringmail-imap`) over the
//! Maildir++ store (`ringmail-store`), logins checked against the account store.
//!
//! ```text
//!  client ─▶ 993 (TLS) / 143 (STARTTLS) ─▶ ringmail_imap::server (tokio, blocking pool for
//!    store calls) ─▶ LOGIN/AUTHENTICATE ─▶ accounts.authenticate ─▶ MaildirStore(user)
//! ```
//!
//! [`MaildirStore`] is one session's view of one user's mailboxes; the selected mailbox is a
//! store [`ringmail_store::Mailbox`] refreshed on demand (IDLE polls it).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use ringmail_accounts::{Accounts, AuthOutcome};
use ringmail_imap::server::{Backend, LoginFuture, ServerConfig as ImapServerConfig};
use ringmail_imap::store::{
    Changes, Flag, FlagOp, MailStore, MailboxInfo, MessageMeta, Selected, SpecialUse, Status,
    StoreError,
};
use ringmail_store as ms;
use tracing::{info, warn};

use crate::limits::{ConnLimits, Refused};
use crate::msa::{FAILURE_WINDOW, Window, failure_delay};

/// Brakes on password guessing and connection floods, per client address (the real client,
/// from the PROXY header when the peer is a trusted LB).
#[derive(Clone, Debug)]
pub struct ImapLimits {
    /// Failed logins per client address within 10 minutes after which its logins are refused
    /// without checking the password. Every failure is answered after a delay growing with
    /// the recent failures of the address or the user name (0.5 s doubling up to 8 s, as the
    /// MSA's AUTH).
    pub max_auth_failures: u32,
    /// Time from connect within which a client must log in (TLS handshake included).
    pub login_timeout: Duration,
    /// Connections at once, in all.
    pub max_connections: usize,
    /// Connections at once per client address, logged in or not.
    pub max_connections_per_ip: usize,
    /// Logged-in sessions at once per user and client address (Dovecot's
    /// `mail_max_userip_connections`).
    pub max_userip_connections: usize,
    /// Sustained commands per second per session (the session's token bucket); `None`: the
    /// IMAP core's default.
    pub commands_per_second: Option<u32>,
}

impl Default for ImapLimits {
    fn default() -> ImapLimits {
        ImapLimits {
            max_auth_failures: 10,
            login_timeout: Duration::from_secs(180),
            max_connections: 20_000,
            max_connections_per_ip: 50,
            max_userip_connections: 10,
            commands_per_second: None,
        }
    }
}

/// What all IMAP connections share: the failure windows and the connection counts.
struct Guard {
    limits: ImapLimits,
    ip_failures: Window<IpAddr>,
    user_failures: Window<String>,
    conns: ConnLimits,
    userip: Mutex<HashMap<(String, IpAddr), usize>>,
}

/// A logged-in session counted against `max_userip_connections` while its store lives.
struct UserIpSlot {
    guard: Arc<Guard>,
    key: (String, IpAddr),
}

impl Guard {
    fn admit_userip(self: &Arc<Guard>, user: &str, ip: IpAddr) -> Option<UserIpSlot> {
        let key = (user.to_ascii_lowercase(), ip);
        let mut m = self.userip.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.limits.max_userip_connections {
            return None;
        }
        *n += 1;
        Some(UserIpSlot {
            guard: Arc::clone(self),
            key,
        })
    }
}

impl Drop for UserIpSlot {
    fn drop(&mut self) {
        let mut m = self.guard.userip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    implicit: bool,
    cfg: Arc<ImapServerConfig>,
    backend: Arc<ImapBackend>,
    trusted: Arc<Vec<crate::config::Cidr>>,
    guard: Arc<Guard>,
) {
    loop {
        let (mut tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "IMAP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (cfg, backend, guard) = (Arc::clone(&cfg), Arc::clone(&backend), Arc::clone(&guard));
        let mut proxied = trusted.iter().any(|c| c.contains(peer.ip()));
        tokio::spawn(async move {
            if proxied && implicit {
                // On the implicit TLS port a TLS record (0x16) first is a direct client (e.g.
                // the LB's own TLS health check), not a PROXY header.
                let mut first = [0u8; 1];
                if let Ok(Ok(1)) =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tcp.peek(&mut first))
                        .await
                    && first[0] == 0x16
                {
                    proxied = false;
                }
            }
            let mut client = peer;
            if proxied {
                match crate::proxy::read_header_exact(&mut tcp, std::time::Duration::from_secs(10))
                    .await
                {
                    Ok(Some(c)) => client = c,
                    Ok(None) => {}
                    Err(e) => {
                        warn!(%peer, error = %e, "refused: a trusted proxy sent no valid PROXY header");
                        return;
                    }
                }
            }
            tracing::debug!(%client, %peer, "imap connection");
            let ip = client.ip();
            let _slot = match guard.conns.admit(ip) {
                Ok(slot) => slot,
                Err(why) => {
                    let limit = match why {
                        Refused::Total => "max_connections",
                        Refused::PerAddress => "max_connections_per_ip",
                    };
                    info!(rip = %ip, limit, "imap connection refused: too many connections");
                    let _ =
                        ringmail_imap::server::refuse(tcp, implicit, &cfg, "Too many connections")
                            .await;
                    return;
                }
            };
            let backend: Arc<dyn Backend> = Arc::new(ClientBackend {
                inner: backend,
                guard: Arc::clone(&guard),
                ip,
            });
            let _ = ringmail_imap::server::connection(tcp, implicit, cfg, backend).await;
        });
    }
}

/// Logins against the account store; each session gets the user's Maildir store.
pub struct ImapBackend {
    pub accounts: Accounts,
    pub store: ms::Store,
}

/// [`ImapBackend`] for one connection: knows the client's address for the failure brakes,
/// the per user+address limit and the log.
struct ClientBackend {
    inner: Arc<ImapBackend>,
    guard: Arc<Guard>,
    ip: IpAddr,
}

impl Backend for ClientBackend {
    fn login(&self, user: String, password: ringmail_imap::Secret) -> LoginFuture {
        let accounts = self.inner.accounts.clone();
        let store = self.inner.store.clone();
        let guard = Arc::clone(&self.guard);
        let ip = self.ip;
        Box::pin(async move {
            let shown = crate::session::printable(&user);
            let max = guard.limits.max_auth_failures as usize;
            if guard.ip_failures.count(&ip, FAILURE_WINDOW) >= max {
                // Locked out: the password is not even checked.
                info!(rip = %ip, user = %shown, "imap login refused: too many authentication failures");
                tokio::time::sleep(failure_delay(max)).await;
                return None;
            }
            // A password that is not UTF-8 cannot match any stored one.
            let outcome = match password.expose_str() {
                Some(pw) => accounts.authenticate(&user, pw).await,
                None => Ok(AuthOutcome::BadCredentials),
            };
            match outcome {
                Ok(AuthOutcome::Ok(account)) => {
                    let Some(slot) = guard.admit_userip(&account.address, ip) else {
                        info!(rip = %ip, user = %shown, "imap login refused: too many connections of this user from this address");
                        return None;
                    };
                    match store.user(&account.address) {
                        Ok(u) => {
                            info!(rip = %ip, user = %shown, "imap login");
                            let mut m = MaildirStore::new(u);
                            m.slot = Some(slot);
                            Some(Box::new(m) as Box<dyn MailStore>)
                        }
                        Err(e) => {
                            warn!(rip = %ip, user = %shown, error = %e, "imap login: mailbox store");
                            None
                        }
                    }
                }
                Ok(_) => {
                    let n_ip = guard.ip_failures.add(ip, FAILURE_WINDOW);
                    let n_user = guard
                        .user_failures
                        .add(user.trim().to_ascii_lowercase(), FAILURE_WINDOW);
                    info!(rip = %ip, user = %shown, failures = n_ip, "imap login failed");
                    tokio::time::sleep(failure_delay(n_ip.max(n_user))).await;
                    None
                }
                Err(e) => {
                    warn!(rip = %ip, user = %shown, error = %e, "imap login: account store unavailable");
                    None
                }
            }
        })
    }
}

/// The IMAP listeners on a thread of their own (a small multi-thread runtime: store calls run
/// on its blocking pool).
/// Connections from `trusted_proxies` must start with a PROXY v1/v2 header (the LB's), whose
/// client address is logged; from anyone else no header is read. `limits`: the brakes on
/// password guessing, the login timeout, the connection limits and the command rate.
pub fn start(
    plain: &[SocketAddr],
    implicit: &[SocketAddr],
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<ImapBackend>,
    greeting: String,
    trusted_proxies: Vec<crate::config::Cidr>,
    limits: ImapLimits,
) -> io::Result<JoinHandle<()>> {
    // The argon2 work areas LOGINs verify in, before the first connection: a burst of logins
    // then reuses them instead of growing the heap (see `ringmail_accounts::password`).
    let reserved = ringmail_accounts::password::reserve_argon2_work_areas();
    tracing::debug!(bytes = reserved, "argon2 work areas reserved");
    let mut listeners = Vec::new();
    for (addrs, implicit) in [(plain, false), (implicit, true)] {
        for a in addrs {
            let l = std::net::TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            listeners.push((l, implicit));
        }
    }
    let defaults = ringmail_imap::session::Config::default();
    let session = ringmail_imap::session::Config {
        greeting,
        commands_per_second: limits
            .commands_per_second
            .unwrap_or(defaults.commands_per_second),
        ..defaults
    };
    let cfg = Arc::new(ImapServerConfig {
        session,
        tls: Some(tls),
        login_timeout: limits.login_timeout,
        ..ImapServerConfig::default()
    });
    let guard = Arc::new(Guard {
        conns: ConnLimits::new(limits.max_connections, limits.max_connections_per_ip),
        limits,
        ip_failures: Window::default(),
        user_failures: Window::default(),
        userip: Mutex::new(HashMap::new()),
    });
    std::thread::Builder::new()
        .name("ringmail-imap".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ringmail-imap")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "cannot build the IMAP runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                let trusted = Arc::new(trusted_proxies);
                for (l, implicit) in listeners {
                    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                        continue;
                    };
                    let (cfg, backend) = (Arc::clone(&cfg), Arc::clone(&backend));
                    let trusted = Arc::clone(&trusted);
                    let guard = Arc::clone(&guard);
                    tasks.spawn(accept_loop(l, implicit, cfg, backend, trusted, guard));
                }
                while tasks.join_next().await.is_some() {}
            });
        })
}

/// One user's mailboxes.
pub struct MaildirStore {
    user: ms::UserStore,
    selected: Option<ms::Mailbox>,
    /// The session's place under `max_userip_connections`, given back when it ends.
    slot: Option<UserIpSlot>,
}

impl MaildirStore {
    pub fn new(user: ms::UserStore) -> MaildirStore {
        MaildirStore {
            user,
            selected: None,
            slot: None,
        }
    }

    /// The change signal of the selected mailbox (IDLE wake-ups within this process).
    pub fn signal(&self) -> Option<ms::ChangeSignal> {
        self.selected.as_ref().map(|m| m.signal())
    }

    fn mailbox(&mut self) -> Result<&mut ms::Mailbox, StoreError> {
        self.selected.as_mut().ok_or(StoreError::NotSelected)
    }
}

fn err(e: ms::StoreError) -> StoreError {
    match e {
        ms::StoreError::NoSuchMailbox(_) | ms::StoreError::NoSuchMessage(_) => StoreError::NotFound,
        ms::StoreError::MailboxExists(_) => StoreError::AlreadyExists,
        ms::StoreError::InvalidName(..) | ms::StoreError::InvalidUser(..) => {
            StoreError::InvalidName
        }
        ms::StoreError::InboxProtected => StoreError::NotAllowed("INBOX cannot be deleted"),
        ms::StoreError::QuotaExceeded { .. } => StoreError::OverQuota,
        ms::StoreError::InvalidKeyword(..) => StoreError::NotAllowed("keyword refused"),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn flag_in(f: &ms::Flag) -> Flag {
    match f {
        ms::Flag::Answered => Flag::Answered,
        ms::Flag::Deleted => Flag::Deleted,
        ms::Flag::Draft => Flag::Draft,
        ms::Flag::Flagged => Flag::Flagged,
        ms::Flag::Seen => Flag::Seen,
        ms::Flag::Keyword(k) => Flag::Keyword(k.clone()),
    }
}

fn flag_out(f: &Flag) -> ms::Flag {
    match f {
        Flag::Answered => ms::Flag::Answered,
        Flag::Deleted => ms::Flag::Deleted,
        Flag::Draft => ms::Flag::Draft,
        Flag::Flagged => ms::Flag::Flagged,
        Flag::Seen => ms::Flag::Seen,
        Flag::Keyword(k) => ms::Flag::Keyword(k.clone()),
    }
}

fn flags_out(flags: &[Flag]) -> Vec<ms::Flag> {
    flags.iter().map(flag_out).collect()
}

fn meta(m: &ms::MessageMeta) -> MessageMeta {
    MessageMeta {
        uid: m.uid,
        flags: m.flags.iter().map(flag_in).collect(),
        modseq: m.modseq,
        size: u32::try_from(m.vsize).unwrap_or(u32::MAX),
        internal_date: m.internal_date,
    }
}

impl MailStore for MaildirStore {
    fn list(&self) -> Result<Vec<MailboxInfo>, StoreError> {
        Ok(self
            .user
            .list()
            .map_err(err)?
            .into_iter()
            .map(|m| MailboxInfo {
                name: m.name,
                delimiter: Some('/'),
                special_use: m.special_use.map(|s| match s {
                    ms::SpecialUse::Sent => SpecialUse::Sent,
                    ms::SpecialUse::Drafts => SpecialUse::Drafts,
                    ms::SpecialUse::Trash => SpecialUse::Trash,
                    ms::SpecialUse::Junk => SpecialUse::Junk,
                    ms::SpecialUse::Archive => SpecialUse::Archive,
                }),
                subscribed: m.subscribed,
                noselect: !m.selectable,
            })
            .collect())
    }

    fn create(&mut self, name: &str) -> Result<(), StoreError> {
        self.user.create(name).map_err(err)
    }

    fn delete(&mut self, name: &str) -> Result<(), StoreError> {
        if name.eq_ignore_ascii_case("INBOX") {
            return Err(StoreError::NotAllowed("INBOX cannot be deleted"));
        }
        self.user.delete(name).map_err(err)
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), StoreError> {
        self.user.rename(from, to).map_err(err)
    }

    fn subscribe(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        self.user.subscribe(name, on).map_err(err)
    }

    fn subscriptions(&self) -> Result<Vec<String>, StoreError> {
        self.user.subscriptions().map_err(err)
    }

    fn status(&self, name: &str) -> Result<Status, StoreError> {
        let s = self.user.status(name).map_err(err)?;
        Ok(Status {
            messages: s.messages,
            recent: s.recent,
            uidnext: s.uidnext,
            uidvalidity: s.uidvalidity,
            unseen: s.unseen,
            deleted: s.deleted,
            highestmodseq: s.highestmodseq,
            // At least the sum of the RFC822.SIZEs (RFC 9051 6.3.11).
            size: s.vsize,
        })
    }

    fn select(&mut self, name: &str) -> Result<Selected, StoreError> {
        self.selected = None;
        let m = self.user.open(name).map_err(err)?;
        let sel = Selected {
            uidvalidity: m.uidvalidity(),
            uidnext: m.uidnext(),
            highestmodseq: m.highestmodseq(),
            uids: m.uids().collect(),
            writable: true,
            keywords: m.keywords(),
        };
        self.selected = Some(m);
        Ok(sel)
    }

    fn unselect(&mut self) {
        self.selected = None;
    }

    fn refresh(&mut self) -> Result<Changes, StoreError> {
        let m = self.mailbox()?;
        let c = m.refresh().map_err(err)?;
        if c.uidvalidity_changed {
            return Err(StoreError::Unavailable(
                "the mailbox was rebuilt with a new UIDVALIDITY".into(),
            ));
        }
        let by_uid = |uid: u32| m.meta(uid).map(|x| meta(&x));
        Ok(Changes {
            new: c.new,
            expunged: c.expunged.iter().map(|e| e.uid).collect(),
            gone: c.gone.iter().map(meta).collect(),
            flags: c
                .flags
                .iter()
                .filter_map(|&u| by_uid(u).map(|x| (x.uid, x.flags, x.modseq)))
                .collect(),
            highestmodseq: m.highestmodseq(),
            uidnext: m.uidnext(),
        })
    }

    fn meta(&self, uid: u32) -> Option<MessageMeta> {
        self.selected.as_ref()?.meta(uid).map(|x| meta(&x))
    }

    fn read(&mut self, uid: u32) -> Result<Vec<u8>, StoreError> {
        self.mailbox()?.read(uid).map_err(err)
    }

    fn store_flags(
        &mut self,
        uids: &[u32],
        op: FlagOp,
        flags: &[Flag],
        unchanged_since: Option<u64>,
    ) -> Result<Vec<(u32, Vec<Flag>, u64)>, StoreError> {
        let op = match op {
            FlagOp::Add => ms::FlagOp::Add,
            FlagOp::Remove => ms::FlagOp::Remove,
            FlagOp::Replace => ms::FlagOp::Replace,
        };
        let u = self
            .mailbox()?
            .store_flags(uids, op, &flags_out(flags), unchanged_since)
            .map_err(err)?;
        Ok(u.updated
            .into_iter()
            .map(|(uid, f, modseq)| (uid, f.iter().map(flag_in).collect(), modseq))
            .collect())
    }

    fn append(
        &mut self,
        mailbox: &str,
        message: &[u8],
        flags: &[Flag],
        date: Option<SystemTime>,
    ) -> Result<(u32, u32), StoreError> {
        let m = self.user.open(mailbox).map_err(err)?;
        let uid = m.append(message, &flags_out(flags), date).map_err(err)?;
        Ok((m.uidvalidity(), uid))
    }

    fn copy(&mut self, uids: &[u32], dest: &str) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let c = self.mailbox()?.copy(uids, dest).map_err(err)?;
        Ok((c.uidvalidity, c.uids))
    }

    fn move_to(&mut self, uids: &[u32], dest: &str) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let c = self.mailbox()?.move_to(uids, dest).map_err(err)?;
        Ok((c.uidvalidity, c.uids))
    }

    fn expunge(&mut self, uids: Option<&[u32]>) -> Result<Vec<u32>, StoreError> {
        Ok(self
            .mailbox()?
            .expunge(uids)
            .map_err(err)?
            .into_iter()
            .map(|e| e.uid)
            .collect())
    }
}
