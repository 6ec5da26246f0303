//! Delivery of queued mail to the next hop (the MDA over LMTP or SMTP; bounces to the MTA),
//! with connection reuse, and retries and bounces decided by the queue.
//!
//! ```text
//!  spool.due() ─▶ dispatcher ─claim─▶ route channel ─▶ N delivery workers per route
//!                     ▲                                  │ one connection each, reused:
//!   "queued" notify ──┘                                  │ MAIL/RCPT/DATA per message, body
//!                                                        ▼ streamed from the spool file
//!                                             record_attempt: delivered / retry / bounce
//! ```
//!
//! A route may have several next hops. A new connection tries them all, starting at a
//! rotating index (so connections, and with them the load, spread over the hops), passing
//! over a hop whose connection, greeting, STARTTLS or AUTH fails; only when every hop failed
//! is the attempt a temporary failure, with each hop's error in the message's last reply. A
//! reply to the transaction itself (4xx/5xx) is the answer, not a reason to try another hop.
//! A connection stays with the hop it reached while it is reused.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ringmail_queue::{
    BodyType, Claim, Envelope as QEnvelope, Outcome as QOutcome, RecipientState, Ret,
};
use ringmail_smtp::client::Outcome;
use ringmail_smtp::{
    Body, Client, ClientConfig, ClientEvent, DsnNotify, DsnRet, Envelope, Orcpt, RcptParams,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::admin::MxStats;
use crate::config::RelayProtocol;
use crate::hop::{Hop, HopSecurity, Hops, TlsLevel};
use crate::runtime::before;
use crate::session::Mx;

/// A connection idle this long is closed with QUIT.
const IDLE: Duration = Duration::from_secs(10);
/// One reply from the next hop must come within this.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Content is read from the spool and written in chunks of this size.
const CHUNK: usize = 64 * 1024;

/// The next hops of one route, chosen by the queue's route field.
#[derive(Debug, Clone)]
pub struct Route {
    /// The envelope's `route` (`"mda"`, `"mta"`).
    pub name: String,
    /// Concurrent deliveries on this route.
    pub connections: usize,
    /// Addresses, protocol, TLS policy and credentials (the same for each hop).
    pub(crate) hops: Arc<Hops>,
}

impl Route {
    /// A route to `addrs` (LMTP or SMTP; at least one) with the hops' TLS policy and
    /// credentials; fails when those are unusable (e.g. an unreadable CA file).
    pub fn new(
        name: &str,
        addrs: &[SocketAddr],
        lmtp: bool,
        connections: usize,
        helo_name: &str,
        security: &HopSecurity,
    ) -> Result<Route, crate::MxError> {
        Ok(Route {
            name: name.to_string(),
            connections,
            hops: Arc::new(Hops::new(addrs, helo_name, lmtp, security)?),
        })
    }

    /// The next hops, in their configured order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.hops.list.iter().map(|h| h.addr).collect()
    }
}

/// What the relay needs from the role that queued the mail (the MX or the MSA).
pub struct RelayCtx {
    pub hostname: String,
    pub spool: ringmail_queue::Spool,
    pub stats: Arc<MxStats>,
    /// Wakes the dispatcher when a message was queued.
    pub queued: Arc<tokio::sync::Notify>,
    /// The first route is the default for envelopes whose route is none of these.
    pub routes: Vec<Route>,
}

impl RelayCtx {
    /// The MX's routes: `mda` (the next hop, LMTP or SMTP) and `mta` for bounces.
    pub fn for_mx(mx: &Mx) -> Result<RelayCtx, crate::MxError> {
        let relay = &mx.cfg.relay;
        let host = &mx.cfg.hostname;
        Ok(RelayCtx {
            hostname: host.clone(),
            spool: mx.spool.clone(),
            stats: Arc::clone(&mx.stats),
            queued: Arc::clone(&mx.queued),
            routes: vec![
                Route::new(
                    "mda",
                    &relay.next_hop,
                    relay.protocol == RelayProtocol::Lmtp,
                    relay.connections.max(1),
                    host,
                    &relay.security,
                )?,
                // Bounces go to the MTA over SMTP (two connections are plenty).
                Route::new(
                    "mta",
                    relay.bounce_next_hop.as_ref().unwrap_or(&relay.next_hop),
                    false,
                    2,
                    host,
                    &relay.bounce_security(),
                )?,
            ],
        })
    }
}

