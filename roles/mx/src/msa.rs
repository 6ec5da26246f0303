//! The MSA role: authenticated submission (RFC 6409) on 587 (STARTTLS) and 465 (implicit TLS).
//! Same runtime, PROXY, TLS, spool, relay and admin machinery as the MX; the policy differs:
//!
//! ```text
//!  socket ─▶ [PROXY from a trusted LB] ─▶ [TLS at accept on 465] ─▶ Server core (AUTH under TLS)
//!    AUTH ─▶ accounts.authenticate (failure: growing delay, 421 after too many)
//!            SCRAM-SHA-256: accounts.scram_secret ─▶ ScramServer (unknown user or no SCRAM
//!            secret: a fake secret from a per-process key, so it fails like a wrong password)
//!    MAIL ─▶ authenticated? owns the sender? hourly rate ─▶ RCPT ─▶ DATA (From, Sender, Resent-* parsed strictly; all owned?)
//!    end of data ─▶ Received (ESMTPSA, Authenticated sender), Message-ID, Date ─▶ spool ─▶ relay
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringmail_accounts::scram::{ScramError, ScramSecret, ScramServer};
use ringmail_accounts::{Account, Accounts, AuthOutcome, normalize_address};
use ringmail_queue::{ClientInfo, Incoming, NewEnvelope, NewRecipient, Spool};
use ringmail_smtp::{Domain, Event, MailParams, Mailbox, RcptParams, Reply, Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::MxError;
use crate::admin::{Metrics, MxStats};
use crate::driver::{Policy, drive};
use crate::msa_config::{LocalRoute, MsaConfig};
use crate::relay::{RelayCtx, Route};
use crate::runtime::Workers;
use crate::session::printable;
use crate::tls::TlsStore;

/// Failures counted per address and per account within this window.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Most header bytes kept to check From:, Message-ID and Date.
const MAX_HEADER_COPY: usize = 256 * 1024;

/// Counters of the MSA.
#[derive(Debug, Default)]
pub struct MsaStats {
    pub sessions: AtomicU64,
    pub auth_ok: AtomicU64,
    pub auth_failed: AtomicU64,
    pub auth_locked_out: AtomicU64,
    pub auth_unavailable: AtomicU64,
    pub refused_unauthenticated: AtomicU64,
    pub refused_sender: AtomicU64,
    pub refused_rate: AtomicU64,
    pub refused_proxy: AtomicU64,
    pub refused_connections: AtomicU64,
    pub refused_recipient: AtomicU64,
    pub messages_accepted: AtomicU64,
    /// Delivery counters, shared with the relay.
    pub relay: Arc<MxStats>,
}

impl Metrics for MsaStats {
    fn render(&self, spool: &Spool, out: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ringmail_msa_sessions_total Submission sessions accepted.\n# TYPE ringmail_msa_sessions_total counter\nringmail_msa_sessions_total {}",
            g(&self.sessions)
        );
        let _ = writeln!(
            out,
            "# HELP ringmail_msa_auth_total Authentication attempts, by result.\n# TYPE ringmail_msa_auth_total counter"
        );
        for (r, c) in [
            ("success", &self.auth_ok),
            ("failure", &self.auth_failed),
            ("locked_out", &self.auth_locked_out),
            ("unavailable", &self.auth_unavailable),
        ] {
            let _ = writeln!(out, "ringmail_msa_auth_total{{result=\"{r}\"}} {}", g(c));
        }
        let _ = writeln!(
            out,
            "# HELP ringmail_msa_refused_total Commands and messages refused, by reason.\n# TYPE ringmail_msa_refused_total counter"
        );
        for (r, c) in [
            ("unauthenticated", &self.refused_unauthenticated),
            ("sender_mismatch", &self.refused_sender),
            ("rate", &self.refused_rate),
            ("proxy", &self.refused_proxy),
            ("connections", &self.refused_connections),
            ("unknown_recipient", &self.refused_recipient),
        ] {
            let _ = writeln!(out, "ringmail_msa_refused_total{{reason=\"{r}\"}} {}", g(c));
        }
        let _ = writeln!(
            out,
            "# HELP ringmail_msa_messages_accepted_total Messages queued.\n# TYPE ringmail_msa_messages_accepted_total counter\nringmail_msa_messages_accepted_total {}",
            g(&self.messages_accepted)
        );
        let _ = writeln!(
            out,
            "# HELP ringmail_msa_deliveries_total Delivery attempts to the next hop, by result.\n# TYPE ringmail_msa_deliveries_total counter"
        );
        for (r, c) in [
            ("delivered", &self.relay.deliveries_ok),
            ("deferred", &self.relay.deliveries_deferred),
            ("failed", &self.relay.deliveries_failed),
        ] {
            let _ = writeln!(
                out,
                "ringmail_msa_deliveries_total{{result=\"{r}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringmail_msa_relay_failovers_total Next hops passed over (connect, greeting, STARTTLS or AUTH failed) for the next one.\n# TYPE ringmail_msa_relay_failovers_total counter\nringmail_msa_relay_failovers_total {}",
            g(&self.relay.relay_failovers)
        );
        let q = spool.stats();
        let _ = writeln!(
            out,
            "# HELP ringmail_queue_messages Messages in the queue.\n# TYPE ringmail_queue_messages gauge\nringmail_queue_messages {}",
            q.messages
        );
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Timestamps of recent events per key, pruned to a window (login failures of the MSA and
/// of the IMAP server).
pub(crate) struct Window<K>(Mutex<HashMap<K, VecDeque<Instant>>>);

impl<K> Default for Window<K> {
    fn default() -> Self {
        Window(Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq + Clone> Window<K> {
    pub(crate) fn count(&self, key: &K, window: Duration) -> usize {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match m.get_mut(key) {
            Some(q) => {
                while q.front().is_some_and(|t| now.duration_since(*t) > window) {
                    q.pop_front();
                }
                let n = q.len();
                if n == 0 {
                    m.remove(key);
                }
                n
            }
            None => 0,
        }
    }

    pub(crate) fn add(&self, key: K, window: Duration) -> usize {
        let n = self.count(&key, window);
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.clear();
        }
        m.entry(key).or_default().push_back(Instant::now());
        n + 1
    }
}

/// Everything the sessions share.
pub struct Msa {
    pub cfg: Arc<MsaConfig>,
    smtp: Arc<ServerConfig>,
    pub spool: Spool,
    pub accounts: Accounts,
    pub tls: Arc<TlsStore>,
    pub stats: Arc<MsaStats>,
    pub queued: Arc<tokio::sync::Notify>,
    ip_failures: Window<IpAddr>,
    user_failures: Window<String>,
    sent: Window<String>,
    limits: crate::limits::ConnLimits,
    /// Key for the fake SCRAM salts of unknown users (random per process).
    scram_key: [u8; 32],
}

/// A running MSA.
pub struct MsaServer {
    msa: Arc<Msa>,
    accounts_rt: Option<tokio::runtime::Runtime>,
    workers: Vec<Workers>,
    relay_stop: tokio::sync::watch::Sender<bool>,
    relay: Option<JoinHandle<()>>,
}

impl MsaServer {
    pub fn start(
        cfg: MsaConfig,
        pin: Option<fn(usize) -> io::Result<()>>,
    ) -> Result<MsaServer, MxError> {
        let cfg = Arc::new(cfg);
        let spool = crate::open_spool(
            &cfg.spool,
            &cfg.hostname,
            cfg.retry_min,
            cfg.retry_max,
            cfg.max_lifetime,
            None,
        )?;
        let tls = Arc::new(TlsStore::new(cfg.tls.clone(), &cfg.hostname)?);
        if let Some(e) =
            crate::msa_config::mechanisms_store_conflict(&cfg.auth_mechanisms, &cfg.accounts)
        {
            return Err(MxError::Accounts(ringmail_accounts::AccountError::Config(
                e,
            )));
        }
        let (accounts, accounts_rt) = crate::open_accounts(&cfg.accounts)?;
        let mut scram_key = [0u8; 32];
        getrandom::fill(&mut scram_key).map_err(|e| {
            MxError::Accounts(ringmail_accounts::AccountError::Unavailable(e.to_string()))
        })?;
        let relay_stats = Arc::new(MxStats::default());
        let stats = Arc::new(MsaStats {
            relay: Arc::clone(&relay_stats),
            ..MsaStats::default()
        });
        let smtp = Arc::new(ServerConfig {
            hostname: cfg.hostname.clone(),
            max_message_size: cfg.max_message_size,
            max_recipients: cfg.max_recipients,
            offer_starttls: true,
            offer_auth: true,
            auth_mechanisms: cfg.auth_mechanisms.clone(),
            ..ServerConfig::default()
        });
        let msa = Arc::new(Msa {
            cfg: Arc::clone(&cfg),
            smtp,
            spool: spool.clone(),
            accounts,
            tls,
            stats: Arc::clone(&stats),
            queued: Arc::new(tokio::sync::Notify::new()),
            ip_failures: Window::default(),
            user_failures: Window::default(),
            sent: Window::default(),
            limits: crate::limits::ConnLimits::new(cfg.max_connections, cfg.max_connections_per_ip),
            scram_key,
        });
        // The next hops' TLS settings are checked before anything listens.
        let mut routes = vec![Route::new(
            "mta",
            &cfg.relay,
            false,
            cfg.connections,
            &cfg.hostname,
            &cfg.relay_security,
        )?];
        if !cfg.local_relay.is_empty() {
            routes.push(Route::new(
                "mda",
                &cfg.local_relay,
                false,
                cfg.connections,
                &cfg.hostname,
                &cfg.local_relay_security,
            )?);
        }
        let nworkers = cfg.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4)
        });
        let mut workers = Vec::new();
        for (addrs, implicit) in [(&cfg.listen, false), (&cfg.listen_tls, true)] {
            if addrs.is_empty() {
                continue;
            }
            let m = Arc::clone(&msa);
            workers.push(
                Workers::start_mode(cfg.runtime, nworkers, addrs, pin, move |s, peer, _| {
                    run(Arc::clone(&m), s, peer, implicit)
                })
                .map_err(MxError::Listen)?,
            );
        }
        let relay_ctx = Arc::new(RelayCtx {
            hostname: cfg.hostname.clone(),
            spool: spool.clone(),
            stats: relay_stats,
            queued: Arc::clone(&msa.queued),
            routes,
        });
        let (relay_stop, stop_rx) = tokio::sync::watch::channel(false);
        let relay = std::thread::Builder::new()
            .name("ringmail-msa-relay".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(crate::relay::run(relay_ctx, stop_rx)),
                    Err(e) => warn!(error = %e, "cannot build the relay runtime"),
                }
            })
            .map_err(MxError::Thread)?;
        if let Some(addr) = cfg.admin {
            crate::admin::spawn(addr, Arc::clone(&stats), spool, "ringmail-msa-admin")
                .map_err(MxError::Listen)?;
        }
        info!(listen = ?cfg.listen, listen_tls = ?cfg.listen_tls, relay = ?cfg.relay, local_relay = ?cfg.local_relay, "msa started");
        Ok(MsaServer {
            msa,
            accounts_rt: Some(accounts_rt),
            workers,
            relay_stop,
            relay: Some(relay),
        })
    }

    pub fn reload_tls(&self) {
        match self.msa.tls.reload() {
            Ok(true) => info!("TLS certificates reloaded"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "TLS reload failed; the previous certificates stay"),
        }
    }

    pub fn stop(mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
        let _ = self.relay_stop.send(true);
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
        if let Some(rt) = self.accounts_rt.take() {
            rt.shutdown_background();
        }
        info!("msa stopped");
    }
}

struct Txn {
    sender: String,
    params: MailParams,
    /// Forward paths with their DSN parameters (NOTIFY=, ORCPT=).
    recipients: Vec<(String, RcptParams)>,
    /// `session::envelope_key` of each of `recipients` (duplicates are queued once).
    recipient_keys: std::collections::HashSet<String>,
    all_local: bool,
    incoming: Option<Incoming>,
    headers: Vec<u8>,
    headers_done: bool,
    /// The header section was longer than [`MAX_HEADER_COPY`]: not all of it was seen.
    headers_truncated: bool,
}

struct Ctx<'a> {
    msa: &'a Msa,
    client: SocketAddr,
    helo: String,
    tls: bool,
    account: Option<Account>,
    /// A SCRAM-SHA-256 exchange in progress.
    scram: Option<Scram>,
    txn: Option<Txn>,
    close: bool,
}

