//! The MTA role: takes mail from our MSAs and MXs (trusted addresses, or AUTH under TLS),
//! queues it durably and delivers it to the world ([`crate::outbound`]). Nothing from the
//! Internet is accepted: any other client is refused at MAIL.
//!
//! ```text
//!  MSA/MX ─▶ listener (per core) ─▶ Server core: trusted address or AUTH ─▶ spool ─▶ 250
//!  spool ─▶ outbound thread: DKIM, MX/MTA-STS, delivery, retries, DSNs (back into the spool)
//!  admin thread: /metrics, /api/queue
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ringmail_accounts::{Accounts, AuthOutcome};
use ringmail_queue::{ClientInfo, Incoming, NewEnvelope, NewRecipient, Spool};
use ringmail_smtp::{Event, MailParams, Mailbox, Reply, Server, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::MxError;
use crate::admin::MxStats;
use crate::dkim::DkimSigner;
use crate::driver::Policy;
use crate::mta_config::MtaConfig;
use crate::outbound::{Outbound, OutboundStats};
use crate::runtime::Workers;
use crate::session::printable;
use crate::tls::TlsStore;

/// Counters of the accepting side.
#[derive(Debug, Default)]
pub struct MtaStats {
    pub sessions: AtomicU64,
    pub refused_relay: AtomicU64,
    pub auth_ok: AtomicU64,
    pub auth_failed: AtomicU64,
    pub messages_accepted: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the sessions share.
pub struct Mta {
    pub cfg: Arc<MtaConfig>,
    smtp: Arc<ServerConfig>,
    pub spool: Spool,
    pub accounts: Option<Accounts>,
    pub tls: Arc<TlsStore>,
    pub stats: Arc<MtaStats>,
    pub queued: Arc<tokio::sync::Notify>,
}

/// A running MTA.
pub struct MtaServer {
    mta: Arc<Mta>,
    out_stats: Arc<OutboundStats>,
    accounts_rt: Option<tokio::runtime::Runtime>,
    workers: Option<Workers>,
    out_stop: tokio::sync::watch::Sender<bool>,
    outbound: Option<JoinHandle<()>>,
}

impl MtaServer {
    pub fn start(
        cfg: MtaConfig,
        pin: Option<fn(usize) -> io::Result<()>>,
    ) -> Result<MtaServer, MxError> {
        let cfg = Arc::new(cfg);
        let dkim = Arc::new(DkimSigner::load(&cfg.dkim).map_err(MxError::Dkim)?);
        let spool = crate::open_spool(
            &cfg.spool,
            &cfg.hostname,
            cfg.retry_min,
            cfg.retry_max,
            cfg.max_lifetime,
            cfg.delay_warning,
        )?;
        let tls = Arc::new(TlsStore::new(cfg.tls.clone(), &cfg.hostname)?);
        let (accounts, accounts_rt) = match &cfg.accounts {
            Some(url) => {
                let (a, rt) = crate::open_accounts(url)?;
                (Some(a), Some(rt))
            }
            None => (None, None),
        };
        let smtp = Arc::new(ServerConfig {
            hostname: cfg.hostname.clone(),
            max_message_size: cfg.max_message_size,
            max_recipients: cfg.max_recipients,
            offer_starttls: true,
            offer_auth: accounts.is_some(),
            ..ServerConfig::default()
        });
        let stats = Arc::new(MtaStats::default());
        let queued = Arc::new(tokio::sync::Notify::new());
        let mta = Arc::new(Mta {
            cfg: Arc::clone(&cfg),
            smtp,
            spool: spool.clone(),
            accounts,
            tls,
            stats,
            queued: Arc::clone(&queued),
        });
        let out_stats = Arc::new(OutboundStats {
            relay: Arc::new(MxStats::default()),
            ..OutboundStats::default()
        });
        let outbound = Arc::new(Outbound::new(
            Arc::clone(&cfg),
            spool.clone(),
            Arc::clone(&out_stats),
            Arc::clone(&queued),
            dkim,
        )?);
        let nworkers = cfg.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4)
        });
        let m = Arc::clone(&mta);
        let workers = Workers::start_mode(
            cfg.runtime,
            nworkers,
            &cfg.listen,
            pin,
            move |s, peer, _| run(Arc::clone(&m), s, peer),
        )
        .map_err(MxError::Listen)?;

        let (out_stop, stop_rx) = tokio::sync::watch::channel(false);
        let outbound = std::thread::Builder::new()
            .name("ringmail-mta-out".into())
            .spawn(move || {
                // Two threads: deliveries are network-bound; signatures run on the signing
                // pool (the blocking pool, one per core at a time).
                match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("ringmail-mta-out")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(crate::outbound::run(outbound, stop_rx)),
                    Err(e) => warn!(error = %e, "cannot build the delivery runtime"),
                }
            })
            .map_err(MxError::Thread)?;
        if let Some(addr) = cfg.admin {
            crate::admin::spawn(addr, Arc::clone(&out_stats), spool, "ringmail-mta-admin")
                .map_err(MxError::Listen)?;
        }
        info!(listen = ?cfg.listen, relay = ?cfg.relay, relay_security = %cfg.relay_security.describe(), resolver = ?cfg.resolver, dkim_keys = cfg.dkim.len(), mta_sts = cfg.mta_sts, "mta started");
        Ok(MtaServer {
            mta,
            out_stats,
            accounts_rt,
            workers: Some(workers),
            out_stop,
            outbound: Some(outbound),
        })
    }

    pub fn reload_tls(&self) {
        match self.mta.tls.reload() {
            Ok(true) => info!("TLS certificates reloaded"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "TLS reload failed; the previous certificates stay"),
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.mta.spool
    }

    pub fn stats(&self) -> Arc<OutboundStats> {
        Arc::clone(&self.out_stats)
    }

    pub fn stop(mut self) {
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        let _ = self.out_stop.send(true);
        if let Some(t) = self.outbound.take() {
            let _ = t.join();
        }
        if let Some(rt) = self.accounts_rt.take() {
            rt.shutdown_background();
        }
        info!("mta stopped");
    }
}