/// Runs the dispatcher and the delivery workers until `stop` fires.
pub async fn run(mx: Arc<RelayCtx>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut txs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for route in &mx.routes {
        let workers = route.connections.max(1);
        let (tx, rx) = mpsc::channel::<Claim>(workers * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        info!(route = %route.name, next_hop = %route.hops.addrs(), security = %route.hops.describe(), "relay route");
        for _ in 0..workers {
            tasks.spawn(worker(
                Arc::clone(&mx),
                route.name.clone(),
                Arc::clone(&route.hops),
                Arc::clone(&rx),
            ));
        }
        txs.push(tx);
    }
    loop {
        if *stop.borrow() {
            break;
        }
        let due = mx.spool.due_limited(SystemTime::now(), 512);
        let mut sent = 0usize;
        for id in due {
            let Some(claim) = mx.spool.claim(&id) else {
                continue;
            };
            // From the index: the envelope is read once, by the delivery worker.
            let route = mx.spool.route(&id);
            let i = route
                .and_then(|route| mx.routes.iter().position(|r| *r.name == *route))
                .unwrap_or(0);
            let tx = &txs[i];
            tokio::select! {
                r = tx.send(claim) => if r.is_err() { break },
                _ = stop.changed() => break,
            }
            sent += 1;
        }
        if sent > 0 {
            continue;
        }
        idle_until_due(&mx.spool, &mx.queued, &mut stop).await;
    }
    drop(txs);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Waits, with nothing to dispatch, until a message is queued, the next retry is due (at most
/// a second), or `stop` changes.
pub(crate) async fn idle_until_due(
    spool: &ringmail_queue::Spool,
    queued: &tokio::sync::Notify,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    let wait = spool
        .next_due()
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    tokio::select! {
        _ = queued.notified() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = stop.changed() => {}
    }
}

/// A byte stream a connection runs over: TCP, then TLS after STARTTLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to do the TLS handshake when the client core asks for it (STARTTLS).
#[derive(Clone)]
pub(crate) struct TlsSetup {
    pub connector: tokio_rustls::TlsConnector,
    pub name: rustls::pki_types::ServerName<'static>,
}

/// Why a connection attempt or a transaction failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnError {
    pub message: String,
    /// The TLS handshake after STARTTLS failed (an opportunistic sender retries in plaintext).
    pub tls_handshake: bool,
}

impl From<String> for ConnError {
    fn from(message: String) -> ConnError {
        ConnError {
            message,
            tls_handshake: false,
        }
    }
}

impl From<&str> for ConnError {
    fn from(message: &str) -> ConnError {
        ConnError::from(message.to_string())
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A connection to a next hop, driven by the I/O-free client core.
pub(crate) struct Conn {
    stream: Option<Box<dyn Io>>,
    pub client: Client,
    buf: Vec<u8>,
    /// The reply timeout, moved before every read (one timer for the connection's life).
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    tls: Option<TlsSetup>,
    pub peer: SocketAddr,
    /// The next hop's name for logs: its MX host name, else its IP address.
    pub host: String,
    /// When the connection was opened (reuse is bounded in time).
    pub opened: std::time::Instant,
    /// Transactions run on it.
    pub transactions: u32,
}

impl Conn {
    /// Connects, reads the greeting, says EHLO/LHLO and does STARTTLS when the client
    /// configuration asks for it (with `tls` for the handshake).
    pub(crate) async fn connect(
        addr: SocketAddr,
        cfg: Arc<ClientConfig>,
        tls: Option<TlsSetup>,
        connect_timeout: Duration,
    ) -> Result<Conn, ConnError> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr} timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream: Some(Box::new(stream)),
            client: Client::new(cfg, false),
            buf: vec![0u8; 16 * 1024],
            timer: Box::pin(tokio::time::sleep(REPLY_TIMEOUT)),
            tls,
            peer: addr,
            host: addr.ip().to_string(),
            opened: std::time::Instant::now(),
            transactions: 0,
        };
        match conn.next_event().await {
            Ok(ClientEvent::Ready) => Ok(conn),
            Ok(ClientEvent::Failed(e)) => Err(format!("{addr}: {e}").into()),
            Ok(other) => Err(format!("{addr}: unexpected {other:?}").into()),
            Err(e) => Err(ConnError {
                message: format!("{addr}: {}", e.message),
                ..e
            }),
        }
    }

    /// Opens a session to a fixed next hop with its TLS policy and credentials: `may` retries
    /// in plaintext after a failed handshake; `encrypt` fails without TLS; AUTH follows TLS.
    pub(crate) async fn open_hop(hop: &Hop, connect_timeout: Duration) -> Result<Conn, ConnError> {
        let addr = hop.addr;
        match Conn::connect(
            addr,
            Arc::clone(&hop.client),
            hop.tls.clone(),
            connect_timeout,
        )
        .await
        {
            Err(e) if e.tls_handshake && hop.level == TlsLevel::May => {
                info!(next_hop = %addr, error = %e, "TLS handshake failed; retrying in plaintext");
                Conn::connect(addr, Arc::clone(&hop.plain), None, connect_timeout).await
            }
            r => r,
        }
    }

    /// The next hop as the delivery log names it: `host[ip]:port` (Postfix's `relay=`).
    pub(crate) fn label(&self) -> String {
        relay_label(&self.host, self.peer)
    }

    fn stream(&mut self) -> Result<&mut Box<dyn Io>, ConnError> {
        self.stream.as_mut().ok_or_else(lost_in_handshake)
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        while let Some(b) = self.client.poll_transmit() {
            self.stream()?
                .write_all(&b)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }

    async fn starttls(&mut self) -> Result<(), ConnError> {
        let setup = self
            .tls
            .clone()
            .ok_or("STARTTLS without a TLS configuration")?;
        let plain = self.stream.take().ok_or("connection lost")?;
        let hs = tokio::time::timeout(
            Duration::from_secs(30),
            setup.connector.connect(setup.name, plain),
        )
        .await;
        match hs {
            Ok(Ok(tls)) => {
                self.stream = Some(Box::new(tls));
                self.client.tls_established();
                Ok(())
            }
            Ok(Err(e)) => Err(ConnError {
                message: format!("TLS handshake: {e}"),
                tls_handshake: true,
            }),
            Err(_) => Err(ConnError {
                message: "TLS handshake timed out".into(),
                tls_handshake: true,
            }),
        }
    }

    /// Writes what is queued and reads until the client has an event; does the TLS
    /// handshake itself when STARTTLS was accepted.
    pub(crate) async fn next_event(&mut self) -> Result<ClientEvent, ConnError> {
        loop {
            self.flush().await?;
            if let Some(ev) = self.client.poll_event() {
                if ev == ClientEvent::StartTls {
                    self.starttls().await?;
                    continue;
                }
                return Ok(ev);
            }
            if self.client.should_close() {
                return Err("connection closed by the protocol".into());
            }
            // Fields borrowed one by one: the stream, the timer and the buffer are disjoint.
            let stream = self.stream.as_mut().ok_or_else(lost_in_handshake)?;
            let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
            let n = match before(self.timer.as_mut(), deadline, stream.read(&mut self.buf)).await {
                Ok(Ok(0)) => return Err("connection closed by the next hop".into()),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(format!("read: {e}").into()),
                Err(()) => return Err("timeout waiting for a reply".into()),
            };
            self.client.receive(&self.buf[..n]);
        }
    }

    pub(crate) async fn quit(mut self) {
        self.client.quit();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.flush().await;
            let mut b = [0u8; 512];
            if let Some(s) = self.stream.as_mut() {
                let _ = s.read(&mut b).await;
                let _ = s.shutdown().await;
            }
        })
        .await;
    }
}