/// Where a SCRAM-SHA-256 exchange stands between two client messages.
enum Scram {
    /// server-first sent; `account` is `None` for a fake secret.
    Exchanging {
        exchange: Box<ScramServer>,
        user: String,
        account: Option<Account>,
    },
    /// The proof was right and `v=` sent: the client's empty response completes the login.
    Verified { account: Account },
}

/// One session. `implicit`: TLS at accept (port 465).
pub async fn run(msa: Arc<Msa>, mut stream: TcpStream, peer: SocketAddr, implicit: bool) {
    let msa = &*msa;
    inc(&msa.stats.sessions);
    let mut trusted = msa
        .cfg
        .trusted_proxies
        .iter()
        .any(|c| c.contains(peer.ip()));
    if trusted && implicit {
        // On an implicit TLS port a client speaks first: a TLS handshake record (0x16) from a
        // trusted address is a direct client (e.g. on the same host as the LB), not a PROXY
        // header.
        let mut first = [0u8; 1];
        if let Ok(Ok(1)) =
            tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first)).await
            && first[0] == 0x16
        {
            trusted = false;
        }
    }
    let mut early = Vec::new();
    let client = if trusted {
        match crate::proxy::read_header(&mut stream, Duration::from_secs(10)).await {
            Ok(info) => {
                early = info.rest;
                info.client.unwrap_or(peer)
            }
            Err(e) => {
                inc(&msa.stats.refused_proxy);
                warn!(%peer, error = %e, "refused: a trusted proxy sent no valid PROXY header");
                return;
            }
        }
    } else {
        peer
    };
    // Connection counts, by the real client (after the PROXY header): a refused client is told
    // so in the protocol (after the handshake on an implicit TLS port).
    let admitted = msa.limits.admit(client.ip());
    let refusal = match &admitted {
        Ok(_) => None,
        Err(r) => {
            inc(&msa.stats.refused_connections);
            info!(client = %client.ip(), limit = ?r, "refused: too many connections");
            Some(match r {
                crate::limits::Refused::Total => {
                    format!("{} Error: too many connections", msa.cfg.hostname)
                }
                crate::limits::Refused::PerAddress => format!(
                    "{} Error: too many connections from {}",
                    msa.cfg.hostname,
                    client.ip()
                ),
            })
        }
    };
    let mut ctx = Ctx {
        msa,
        client,
        helo: String::new(),
        tls: implicit,
        account: None,
        scram: None,
        txn: None,
        close: false,
    };
    if implicit {
        // With implicit TLS, bytes after the PROXY header belong to the handshake.
        let io = Prefixed {
            pre: early,
            inner: stream,
        };
        let acceptor = msa.tls.acceptor();
        match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(io)).await {
            Ok(Ok(mut tls)) => {
                let mut server = Server::new(Arc::clone(&msa.smtp), true);
                if let Some(text) = &refusal {
                    server.refuse_connection(421, "4.7.0", text);
                    let _ = crate::driver::flush(&mut tls, &mut server).await;
                } else {
                    server.greet();
                    let _ = drive(&mut tls, &mut server, &mut ctx).await;
                }
                let _ = tls.shutdown().await;
            }
            Ok(Err(e)) => debug!(client = %client.ip(), error = %e, "TLS handshake failed"),
            Err(_) => debug!(client = %client.ip(), "TLS handshake timed out"),
        }
        return;
    }
    let mut server = Server::new(Arc::clone(&msa.smtp), false);
    if let Some(text) = &refusal {
        server.refuse_connection(421, "4.7.0", text);
        let _ = crate::driver::flush(&mut stream, &mut server).await;
        return;
    }
    server.greet();
    if !early.is_empty() {
        server.receive(&early);
    }
    crate::driver::serve_with_starttls(
        stream,
        &mut server,
        &mut ctx,
        msa.tls.acceptor(),
        client.ip(),
    )
    .await;
}