struct Txn {
    sender: Option<String>,
    params: MailParams,
    recipients: Vec<NewRecipient>,
    incoming: Option<Incoming>,
}

struct Ctx<'a> {
    mta: &'a Mta,
    client: SocketAddr,
    trusted: bool,
    helo: String,
    tls: bool,
    user: Option<String>,
    txn: Option<Txn>,
    failures: u32,
    close: bool,
}

/// One session.
pub async fn run(mta: Arc<Mta>, mut stream: TcpStream, peer: SocketAddr) {
    let mta = &*mta;
    inc(&mta.stats.sessions);
    let trusted = mta
        .cfg
        .trusted_clients
        .iter()
        .any(|c| c.contains(peer.ip()));
    let mut ctx = Ctx {
        mta,
        client: peer,
        trusted,
        helo: String::new(),
        tls: false,
        user: None,
        txn: None,
        failures: 0,
        close: false,
    };
    let mut server = Server::new(Arc::clone(&mta.smtp), false);
    if !trusted && mta.accounts.is_none() {
        // Nobody else may relay and there is no AUTH to offer: say so at once.
        inc(&mta.stats.refused_relay);
        info!(client = %peer.ip(), "refused: not a trusted client");
        server.refuse_connection(554, "5.7.1", "Access denied: not an internal client");
        let _ = crate::driver::flush(&mut stream, &mut server).await;
        let _ = stream.shutdown().await;
        return;
    }
    server.greet();
    crate::driver::serve_with_starttls(
        stream,
        &mut server,
        &mut ctx,
        mta.tls.acceptor(),
        peer.ip(),
    )
    .await;
}

impl Policy for Ctx<'_> {
    fn command_timeout(&self) -> Duration {
        self.mta.cfg.command_timeout
    }

    fn data_timeout(&self) -> Duration {
        self.mta.cfg.data_timeout
    }

    async fn on_event(&mut self, server: &mut Server, event: Event) {
        match event {
            Event::DataChunk(bytes) => {
                if let Some(txn) = self.txn.as_mut()
                    && let Some(inc) = txn.incoming.as_mut()
                    && let Err(e) = inc.write(&bytes)
                {
                    warn!(error = %e, "spool write failed");
                    txn.incoming = None;
                }
            }
            Event::Helo { name, .. } => {
                self.helo = name;
                self.txn = None;
                server.accept();
            }
            Event::AuthPlain {
                authzid,
                authcid,
                password,
            }
            | Event::AuthLogin {
                authzid,
                authcid,
                password,
            } => {
                self.on_auth(server, authzid, &authcid, password.expose_str())
                    .await
            }
            Event::MailFrom {
                reverse_path,
                params,
            } => self.on_mail(server, reverse_path, params),
            Event::RcptTo {
                forward_path,
                params,
            } => {
                let Some(txn) = self.txn.as_mut() else {
                    server.reject(Reply::new(503, "5.5.1", "Error: need MAIL command"));
                    return;
                };
                let mut r = NewRecipient::new(forward_path.raw().to_string());
                crate::session::apply_rcpt_params(&mut r, &params);
                txn.recipients.push(r);
                server.accept();
            }
            Event::Reset => self.txn = None,
            // Only PLAIN and LOGIN are offered here.
            Event::AuthSasl { .. } => server.auth_result(false),
            Event::Quit
            | Event::StartTls
            | Event::DataStart
            | Event::DataEnd
            | Event::DataAborted { .. } => {}
        }
    }

    fn on_data_start(&mut self, _server: &mut Server) {
        if let Some(txn) = self.txn.as_mut() {
            match self.mta.spool.begin() {
                Ok(i) => txn.incoming = Some(i),
                Err(e) => warn!(error = %e, "cannot start a spool file"),
            }
        }
    }

    async fn on_data_end(&mut self, server: &mut Server) -> bool {
        self.on_data_end(server).await
    }

    fn on_data_aborted(&mut self, _reason: ringmail_smtp::AbortReason) {
        self.txn = None;
    }

    fn on_ack_maybe_lost(&mut self) {
        self.mta.spool.note_ack_maybe_lost();
    }

    fn on_disconnect(&mut self) {
        self.txn = None;
    }

    fn wants_close(&self) -> bool {
        self.close
    }

    fn tls_started(&mut self) {
        self.tls = true;
        self.user = None;
        self.txn = None;
    }
}

