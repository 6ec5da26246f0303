//! The MDA's delivery side: LMTP (RFC 2033) from our MX and MSA into the users' mailboxes
//! (Maildir++, [`ringmail_store`]), or to a program for configured addresses.
//!
//! ```text
//!  MX / MSA ─▶ LMTP listener (trusted addresses only) ─▶ Server core (LMTP mode)
//!    RCPT: account or alias? (user+folder@ ─▶ folder) ─ unknown: 550 5.1.1
//!    DATA ─▶ buffered (max_message_size) ─▶ once per resolved mailbox (account + folder)
//!    or program, on the blocking pool (duplicate recipients share the first one's reply):
//!        Return-Path, Delivered-To + message ─▶ Maildir: tmp/ fsync ─▶ new/ ─▶ dir fsync ─▶ 250
//!        (quota: 552 5.2.2; store failure: 451 4.3.0) or program: stdin, timeout, exit code
//!    one reply per recipient (RFC 2033 4.2)
//! ```

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ringmail_accounts::Accounts;
use ringmail_smtp::{Domain, Event, Mailbox, Reply, Server, ServerConfig};
use ringmail_store::{Store, StoreError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::MxError;
use crate::config::Cidr;
use crate::driver::{Policy, drive};
use crate::runtime::Workers;
use crate::session::printable;

/// What the MDA's LMTP side runs with.
#[derive(Debug, Clone)]
pub struct MdaConfig {
    pub hostname: String,
    pub lmtp: Vec<SocketAddr>,
    pub maildir: PathBuf,
    pub accounts: String,
    /// Who may deliver (our MX and MSA hosts).
    pub trusted_clients: Vec<Cidr>,
    /// Addresses delivered to a program (argv, no shell) instead of a mailbox.
    pub programs: HashMap<String, Vec<String>>,
    pub program_timeout: Duration,
    pub max_message_size: u64,
    pub workers: Option<usize>,
    /// IMAP listeners with STARTTLS (143) and with implicit TLS (993).
    pub imap: Vec<SocketAddr>,
    pub imaps: Vec<SocketAddr>,
    /// Certificate for IMAP; absent: self-signed for `hostname`.
    pub tls: Option<crate::config::TlsFiles>,
    /// Load balancers whose PROXY v1/v2 headers the IMAP listeners accept (and require).
    pub trusted_proxies: Vec<Cidr>,
    /// Sustained IMAP commands per second per session (the session's token bucket);
    /// `None`: the IMAP core's default.
    pub imap_commands_per_second: Option<u32>,
    /// IMAP login-failure brakes, login timeout and connection limits.
    pub imap_limits: crate::mda_imap::ImapLimits,
}

impl MdaConfig {
    pub fn quick(
        hostname: String,
        lmtp: Vec<SocketAddr>,
        maildir: PathBuf,
        accounts: String,
    ) -> MdaConfig {
        MdaConfig {
            hostname,
            lmtp,
            maildir,
            accounts,
            trusted_clients: vec![
                Cidr::parse("127.0.0.0/8").expect("valid"),
                Cidr::parse("::1/128").expect("valid"),
            ],
            programs: HashMap::new(),
            program_timeout: Duration::from_secs(60),
            max_message_size: crate::DEFAULT_INTERNAL_MAX_MESSAGE_SIZE,
            workers: None,
            imap: Vec::new(),
            imaps: Vec::new(),
            tls: None,
            trusted_proxies: Vec::new(),
            imap_commands_per_second: None,
            imap_limits: crate::mda_imap::ImapLimits::default(),
        }
    }
}

/// Counters of the delivery side.
#[derive(Debug, Default)]
pub struct MdaStats {
    pub sessions: AtomicU64,
    pub refused_client: AtomicU64,
    pub refused_unknown_user: AtomicU64,
    pub delivered: AtomicU64,
    pub delivered_program: AtomicU64,
    pub quota_exceeded: AtomicU64,
    pub failed_temporary: AtomicU64,
    pub failed_permanent: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the LMTP sessions share.
pub struct Mda {
    pub cfg: Arc<MdaConfig>,
    smtp: Arc<ServerConfig>,
    pub store: Store,
    pub accounts: Accounts,
    pub stats: Arc<MdaStats>,
}

/// A running LMTP delivery service.
pub struct MdaServer {
    mda: Arc<Mda>,
    accounts_rt: Option<tokio::runtime::Runtime>,
    workers: Option<Workers>,
}

impl MdaServer {
    pub fn start(
        cfg: MdaConfig,
        pin: Option<fn(usize) -> io::Result<()>>,
    ) -> Result<MdaServer, MxError> {
        let cfg = Arc::new(cfg);
        let store = Store::open(
            &cfg.maildir,
            ringmail_store::StoreOptions {
                hostname: cfg.hostname.clone(),
                ..ringmail_store::StoreOptions::default()
            },
        )
        .map_err(|e| MxError::Store(e.to_string()))?;
        let (accounts, accounts_rt) = crate::open_accounts(&cfg.accounts)?;
        let smtp = Arc::new(ServerConfig {
            hostname: cfg.hostname.clone(),
            max_message_size: cfg.max_message_size,
            lmtp: true,
            ..ServerConfig::default()
        });
        let mda = Arc::new(Mda {
            cfg: Arc::clone(&cfg),
            smtp,
            store,
            accounts,
            stats: Arc::new(MdaStats::default()),
        });
        let nworkers = cfg.workers.unwrap_or(2);
        let m = Arc::clone(&mda);
        let workers = Workers::start_mode(
            crate::runtime::RuntimeMode::PerCore,
            nworkers,
            &cfg.lmtp,
            pin,
            move |s, peer, _| run(Arc::clone(&m), s, peer),
        )
        .map_err(MxError::Listen)?;
        if !cfg.imap.is_empty() || !cfg.imaps.is_empty() {
            let tls = crate::tls::TlsStore::new(cfg.tls.clone(), &cfg.hostname)?;
            let backend = Arc::new(crate::mda_imap::ImapBackend {
                accounts: mda.accounts.clone(),
                store: mda.store.clone(),
            });
            crate::mda_imap::start(
                &cfg.imap,
                &cfg.imaps,
                Arc::clone(tls.acceptor().config()),
                backend,
                format!("{} ringmail IMAP ready", cfg.hostname),
                cfg.trusted_proxies.clone(),
                crate::mda_imap::ImapLimits {
                    commands_per_second: cfg.imap_commands_per_second,
                    ..cfg.imap_limits.clone()
                },
            )
            .map_err(MxError::Listen)?;
            info!(imap = ?cfg.imap, imaps = ?cfg.imaps, "imap started");
        }
        info!(lmtp = ?cfg.lmtp, maildir = %cfg.maildir.display(), programs = cfg.programs.len(), "mda (lmtp) started");
        Ok(MdaServer {
            mda,
            accounts_rt: Some(accounts_rt),
            workers: Some(workers),
        })
    }

    pub fn stats(&self) -> Arc<MdaStats> {
        Arc::clone(&self.mda.stats)
    }

    pub fn stop(mut self) {
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        if let Some(rt) = self.accounts_rt.take() {
            rt.shutdown_background();
        }
        info!("mda (lmtp) stopped");
    }
}

/// Where one recipient's copy goes.
#[derive(Debug, Clone)]
enum Target {
    Mailbox {
        account: String,
        folder: Option<String>,
        quota: Option<u64>,
        /// `folder` is the mailbox the store delivers to (set before delivery).
        resolved: bool,
    },
    Program(Vec<String>),
}

/// What makes two recipients of one transaction the same delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Dedup {
    Mailbox(String, String),
    Program(String),
    /// Not resolved: never merged with another recipient.
    Unique(usize),
}

impl Dedup {
    fn of(i: usize, r: &Rcpt) -> Dedup {
        match &r.target {
            Target::Mailbox {
                account,
                folder,
                resolved: true,
                ..
            } => Dedup::Mailbox(account.clone(), folder.clone().unwrap_or_default()),
            Target::Mailbox { .. } => Dedup::Unique(i),
            Target::Program(_) => Dedup::Program(r.address.clone()),
        }
    }
}

#[derive(Clone)]
struct Rcpt {
    address: String,
    target: Target,
}

struct Txn {
    sender: Option<String>,
    rcpts: Vec<Rcpt>,
    data: Vec<u8>,
}

struct Ctx<'a> {
    mda: &'a Mda,
    client: SocketAddr,
    txn: Option<Txn>,
}