/// A stream with bytes already read in front (what followed a PROXY header).
struct Prefixed<S> {
    pre: Vec<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Policy for Ctx<'_> {
    fn command_timeout(&self) -> Duration {
        self.msa.cfg.command_timeout
    }

    fn data_timeout(&self) -> Duration {
        self.msa.cfg.data_timeout
    }

    async fn on_event(&mut self, server: &mut Server, event: Event) {
        match event {
            Event::DataChunk(bytes) => on_chunk(self, &bytes),
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
            } => on_auth(server, self, authzid, &authcid, password.expose_str()).await,
            Event::AuthSasl {
                first, response, ..
            } => on_scram(server, self, first, response.expose()).await,
            Event::MailFrom {
                reverse_path,
                params,
            } => on_mail(server, self, reverse_path, params).await,
            Event::RcptTo {
                forward_path,
                params,
            } => on_rcpt(server, self, &forward_path, params).await,
            Event::Reset => self.txn = None,
            // Handled by the driver.
            Event::Quit
            | Event::StartTls
            | Event::DataStart
            | Event::DataEnd
            | Event::DataAborted { .. } => {}
        }
    }

    fn on_data_start(&mut self, _server: &mut Server) {
        if let Some(txn) = self.txn.as_mut() {
            match self.msa.spool.begin() {
                Ok(i) => txn.incoming = Some(i),
                Err(e) => warn!(error = %e, "cannot start a spool file"),
            }
        }
    }

    async fn on_data_end(&mut self, server: &mut Server) -> bool {
        on_data_end(server, self).await
    }

    fn on_data_aborted(&mut self, _reason: ringmail_smtp::AbortReason) {
        self.txn = None;
    }

    fn on_ack_maybe_lost(&mut self) {
        self.msa.spool.note_ack_maybe_lost();
    }

    fn on_disconnect(&mut self) {
        self.txn = None;
    }

    fn wants_close(&self) -> bool {
        self.close
    }

    fn tls_started(&mut self) {
        self.tls = true;
        self.account = None;
        self.scram = None;
    }
}

/// The delay before a failure reply: 0.5 s, doubling per recent failure, at most 8 s.
pub fn failure_delay(failures: usize) -> Duration {
    let exp = failures.saturating_sub(1).min(4) as u32;
    Duration::from_millis(500 * (1u64 << exp))
}

/// Too many recent failures from this client: 421 and close. True if so.
fn locked_out(server: &mut Server, ctx: &mut Ctx<'_>, shown: &str) -> bool {
    let msa = ctx.msa;
    let ip = ctx.client.ip();
    if msa.ip_failures.count(&ip, FAILURE_WINDOW) < msa.cfg.max_auth_failures as usize {
        return false;
    }
    info!(client = %ip, user = %shown, "refused: too many authentication failures");
    lock_out(server, ctx);
    true
}