impl Ctx<'_> {
    async fn on_auth(
        &mut self,
        server: &mut Server,
        authzid: Option<String>,
        user: &str,
        password: Option<&str>,
    ) {
        let Some(accounts) = &self.mta.accounts else {
            server.reject(Reply::new(
                503,
                "5.5.1",
                "Error: authentication not enabled",
            ));
            return;
        };
        let authz_ok = authzid
            .as_deref()
            .is_none_or(|z| z.is_empty() || z.eq_ignore_ascii_case(user));
        let outcome = match password {
            Some(pw) if authz_ok => accounts.authenticate(user, pw).await,
            _ => Ok(AuthOutcome::BadCredentials),
        };
        let shown = printable(user);
        match outcome {
            Ok(AuthOutcome::Ok(account)) => {
                inc(&self.mta.stats.auth_ok);
                info!(client = %self.client.ip(), user = %shown, "authenticated");
                self.user = Some(account.address);
                server.auth_result(true);
            }
            Ok(_) => {
                inc(&self.mta.stats.auth_failed);
                self.failures += 1;
                info!(client = %self.client.ip(), user = %shown, "authentication failed");
                tokio::time::sleep(crate::msa::failure_delay(self.failures as usize)).await;
                if self.failures >= 3 {
                    server.reject(Reply::new(
                        421,
                        "4.7.0",
                        "Error: too many authentication failures",
                    ));
                    self.close = true;
                } else {
                    server.auth_result(false);
                }
            }
            Err(e) => {
                warn!(client = %self.client.ip(), user = %shown, error = %e, "authentication: account store unavailable");
                server.reject(Reply::new(454, "4.7.0", "Temporary authentication failure"));
            }
        }
    }

    fn on_mail(&mut self, server: &mut Server, reverse_path: Option<Mailbox>, params: MailParams) {
        if !self.trusted && self.user.is_none() {
            inc(&self.mta.stats.refused_relay);
            info!(client = %self.client.ip(), "refused: relaying without authentication");
            server.reject(Reply::new(530, "5.7.0", "Authentication required"));
            return;
        }
        self.txn = Some(Txn {
            sender: reverse_path.map(|m| m.raw().to_string()),
            params,
            recipients: Vec::new(),
            incoming: None,
        });
        server.accept();
    }

    async fn on_data_end(&mut self, server: &mut Server) -> bool {
        let mta = self.mta;
        let Some(mut txn) = self.txn.take() else {
            server.reject(Reply::new(503, "5.5.1", "Error: no transaction"));
            return false;
        };
        let Some(incoming) = txn.incoming.take() else {
            server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
            return false;
        };
        let id = incoming.id().to_string();
        let now =
            ringmail_queue::rfc5322_date(ringmail_queue::to_unix(std::time::SystemTime::now()));
        let ip = self.client.ip();
        let proto = match (txn.params.smtputf8, self.tls, self.user.is_some()) {
            (true, _, true) => "UTF8SMTPSA",
            (true, true, false) => "UTF8SMTPS",
            (true, false, false) => "UTF8SMTP",
            (false, true, true) => "ESMTPSA",
            (false, false, true) => "ESMTPA",
            (false, true, false) => "ESMTPS",
            (false, false, false) => "ESMTP",
        };
        let headers = format!(
            "Received: {from}\r\n\tby {host} (ringmail) with {proto} id {id};\r\n\t{now}\r\n",
            from = crate::session::received_from(&self.helo, "unknown", ip),
            host = mta.cfg.hostname,
        );
        let rcpts = txn.recipients.len();
        let mut env = NewEnvelope::new(txn.sender.clone(), txn.recipients, "out");
        crate::session::apply_mail_params(&mut env, &txn.params);
        env.client = Some(ClientInfo {
            addr: self.client.to_string(),
            helo: self.helo.clone(),
            tls: self.tls,
            auth: self.user.clone(),
        });
        env.headers = headers;
        match incoming.commit(env).await {
            Ok(qid) => {
                inc(&mta.stats.messages_accepted);
                info!(id = %qid, client = %ip, sender = %printable(txn.sender.as_deref().unwrap_or("")), rcpts, "queued");
                server.data_committed(&qid.to_string());
                mta.queued.notify_one();
                true
            }
            Err(e) => {
                warn!(error = %e, "queue commit failed");
                server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
                false
            }
        }
    }
}
