//! Delivery to the world: the MTA's side of the queue.
//!
//! ```text
//!  spool.due() ─▶ dispatcher ─claim─▶ one task per message (at most max_connections)
//!                                      │ DKIM: signed once per attempt on the signing
//!                                      │ pool (one signature per core at a time): ahead,
//!                                      │ while the sessions are busy, when the destination
//!                                      │ has just taken mail; else once a session is ready
//!                                      │ recipients grouped by domain, domains in parallel
//!                                      ▼
//!   per domain: permit (max_per_destination) ─▶ idle cached connection for the domain?
//!      ├─ smart hosts (`relay`): each in turn from a rotating start until one gives a session
//!      └─ else: MX hosts (preference, shuffled ties; implicit MX; null MX = bounce)
//!              ─▶ MTA-STS policy (enforce: only matching MX hosts, verified TLS)
//!              ─▶ each address of each host until one session takes the transaction
//!   STARTTLS when offered (opportunistic: any certificate; a failed handshake retries in
//!   plaintext), MAIL/RCPT/DATA, body streamed from the spool ─▶ connection back to the cache
//!  record_attempt: delivered / retry with backoff / bounce (DSN through this same MTA)
//! ```
//!
//! A transaction that every recipient answers with 4xx, or a session that breaks, moves on to
//! the next MX host (as Postfix does); nothing was accepted there, so no duplicate arises,
//! except when the connection breaks after the end of data and before the reply (RFC 5321
//! section 6.1 accepts that duplicate).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ringmail_queue::{Claim, Envelope as QEnvelope, Outcome as QOutcome, RecipientState, Spool};
use ringmail_smtp::{ClientConfig, StartTlsPolicy};
use tokio::sync::{Notify, OnceCell, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::admin::{Metrics, MxStats};
use crate::dkim::DkimSigner;
use crate::hop::Hops;
use crate::mta_config::MtaConfig;
use crate::relay::{Conn, ConnError, TlsSetup, open_any, transaction};
use crate::resolve::{MxHost, MxResolver, ResolveError};
use crate::sts::{Mode, Sts};

/// An idle cached connection is closed after this.
const CACHE_IDLE: Duration = Duration::from_secs(3);
/// A connection is not reused after this long or this many transactions.
const CACHE_MAX_AGE: Duration = Duration::from_secs(300);
const CACHE_MAX_TRANSACTIONS: u32 = 100;
/// Most idle connections kept per destination.
const CACHE_PER_DESTINATION: usize = 8;
/// A destination that took mail this recently gets its messages signed ahead.
const SIGN_AHEAD_WINDOW: Duration = Duration::from_secs(30);
/// Largest message signed in memory; larger ones go unsigned (and are logged).
const MAX_SIGNED: u64 = 64 * 1024 * 1024;

/// Counters of the outbound side.
#[derive(Debug, Default)]
pub struct OutboundStats {
    pub connections_opened: AtomicU64,
    pub connections_reused: AtomicU64,
    pub connect_failures: AtomicU64,
    pub tls_sessions: AtomicU64,
    pub tls_fallbacks: AtomicU64,
    pub sts_enforced: AtomicU64,
    pub dkim_signed: AtomicU64,
    pub dkim_errors: AtomicU64,
    /// Destinations whose every MX address was this MTA (bounced 5.4.6).
    pub loops: AtomicU64,
    /// Deliveries, shared with the generic relay counters.
    pub relay: Arc<MxStats>,
}

impl Metrics for OutboundStats {
    fn render(&self, spool: &Spool, out: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, c) in [
            (
                "ringmail_mta_connections_total",
                "Outbound SMTP connections opened.",
                &self.connections_opened,
            ),
            (
                "ringmail_mta_connections_reused_total",
                "Transactions run on a cached connection.",
                &self.connections_reused,
            ),
            (
                "ringmail_mta_loops_total",
                "Deliveries bounced because every MX address was this MTA (mail loop).",
                &self.loops,
            ),
            (
                "ringmail_mta_connect_failures_total",
                "Remote addresses that could not be reached or refused the session.",
                &self.connect_failures,
            ),
            (
                "ringmail_mta_tls_sessions_total",
                "Outbound sessions with STARTTLS.",
                &self.tls_sessions,
            ),
            (
                "ringmail_mta_tls_fallbacks_total",
                "Opportunistic TLS handshakes that failed and were retried in plaintext.",
                &self.tls_fallbacks,
            ),
            (
                "ringmail_mta_sts_enforced_total",
                "Deliveries under an MTA-STS policy in enforce mode.",
                &self.sts_enforced,
            ),
            (
                "ringmail_mta_dkim_signed_total",
                "Messages signed (per delivery attempt).",
                &self.dkim_signed,
            ),
            (
                "ringmail_mta_dkim_errors_total",
                "Messages that could not be signed (sent unsigned).",
                &self.dkim_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                g(c)
            );
        }
        self.relay.render(spool, out);
    }
}