/// One LMTP session (trusted clients only).
pub async fn run(mda: Arc<Mda>, mut stream: TcpStream, peer: SocketAddr) {
    let mda = &*mda;
    inc(&mda.stats.sessions);
    let mut server = Server::new(Arc::clone(&mda.smtp), false);
    if !mda
        .cfg
        .trusted_clients
        .iter()
        .any(|c| c.contains(peer.ip()))
    {
        inc(&mda.stats.refused_client);
        info!(client = %peer.ip(), "refused: not a trusted LMTP client");
        server.refuse_connection(554, "5.7.1", "Access denied");
        let _ = crate::driver::flush(&mut stream, &mut server).await;
        let _ = stream.shutdown().await;
        return;
    }
    let mut ctx = Ctx {
        mda,
        client: peer,
        txn: None,
    };
    server.greet();
    // On `Closed` the replies are written: dropping the stream sends the FIN.
    if let Err(e) = drive(&mut stream, &mut server, &mut ctx).await {
        debug!(client = %peer.ip(), error = %e, "lmtp session ended");
    }
}

/// `user+folder@domain` ─▶ (`user@domain`, `folder`).
pub fn split_plus(address: &str) -> (String, Option<String>) {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return (address.to_string(), None);
    };
    match local.split_once('+') {
        Some((user, folder)) if !user.is_empty() && !folder.is_empty() => {
            (format!("{user}@{domain}"), Some(folder.to_string()))
        }
        _ => (address.to_string(), None),
    }
}