/// 421 and close for a client over the failure limit (counted).
fn lock_out(server: &mut Server, ctx: &mut Ctx<'_>) {
    inc(&ctx.msa.stats.auth_locked_out);
    server.reject(Reply::new(
        421,
        "4.7.0",
        &format!(
            "{} Error: too many authentication failures",
            ctx.msa.cfg.hostname
        ),
    ));
    ctx.close = true;
}

fn auth_succeeded(server: &mut Server, ctx: &mut Ctx<'_>, account: Account, mechanism: &str) {
    inc(&ctx.msa.stats.auth_ok);
    let shown = printable(&account.address);
    info!(client = %ctx.client.ip(), user = %shown, mechanism, result = "ok", "authentication");
    ctx.account = Some(account);
    server.auth_result(true);
}

/// A failed login, whatever the mechanism and the reason: counted, logged (`result` and the
/// mechanism, never a credential), delayed like every other failure, then 535 (or 421).
async fn auth_failed(
    server: &mut Server,
    ctx: &mut Ctx<'_>,
    user: &str,
    mechanism: &str,
    result: &str,
) {
    let msa = ctx.msa;
    let ip = ctx.client.ip();
    let shown = printable(user);
    let user_key = user.trim().to_ascii_lowercase();
    inc(&msa.stats.auth_failed);
    let n_ip = msa.ip_failures.add(ip, FAILURE_WINDOW);
    let n_user = msa.user_failures.add(user_key, FAILURE_WINDOW);
    let delay = failure_delay(n_ip.max(n_user));
    info!(client = %ip, user = %shown, mechanism, result, failures = n_ip, "authentication failed");
    tokio::time::sleep(delay).await;
    if n_ip >= msa.cfg.max_auth_failures as usize {
        lock_out(server, ctx);
    } else {
        server.auth_result(false);
    }
}

fn auth_unavailable(server: &mut Server, ctx: &mut Ctx<'_>, user: &str, e: &dyn std::fmt::Display) {
    inc(&ctx.msa.stats.auth_unavailable);
    let shown = printable(user);
    warn!(client = %ctx.client.ip(), user = %shown, error = %e, "authentication: account store unavailable");
    server.reject(Reply::new(454, "4.7.0", "Temporary authentication failure"));
}

async fn on_auth(
    server: &mut Server,
    ctx: &mut Ctx<'_>,
    authzid: Option<String>,
    user: &str,
    password: Option<&str>,
) {
    let msa = ctx.msa;
    let shown = printable(user);
    if locked_out(server, ctx, &shown) {
        return;
    }
    // An authorization identity other than the login is not supported.
    let authz_ok = authzid
        .as_deref()
        .is_none_or(|z| z.is_empty() || z.eq_ignore_ascii_case(user));
    let outcome = match password {
        Some(pw) if authz_ok => msa.accounts.authenticate(user, pw).await,
        _ => Ok(AuthOutcome::BadCredentials),
    };
    match outcome {
        Ok(AuthOutcome::Ok(account)) => auth_succeeded(server, ctx, account, "PLAIN/LOGIN"),
        Ok(o) => {
            let result = if o == AuthOutcome::Disabled {
                "disabled"
            } else {
                "bad credentials"
            };
            auth_failed(server, ctx, user, "PLAIN/LOGIN", result).await;
        }
        Err(e) => auth_unavailable(server, ctx, user, &e),
    }
}

const SCRAM: &str = "SCRAM-SHA-256";

/// One client message of a SCRAM-SHA-256 exchange ([`ringmail_accounts::scram`]).
async fn on_scram(server: &mut Server, ctx: &mut Ctx<'_>, first: bool, response: &[u8]) {
    let msa = ctx.msa;
    if first {
        ctx.scram = None;
        if locked_out(server, ctx, "") {
            return;
        }
        let mut exchange = Box::new(ScramServer::with_os_nonce());
        let user = match exchange.client_first(response) {
            Ok(cf) => cf.username,
            Err(e) => return scram_failed(server, ctx, "", e).await,
        };
        let (secret, account) = match msa.accounts.scram_secret(&user).await {
            Ok(Some((account, secret))) => (secret, Some(account)),
            // Unknown user, or a password stored with another scheme: a stand-in secret,
            // stable per user name, so the exchange looks the same and fails at the proof.
            Ok(None) => {
                let key = normalize_address(&user).unwrap_or_else(|_| user.to_lowercase());
                (ScramSecret::fake(&msa.scram_key, &key), None)
            }
            Err(e) => return auth_unavailable(server, ctx, &user, &e),
        };
        let server_first = exchange.server_first(secret, account.is_some());
        ctx.scram = Some(Scram::Exchanging {
            exchange,
            user,
            account,
        });
        server.auth_challenge(&server_first);
        return;
    }
    match ctx.scram.take() {
        Some(Scram::Exchanging {
            mut exchange,
            user,
            account,
        }) => match (exchange.client_final(response), account) {
            (Ok(_), Some(account)) if account.disabled => {
                auth_failed(server, ctx, &user, SCRAM, "disabled").await;
            }
            (Ok(server_final), Some(account)) => {
                ctx.scram = Some(Scram::Verified { account });
                server.auth_challenge(&server_final);
            }
            // Unreachable: a fake secret never verifies.
            (Ok(_), None) => scram_failed(server, ctx, &user, ScramError::InvalidProof).await,
            (Err(e), _) => scram_failed(server, ctx, &user, e).await,
        },
        // RFC 4954: the client answers the final challenge with an empty response.
        Some(Scram::Verified { account }) if response.is_empty() => {
            auth_succeeded(server, ctx, account, SCRAM);
        }
        Some(Scram::Verified { account }) => {
            let user = account.address.clone();
            auth_failed(
                server,
                ctx,
                &user,
                SCRAM,
                "unexpected data after server-final",
            )
            .await;
        }
        None => auth_failed(server, ctx, "", SCRAM, "out of sequence").await,
    }
}

async fn scram_failed(server: &mut Server, ctx: &mut Ctx<'_>, user: &str, e: ScramError) {
    let result = match e {
        ScramError::InvalidProof => "bad credentials",
        other => other.server_error(),
    };
    auth_failed(server, ctx, user, SCRAM, result).await;
}