/// Everything the delivery tasks share.
pub struct Outbound {
    pub cfg: Arc<MtaConfig>,
    pub spool: Spool,
    pub stats: Arc<OutboundStats>,
    pub queued: Arc<Notify>,
    resolver: MxResolver,
    sts: Option<Sts>,
    tls_any: tokio_rustls::TlsConnector,
    tls_verified: tokio_rustls::TlsConnector,
    /// The smart hosts (`relay`) with their TLS policy and credentials.
    smart_host: Option<Hops>,
    /// Per-domain next hops (`transport`), before MX lookups and smart hosts.
    transport: HashMap<String, Hops>,
    cache: Mutex<HashMap<String, Vec<(Conn, Instant)>>>,
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// When each destination last took a transaction (for signing ahead).
    took_mail: Mutex<HashMap<String, Instant>>,
    signing: SignPool,
}

/// The signing pool: signatures run on the blocking pool, at most one per core at a time, in
/// the order they were asked for, so that every core signs while the delivery threads keep the
/// sessions busy. Owned parts only, so that a signature can be computed in a task of its own.
#[derive(Clone)]
struct SignPool {
    dkim: Arc<DkimSigner>,
    spool: Spool,
    stats: Arc<OutboundStats>,
    permits: Arc<Semaphore>,
}

impl Outbound {
    /// The resolver, MTA-STS and the two TLS client configurations from the configuration.
    pub fn new(
        cfg: Arc<MtaConfig>,
        spool: Spool,
        stats: Arc<OutboundStats>,
        queued: Arc<Notify>,
        dkim: Arc<DkimSigner>,
    ) -> Result<Outbound, crate::MxError> {
        let resolver = MxResolver::new(cfg.resolver, Duration::from_secs(5))
            .map_err(|e| crate::MxError::Resolver(e.to_string()))?;
        let sts = if cfg.mta_sts && cfg.relay.is_empty() {
            let sts_cfg = crate::sts::StsConfig {
                enabled: true,
                extra_ca: cfg.mta_sts_ca.clone(),
                ..crate::sts::StsConfig::default()
            };
            Some(
                Sts::new(sts_cfg, resolver.clone())
                    .map_err(|e| crate::MxError::Resolver(e.to_string()))?,
            )
        } else {
            None
        };
        let tls_verified = crate::sts::tls_verified(cfg.mta_sts_ca.as_deref())
            .map_err(|e| crate::MxError::Resolver(e.to_string()))?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let smart_host = if cfg.relay.is_empty() {
            None
        } else {
            Some(Hops::new(
                &cfg.relay,
                &cfg.hostname,
                false,
                &cfg.relay_security,
            )?)
        };
        // Opportunistic STARTTLS, no AUTH: our own MX (or another hop of ours) takes mail for
        // its domains from anyone.
        let transport = cfg
            .transport
            .iter()
            .map(|(domain, addrs)| {
                let hops = Hops::new(
                    addrs,
                    &cfg.hostname,
                    false,
                    &crate::hop::HopSecurity::level(crate::hop::TlsLevel::May),
                )?;
                Ok((domain.clone(), hops))
            })
            .collect::<Result<HashMap<_, _>, crate::MxError>>()?;
        let (out_spool, out_stats) = (spool.clone(), Arc::clone(&stats));
        Ok(Outbound {
            cfg,
            spool,
            stats,
            queued,
            resolver,
            sts,
            tls_any: tokio_rustls::TlsConnector::from(crate::sts::tls_opportunistic()),
            tls_verified: tokio_rustls::TlsConnector::from(tls_verified),
            smart_host,
            transport,
            cache: Mutex::new(HashMap::new()),
            per_destination: Mutex::new(HashMap::new()),
            took_mail: Mutex::new(HashMap::new()),
            signing: SignPool {
                dkim,
                spool: out_spool,
                stats: out_stats,
                permits: Arc::new(Semaphore::new(cores)),
            },
        })
    }