impl Ctx<'_> {
    async fn on_rcpt(&mut self, server: &mut Server, rcpt: &Mailbox) {
        let Some(txn) = self.txn.as_mut() else {
            server.reject(Reply::new(503, "5.5.1", "Error: need MAIL command"));
            return;
        };
        let raw = match rcpt.domain() {
            Domain::Name(d) => format!("{}@{}", rcpt.local(), d),
            _ => {
                server.reject(Reply::new(550, "5.1.1", "Error: no such user here"));
                return;
            }
        };
        let address = raw.to_lowercase();
        if let Some(argv) = self.mda.cfg.programs.get(&address) {
            txn.rcpts.push(Rcpt {
                address,
                target: Target::Program(argv.clone()),
            });
            server.accept();
            return;
        }
        // The account part is case-insensitive; the detail keeps its case, since it names a
        // (case-sensitive) mailbox.
        let (base, folder) = split_plus(&raw);
        let base = base.to_lowercase();
        let found = match self.mda.accounts.resolve(&address).await {
            Ok(Some(a)) => Ok(Some((a, None))),
            Ok(None) if folder.is_some() => self
                .mda
                .accounts
                .resolve(&base)
                .await
                .map(|a| a.map(|a| (a, folder.clone()))),
            other => other.map(|a| a.map(|a| (a, None))),
        };
        match found {
            Ok(Some((account, folder))) if !account.disabled => {
                txn.rcpts.push(Rcpt {
                    address,
                    target: Target::Mailbox {
                        account: account.address.to_lowercase(),
                        folder,
                        quota: account.quota_bytes,
                        resolved: false,
                    },
                });
                server.accept();
            }
            Ok(_) => {
                inc(&self.mda.stats.refused_unknown_user);
                info!(rcpt = %printable(&address), "refused: no such user");
                server.reject(Reply::new(550, "5.1.1", "Error: no such user here"));
            }
            Err(e) => {
                warn!(error = %e, "account store lookup failed");
                server.reject(Reply::new(451, "4.3.0", "Error: temporary lookup failure"));
            }
        }
    }

    async fn on_data_end(&mut self, server: &mut Server) -> bool {
        let Some(txn) = self.txn.take() else {
            server.reject(Reply::new(503, "5.5.1", "Error: no transaction"));
            return false;
        };
        let data = Arc::new(txn.data);
        let rcpts = self.resolve_mailboxes(txn.rcpts).await;
        // One copy per resolved mailbox (or program): a recipient named twice, in another
        // case, or through another detail that lands in the same folder, gets the reply of
        // its first delivery (RFC 2033 still wants one reply per accepted RCPT).
        let mut first: HashMap<Dedup, usize> = HashMap::new();
        let mut replies: Vec<Reply> = Vec::with_capacity(rcpts.len());
        let mut any = false;
        for (n, r) in rcpts.iter().enumerate() {
            let key = Dedup::of(n, r);
            if let Some(&i) = first.get(&key) {
                debug!(rcpt = %printable(&r.address), "duplicate recipient: delivered once");
                replies.push(replies[i].clone());
                continue;
            }
            let reply = self.deliver_one(&txn.sender, r, Arc::clone(&data)).await;
            any |= reply.code() == 250;
            first.insert(key, replies.len());
            replies.push(reply);
        }
        server.data_committed_lmtp(&replies);
        any
    }

    /// Replaces each mailbox recipient's folder with the mailbox the store will deliver it to
    /// (the folder, a case-insensitive match, or INBOX), on the blocking pool. A recipient
    /// whose mailbox cannot be resolved now keeps its folder (its delivery then reports the
    /// error).
    async fn resolve_mailboxes(&self, rcpts: Vec<Rcpt>) -> Vec<Rcpt> {
        let store = self.mda.store.clone();
        let mut out = rcpts.clone();
        let res = tokio::task::spawn_blocking(move || {
            for r in &mut out {
                if let Target::Mailbox {
                    account,
                    folder,
                    resolved,
                    ..
                } = &mut r.target
                    && let Ok(user) = store.user(account)
                    && let Ok(name) = user.delivery_mailbox(folder.as_deref())
                {
                    *folder = Some(name.as_str().to_string());
                    *resolved = true;
                }
            }
            out
        })
        .await;
        match res {
            Ok(resolved) => resolved,
            Err(e) => {
                warn!(error = %e, "mailbox resolution task failed");
                rcpts
            }
        }
    }

    async fn deliver_one(&self, sender: &Option<String>, r: &Rcpt, data: Arc<Vec<u8>>) -> Reply {
        let mda = self.mda;
        let prefix = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            printable(sender.as_deref().unwrap_or("")),
            printable(&r.address),
        );
        match &r.target {
            Target::Program(argv) => {
                match run_program(argv, &prefix, &data, mda.cfg.program_timeout).await {
                    Ok(()) => {
                        inc(&mda.stats.delivered_program);
                        info!(rcpt = %printable(&r.address), program = %argv[0], "delivered to program");
                        Reply::new(250, "2.0.0", &format!("<{}> delivered", r.address))
                    }
                    Err((reply, why)) => {
                        warn!(rcpt = %printable(&r.address), program = %argv[0], reason = %why, "program delivery failed");
                        if reply.code() >= 500 {
                            inc(&mda.stats.failed_permanent);
                        } else {
                            inc(&mda.stats.failed_temporary);
                        }
                        reply
                    }
                }
            }
            Target::Mailbox {
                account,
                folder,
                quota,
                ..
            } => {
                let store = mda.store.clone();
                let (account2, folder2, quota) = (account.clone(), folder.clone(), *quota);
                let res = tokio::task::spawn_blocking(move || {
                    let user = store.user(&account2)?;
                    let size = (prefix.len() + data.len()) as u64;
                    if let Some(limit) = quota {
                        let (used, messages) = user.quota()?;
                        if used + size > limit {
                            return Err(StoreError::QuotaExceeded {
                                used,
                                adding: size,
                                messages,
                                adding_messages: 1,
                            });
                        }
                    }
                    // The message is shared by every recipient's copy, never cloned.
                    let mut reader =
                        io::Cursor::new(prefix.into_bytes()).chain(io::Cursor::new(Shared(data)));
                    user.deliver(folder2.as_deref(), &mut reader, Some(size))
                })
                .await;
                match res {
                    Ok(Ok(d)) => {
                        inc(&mda.stats.delivered);
                        info!(rcpt = %printable(&r.address), account = %account, mailbox = %d.mailbox, uid = d.uid, "delivered");
                        Reply::new(
                            250,
                            "2.0.0",
                            &format!("<{}> saved to {}", r.address, d.mailbox),
                        )
                    }
                    Ok(Err(StoreError::QuotaExceeded { .. })) => {
                        inc(&mda.stats.quota_exceeded);
                        info!(rcpt = %printable(&r.address), "refused: mailbox full");
                        Reply::new(552, "5.2.2", &format!("<{}> Mailbox is full", r.address))
                    }
                    Ok(Err(e)) => {
                        inc(&mda.stats.failed_temporary);
                        warn!(rcpt = %printable(&r.address), error = %e, "delivery failed");
                        Reply::new(451, "4.3.0", "Error: mailbox write failed")
                    }
                    Err(e) => {
                        inc(&mda.stats.failed_temporary);
                        warn!(error = %e, "delivery task failed");
                        Reply::new(451, "4.3.0", "Error: mailbox write failed")
                    }
                }
            }
        }
    }
}