async fn on_mail(
    server: &mut Server,
    ctx: &mut Ctx<'_>,
    reverse_path: Option<Mailbox>,
    params: MailParams,
) {
    let msa = ctx.msa;
    let Some(account) = ctx.account.clone() else {
        inc(&msa.stats.refused_unauthenticated);
        server.reject(Reply::new(530, "5.7.0", "Authentication required"));
        return;
    };
    let user = printable(&account.address);
    let owned = match &reverse_path {
        Some(m) => msa.accounts.owns(&account, m.raw()).await,
        None => false,
    };
    if !owned {
        inc(&msa.stats.refused_sender);
        let sender = reverse_path.as_ref().map_or("", |m| m.raw());
        info!(client = %ctx.client.ip(), user = %user, sender = %printable(sender), "refused: sender not owned");
        server.reject(Reply::new(
            553,
            "5.7.1",
            &format!(
                "<{}>: Sender address rejected: not owned by user {user}",
                printable(sender)
            ),
        ));
        return;
    }
    let key = account.address.to_ascii_lowercase();
    if msa.sent.count(&key, Duration::from_secs(3600)) >= msa.cfg.max_messages_per_hour as usize {
        inc(&msa.stats.refused_rate);
        info!(user = %user, "refused: hourly message limit");
        server.reject(Reply::new(
            450,
            "4.7.1",
            "Error: too many messages from your account; try again later",
        ));
        return;
    }
    ctx.txn = Some(Txn {
        sender: reverse_path
            .map(|m| m.raw().to_string())
            .unwrap_or_default(),
        params,
        recipients: Vec::new(),
        recipient_keys: std::collections::HashSet::new(),
        all_local: true,
        incoming: None,
        headers: Vec::new(),
        headers_done: false,
        headers_truncated: false,
    });
    server.accept();
}

async fn on_rcpt(server: &mut Server, ctx: &mut Ctx<'_>, rcpt: &Mailbox, params: RcptParams) {
    if ctx.account.is_none() {
        inc(&ctx.msa.stats.refused_unauthenticated);
        server.reject(Reply::new(530, "5.7.0", "Authentication required"));
        return;
    }
    if ctx.txn.is_none() {
        server.reject(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        return;
    }
    let local = match rcpt.domain() {
        Domain::Name(d) => match ctx.msa.accounts.is_local_domain(d).await {
            Ok(local) => local,
            Err(e) => {
                warn!(error = %e, "account store lookup failed");
                server.reject(Reply::new(
                    451,
                    "4.3.0",
                    "Recipient address rejected: temporary lookup failure",
                ));
                return;
            }
        },
        _ => false,
    };
    // A recipient in one of our domains must exist (Postfix's
    // smtpd_reject_unlisted_recipient): refused now rather than bounced later.
    if local && let Err(reply) = crate::session::known_recipient(&ctx.msa.accounts, rcpt).await {
        if reply.code() >= 500 {
            inc(&ctx.msa.stats.refused_recipient);
        }
        let user = ctx
            .account
            .as_ref()
            .map_or(String::new(), |a| printable(&a.address));
        info!(client = %ctx.client.ip(), user = %user, rcpt = %printable(rcpt.raw()), code = reply.code(), "refused: recipient");
        server.reject(reply);
        return;
    }
    let Some(txn) = ctx.txn.as_mut() else {
        return;
    };
    txn.all_local &= local;
    if txn
        .recipient_keys
        .insert(crate::session::envelope_key(rcpt))
    {
        txn.recipients.push((rcpt.raw().to_string(), params));
    }
    server.accept();
}

fn on_chunk(ctx: &mut Ctx<'_>, bytes: &[u8]) {
    let Some(txn) = ctx.txn.as_mut() else {
        return;
    };
    if let Some(inc) = txn.incoming.as_mut()
        && let Err(e) = inc.write(bytes)
    {
        warn!(error = %e, "spool write failed");
        txn.incoming = None;
    }
    if !txn.headers_done {
        let room = MAX_HEADER_COPY.saturating_sub(txn.headers.len());
        txn.headers
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        if let Some(i) = header_end(&txn.headers) {
            txn.headers.truncate(i);
            txn.headers_done = true;
        } else if txn.headers.len() >= MAX_HEADER_COPY {
            txn.headers_done = true;
            txn.headers_truncated = true;
        }
    }
}

/// Where the header section ends (the empty line), if it does in `b`.
fn header_end(b: &[u8]) -> Option<usize> {
    if b.starts_with(b"\r\n") {
        return Some(0);
    }
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 2)
}