    /// True when `addr` (for MX host `host`) is this MTA: the host is our own name, or the
    /// address and port are one we listen on (for a wildcard listener: any address of this
    /// host, which is what a socket can bind to).
    fn loops_back(&self, host: &str, addr: SocketAddr) -> bool {
        if host
            .trim_end_matches('.')
            .eq_ignore_ascii_case(&self.cfg.hostname)
        {
            return true;
        }
        self.cfg.listen.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == addr.ip()
                    || (l.ip().is_unspecified()
                        && l.is_ipv4() == addr.is_ipv4()
                        && std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).is_ok()))
        })
    }

    fn take_cached(&self, dest: &str) -> Option<Conn> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let list = cache.get_mut(dest)?;
        while let Some((c, since)) = list.pop() {
            if since.elapsed() < CACHE_IDLE && !c.client.should_close() {
                return Some(c);
            }
            drop_conn(c);
        }
        None
    }

    fn put_back(&self, dest: &str, c: Conn) {
        if c.client.should_close()
            || c.opened.elapsed() > CACHE_MAX_AGE
            || c.transactions >= CACHE_MAX_TRANSACTIONS
        {
            drop_conn(c);
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let list = cache.entry(dest.to_string()).or_default();
        if list.len() >= CACHE_PER_DESTINATION {
            drop_conn(c);
        } else {
            list.push((c, Instant::now()));
        }
    }

    /// Closes idle connections that have waited too long.
    fn reap(&self) {
        let mut expired = Vec::new();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|_, list| {
                let (keep, old): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|(_, since)| since.elapsed() < CACHE_IDLE);
                *list = keep;
                expired.extend(old.into_iter().map(|(c, _)| c));
                !list.is_empty()
            });
        }
        for c in expired {
            drop_conn(c);
        }
    }

    fn destination_permit(&self, dest: &str) -> Arc<Semaphore> {
        let mut m = self
            .per_destination
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if m.len() > 10_000 {
            // Forget idle destinations now and then.
            m.retain(|_, s| s.available_permits() < self.cfg.max_per_destination);
        }
        Arc::clone(
            m.entry(dest.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.max_per_destination))),
        )
    }

    /// Notes that `dest` took a transaction just now.
    fn took_mail(&self, dest: &str) {
        let now = Instant::now();
        let mut m = self.took_mail.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(dest) {
            Some(at) => *at = now,
            None => {
                if m.len() > 10_000 {
                    m.retain(|_, at| at.elapsed() < SIGN_AHEAD_WINDOW);
                }
                m.insert(dest.to_string(), now);
            }
        }
    }

    /// Notes that no session with `dest` could take a transaction.
    fn unreachable(&self, dest: &str) {
        let mut m = self.took_mail.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(dest);
    }

    /// True when `dest` took a transaction within [`SIGN_AHEAD_WINDOW`].
    fn takes_mail(&self, dest: &str) -> bool {
        let m = self.took_mail.lock().unwrap_or_else(|e| e.into_inner());
        m.get(dest)
            .is_some_and(|at| at.elapsed() < SIGN_AHEAD_WINDOW)
    }

    fn close_all(&self) -> Vec<Conn> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .drain()
            .flat_map(|(_, l)| l.into_iter().map(|(c, _)| c))
            .collect()
    }
}

/// QUIT in the background.
fn drop_conn(c: Conn) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(c.quit());
    }
}