use std::io::Read as _;

/// The received message, shared (read-only) by the deliveries of all its recipients.
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Runs `argv` (no shell) with the message on stdin, within `timeout`. Exit 0: delivered;
/// 75 (EX_TEMPFAIL) or a timeout or a signal: temporary; anything else: permanent (the way
/// Postfix's pipe(8) maps sysexits).
async fn run_program(
    argv: &[String],
    prefix: &str,
    data: &[u8],
    timeout: Duration,
) -> Result<(), (Reply, String)> {
    let temp = |why: String| {
        (
            Reply::new(451, "4.3.0", "Error: delivery program failed"),
            why,
        )
    };
    let Some((cmd, args)) = argv.split_first() else {
        return Err(temp("empty command".into()));
    };
    let mut child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .spawn()
        .map_err(|e| temp(format!("spawn {cmd}: {e}")))?;
    let mut stdin = child.stdin.take().ok_or_else(|| temp("no stdin".into()))?;
    let mut message = Vec::with_capacity(prefix.len() + data.len());
    message.extend_from_slice(prefix.as_bytes());
    message.extend_from_slice(data);
    let run = async {
        // A program that does not read its input must not block us: write errors are ignored,
        // the exit code decides.
        let _ = stdin.write_all(&message).await;
        drop(stdin);
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(temp(format!("timed out after {timeout:?}"))),
        Ok(Err(e)) => Err(temp(format!("wait: {e}"))),
        Ok(Ok(out)) => match out.status.code() {
            Some(0) => Ok(()),
            Some(75) => Err(temp("exit 75 (temporary failure)".into())),
            Some(code) => Err((
                Reply::new(
                    550,
                    "5.3.0",
                    &format!("Error: delivery program exited with {code}"),
                ),
                format!(
                    "exit {code}: {}",
                    printable(&String::from_utf8_lossy(
                        &out.stderr[..out.stderr.len().min(200)]
                    ))
                ),
            )),
            None => Err(temp("killed by a signal".into())),
        },
    }
}

