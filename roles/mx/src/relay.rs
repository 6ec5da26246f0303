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

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ringmail_queue::{BodyType, Claim, Envelope as QEnvelope, Outcome as QOutcome, Ret};
use ringmail_smtp::client::Outcome;
use ringmail_smtp::{
    Body, Client, ClientConfig, ClientEvent, DsnNotify, DsnRet, Envelope, Orcpt, RcptParams,
    StartTlsPolicy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::admin::MxStats;
use crate::config::RelayProtocol;
use crate::session::Mx;

/// A connection idle this long is closed with QUIT.
const IDLE: Duration = Duration::from_secs(10);
/// One reply from the next hop must come within this.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Content is read from the spool and written in chunks of this size.
const CHUNK: usize = 64 * 1024;

/// One next hop, chosen by the queue's route field.
#[derive(Debug, Clone)]
pub struct Route {
    /// The envelope's `route` (`"mda"`, `"mta"`).
    pub name: String,
    pub addr: SocketAddr,
    pub lmtp: bool,
    /// Concurrent deliveries on this route.
    pub connections: usize,
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
    pub fn for_mx(mx: &Mx) -> RelayCtx {
        let mda = mx.cfg.relay.next_hop;
        RelayCtx {
            hostname: mx.cfg.hostname.clone(),
            spool: mx.spool.clone(),
            stats: Arc::clone(&mx.stats),
            queued: Arc::clone(&mx.queued),
            routes: vec![
                Route {
                    name: "mda".into(),
                    addr: mda,
                    lmtp: mx.cfg.relay.protocol == RelayProtocol::Lmtp,
                    connections: mx.cfg.relay.connections.max(1),
                },
                // Bounces go to the MTA over SMTP (two connections are plenty).
                Route {
                    name: "mta".into(),
                    addr: mx.cfg.relay.bounce_next_hop.unwrap_or(mda),
                    lmtp: false,
                    connections: 2,
                },
            ],
        }
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
        for _ in 0..workers {
            tasks.spawn(worker(
                Arc::clone(&mx),
                route.addr,
                route.lmtp,
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
            let route = mx
                .spool
                .get(&id)
                .ok()
                .flatten()
                .map(|e| e.route)
                .unwrap_or_default();
            let i = mx.routes.iter().position(|r| r.name == route).unwrap_or(0);
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
        let wait = mx
            .spool
            .next_due()
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = mx.queued.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
    drop(txs);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// A connection to the next hop.
struct Conn {
    stream: TcpStream,
    client: Client,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(mx: &RelayCtx, addr: SocketAddr, lmtp: bool) -> Result<Conn, String> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr} timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let cfg = Arc::new(ClientConfig {
            helo_name: mx.hostname.clone(),
            lmtp,
            // The next hop is ours, on the internal network (see the README's architecture).
            use_starttls: StartTlsPolicy::Never,
            ..ClientConfig::default()
        });
        let mut conn = Conn {
            stream,
            client: Client::new(cfg, false),
            buf: vec![0u8; 16 * 1024],
        };
        match conn.next_event().await? {
            ClientEvent::Ready => Ok(conn),
            ClientEvent::Failed(e) => Err(format!("{addr}: {e}")),
            other => Err(format!("{addr}: unexpected {other:?}")),
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        while let Some(b) = self.client.poll_transmit() {
            self.stream
                .write_all(&b)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }

    /// Writes what is queued and reads until the client has an event.
    async fn next_event(&mut self) -> Result<ClientEvent, String> {
        loop {
            self.flush().await?;
            if let Some(ev) = self.client.poll_event() {
                return Ok(ev);
            }
            if self.client.should_close() {
                return Err("connection closed by the protocol".into());
            }
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read(&mut self.buf))
                .await
                .map_err(|_| "timeout waiting for a reply".to_string())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed by the next hop".into());
            }
            let data = self.buf[..n].to_vec();
            self.client.receive(&data);
        }
    }

    async fn quit(mut self) {
        self.client.quit();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.flush().await;
            let mut b = [0u8; 512];
            let _ = self.stream.read(&mut b).await;
        })
        .await;
    }
}

async fn worker(
    mx: Arc<RelayCtx>,
    addr: SocketAddr,
    lmtp: bool,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Claim>>>,
) {
    let mut conn: Option<Conn> = None;
    loop {
        let next = {
            let mut rx = rx.lock().await;
            tokio::time::timeout(IDLE, rx.recv()).await
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
        deliver_one(&mx, addr, lmtp, &mut conn, claim).await;
    }
    if let Some(c) = conn.take() {
        c.quit().await;
    }
}

async fn deliver_one(
    mx: &RelayCtx,
    addr: SocketAddr,
    lmtp: bool,
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
    let results = match attempt(mx, addr, lmtp, conn, &env).await {
        Ok(r) => r,
        Err(why) => {
            // The connection is unusable: drop it; every pending recipient is retried later.
            *conn = None;
            debug!(%id, next_hop = %addr, reason = %why, "delivery deferred");
            pending
                .iter()
                .map(|a| {
                    (
                        a.clone(),
                        QOutcome::TempFail {
                            reply: format!("delivery to {addr} failed: {why}"),
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
    match mx
        .spool
        .record_attempt(&id, results, SystemTime::now())
        .await
    {
        Ok(summary) => {
            info!(%id, next_hop = %addr, delivered = summary.delivered, deferred = summary.deferred, failed = summary.failed, "delivery attempt");
        }
        Err(e) => warn!(%id, error = %e, "cannot record the delivery attempt"),
    }
    use std::sync::atomic::Ordering::Relaxed;
    mx.stats.deliveries_ok.fetch_add(ok, Relaxed);
    mx.stats.deliveries_deferred.fetch_add(deferred, Relaxed);
    mx.stats.deliveries_failed.fetch_add(failed, Relaxed);
    drop(claim);
}

fn client_envelope(env: &QEnvelope) -> Envelope {
    let pending: Vec<_> = env.pending().collect();
    Envelope {
        mail_from: env.sender.clone(),
        rcpt_to: pending.iter().map(|r| r.address.clone()).collect(),
        size: Some(env.size + env.headers.len() as u64),
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
        rcpt_params: pending
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

/// One transaction on a (possibly reused) connection; per-recipient outcomes.
async fn attempt(
    mx: &RelayCtx,
    addr: SocketAddr,
    lmtp: bool,
    conn: &mut Option<Conn>,
    env: &QEnvelope,
) -> Result<Vec<(String, QOutcome)>, String> {
    if conn.is_none() {
        *conn = Some(Conn::open(mx, addr, lmtp).await?);
    }
    let c = conn.as_mut().ok_or("no connection")?;
    if let Err(e) = c.client.start_transaction(client_envelope(env)) {
        // The next hop cannot take this message: a missing extension (SMTPUTF8, 8BITMIME,
        // BINARYMIME) will not appear by retrying, so it bounces (RFC 6531 section 3.2: 5.6.7
        // for SMTPUTF8); anything else is retried.
        let permanent = matches!(e, ringmail_smtp::ClientError::MissingExtension(_));
        let reply = if permanent {
            format!("553 5.6.7 next hop {addr} cannot take this message: {e}")
        } else {
            format!("cannot send to {addr}: {e}")
        };
        return Ok(env
            .pending()
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
                send_body(mx, c, env).await?;
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
            ClientEvent::Failed(e) => return Err(e.to_string()),
            ClientEvent::Closed => return Err("connection closed".into()),
            ClientEvent::Ready | ClientEvent::StartTls => {}
        }
    }
}

/// The reply as the next hop sent it, enhanced status code included: DSNs take their
/// `Status:` from it (RFC 3463), so `550 5.1.1 ...` must not become `550 ...`.
fn reply_line(reply: &ringmail_smtp::Reply) -> String {
    match reply.enhanced() {
        Some(e) => format!("{} {e} {}", reply.code(), reply.text()),
        None => format!("{} {}", reply.code(), reply.text()),
    }
}

/// Trace headers, then the content, streamed from the spool file.
async fn send_body(mx: &RelayCtx, c: &mut Conn, env: &QEnvelope) -> Result<(), String> {
    if !env.headers.is_empty() {
        c.client
            .send_body_chunk(env.headers.as_bytes())
            .map_err(|e| e.to_string())?;
        c.flush().await?;
    }
    let mut file = mx
        .spool
        .open_body(&env.id)
        .map_err(|e| format!("spool: {e}"))?;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut chunk)
            .map_err(|e| format!("spool read: {e}"))?;
        if n == 0 {
            break;
        }
        c.client
            .send_body_chunk(&chunk[..n])
            .map_err(|e| e.to_string())?;
        c.flush().await?;
    }
    c.client.end_body().map_err(|e| e.to_string())?;
    Ok(())
}