fn lost_in_handshake() -> ConnError {
    ConnError::from("connection lost in a TLS handshake")
}

async fn worker(
    mx: Arc<RelayCtx>,
    route: String,
    hops: Arc<Hops>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Claim>>>,
) {
    let mut conn: Option<Conn> = None;
    // The idle timeout, moved before every wait (one timer for the worker's life).
    let mut idle = std::pin::pin!(tokio::time::sleep(IDLE));
    loop {
        let next = {
            let mut rx = rx.lock().await;
            before(idle.as_mut(), tokio::time::Instant::now() + IDLE, rx.recv()).await
        };
        let claim = match next {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(_) => {
                if let Some(c) = conn.take() {
                    c.quit().await;
                }
                continue;
            }
        };
        deliver_one(&mx, &route, &hops, &mut conn, claim).await;
    }
    if let Some(c) = conn.take() {
        c.quit().await;
    }
}

async fn deliver_one(
    mx: &RelayCtx,
    route: &str,
    hops: &Hops,
    conn: &mut Option<Conn>,
    claim: Claim,
) {
    let id = claim.id().clone();
    let env = match mx.spool.get(&id) {
        Ok(Some(e)) => e,
        Ok(None) => return,
        Err(e) => {
            warn!(%id, error = %e, "cannot read the envelope");
            return;
        }
    };
    let pending: Vec<_> = env.pending().map(|r| r.address.clone()).collect();
    if pending.is_empty() {
        return;
    }
    let results = match attempt(mx, route, hops, conn, &env).await {
        Ok(r) => r,
        Err(reply) => {
            // The connection is unusable: drop it; every pending recipient is retried later.
            *conn = None;
            debug!(%id, %route, reason = %reply, "delivery deferred");
            pending
                .iter()
                .map(|a| {
                    (
                        a.clone(),
                        QOutcome::TempFail {
                            reply: reply.clone(),
                        },
                    )
                })
                .collect()
        }
    };
    let (mut ok, mut deferred, mut failed) = (0u64, 0u64, 0u64);
    for (_, o) in &results {
        match o {
            QOutcome::Delivered { .. } => ok += 1,
            QOutcome::TempFail { .. } => deferred += 1,
            QOutcome::PermFail { .. } => failed += 1,
        }
    }
    let relay = conn.as_ref().map(|c| c.label());
    let received_at = env.received_at;
    // The envelope read above is current: we hold the claim.
    match mx
        .spool
        .record_attempt_with(env, results, SystemTime::now())
        .await
    {
        Ok(summary) => {
            log_recipients(&id, route, received_at, &summary, |_| relay.as_deref());
            debug!(%id, %route, next_hop = relay.as_deref().unwrap_or("none"), delivered = summary.delivered, deferred = summary.deferred, failed = summary.failed, "delivery attempt");
        }
        Err(e) => warn!(%id, error = %e, "cannot record the delivery attempt"),
    }
    use std::sync::atomic::Ordering::Relaxed;
    mx.stats.deliveries_ok.fetch_add(ok, Relaxed);
    mx.stats.deliveries_deferred.fetch_add(deferred, Relaxed);
    mx.stats.deliveries_failed.fetch_add(failed, Relaxed);
    drop(claim);
}