/// Runs the dispatcher until `stop` fires.
pub async fn run(out: Arc<Outbound>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(out.cfg.max_connections.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_reap = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        if last_reap.elapsed() >= Duration::from_secs(1) {
            out.reap();
            last_reap = Instant::now();
        }
        let due = out.spool.due_limited(SystemTime::now(), 512);
        let mut sent = 0usize;
        for id in due {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stop.changed() => break,
            };
            let Some(claim) = out.spool.claim(&id) else {
                continue;
            };
            let o = Arc::clone(&out);
            tasks.spawn(async move {
                deliver_message(&o, claim).await;
                drop(permit);
            });
            sent += 1;
        }
        if sent > 0 {
            continue;
        }
        crate::relay::idle_until_due(&out.spool, &out.queued, &mut stop).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    for c in out.close_all() {
        c.quit().await;
    }
}

/// The domain of an address (lower case; a domain literal as written).
fn domain_of(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() {
        return None;
    }
    Some(domain.to_lowercase())
}

async fn deliver_message(out: &Outbound, claim: Claim) {
    let id = claim.id().clone();
    let env = match out.spool.get(&id) {
        Ok(Some(e)) => e,
        Ok(None) => return,
        Err(e) => {
            warn!(%id, error = %e, "cannot read the envelope");
            return;
        }
    };
    let mut results: Vec<(String, QOutcome)> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&RecipientState>> = BTreeMap::new();
    for r in env.pending() {
        match domain_of(&r.address) {
            Some(d) => groups.entry(d).or_default().push(r),
            None => results.push((
                r.address.clone(),
                QOutcome::PermFail {
                    reply: "501 5.1.3 bad recipient address syntax".into(),
                },
            )),
        }
    }
    if groups.is_empty() && results.is_empty() {
        return;
    }
    // Signed once per attempt. When a destination of the message has just taken mail, the
    // signature starts now on the signing pool, while the sessions are busy with earlier
    // messages; otherwise once some session is ready to take the message (a destination
    // that is down costs no signature).
    let prefix = Prefix::default();
    if !out.signing.dkim.is_empty() && groups.keys().any(|d| out.takes_mail(d)) {
        prefix.start(&out.signing, &env);
    }
    let attempts = groups
        .iter()
        .map(|(domain, rcpts)| deliver_domain(out, &env, domain, rcpts, &prefix));
    // The next hop that answered each recipient, for the delivery log.
    let mut relays: HashMap<String, String> = HashMap::new();
    for (r, relay) in futures_util::future::join_all(attempts).await {
        if let Some(relay) = relay {
            for (address, _) in &r {
                relays.insert(address.clone(), relay.clone());
            }
        }
        results.extend(r);
    }
    let (mut ok, mut deferred, mut failed) = (0u64, 0u64, 0u64);
    for (_, o) in &results {
        match o {
            QOutcome::Delivered { .. } => ok += 1,
            QOutcome::TempFail { .. } => deferred += 1,
            QOutcome::PermFail { .. } => failed += 1,
        }
    }
    match out
        .spool
        .record_attempt(&id, results, SystemTime::now())
        .await
    {
        Ok(summary) => {
            crate::relay::log_recipients(&id, "out", env.received_at, &summary, |a| {
                relays.get(a).map(String::as_str)
            });
            debug!(%id, delivered = summary.delivered, deferred = summary.deferred, failed = summary.failed, bounce = ?summary.bounce.map(|b| b.to_string()), "delivery attempt");
        }
        Err(e) => warn!(%id, error = %e, "cannot record the delivery attempt"),
    }
    let relay = &out.stats.relay;
    relay.deliveries_ok.fetch_add(ok, Ordering::Relaxed);
    relay
        .deliveries_deferred
        .fetch_add(deferred, Ordering::Relaxed);
    relay.deliveries_failed.fetch_add(failed, Ordering::Relaxed);
    drop(claim);
}

/// The DKIM-Signature fields of one delivery attempt: computed once, either started ahead
/// ([`Prefix::start`]) or when the first session is ready ([`Prefix::get`]).
#[derive(Default)]
struct Prefix {
    ahead: Mutex<Option<JoinHandle<String>>>,
    fields: OnceCell<String>,
}

impl Prefix {
    /// Starts signing now, in a task of its own.
    fn start(&self, pool: &SignPool, env: &QEnvelope) {
        let job = tokio::spawn(pool.clone().sign(env.id.clone(), env.size));
        *self.ahead.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
    }

