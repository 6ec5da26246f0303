//! The health check runner.
//!
//! One dedicated OS thread, `ringmail-health`, runs a tokio current-thread runtime: health checks
//! are few, slow and latency-tolerant, so they stay off the proxy workers entirely. Every backend
//! of every pool gets one task that loops forever:
//!
//! 1. run one check ([`check_once`]): connect, drive the I/O-free
//!    [`Dialogue`](ringmail_proxy_core::health::Dialogue) for the pool's check kind, upgrade to
//!    TLS when it asks; the pool's `health.timeout` bounds the *whole* check, connect included;
//! 2. count the result in the backend's `checks_ok` / `checks_failed`, keep the failure reason in
//!    `last_check_error`;
//! 3. feed [`RiseFall`] and publish its verdict with [`PoolRuntime::set_up`], logging transitions
//!    (`warn!` with the reason when a backend goes down, `info!` when it comes back);
//! 4. sleep `interval` plus a small random jitter (at most a tenth of the interval, capped at
//!    250 ms) so that checks of many backends do not synchronise.
//!
//! The first check runs immediately. A backend that is up when the checker starts is *up but
//! unconfirmed* ([`RiseFall::initial`]): its first check result decides at once. One that is
//! already down (its runtime survived a reload) has to rise normally.
//!
//! TLS checks use a rustls client built on the ring provider passed in explicitly, with a
//! verifier that accepts any certificate: a health check proves the backend completes a
//! handshake (the handshake signature is still verified against the presented key), it does not
//! authenticate the backend. SNI is `tls_server_name` when configured; otherwise the backend's IP
//! address is used as the server name, which rustls never sends as SNI.
//!
//! [`HealthChecker::stop`] ends every task and joins the thread; in-flight checks are simply
//! dropped, which closes their sockets.
#![forbid(unsafe_code)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ringmail_proxy_core::config::HealthCheck;
use ringmail_proxy_core::health::{CheckFailure, Dialogue, RiseFall, Step};
use ringmail_proxy_core::proxy_protocol::{self, Version as ProxyVersion};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::runtime::PoolRuntime;

/// The shortest pause between two checks of one backend, whatever the configuration says.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The largest jitter added to an interval.
const MAX_JITTER: Duration = Duration::from_millis(250);
/// Read buffer of one check; the dialogue caps the total read anyway.
const READ_BUF: usize = 4096;
/// Upper bound on dialogue steps of one check (the dialogue's byte cap ends it much sooner).
const MAX_STEPS: usize = 20_000;

/// The running health checker. Dropping it without [`HealthChecker::stop`] also stops the
/// checks, but does not wait for the thread.
#[derive(Debug)]
pub struct HealthChecker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthChecker {
    /// Stops every check and joins the checker thread. Returns promptly: in-flight checks are
    /// abandoned, not awaited.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("health check thread panicked");
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        // Signal only; joining in drop could stall an unrelated unwinding path.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts checking every backend of every pool on a dedicated thread.
pub fn spawn(pools: Vec<Arc<PoolRuntime>>) -> std::io::Result<HealthChecker> {
    let tls = client_config().map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("ringmail-health".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                for pool in &pools {
                    for idx in 0..pool.backends.len() {
                        tokio::spawn(backend_loop(Arc::clone(pool), idx, Arc::clone(&tls)));
                    }
                }
                // Resolves on stop() and when the handle is dropped.
                let _ = stop_rx.await;
            });
            // Dropping the tasks closes their sockets; nothing blocking runs on this runtime.
            runtime.shutdown_timeout(Duration::from_millis(200));
        })?;
    Ok(HealthChecker {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Runs one complete check of `addr` as configured by `hc`, bounded by `hc.timeout`.
pub async fn check_once(addr: SocketAddr, hc: &HealthCheck) -> Result<(), CheckFailure> {
    check_once_proxied(addr, hc, None).await
}

/// [`check_once`] for a pool that sends the PROXY protocol: the check's connection starts with
/// the header a proxy sends for its own connections (v1 `PROXY UNKNOWN`, v2 `LOCAL`), as
/// HAProxy's `check-send-proxy` does. Backends that trust the LB (Postfix's
/// `smtpd_upstream_proxy_protocol`, Dovecot's `haproxy_trusted_networks`, ringmail's
/// `trusted_proxies`) require a header on every connection from it, checks included.
pub async fn check_once_proxied(
    addr: SocketAddr,
    hc: &HealthCheck,
    proxy: Option<ProxyVersion>,
) -> Result<(), CheckFailure> {
    let tls = client_config().map_err(CheckFailure::Tls)?;
    check_with(addr, hc, &tls, proxy).await
}

async fn check_with(
    addr: SocketAddr,
    hc: &HealthCheck,
    tls: &Arc<ClientConfig>,
    proxy: Option<ProxyVersion>,
) -> Result<(), CheckFailure> {
    let mut dialogue = Dialogue::new(hc.kind, &hc.ehlo_name);
    let outcome =
        tokio::time::timeout(hc.timeout, drive(&mut dialogue, addr, hc, tls, proxy)).await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(dialogue
            .pending_failure()
            .cloned()
            .unwrap_or(CheckFailure::Timeout {
                phase: dialogue.phase(),
                after_ms: u64::try_from(hc.timeout.as_millis()).unwrap_or(u64::MAX),
            })),
    }
}

/// A check's connection, before or after TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while a handshake is in progress.
    Gone,
}