/// `host[ip]:port`, as Postfix's `relay=` names a next hop.
pub(crate) fn relay_label(host: &str, addr: SocketAddr) -> String {
    format!("{host}[{}]:{}", addr.ip(), addr.port())
}

/// The delivery log of one attempt: a line per recipient with where it stands (Postfix's
/// `to=<…>, relay=…, delay=…, dsn=…, status=sent|deferred|bounced (reply)`). `relay_of` names
/// the next hop whose answer decided a recipient (`none` when no session was had). Only
/// addresses and replies are logged, never content or credentials.
pub(crate) fn log_recipients<'a>(
    id: &ringmail_queue::QueueId,
    route: &str,
    received_at: SystemTime,
    summary: &ringmail_queue::AttemptSummary,
    relay_of: impl Fn(&str) -> Option<&'a str>,
) {
    let delay = SystemTime::now()
        .duration_since(received_at)
        .map_or(0, |d| d.as_secs());
    for r in &summary.recipients {
        let relay = relay_of(&r.address).unwrap_or("none");
        let to = crate::session::printable(&r.address);
        info!(%id, %route, to = %to, %relay, delay, dsn = %r.dsn, status = %r.status, reply = %r.reply, "delivery");
    }
    if let Some(b) = &summary.bounce {
        info!(%id, %route, dsn_id = %b, "sender non-delivery notification queued");
    }
    if let Some(b) = &summary.delay_warning {
        info!(%id, %route, dsn_id = %b, "sender delay notification queued");
    }
}

