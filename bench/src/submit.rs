//! Authenticated submissions: N concurrent clients, each a new connection per message: EHLO,
//! STARTTLS, EHLO, AUTH PLAIN, MAIL/RCPT/DATA, QUIT, driven by ringmail's own I/O-free SMTP
//! client core. Latency per message into an HDR histogram.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use clap::Args;
use hdrhistogram::Histogram;
use ringmail_smtp::{Client, ClientConfig, ClientEvent, Envelope, Secret, StartTlsPolicy};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::parse_duration;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The submission port (STARTTLS), directly or through the LB.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    #[arg(long)]
    rcpt: String,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop early once this many messages have been accepted.
    #[arg(long, default_value_t = 1_000_000)]
    max_messages: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
}

#[derive(Debug)]
pub(crate) struct AnyCert(pub(crate) WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Writes what the client queued and reads until it has an event.
async fn event<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    c: &mut Client,
    buf: &mut [u8],
) -> Result<ClientEvent> {
    loop {
        while let Some(b) = c.poll_transmit() {
            s.write_all(&b).await?;
        }
        if let Some(ev) = c.poll_event() {
            return Ok(ev);
        }
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(buf)).await??;
        if n == 0 {
            return Err(anyhow!("connection closed"));
        }
        c.receive(&buf[..n]);
    }
}

/// Drives one session on `s` until it needs a TLS handshake (Ok(true)) or is done (Ok(false)).
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    c: &mut Client,
    env: &Envelope,
    body: &[u8],
) -> Result<bool> {
    let mut buf = vec![0u8; 8192];
    loop {
        match event(s, c, &mut buf).await? {
            ClientEvent::StartTls => return Ok(true),
            ClientEvent::Ready => c.start_transaction(env.clone())?,
            ClientEvent::SendBody => {
                c.send_body_chunk(body)?;
                c.end_body()?;
            }
            ClientEvent::TransactionDone(r) => {
                if !r.all_accepted() {
                    return Err(anyhow!("refused: {:?}", r.recipients));
                }
                c.quit();
            }
            ClientEvent::Closed => return Ok(false),
            ClientEvent::Failed(e) => return Err(anyhow!("{e}")),
        }
    }
}

async fn one(
    args: &SubmitArgs,
    cfg: &Arc<ClientConfig>,
    tls: &tokio_rustls::TlsConnector,
    body: &[u8],
) -> Result<()> {
    let mut tcp = TcpStream::connect(args.target).await?;
    tcp.set_nodelay(true)?;
    let mut c = Client::new(Arc::clone(cfg), false);
    let env = Envelope::new(Some(&args.user), &[&args.rcpt]);
    if !session(&mut tcp, &mut c, &env, body).await? {
        return Ok(());
    }
    let name = ServerName::try_from("localhost")?.to_owned();
    let mut t = tls.connect(name, tcp).await?;
    c.tls_established();
    session(&mut t, &mut c, &env, body).await?;
    Ok(())
}

pub fn run(args: SubmitArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AnyCert(provider.signature_verification_algorithms));
        let tls_cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg));
        let cfg = Arc::new(ClientConfig {
            helo_name: "bench.client.test".into(),
            use_starttls: StartTlsPolicy::Required,
            auth: Some((args.user.clone(), Secret::from(args.password.clone()))),
            ..ClientConfig::default()
        });
        let mut body = format!(
            "From: {}\r\nTo: {}\r\nSubject: bench\r\n\r\n",
            args.user, args.rcpt
        )
        .into_bytes();
        while body.len() < args.size {
            body.extend_from_slice(b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n");
        }
        let args = Arc::new(args);
        let body = Arc::new(body);
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (args, cfg, tls, body) = (Arc::clone(&args), Arc::clone(&cfg), tls.clone(), Arc::clone(&body));
            let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut first_error = None;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match one(&args, &cfg, &tls, &body).await {
                        Ok(()) => {
                            let _ = h.record(t.elapsed().as_micros() as u64);
                            if ok.fetch_add(1, Ordering::Relaxed) + 1 >= args.max_messages {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert(e.to_string());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                (h, first_error)
            }));
        }
        let start = Instant::now();
        while start.elapsed() < args.duration && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut all = Histogram::<u64>::new(3)?;
        let mut err = None;
        for t in tasks {
            let (h, e) = t.await?;
            all.add(h)?;
            if err.is_none() {
                err = e;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let n = ok.load(Ordering::Relaxed);
        println!(
            "{{\"messages\":{n},\"failed\":{},\"seconds\":{secs:.2},\"msgs_per_sec\":{:.1},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2},\"max_ms\":{:.2},\"first_error\":{}}}",
            failed.load(Ordering::Relaxed),
            n as f64 / secs,
            all.value_at_quantile(0.5) as f64 / 1000.0,
            all.value_at_quantile(0.9) as f64 / 1000.0,
            all.value_at_quantile(0.99) as f64 / 1000.0,
            all.value_at_quantile(0.999) as f64 / 1000.0,
            all.max() as f64 / 1000.0,
            serde_json::to_string(&err)?,
        );
        Ok(())
    })
}