    /// The fields: those signed ahead, else signed now.
    async fn get(&self, pool: &SignPool, env: &QEnvelope) -> &str {
        self.fields
            .get_or_init(|| async {
                let ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner()).take();
                match ahead {
                    Some(job) => job.await.unwrap_or_else(|e| {
                        pool.stats.dkim_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(id = %env.id, error = %e, "DKIM signing task failed; sent unsigned");
                        String::new()
                    }),
                    None => pool.clone().sign(env.id.clone(), env.size).await,
                }
            })
            .await
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        // A signature started ahead that no session used.
        if let Some(job) = self
            .ahead
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            job.abort();
        }
    }
}

impl SignPool {
    /// The DKIM-Signature fields for a stored message ("" when no key applies), signed on the
    /// blocking pool with one of the per-core permits.
    async fn sign(self, id: ringmail_queue::QueueId, size: u64) -> String {
        if self.dkim.is_empty() {
            return String::new();
        }
        if size > MAX_SIGNED {
            warn!(%id, size, "message too large to sign; sent unsigned");
            return String::new();
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return String::new();
        };
        let dkim = Arc::clone(&self.dkim);
        let file = self.spool.open_body(&id);
        let work = move || -> Result<String, String> {
            let mut file = file.map_err(|e| e.to_string())?;
            let mut msg = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut msg).map_err(|e| e.to_string())?;
            dkim.sign(&msg).map_err(|e| e.to_string())
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(s)) => {
                if !s.is_empty() {
                    self.stats.dkim_signed.fetch_add(1, Ordering::Relaxed);
                }
                s
            }
            Ok(Err(e)) => {
                self.stats.dkim_errors.fetch_add(1, Ordering::Relaxed);
                warn!(%id, error = %e, "DKIM signing failed; sent unsigned");
                String::new()
            }
            Err(e) => {
                self.stats.dkim_errors.fetch_add(1, Ordering::Relaxed);
                warn!(%id, error = %e, "DKIM signing task failed; sent unsigned");
                String::new()
            }
        }
    }
}

fn all(rcpts: &[&RecipientState], o: impl Fn() -> QOutcome) -> Vec<(String, QOutcome)> {
    rcpts.iter().map(|r| (r.address.clone(), o())).collect()
}

/// The hosts to try for a domain, or the verdict for all its recipients.
async fn plan(out: &Outbound, domain: &str) -> Result<(Vec<MxHost>, bool), Result<String, String>> {
    let mut hosts = match out.resolver.mx_hosts(domain).await {
        Ok(h) => h,
        Err(ResolveError::Permanent { code, message }) => {
            let basic = if code == "5.1.10" { 556 } else { 550 };
            return Err(Err(format!("{basic} {code} {domain}: {message}")));
        }
        Err(e) => return Err(Ok(format!("451 4.4.3 {domain}: {e}"))),
    };
    let mut enforce = false;
    if let Some(sts) = &out.sts
        && hosts.iter().all(|h| h.literal.is_none())
        && let Some(policy) = sts.policy(domain).await
        && policy.mode() == Mode::Enforce
    {
        enforce = true;
        out.stats.sts_enforced.fetch_add(1, Ordering::Relaxed);
        hosts.retain(|h| policy.mx_matches(&h.name));
        if hosts.is_empty() {
            return Err(Ok(format!(
                "451 4.7.5 {domain}: no MX host matches the domain's MTA-STS policy"
            )));
        }
    }
    Ok((hosts, enforce))
}

/// The reply for a domain none of whose hosts has an address (every lookup answered, none
/// with an A or AAAA record): permanent, as with Postfix, since RFC 5321 section 5.1 makes a
/// domain with neither MX nor address records an error. Lookups that failed temporarily never
/// come here.
fn no_address_reply(domain: &str, hosts: &[MxHost]) -> String {
    match hosts {
        [h] if h.implicit => {
            format!("550 5.4.4 {domain}: no MX and no address record (A or AAAA) for the domain")
        }
        [h] => format!(
            "550 5.4.4 {domain}: MX host {} has no address record",
            h.name
        ),
        _ => format!("550 5.4.4 {domain}: no MX host has an address record"),
    }
}