/// Every next hop of a route failed to give a session: the error of each, in the order tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HopsFailed(pub Vec<(SocketAddr, ConnError)>);

impl std::fmt::Display for HopsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [] => f.write_str("no next hop"),
            // One hop: as before there were lists.
            [(addr, e)] => write!(f, "delivery to {addr} failed: {e}"),
            all => {
                write!(f, "delivery failed on all {} next hops: ", all.len())?;
                for (i, (addr, e)) in all.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    // The connection errors mostly name the address already.
                    if e.message.contains(&addr.to_string()) {
                        write!(f, "{e}")?;
                    } else {
                        write!(f, "{addr}: {e}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Opens a session to one of `hops`: each in turn from the route's rotating start, passing
/// over a hop whose connection, greeting, STARTTLS or AUTH fails (counted in `failovers`).
pub(crate) async fn open_any(
    hops: &Hops,
    route: &str,
    connect_timeout: Duration,
    failovers: &std::sync::atomic::AtomicU64,
) -> Result<Conn, HopsFailed> {
    let order = hops.order();
    let n = order.len();
    let mut errors = Vec::new();
    for (i, hop) in order.into_iter().enumerate() {
        match Conn::open_hop(hop, connect_timeout).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if i + 1 < n {
                    failovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // The credentials themselves are never logged.
                    warn!(%route, next_hop = %hop.addr, security = %hop.describe, error = %e, "cannot open a session to this next hop; trying the next one");
                }
                errors.push((hop.addr, e));
            }
        }
    }
    Err(HopsFailed(errors))
}

/// The client-side envelope of a queued message for some of its pending recipients; `extra`
/// octets are sent in front of the stored content (SIZE=).
pub(crate) fn client_envelope(env: &QEnvelope, rcpts: &[&RecipientState], extra: u64) -> Envelope {
    Envelope {
        mail_from: env.sender.clone(),
        rcpt_to: rcpts.iter().map(|r| r.address.clone()).collect(),
        size: Some(env.size + env.headers.len() as u64 + extra),
        body: match env.body {
            BodyType::SevenBit => Body::SevenBit,
            BodyType::EightBitMime => Body::EightBitMime,
            BodyType::BinaryMime => Body::BinaryMime,
        },
        smtputf8: env.smtputf8,
        ret: env.ret.map(|r| match r {
            Ret::Full => DsnRet::Full,
            Ret::Hdrs => DsnRet::Hdrs,
        }),
        envid: env.envid.clone(),
        rcpt_params: rcpts
            .iter()
            .map(|r| {
                let n = &r.notify;
                let mut notify = Vec::new();
                if n.never {
                    notify.push(DsnNotify::Never);
                } else {
                    if n.success {
                        notify.push(DsnNotify::Success);
                    }
                    if n.failure {
                        notify.push(DsnNotify::Failure);
                    }
                    if n.delay {
                        notify.push(DsnNotify::Delay);
                    }
                }
                RcptParams {
                    notify: (!notify.is_empty()).then_some(notify),
                    orcpt: r.orcpt.as_ref().and_then(|o| {
                        let (t, a) = o.split_once(';')?;
                        Some(Orcpt {
                            addr_type: t.to_string(),
                            addr: a.to_string(),
                        })
                    }),
                }
            })
            .collect(),
    }
}

/// One transaction on a reused connection or a new one to one of `hops`; per-recipient
/// outcomes, or the reply every pending recipient is deferred with.
async fn attempt(
    mx: &RelayCtx,
    route: &str,
    hops: &Hops,
    conn: &mut Option<Conn>,
    env: &QEnvelope,
) -> Result<Vec<(String, QOutcome)>, String> {
    let rcpts: Vec<&RecipientState> = env.pending().collect();
    if let Some(c) = conn.as_mut() {
        match transaction(&mx.spool, c, env, &rcpts, "").await {
            Ok(r) => return Ok(r),
            Err(e) => {
                // The hop may have closed the idle connection, or gone away: a new session
                // (maybe to another hop) gets the message. Nothing was accepted on the old one,
                // except when it broke between the end of the data and the reply (RFC 5321
                // section 6.1 accepts that duplicate).
                debug!(id = %env.id, %route, next_hop = %c.peer, error = %e, "reused connection failed; opening a new one");
                *conn = None;
            }
        }
    }
    let failovers = &mx.stats.relay_failovers;
    let c = match open_any(hops, route, Duration::from_secs(10), failovers).await {
        Ok(c) => conn.insert(c),
        Err(e) => {
            // A refused STARTTLS or AUTH is a configuration problem worth seeing at once
            // (the credentials themselves are never logged).
            warn!(id = %env.id, %route, next_hop = %hops.addrs(), security = %hops.describe(), error = %e, "cannot open a session to the next hop; mail stays queued");
            return Err(e.to_string());
        }
    };
    let peer = c.peer;
    transaction(&mx.spool, c, env, &rcpts, "")
        .await
        .map_err(|e| format!("delivery to {peer} failed: {e}"))
}

/// Runs one transaction for `rcpts` of `env` on `c`: `prefix` (e.g. DKIM-Signature fields),
/// the envelope's trace headers, then the content streamed from the spool. Per-recipient
/// outcomes; `Err` when the connection failed (every recipient is then still pending).
pub(crate) async fn transaction(
    spool: &ringmail_queue::Spool,
    c: &mut Conn,
    env: &QEnvelope,
    rcpts: &[&RecipientState],
    prefix: &str,
) -> Result<Vec<(String, QOutcome)>, ConnError> {
    let addr = c.peer;
    c.transactions += 1;
    if let Err(e) = c
        .client
        .start_transaction(client_envelope(env, rcpts, prefix.len() as u64))
    {
        // The next hop cannot take this message: a missing extension (SMTPUTF8, 8BITMIME,
        // BINARYMIME) will not appear by retrying, so it bounces (RFC 6531 section 3.2: 5.6.7
        // for SMTPUTF8); anything else is retried.
        let permanent = matches!(e, ringmail_smtp::ClientError::MissingExtension(_));
        let reply = if permanent {
            format!("553 5.6.7 next hop {addr} cannot take this message: {e}")
        } else {
            format!("cannot send to {addr}: {e}")
        };
        return Ok(rcpts
            .iter()
            .map(|r| {
                let o = if permanent {
                    QOutcome::PermFail {
                        reply: reply.clone(),
                    }
                } else {
                    QOutcome::TempFail {
                        reply: reply.clone(),
                    }
                };
                (r.address.clone(), o)
            })
            .collect());
    }
    loop {
        match c.next_event().await? {
            ClientEvent::SendBody => {
                send_body(spool, c, env, prefix).await?;
            }
            ClientEvent::TransactionDone(result) => {
                return Ok(result
                    .recipients
                    .into_iter()
                    .map(|r| {
                        let o = match r.outcome {
                            Outcome::Accepted(reply) => QOutcome::Delivered {
                                reply: reply_line(&reply),
                            },
                            Outcome::TempFail(reply) => QOutcome::TempFail {
                                reply: reply_line(&reply),
                            },
                            Outcome::PermFail(reply) => QOutcome::PermFail {
                                reply: reply_line(&reply),
                            },
                        };
                        (r.address, o)
                    })
                    .collect());
            }
            ClientEvent::Failed(e) => return Err(e.to_string().into()),
            ClientEvent::Closed => return Err("connection closed".into()),
            ClientEvent::Ready | ClientEvent::StartTls => {}
        }
    }
}

/// The reply as the next hop sent it, enhanced status code included: DSNs take their
/// `Status:` from it (RFC 3463), so `550 5.1.1 ...` must not become `550 ...`.
pub(crate) fn reply_line(reply: &ringmail_smtp::Reply) -> String {
    match reply.enhanced() {
        Some(e) => format!("{} {e} {}", reply.code(), reply.text()),
        None => format!("{} {}", reply.code(), reply.text()),
    }
}

/// `prefix`, the trace headers, then the content, streamed from the spool file. The prefix and
/// the trace headers go out with the first piece of the content: a usual message is one write
/// (and, with CHUNKING, one BDAT).
pub(crate) async fn send_body(
    spool: &ringmail_queue::Spool,
    c: &mut Conn,
    env: &QEnvelope,
    prefix: &str,
) -> Result<(), ConnError> {
    let mut file = spool
        .open_body(&env.id)
        .map_err(|e| format!("spool: {e}"))?;
    // Read size: the whole of a small message, else CHUNK. No bigger than the message needs: a
    // 64 KiB buffer allocated, zeroed and freed per message costs more than a small message's
    // whole copy. The body's length is known, so reading stops there (no read to see the end).
    let mut left = file.len();
    let read = usize::try_from(left).map_or(CHUNK, |n| n.min(CHUNK));
    // The DKIM prefix and the trace headers go with the first piece of the content: one BDAT
    // (or one piece of DATA) for a usual message. Queued, not written: a small message goes
    // out with its end of data in one write.
    let mut chunk = Vec::with_capacity(prefix.len() + env.headers.len() + read);
    chunk.extend_from_slice(prefix.as_bytes());
    chunk.extend_from_slice(env.headers.as_bytes());
    let mut queued = 0usize;
    loop {
        let mut n = 0;
        if left > 0 {
            let start = chunk.len();
            chunk.resize(start + read, 0);
            n = file
                .read(&mut chunk[start..])
                .map_err(|e| format!("spool read: {e}"))?;
            chunk.truncate(start + n);
            left = left.saturating_sub(n as u64);
        }
        if !chunk.is_empty() {
            c.client
                .send_body_chunk(&chunk)
                .map_err(|e| e.to_string())?;
            // At most about one chunk is held in memory; the rest goes with the end of data.
            queued += chunk.len();
            if queued >= CHUNK {
                c.flush().await?;
                queued = 0;
            }
            chunk.clear();
        }
        // The whole body was read (or the file ended early, as before: what there was goes).
        if n == 0 || left == 0 {
            break;
        }
    }
    c.client.end_body().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_are_named_like_postfix() {
        let v4: SocketAddr = "192.0.2.1:25".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:25".parse().unwrap();
        assert_eq!(
            relay_label("mx.example.org", v4),
            "mx.example.org[192.0.2.1]:25"
        );
        assert_eq!(
            relay_label("2001:db8::1", v6),
            "2001:db8::1[2001:db8::1]:25"
        );
    }

    #[test]
    fn every_hops_error_in_the_reply() {
        let a: SocketAddr = "10.0.0.20:24".parse().unwrap();
        let b: SocketAddr = "10.0.0.21:24".parse().unwrap();
        let refused = ConnError::from(format!("connect to {a}: Connection refused"));
        // One hop: the reply reads as it did before lists.
        assert_eq!(
            HopsFailed(vec![(a, refused.clone())]).to_string(),
            format!("delivery to {a} failed: connect to {a}: Connection refused")
        );
        // Several: each hop's error, named by its address once.
        let text = HopsFailed(vec![
            (a, refused),
            (b, ConnError::from("TLS handshake timed out")),
        ])
        .to_string();
        assert_eq!(
            text,
            format!(
                "delivery failed on all 2 next hops: connect to {a}: Connection refused; {b}: TLS handshake timed out"
            )
        );
    }
}