/// The header fields of a header section: (name, unfolded value).
pub fn header_fields(section: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(section);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

/// The addresses of an address-list header value (RFC 5322 section 3.4): display names,
/// quoted strings, comments and groups handled.
pub fn header_addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut angle: Option<String> = None;
    let (mut in_quote, mut depth, mut in_angle) = (false, 0usize, false);
    let mut chars = value.chars();
    let finish = |cur: &mut String, angle: &mut Option<String>, out: &mut Vec<String>| {
        let a = angle.take().unwrap_or_else(|| cur.trim().to_string());
        let a = a.trim().to_string();
        if !a.is_empty() {
            out.push(a);
        }
        cur.clear();
    };
    while let Some(c) = chars.next() {
        if in_quote {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => in_quote = false,
                _ => {}
            }
            continue;
        }
        if depth > 0 {
            match c {
                '\\' => {
                    chars.next();
                }
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            continue;
        }
        if in_angle {
            if c == '>' {
                in_angle = false;
            } else if let Some(a) = angle.as_mut() {
                a.push(c);
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
            '(' => depth = 1,
            '<' => {
                in_angle = true;
                angle = Some(String::new());
            }
            // A group's display name: what came before is not an address.
            ':' => cur.clear(),
            ',' | ';' => finish(&mut cur, &mut angle, &mut out),
            _ => cur.push(c),
        }
    }
    finish(&mut cur, &mut angle, &mut out);
    out
}

/// The header fields whose addresses must all belong to the authenticated account, and
/// whether the field may appear at most once (RFC 5322 3.6: From and Sender; Resent- blocks
/// may repeat, 3.6.6) and must hold exactly one mailbox (Sender, Resent-Sender).
const ORIGINATOR_FIELDS: [(&str, bool, bool); 4] = [
    ("From", true, false),
    ("Sender", true, true),
    ("Resent-From", false, false),
    ("Resent-Sender", false, true),
];

/// Why a message's originator fields are refused (553 5.7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginatorError {
    /// No `From:` field (required, RFC 5322 3.6).
    MissingFrom,
    /// `From:` or `Sender:` more than once.
    Repeated(&'static str),
    /// The field is not a plain mailbox list: the reason.
    Malformed(&'static str, &'static str),
    /// An address the account does not own.
    NotOwned(&'static str, String),
}

impl OriginatorError {
    /// The reply text (printable; addresses shown with [`printable`]).
    pub fn reply_text(&self, user: &str) -> String {
        match self {
            OriginatorError::MissingFrom => {
                "Message refused: no From: header field (RFC 5322 3.6)".to_string()
            }
            OriginatorError::Repeated(f) => {
                format!("Message refused: more than one {f}: header field")
            }
            OriginatorError::Malformed(f, why) => {
                format!("Message refused: {f}: header field not understood: {why}")
            }
            OriginatorError::NotOwned(f, a) => format!(
                "<{}>: Sender address rejected: {f}: address not owned by user {user}",
                printable(a)
            ),
        }
    }
}

/// The originator fields of a header section, each address checked by `owns`: `Ok(())` when
/// From (required, once), Sender (at most once, one mailbox), Resent-From and Resent-Sender
/// parse completely as plain mailbox lists ([`parse_mailbox_list`]) and every address in them
/// is owned.
pub async fn check_originators<F, Fut>(
    fields: &[(String, String)],
    mut owns: F,
) -> Result<(), OriginatorError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut addresses = Vec::new();
    for (name, once, single) in ORIGINATOR_FIELDS {
        let values: Vec<&str> = fields
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        if name == "From" && values.is_empty() {
            return Err(OriginatorError::MissingFrom);
        }
        if once && values.len() > 1 {
            return Err(OriginatorError::Repeated(name));
        }
        for v in values {
            let list =
                parse_mailbox_list(v).map_err(|why| OriginatorError::Malformed(name, why))?;
            if single && list.len() != 1 {
                return Err(OriginatorError::Malformed(name, "more than one address"));
            }
            addresses.extend(list.into_iter().map(|a| (name, a)));
        }
    }
    for (name, a) in addresses {
        if !owns(a.clone()).await {
            return Err(OriginatorError::NotOwned(name, a));
        }
    }
    Ok(())
}

/// A lexical token of a structured header field body (RFC 5322 3.2), comments and folding
/// whitespace skipped. `spaced`: whitespace or a comment came before it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Atom(String),
    Quoted(String),
    Literal(String),
    Special(char),
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Splits a field body into tokens; an unterminated quoted string, comment or domain
/// literal, or a character allowed nowhere, is an error.
fn tokens(value: &str) -> Result<Vec<(Tok, bool)>, &'static str> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    let mut spaced = false;
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => spaced = true,
            '(' => {
                let mut depth = 1usize;
                while depth > 0 {
                    match chars.next() {
                        None => return Err("unterminated comment"),
                        Some('\\') => {
                            if chars.next().is_none() {
                                return Err("unterminated comment");
                            }
                        }
                        Some('(') => depth += 1,
                        Some(')') => depth -= 1,
                        Some(c) if c.is_control() && c != '\t' => {
                            return Err("control character");
                        }
                        Some(_) => {}
                    }
                }
                spaced = true;
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated quoted string"),
                        Some('\\') => match chars.next() {
                            Some(c) if !c.is_control() || c == '\t' => s.push(c),
                            _ => return Err("unterminated quoted string"),
                        },
                        Some('"') => break,
                        Some(c) if c.is_control() && c != '\t' => {
                            return Err("control character");
                        }
                        Some(c) => s.push(c),
                    }
                }
                out.push((Tok::Quoted(s), spaced));
                spaced = false;
            }
            '[' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated domain literal"),
                        Some(']') => break,
                        Some(c) if c == '[' || c == '\\' || c.is_control() => {
                            return Err("bad domain literal");
                        }
                        Some(c) => s.push(c),
                    }
                }
                out.push((Tok::Literal(s), spaced));
                spaced = false;
            }
            c if is_atext(c) => {
                let mut s = String::from(c);
                while let Some(&n) = chars.peek() {
                    if !is_atext(n) {
                        break;
                    }
                    s.push(n);
                    chars.next();
                }
                out.push((Tok::Atom(s), spaced));
                spaced = false;
            }
            '<' | '>' | '@' | ',' | ';' | ':' | '.' => {
                out.push((Tok::Special(c), spaced));
                spaced = false;
            }
            ')' => return Err("unbalanced ')'"),
            ']' => return Err("unbalanced ']'"),
            _ => return Err("character not allowed here"),
        }
    }
    Ok(out)
}

/// Whether `s` is a dot-atom text (RFC 5322 3.2.3).
fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|p| !p.is_empty() && p.chars().all(is_atext))
}

/// A dot-atom starting at the atom `toks[*i]`: atoms joined by `.` with nothing between them.
/// None when a `.` is not followed by an adjacent atom.
fn dot_atom(toks: &[(Tok, bool)], i: &mut usize) -> Option<String> {
    let adjacent = |j: usize| toks.get(j).is_some_and(|(_, spaced)| !spaced);
    let Some((Tok::Atom(first), _)) = toks.get(*i) else {
        return None;
    };
    let mut out = first.clone();
    *i += 1;
    while adjacent(*i) && toks[*i].0 == Tok::Special('.') {
        let Some((Tok::Atom(a), false)) = toks.get(*i + 1) else {
            return None;
        };
        out.push('.');
        out.push_str(a);
        *i += 2;
    }
    Some(out)
}

/// Parses an addr-spec from `toks[*i..]`; folding whitespace and comments inside it (obsolete
/// syntax) are refused. A quoted local part whose content is a dot-atom is unquoted
/// (`"alice"@x` is `alice@x`); another keeps its quotes (escaped).
fn addr_spec(toks: &[(Tok, bool)], i: &mut usize) -> Result<String, &'static str> {
    let adjacent = |j: usize| toks.get(j).is_some_and(|(_, spaced)| !spaced);
    let local = match toks.get(*i) {
        Some((Tok::Quoted(q), _)) => {
            *i += 1;
            if is_dot_atom(q) {
                q.clone()
            } else {
                let mut quoted = String::from('"');
                for c in q.chars() {
                    if c == '"' || c == '\\' {
                        quoted.push('\\');
                    }
                    quoted.push(c);
                }
                quoted.push('"');
                quoted
            }
        }
        Some((Tok::Atom(_), _)) => dot_atom(toks, i).ok_or("bad local part")?,
        _ => return Err("expected an address"),
    };
    if !(adjacent(*i) && toks[*i].0 == Tok::Special('@')) {
        return Err("address without '@'");
    }
    *i += 1;
    let domain = match toks.get(*i) {
        Some((Tok::Atom(_), false)) => dot_atom(toks, i).ok_or("bad domain")?,
        Some((Tok::Literal(l), false)) => {
            *i += 1;
            format!("[{}]", l.trim())
        }
        _ => return Err("bad domain"),
    };
    Ok(format!("{local}@{domain}"))
}