impl Policy for Ctx<'_> {
    fn command_timeout(&self) -> Duration {
        Duration::from_secs(300)
    }

    fn data_timeout(&self) -> Duration {
        Duration::from_secs(600)
    }

    async fn on_event(&mut self, server: &mut Server, event: Event) {
        match event {
            Event::DataChunk(bytes) => {
                if let Some(txn) = self.txn.as_mut() {
                    txn.data.extend_from_slice(&bytes);
                }
            }
            Event::Helo { .. } => {
                self.txn = None;
                server.accept();
            }
            Event::MailFrom { reverse_path, .. } => {
                self.txn = Some(Txn {
                    sender: reverse_path.map(|m| m.raw().to_string()),
                    rcpts: Vec::new(),
                    data: Vec::new(),
                });
                server.accept();
            }
            Event::RcptTo { forward_path, .. } => self.on_rcpt(server, &forward_path).await,
            Event::AuthPlain { .. } | Event::AuthLogin { .. } | Event::AuthSasl { .. } => {
                server.reject(Reply::new(
                    503,
                    "5.5.1",
                    "Error: authentication not enabled",
                ));
            }
            Event::Reset => self.txn = None,
            Event::Quit
            | Event::StartTls
            | Event::DataStart
            | Event::DataEnd
            | Event::DataAborted { .. } => {}
        }
    }

    fn on_data_start(&mut self, _server: &mut Server) {}

    async fn on_data_end(&mut self, server: &mut Server) -> bool {
        Ctx::on_data_end(self, server).await
    }

    fn on_data_aborted(&mut self, _reason: ringmail_smtp::AbortReason) {
        self.txn = None;
    }

    fn on_ack_maybe_lost(&mut self) {
        debug!(client = %self.client.ip(), "an LMTP reply may not have reached the client");
    }

    fn on_disconnect(&mut self) {
        self.txn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(address: &str, account: &str, folder: Option<&str>, resolved: bool) -> Rcpt {
        Rcpt {
            address: address.into(),
            target: Target::Mailbox {
                account: account.into(),
                folder: folder.map(str::to_string),
                quota: None,
                resolved,
            },
        }
    }

    #[test]
    fn recipients_of_one_mailbox_share_a_delivery() {
        let a = mailbox("bob@example.test", "bob@example.test", Some("INBOX"), true);
        let b = mailbox(
            "robert@example.test",
            "bob@example.test",
            Some("INBOX"),
            true,
        );
        let c = mailbox("bob+Rt@example.test", "bob@example.test", Some("Rt"), true);
        let d = mailbox("bob+x@example.test", "bob@example.test", Some("x"), false);
        let e = mailbox("bob+x@example.test", "bob@example.test", Some("x"), false);
        assert_eq!(Dedup::of(0, &a), Dedup::of(1, &b));
        assert_ne!(Dedup::of(0, &a), Dedup::of(2, &c));
        // Unresolved mailboxes are never merged.
        assert_ne!(Dedup::of(3, &d), Dedup::of(4, &e));
        let p = Rcpt {
            address: "list@example.test".into(),
            target: Target::Program(vec!["/bin/true".into()]),
        };
        assert_eq!(Dedup::of(5, &p), Dedup::of(6, &p.clone()));
    }

    #[test]
    fn plus_addresses_keep_the_case_of_the_detail() {
        assert_eq!(
            split_plus("Bob+Rt@example.test"),
            ("Bob@example.test".into(), Some("Rt".into()))
        );
    }

    #[test]
    fn plus_addresses_split_into_folders() {
        assert_eq!(
            split_plus("bob+lists@example.test"),
            ("bob@example.test".into(), Some("lists".into()))
        );
        assert_eq!(
            split_plus("bob@example.test"),
            ("bob@example.test".into(), None)
        );
        assert_eq!(
            split_plus("+x@example.test"),
            ("+x@example.test".into(), None)
        );
        assert_eq!(
            split_plus("bob+@example.test"),
            ("bob+@example.test".into(), None)
        );
    }
}