/// One domain's recipients of a message: their outcomes, and the next hop that gave them
/// (`host[ip]:port`, for the delivery log; `None` when no session was had).
async fn deliver_domain(
    out: &Outbound,
    env: &QEnvelope,
    domain: &str,
    rcpts: &[&RecipientState],
    prefix: &Prefix,
) -> (Vec<(String, QOutcome)>, Option<String>) {
    let signed = || prefix.get(&out.signing, env);
    let temp = |reply: String| {
        all(rcpts, || QOutcome::TempFail {
            reply: reply.clone(),
        })
    };
    let dest = out.destination_permit(domain);
    let Ok(_permit) = dest.acquire().await else {
        return (temp("451 4.3.0 shutting down".into()), None);
    };
    // A cached connection to this domain first (a stale one fails fast; then a fresh one).
    if let Some(mut c) = out.take_cached(domain) {
        out.stats.connections_reused.fetch_add(1, Ordering::Relaxed);
        let prefix = signed().await;
        match transaction(&out.spool, &mut c, env, rcpts, prefix).await {
            Ok(r)
                if r.iter()
                    .all(|(_, o)| matches!(o, QOutcome::TempFail { .. })) =>
            {
                // Nothing accepted on the old session: a fresh one (or another MX) may do
                // better, e.g. after the remote changed its mind.
                c.quit().await;
            }
            Ok(r) => {
                let relay = c.label();
                out.took_mail(domain);
                out.put_back(domain, c);
                return (r, Some(relay));
            }
            Err(_) => {}
        }
    }
    // A transport for the domain (our own, say), then the smart hosts: fixed next hops.
    if let Some(hops) = out.transport.get(domain) {
        return deliver_hops(out, hops, "transport", env, domain, rcpts, prefix).await;
    }
    if let Some(hops) = &out.smart_host {
        return deliver_hops(out, hops, "smart host", env, domain, rcpts, prefix).await;
    }
    let (hosts, enforce) = match plan(out, domain).await {
        Ok(p) => p,
        Err(Ok(temp_reply)) => return (temp(temp_reply), None),
        Err(Err(perm_reply)) => {
            let r = all(rcpts, || QOutcome::PermFail {
                reply: perm_reply.clone(),
            });
            return (r, None);
        }
    };
    let mut last_error = format!("451 4.4.1 {domain}: no MX host could be reached");
    let mut last_relay = None;
    let (mut tried, mut looped, mut addressless) = (0usize, 0usize, 0usize);
    for host in &hosts {
        let addrs: Vec<IpAddr> = match host.literal {
            Some(ip) => vec![ip],
            None => match out.resolver.addresses(&host.name).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) | Err(ResolveError::Permanent { .. }) => {
                    addressless += 1;
                    last_error = format!("451 4.4.4 {}: host has no address", host.name);
                    continue;
                }
                Err(e) => {
                    last_error = format!("451 4.4.3 {}: {e}", host.name);
                    continue;
                }
            },
        };
        for ip in addrs {
            let addr = SocketAddr::new(ip, out.cfg.remote_port);
            tried += 1;
            if out.loops_back(&host.name, addr) {
                // An MX that is this MTA: sending there would bring the message straight
                // back (Postfix: "mail for ... loops back to myself").
                looped += 1;
                warn!(%domain, host = %host.name, %addr, "MX host is this MTA: mail loops back to myself");
                continue;
            }
            // A domain literal is logged as its address, as Postfix does.
            let shown = match host.literal {
                Some(ip) => ip.to_string(),
                None => host.name.clone(),
            };
            last_relay = Some(crate::relay::relay_label(&shown, addr));
            let mut c = match open(out, addr, &host.name, enforce).await {
                Ok(c) => c,
                Err(e) => {
                    out.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(%domain, host = %host.name, %addr, error = %e, "session failed; next address");
                    last_error = format!("451 4.4.1 {} [{}]: {e}", host.name, addr.ip());
                    continue;
                }
            };
            c.host = shown;
            let prefix = signed().await;
            match transaction(&out.spool, &mut c, env, rcpts, prefix).await {
                Ok(r)
                    if r.iter()
                        .all(|(_, o)| matches!(o, QOutcome::TempFail { .. })) =>
                {
                    // Nothing accepted here: the next MX host may do better.
                    if let Some((_, QOutcome::TempFail { reply })) = r.first() {
                        last_error = format!("{reply} (from {} [{}])", host.name, addr.ip());
                    }
                    c.quit().await;
                }
                Ok(r) => {
                    let relay = c.label();
                    out.took_mail(domain);
                    out.put_back(domain, c);
                    return (r, Some(relay));
                }
                Err(e) => {
                    debug!(%domain, host = %host.name, %addr, error = %e, "transaction failed; next address");
                    last_error = format!("451 4.4.2 {} [{}]: {e}", host.name, addr.ip());
                }
            }
        }
    }
    if tried > 0 && looped == tried {
        out.stats.loops.fetch_add(1, Ordering::Relaxed);
        let reply = format!("554 5.4.6 mail for {domain} loops back to myself");
        let r = all(rcpts, || QOutcome::PermFail {
            reply: reply.clone(),
        });
        return (r, None);
    }
    if !hosts.is_empty() && addressless == hosts.len() {
        let reply = no_address_reply(domain, &hosts);
        let r = all(rcpts, || QOutcome::PermFail {
            reply: reply.clone(),
        });
        return (r, None);
    }
    out.unreachable(domain);
    (temp(last_error), last_relay)
}