/// The addresses of a mailbox-list (RFC 5322 3.4) parsed strictly, so that no mail client
/// can read another address from the same text: `[display-name] <addr-spec>` or a bare
/// `addr-spec`, separated by commas. The display name is a phrase of atoms and quoted strings
/// (encoded-words are atoms: text, never an address), with `.` allowed after its first word
/// (obs-phrase); comments and folding whitespace are skipped between tokens. Refused: an
/// unterminated quoted string or comment, a stray special (`@`, `<`, `:` ...) in a display
/// name, anything after an address but a comma, a group, an empty list or element, a
/// source route, and comments or whitespace inside an address.
pub fn parse_mailbox_list(value: &str) -> Result<Vec<String>, &'static str> {
    let toks = tokens(value)?;
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        // A phrase (display name) or the start of an addr-spec.
        let start = i;
        while let Some((t, _)) = toks.get(i) {
            match t {
                Tok::Atom(_) | Tok::Quoted(_) => i += 1,
                Tok::Special('.') if i > start => i += 1,
                _ => break,
            }
        }
        match toks.get(i) {
            Some((Tok::Special('<'), _)) => {
                i += 1;
                if matches!(toks.get(i), Some((Tok::Special('@'), _))) {
                    return Err("source route");
                }
                out.push(addr_spec(&toks, &mut i)?);
                if !matches!(toks.get(i), Some((Tok::Special('>'), _))) {
                    return Err("unterminated or malformed <address>");
                }
                i += 1;
            }
            Some((Tok::Special(':'), _)) => return Err("group syntax"),
            _ if i == start => {
                return Err(if toks.is_empty() {
                    "no address"
                } else {
                    "expected an address"
                });
            }
            _ => {
                // No angle brackets: the words were the local part of a bare addr-spec.
                let mut j = start;
                out.push(addr_spec(&toks, &mut j)?);
                i = j;
            }
        }
        match toks.get(i) {
            None => return Ok(out),
            Some((Tok::Special(','), _)) if i + 1 < toks.len() => i += 1,
            Some((Tok::Special(','), _)) => return Err("empty list element"),
            Some((Tok::Special(';'), _)) => return Err("group syntax"),
            Some(_) => return Err("text after an address"),
        }
    }
}

fn random_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let a = h.finish();
    h.write_u8(1);
    format!("{a:016x}{:016x}", h.finish())
}