impl Conn {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => write_flush(s, bytes).await,
            Conn::Tls(s) => write_flush(s.as_mut(), bytes).await,
            Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Best-effort orderly close (TLS close_notify, then FIN), bounded by the check timeout.
    async fn close(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

async fn drive(
    dialogue: &mut Dialogue,
    addr: SocketAddr,
    hc: &HealthCheck,
    tls: &Arc<ClientConfig>,
    proxy: Option<ProxyVersion>,
) -> Result<(), CheckFailure> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| CheckFailure::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut conn = Conn::Plain(tcp);
    if let Some(version) = proxy {
        let mut header = Vec::with_capacity(16);
        proxy_protocol::encode_local(version, &mut header);
        conn.write_all(&header)
            .await
            .map_err(|e| CheckFailure::Connect(format!("sending the PROXY header: {e}")))?;
    }
    let mut buf = vec![0u8; READ_BUF];
    let mut step = dialogue.on_connected();
    for _ in 0..MAX_STEPS {
        step = match step {
            Step::Done(result) => {
                conn.close().await;
                return result;
            }
            Step::Send(bytes) => match conn.write_all(&bytes).await {
                Ok(()) => read_step(dialogue, &mut conn, &mut buf).await,
                Err(e) => io_failure(dialogue, &e),
            },
            Step::Recv => read_step(dialogue, &mut conn, &mut buf).await,
            Step::StartTls => {
                let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Gone) else {
                    return Err(CheckFailure::Tls("TLS requested twice".to_string()));
                };
                let name = server_name(addr, hc)?;
                let stream = TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| CheckFailure::Tls(e.to_string()))?;
                conn = Conn::Tls(Box::new(stream));
                dialogue.on_tls_done()
            }
        };
    }
    Err(CheckFailure::OutOfOrder("check exceeded its step budget"))
}

async fn read_step(dialogue: &mut Dialogue, conn: &mut Conn, buf: &mut [u8]) -> Step {
    match conn.read(buf).await {
        Ok(n) => dialogue.on_bytes(buf.get(..n).unwrap_or_default()),
        // A TLS peer closing without close_notify, or resetting after the goodbye, is an end
        // of stream as far as the check is concerned.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => dialogue.on_eof(),
        Err(e) if dialogue.is_closing() && is_reset(&e) => dialogue.on_eof(),
        Err(e) => io_failure(dialogue, &e),
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

fn io_failure(dialogue: &Dialogue, e: &std::io::Error) -> Step {
    let failure = dialogue
        .pending_failure()
        .cloned()
        .unwrap_or_else(|| CheckFailure::Io {
            phase: dialogue.phase(),
            error: e.to_string(),
        });
    Step::Done(Err(failure))
}

fn server_name(addr: SocketAddr, hc: &HealthCheck) -> Result<ServerName<'static>, CheckFailure> {
    match &hc.tls_server_name {
        Some(name) => ServerName::try_from(name.clone())
            .map_err(|e| CheckFailure::Tls(format!("invalid server name {name:?}: {e}"))),
        None => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}

/// The rustls client of all checks: ring provider, any certificate accepted.
fn client_config() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AcceptAnyCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts any server certificate but still checks the handshake signature against it, so the
/// backend must hold the key of the certificate it presents.
#[derive(Debug)]
struct AcceptAnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The endless check loop of one backend.
async fn backend_loop(pool: Arc<PoolRuntime>, idx: usize, tls: Arc<ClientConfig>) {
    let Some(backend) = pool.backends.get(idx).cloned() else {
        return;
    };
    let hc = pool.config.health.clone();
    let mut state = if backend.is_up() {
        RiseFall::initial(hc.rise, hc.fall)
    } else {
        RiseFall::new(hc.rise, hc.fall, false)
    };
    let mut rng = Jitter::new(backend.addr);
    let interval = hc.interval.max(MIN_INTERVAL);
    let jitter_max = (interval / 10).min(MAX_JITTER);
    loop {
        let result = check_with(backend.addr, &hc, &tls, pool.config.proxy_protocol).await;
        match &result {
            Ok(()) => {
                backend.checks_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(failure) => {
                backend.checks_failed.fetch_add(1, Ordering::Relaxed);
                let mut slot = backend
                    .last_check_error
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                *slot = Some(failure.to_string());
            }
        }
        // Taken out passively by the workers (consecutive connect failures) while the checks
        // still said up: start over from down, so it must pass `rise` checks to come back.
        if state.is_up() && !backend.is_up() {
            state = RiseFall::new(hc.rise, hc.fall, false);
        }
        if result.is_ok() {
            backend.connect_fail_streak.store(0, Ordering::Relaxed);
        }
        state.record(result.is_ok());
        // Publish every time: set_up is a no-op unless the state differs, and this also heals
        // any drift between the runtime flag and the hysteresis state.
        if pool.set_up(idx, state.is_up()) {
            match &result {
                Err(failure) => warn!(
                    pool = %pool.config.name,
                    backend = %backend.name,
                    addr = %backend.addr,
                    reason = %failure,
                    "backend down"
                ),
                Ok(()) => info!(
                    pool = %pool.config.name,
                    backend = %backend.name,
                    addr = %backend.addr,
                    "backend up"
                ),
            }
        }
        tokio::time::sleep(interval + rng.upto(jitter_max)).await;
    }
}

/// A small xorshift generator; jitter needs spread, not quality.
struct Jitter(u64);

impl Jitter {
    fn new(addr: SocketAddr) -> Self {
        // RandomState is seeded per process from the OS; mixing in the address spreads backends.
        let seed = RandomState::new().hash_one(addr) | 1;
        Jitter(seed)
    }

    fn upto(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        if max_ms == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(self.0 % (max_ms + 1))
        }
    }
}