/// Delivery through fixed next hops (a domain's transport, or the smart hosts): a session with
/// one of them (each in turn from a rotating start, passing over one that cannot be reached or
/// refuses STARTTLS or AUTH), then its answer to the transaction, whatever it is.
async fn deliver_hops(
    out: &Outbound,
    hops: &Hops,
    what: &str,
    env: &QEnvelope,
    domain: &str,
    rcpts: &[&RecipientState],
    prefix: &Prefix,
) -> (Vec<(String, QOutcome)>, Option<String>) {
    let temp = |reply: String| {
        all(rcpts, || QOutcome::TempFail {
            reply: reply.clone(),
        })
    };
    out.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    let failovers = &out.stats.relay.relay_failovers;
    let mut c = match open_any(hops, what, out.cfg.connect_timeout, failovers).await {
        Ok(c) => c,
        Err(e) => {
            out.stats
                .connect_failures
                .fetch_add(e.0.len() as u64, Ordering::Relaxed);
            warn!(id = %env.id, %domain, route = what, next_hop = %hops.addrs(), security = %hops.describe(), error = %e, "cannot open a session to the next hop; mail stays queued");
            out.unreachable(domain);
            return (temp(format!("451 4.4.1 {e}")), None);
        }
    };
    if c.client.is_tls() {
        out.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
    }
    let relay = c.label();
    // Signed only now that a session is ready to take the message.
    let prefix = prefix.get(&out.signing, env).await;
    match transaction(&out.spool, &mut c, env, rcpts, prefix).await {
        Ok(r) => {
            if r.iter()
                .all(|(_, o)| matches!(o, QOutcome::TempFail { .. }))
            {
                c.quit().await;
            } else {
                out.took_mail(domain);
                out.put_back(domain, c);
            }
            (r, Some(relay))
        }
        Err(e) => {
            debug!(%domain, route = what, next_hop = %c.peer, error = %e, "transaction with the next hop failed");
            (temp(format!("451 4.4.2 [{}]: {e}", c.peer)), Some(relay))
        }
    }
}

/// The name a remote's certificate is asked for: the address of a domain literal
/// (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 section 4.1.3) or of an IP address, else the
/// host name.
fn tls_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    let literal = host
        .parse::<IpAddr>()
        .ok()
        .or_else(|| crate::resolve::parse_domain_literal(host).and_then(Result::ok));
    match literal {
        Some(ip) => Ok(rustls::pki_types::ServerName::IpAddress(ip.into())),
        None => rustls::pki_types::ServerName::try_from(host.trim_end_matches('.').to_string())
            .map_err(|e| format!("{host}: {e}")),
    }
}