async fn on_data_end(server: &mut Server, ctx: &mut Ctx<'_>) -> bool {
    let msa = ctx.msa;
    let Some(mut txn) = ctx.txn.take() else {
        server.reject(Reply::new(503, "5.5.1", "Error: no transaction"));
        return false;
    };
    let Some(account) = ctx.account.clone() else {
        server.reject(Reply::new(530, "5.7.0", "Authentication required"));
        return false;
    };
    let Some(incoming) = txn.incoming.take() else {
        server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
        return false;
    };
    let fields = header_fields(&txn.headers);
    let has = |n: &str| fields.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let user = printable(&account.address);
    // From (and Sender, Resent-From, Resent-Sender): strictly parsed, every address the user's.
    let verdict = if txn.headers_truncated {
        Err(OriginatorError::Malformed(
            "From",
            "header section too long to check",
        ))
    } else {
        let (accounts, acct) = (&msa.accounts, &account);
        check_originators(&fields, |a| async move { accounts.owns(acct, &a).await }).await
    };
    if let Err(e) = verdict {
        inc(&msa.stats.refused_sender);
        info!(client = %ctx.client.ip(), user = %user, problem = ?e, "refused: originator header fields");
        incoming.abort();
        server.reject(Reply::new(553, "5.7.1", &e.reply_text(&user)));
        return false;
    }
    let id = incoming.id().to_string();
    let now = ringmail_queue::rfc5322_date(ringmail_queue::to_unix(std::time::SystemTime::now()));
    let ip = ctx.client.ip();
    let proto = if txn.params.smtputf8 {
        "UTF8SMTPSA"
    } else {
        "ESMTPSA"
    };
    let rcpt = if txn.recipients.len() == 1 {
        let safe: String = txn.recipients[0]
            .0
            .chars()
            .filter(|c| !c.is_control() && *c != '<' && *c != '>')
            .take(300)
            .collect();
        format!("\r\n\tfor <{safe}>")
    } else {
        String::new()
    };
    let mut headers = format!(
        "Received: {from}\r\n\t(Authenticated sender: {user})\r\n\tby {host} (ringmail) with {proto} id {id}{rcpt};\r\n\t{now}\r\n",
        from = crate::session::received_from(&ctx.helo, "unknown", ip),
        host = msa.cfg.hostname,
    );
    if !has("message-id") {
        let _ = write!(
            headers,
            "Message-ID: <{}@{}>\r\n",
            random_token(),
            msa.cfg.hostname
        );
    }
    if !has("date") {
        let _ = write!(headers, "Date: {now}\r\n");
    }
    let route = if txn.all_local && msa.cfg.local_route == LocalRoute::Mda {
        "mda"
    } else {
        "mta"
    };
    // DSN parameters (RET, ENVID, NOTIFY, ORCPT; RFC 3461 section 4) and BODY travel with
    // the message: the relay hands them on to the next hop.
    let recipients: Vec<NewRecipient> = txn
        .recipients
        .iter()
        .map(|(addr, p)| {
            let mut r = NewRecipient::new(addr.clone());
            crate::session::apply_rcpt_params(&mut r, p);
            r
        })
        .collect();
    let sender = (!txn.sender.is_empty()).then(|| txn.sender.clone());
    let mut env = NewEnvelope::new(sender, recipients, route);
    crate::session::apply_mail_params(&mut env, &txn.params);
    env.client = Some(ClientInfo {
        addr: ctx.client.to_string(),
        helo: ctx.helo.clone(),
        tls: ctx.tls,
        auth: Some(account.address.clone()),
    });
    env.headers = headers;
    match incoming.commit(env).await {
        Ok(qid) => {
            msa.sent.add(
                account.address.to_ascii_lowercase(),
                Duration::from_secs(3600),
            );
            inc(&msa.stats.messages_accepted);
            info!(id = %qid, client = %ip, user = %user, sender = %printable(&txn.sender), rcpts = txn.recipients.len(), route, "queued");
            server.data_committed(&qid.to_string());
            msa.queued.notify_one();
            true
        }
        Err(e) => {
            warn!(error = %e, "queue commit failed");
            server.reject(Reply::new(451, "4.3.0", "Error: queue file write error"));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_from_headers() {
        assert_eq!(
            header_addresses("\"Doe, Jane\" <jane@example.test>, bob@example.test (Bob)"),
            ["jane@example.test", "bob@example.test"]
        );
        assert_eq!(
            header_addresses("Team: a@x.test, B <b@x.test>;"),
            ["a@x.test", "b@x.test"]
        );
        let f = header_fields(b"From: Alice\r\n <alice@example.test>\r\nSubject: x\r\n");
        assert_eq!(f[0].1, "Alice <alice@example.test>");
    }

    /// The originator check of a header section, alice@example.test (any case) owned.
    fn check(section: &str) -> Result<(), OriginatorError> {
        let fields = header_fields(section.as_bytes());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(check_originators(&fields, |a| async move {
                a.eq_ignore_ascii_case("alice@example.test")
            }))
    }

    #[test]
    fn originator_bypasses_refused() {
        let malformed =
            |e: Result<(), OriginatorError>| matches!(e, Err(OriginatorError::Malformed(..)));
        // Parser differentials: what some client reads as bob, or nothing checked.
        for from in [
            "bob@example.test <alice@example.test>",
            "\"alice@example.test\\\" <bob@example.test>",
            "\"bob@example.test\" alice@example.test",
            "<alice@example.test> bob@example.test",
            "undisclosed-recipients:;",
            "Team: alice@example.test;",
            "",
            "Alice",
            "Alice (unterminated <alice@example.test>",
            "Al<ice <alice@example.test>",
            "alice@example.test <alice@example.test>",
            "<alice@example.test",
            "<@relay.test:alice@example.test>",
            "alice@example.test,",
            "alice @example.test",
            "alice(c)@example.test",
            "alice@example.test; bob@example.test",
            "a@b@example.test",
        ] {
            let r = check(&format!("From: {from}\r\nSubject: x\r\n"));
            assert!(malformed(r.clone()), "{from:?}: {r:?}");
        }
        assert_eq!(check("Subject: x\r\n"), Err(OriginatorError::MissingFrom));
        assert_eq!(check(""), Err(OriginatorError::MissingFrom));
        assert_eq!(
            check("From: alice@example.test\r\nfrom: alice@example.test\r\n"),
            Err(OriginatorError::Repeated("From"))
        );
        assert_eq!(
            check(
                "From: alice@example.test\r\nSender: a@example.test\r\nSender: alice@example.test\r\n"
            ),
            Err(OriginatorError::Repeated("Sender"))
        );
        for (f, h) in [
            (
                "From",
                "From: Alice <alice@example.test>, Bob <bob@example.test>\r\n",
            ),
            (
                "Sender",
                "From: alice@example.test\r\nSender: Bob <bob@example.test>\r\n",
            ),
            (
                "Resent-From",
                "From: alice@example.test\r\nResent-From: bob@example.test\r\n",
            ),
            (
                "Resent-Sender",
                "From: alice@example.test\r\nResent-Sender: bob@example.test\r\n",
            ),
        ] {
            assert_eq!(
                check(h),
                Err(OriginatorError::NotOwned(f, "bob@example.test".to_string())),
                "{h:?}"
            );
        }
        // Sender and Resent-Sender name one mailbox.
        assert!(malformed(check(
            "From: alice@example.test\r\nSender: alice@example.test, alice@example.test\r\n"
        )));
        // An encoded-word is display text: the address is what counts.
        assert!(check("From: =?utf-8?b?YWxpY2U=?= <bob@example.test>\r\n").is_err());
        // A quoted local part other than a dot-atom is kept quoted (and shown so).
        let e = check("From: \"bob smith\"@example.test\r\n").unwrap_err();
        assert_eq!(
            e,
            OriginatorError::NotOwned("From", "\"bob smith\"@example.test".to_string())
        );
        assert!(
            e.reply_text("alice@example.test")
                .starts_with("<\"bob smith\"@example.test>: ")
        );
        let e = check("From: \"b\\\"ob\"@example.test\r\n").unwrap_err();
        assert!(
            e.reply_text("alice@example.test")
                .starts_with("<\"b\\\"ob\"@example.test>"),
            "{e:?}"
        );
    }

    #[test]
    fn originator_legitimate_forms_pass() {
        for h in [
            "From: \"Alice, A.\" <alice@example.test>\r\n",
            "From: Alice <alice@example.test>\r\n",
            "From: alice@example.test (Alice)\r\n",
            "From: alice@example.test\r\n",
            "From: <alice@example.test>\r\n",
            "From: Alice A. Liddell <Alice@Example.Test>\r\n",
            "From: (comment) Alice (more) <alice@example.test> (trailing)\r\n",
            "From: Alice\r\n <alice@example.test>\r\n",
            "From:\r\n\t\"Alice\"\r\n\t<alice@example.test>,\r\n alice@example.test\r\n",
            "From: =?utf-8?q?Alice_=C3=A9?= <alice@example.test>\r\n",
            "From: =?utf-8?b?Ym9iQGV4YW1wbGUudGVzdA==?= <alice@example.test>\r\n",
            "From: \"alice\"@example.test\r\n",
            "From: \"Al \\\"the\\\" ice\" <alice@example.test>\r\n",
            "From: Älice <alice@example.test>\r\n",
            "From: alice@example.test\r\nSender: <alice@example.test>\r\nResent-From: alice@example.test\r\nResent-Sender: alice@example.test\r\nResent-From: Alice <alice@example.test>\r\n",
        ] {
            assert_eq!(check(h), Ok(()), "{h:?}");
        }
        assert_eq!(
            parse_mailbox_list("\"Doe, Jane\" <jane@example.test>, bob@example.test (Bob)"),
            Ok(vec![
                "jane@example.test".to_string(),
                "bob@example.test".to_string()
            ])
        );
        assert_eq!(
            parse_mailbox_list("x <a@[192.0.2.1]>"),
            Ok(vec!["a@[192.0.2.1]".to_string()])
        );
    }

    #[test]
    fn delay_grows_and_caps() {
        assert_eq!(failure_delay(1), Duration::from_millis(500));
        assert_eq!(failure_delay(2), Duration::from_secs(1));
        assert_eq!(failure_delay(9), Duration::from_secs(8));
    }
}