/// Opens a session with opportunistic STARTTLS (RFC 7435: any certificate; a failed
/// handshake is retried once in plaintext), or with verified TLS required (MTA-STS enforce).
async fn open(
    out: &Outbound,
    addr: SocketAddr,
    host: &str,
    enforce: bool,
) -> Result<Conn, ConnError> {
    let name = tls_name(host)?;
    let policy = if enforce {
        StartTlsPolicy::Required
    } else {
        StartTlsPolicy::Opportunistic
    };
    let cfg = |use_starttls| {
        Arc::new(ClientConfig {
            helo_name: out.cfg.hostname.clone(),
            use_starttls,
            ..ClientConfig::default()
        })
    };
    let tls = TlsSetup {
        connector: if enforce {
            out.tls_verified.clone()
        } else {
            out.tls_any.clone()
        },
        name,
    };
    let timeout = out.cfg.connect_timeout;
    out.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    match Conn::connect(addr, cfg(policy), Some(tls), timeout).await {
        Ok(c) => {
            if c.client.is_tls() {
                out.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
            }
            Ok(c)
        }
        Err(e) if e.tls_handshake && !enforce => {
            out.stats.tls_fallbacks.fetch_add(1, Ordering::Relaxed);
            info!(%addr, %host, error = %e, "TLS handshake failed; retrying in plaintext");
            out.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
            Conn::connect(addr, cfg(StartTlsPolicy::Never), None, timeout).await
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_without_any_address_is_a_permanent_failure() {
        let host = |name: &str, implicit| MxHost {
            name: name.into(),
            preference: 10,
            implicit,
            literal: None,
        };
        let r = no_address_reply("noaddr.test", &[host("noaddr.test", true)]);
        assert!(
            r.starts_with("550 5.4.4 noaddr.test: no MX and no address"),
            "{r}"
        );
        assert_eq!(ringmail_queue::dsn_status(&r, "4.0.0"), "5.4.4");
        let r = no_address_reply("x.test", &[host("mx.x.test", false)]);
        assert!(r.starts_with("550 5.4.4 x.test: MX host mx.x.test"), "{r}");
        let r = no_address_reply(
            "x.test",
            &[host("a.x.test", false), host("b.x.test", false)],
        );
        assert!(r.starts_with("550 5.4.4 x.test: no MX host has"), "{r}");
    }

    #[test]
    fn address_literals_are_connected_to_by_address() {
        use rustls::pki_types::ServerName;
        let ip = |s: &str| ServerName::IpAddress(s.parse::<IpAddr>().unwrap().into());
        assert_eq!(tls_name("[192.0.2.1]").unwrap(), ip("192.0.2.1"));
        assert_eq!(tls_name("[IPv6:2001:db8::1]").unwrap(), ip("2001:db8::1"));
        assert_eq!(tls_name("[ipv6:2001:DB8::1]").unwrap(), ip("2001:db8::1"));
        assert_eq!(tls_name("192.0.2.1").unwrap(), ip("192.0.2.1"));
        assert_eq!(
            tls_name("mx.example.org.").unwrap(),
            ServerName::try_from("mx.example.org").unwrap()
        );
        assert!(tls_name("[192.0.2.300]").is_err());
        // The literal is the one host to try: no DNS, no MTA-STS.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let resolver =
            MxResolver::new(Some("127.0.0.1:9".parse().unwrap()), Duration::from_secs(1)).unwrap();
        for (domain, want) in [
            ("[192.0.2.1]", "192.0.2.1"),
            ("[ipv6:2001:db8::1]", "2001:db8::1"),
        ] {
            let hosts = rt.block_on(resolver.mx_hosts(domain)).unwrap();
            assert_eq!(hosts.len(), 1);
            assert_eq!(hosts[0].literal, Some(want.parse().unwrap()), "{domain}");
        }
    }

    #[test]
    fn domains_of_addresses() {
        assert_eq!(domain_of("a@Example.COM").as_deref(), Some("example.com"));
        assert_eq!(domain_of("\"a@b\"@x.test").as_deref(), Some("x.test"));
        assert_eq!(domain_of("a@[192.0.2.1]").as_deref(), Some("[192.0.2.1]"));
        assert_eq!(domain_of("nodomain"), None);
        assert_eq!(domain_of("@x.test"), None);
        assert_eq!(domain_of("a@"), None);
    }
}
