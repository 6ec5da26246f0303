//! Health checks against real servers on loopback: SMTP (with real STARTTLS), IMAP, TLS,
//! silent and hostile servers, and the runner's rise/fall behaviour over time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmail_dataplane::healthcheck::{self, check_once};
use ringmail_dataplane::runtime::PoolRuntime;
use ringmail_proxy_core::config::{HealthCheck, Pool};
use ringmail_proxy_core::health::{CheckFailure, CheckKind};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// What a test server saw, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, s: &str) -> usize {
        self.lines().iter().filter(|l| *l == s).count()
    }
}

fn acceptor() -> TlsAcceptor {
    let ck = rcgen::generate_simple_self_signed(vec!["mail.example".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

fn hc(kind: CheckKind) -> HealthCheck {
    HealthCheck {
        kind,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(1500),
        rise: 2,
        fall: 3,
        ehlo_name: "lb.test.invalid".to_string(),
        tls_server_name: None,
    }
}

/// Accepts connections and hands each to `serve` on its own task.
async fn serve_on<F, Fut>(listener: TcpListener, serve: F) -> JoinHandle<()>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    })
}

async fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

// ---- SMTP responder ----

#[derive(Clone)]
struct Smtp {
    banner: &'static str,
    ehlo: &'static str,
    ehlo_tls: &'static str,
    tls: Option<TlsAcceptor>,
    /// Appended to the STARTTLS 220 reply, before the handshake.
    inject: &'static str,
}

impl Smtp {
    fn plain() -> Self {
        Smtp {
            banner: "220-mx.test ESMTP\r\n220 ready\r\n",
            ehlo: "250-mx.test hello\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            ehlo_tls: "250-mx.test hello again\r\n250 8BITMIME\r\n",
            tls: None,
            inject: "",
        }
    }
    fn starttls() -> Self {
        Smtp {
            ehlo: "250-mx.test hello\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
            tls: Some(acceptor()),
            ..Smtp::plain()
        }
    }
}

enum Next {
    StartTls,
    Closed,
}

async fn smtp_commands<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut BufReader<S>,
    cfg: &Smtp,
    log: &Log,
    in_tls: bool,
) -> Next {
    for _ in 0..50 {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            log.push("eof");
            return Next::Closed;
        }
        assert!(
            line.ends_with("\r\n"),
            "client sent a bare line end: {line:?}"
        );
        let cmd = line.trim_end().to_string();
        log.push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO ") {
            (if in_tls { cfg.ehlo_tls } else { cfg.ehlo }).to_string()
        } else if upper == "STARTTLS" && !in_tls && cfg.tls.is_some() {
            let reply = format!("220 2.0.0 go ahead\r\n{}", cfg.inject);
            let _ = r.get_mut().write_all(reply.as_bytes()).await;
            return Next::StartTls;
        } else if upper == "QUIT" {
            let _ = r.get_mut().write_all(b"221 2.0.0 bye\r\n").await;
            return Next::Closed;
        } else {
            "500 5.5.1 what\r\n".to_string()
        };
        if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return Next::Closed;
        }
    }
    Next::Closed
}

async fn smtp_session(tcp: TcpStream, cfg: Smtp, log: Log) {
    let mut r = BufReader::new(tcp);
    if r.get_mut().write_all(cfg.banner.as_bytes()).await.is_err() {
        return;
    }
    if let Next::StartTls = smtp_commands(&mut r, &cfg, &log, false).await {
        let Some(acceptor) = cfg.tls.clone() else {
            return;
        };
        match acceptor.accept(r.into_inner()).await {
            Ok(tls) => {
                log.push(format!("tls sni={:?}", tls.get_ref().1.server_name()));
                let mut r = BufReader::new(tls);
                smtp_commands(&mut r, &cfg, &log, true).await;
                let _ = r.get_mut().shutdown().await;
            }
            Err(e) => log.push(format!("tls failed: {e}")),
        }
    }
}

async fn smtp_server(cfg: Smtp) -> (SocketAddr, Log, JoinHandle<()>) {
    let (l, addr) = listen().await;
    let log = Log::default();
    let log2 = log.clone();
    let task = serve_on(l, move |tcp| smtp_session(tcp, cfg.clone(), log2.clone())).await;
    (addr, log, task)
}

// ---- IMAP responder ----

async fn imap_server(greeting: &'static str) -> (SocketAddr, Log) {
    let (l, addr) = listen().await;
    let log = Log::default();
    let log2 = log.clone();
    serve_on(l, move |tcp| {
        let log = log2.clone();
        async move {
            let mut r = BufReader::new(tcp);
            if r.get_mut().write_all(greeting.as_bytes()).await.is_err() {
                return;
            }
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) > 0 {
                log.push(line.clone());
                if line == "a1 LOGOUT\r\n" {
                    let _ = r
                        .get_mut()
                        .write_all(b"* BYE bye\r\na1 OK LOGOUT completed\r\n")
                        .await;
                }
            }
        }
    })
    .await;
    (addr, log)
}

// ---- SMTP checks ----

#[tokio::test]
async fn smtp_check_passes_and_ends_with_quit() {
    let (addr, log, _t) = smtp_server(Smtp::plain()).await;
    assert_eq!(check_once(addr, &hc(CheckKind::Smtp)).await, Ok(()));
    // The server records QUIT before answering 221, and check_once returned after the 221.
    assert_eq!(log.lines(), vec!["EHLO lb.test.invalid", "QUIT"]);
}

#[tokio::test]
async fn smtp_refusing_banner_fails_with_reason_and_still_quits() {
    let cfg = Smtp {
        banner: "554 5.3.2 not accepting\r\n",
        ..Smtp::plain()
    };
    let (addr, log, _t) = smtp_server(cfg).await;
    let err = check_once(addr, &hc(CheckKind::Smtp)).await.unwrap_err();
    assert_eq!(err.to_string(), "banner 554 5.3.2 not accepting");
    assert_eq!(log.lines(), vec!["QUIT"]);
}

#[tokio::test]
async fn smtp_starttls_check_does_a_real_handshake_with_sni() {
    let (addr, log, _t) = smtp_server(Smtp::starttls()).await;
    let mut check = hc(CheckKind::SmtpStarttls);
    check.tls_server_name = Some("mail.example".to_string());
    assert_eq!(check_once(addr, &check).await, Ok(()));
    assert_eq!(
        log.lines(),
        vec![
            "EHLO lb.test.invalid",
            "STARTTLS",
            "tls sni=Some(\"mail.example\")",
            "EHLO lb.test.invalid",
            "QUIT",
        ]
    );
}

#[tokio::test]
async fn smtp_starttls_without_sni_by_default() {
    let (addr, log, _t) = smtp_server(Smtp::starttls()).await;
    assert_eq!(check_once(addr, &hc(CheckKind::SmtpStarttls)).await, Ok(()));
    assert!(
        log.lines().contains(&"tls sni=None".to_string()),
        "{:?}",
        log.lines()
    );
}

#[tokio::test]
async fn smtp_starttls_missing_fails_and_quits() {
    let (addr, log, _t) = smtp_server(Smtp::plain()).await;
    let err = check_once(addr, &hc(CheckKind::SmtpStarttls))
        .await
        .unwrap_err();
    assert_eq!(err, CheckFailure::NoStartTls);
    assert_eq!(err.to_string(), "no STARTTLS in EHLO reply");
    assert_eq!(log.lines(), vec!["EHLO lb.test.invalid", "QUIT"]);
}

#[tokio::test]
async fn smtp_starttls_response_injection_fails() {
    let cfg = Smtp {
        inject: "250 injected\r\n",
        ..Smtp::starttls()
    };
    let (addr, _log, _t) = smtp_server(cfg).await;
    let err = check_once(addr, &hc(CheckKind::SmtpStarttls))
        .await
        .unwrap_err();
    assert_eq!(err, CheckFailure::DataAfterStartTls);
}

#[tokio::test]
async fn smtp_check_against_imap_server_fails() {
    let (addr, _log) = imap_server("* OK IMAP ready\r\n").await;
    let err = check_once(addr, &hc(CheckKind::Smtp)).await.unwrap_err();
    assert!(matches!(err, CheckFailure::Malformed(_)), "{err}");
}

// ---- IMAP checks ----

#[tokio::test]
async fn imap_check_passes_with_logout() {
    let (addr, log) = imap_server("* OK [CAPABILITY IMAP4rev1] ready\r\n").await;
    assert_eq!(check_once(addr, &hc(CheckKind::Imap)).await, Ok(()));
    assert_eq!(log.lines(), vec!["a1 LOGOUT\r\n"]);
    let (addr, _) = imap_server("* PREAUTH welcome back\r\n").await;
    assert_eq!(check_once(addr, &hc(CheckKind::Imap)).await, Ok(()));
}

#[tokio::test]
async fn imap_bye_greeting_fails() {
    let (addr, log) = imap_server("* BYE too many connections\r\n").await;
    let err = check_once(addr, &hc(CheckKind::Imap)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "IMAP greeting was BYE: too many connections"
    );
    assert!(log.lines().is_empty());
}

// ---- TLS and TCP checks ----

async fn tls_server() -> (SocketAddr, Log) {
    let (l, addr) = listen().await;
    let acceptor = acceptor();
    let log = Log::default();
    let log2 = log.clone();
    serve_on(l, move |tcp| {
        let (acceptor, log) = (acceptor.clone(), log2.clone());
        async move {
            match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    log.push(format!("sni={:?}", tls.get_ref().1.server_name()));
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await;
                }
                Err(e) => log.push(format!("failed: {e}")),
            }
        }
    })
    .await;
    (addr, log)
}

#[tokio::test]
async fn tls_check_completes_handshake_with_self_signed_cert() {
    let (addr, log) = tls_server().await;
    assert_eq!(check_once(addr, &hc(CheckKind::Tls)).await, Ok(()));
    let mut check = hc(CheckKind::Tls);
    check.tls_server_name = Some("mail.example".to_string());
    assert_eq!(check_once(addr, &check).await, Ok(()));
    let deadline = Instant::now() + Duration::from_secs(2);
    while log.lines().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(log.lines(), vec!["sni=None", "sni=Some(\"mail.example\")"]);
}

#[tokio::test]
async fn tls_check_against_plain_smtp_fails() {
    let (addr, _log, _t) = smtp_server(Smtp::plain()).await;
    let err = check_once(addr, &hc(CheckKind::Tls)).await.unwrap_err();
    assert!(
        err.to_string().starts_with("TLS handshake failed: "),
        "{err}"
    );
}

#[tokio::test]
async fn closed_port_fails_to_connect() {
    let (l, addr) = listen().await;
    drop(l);
    for kind in [CheckKind::Tcp, CheckKind::Smtp, CheckKind::Tls] {
        let err = check_once(addr, &hc(kind)).await.unwrap_err();
        assert!(matches!(err, CheckFailure::Connect(_)), "{err}");
    }
}

/// Accepts and never says a word.
async fn silent_server() -> SocketAddr {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = l.accept().await {
            if held.len() < 1000 {
                held.push(tcp);
            }
        }
    });
    addr
}

#[tokio::test]
async fn silent_server_fails_within_timeout() {
    let addr = silent_server().await;
    let mut check = hc(CheckKind::Smtp);
    check.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = check_once(addr, &check).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(
        err,
        CheckFailure::Timeout {
            phase: "the banner",
            after_ms: 300
        }
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    for kind in [CheckKind::Imap, CheckKind::Tls] {
        check.kind = kind;
        assert!(matches!(
            check_once(addr, &check).await,
            Err(CheckFailure::Timeout { .. })
        ));
    }
    // A plain TCP check only needs the connect.
    assert_eq!(check_once(addr, &hc(CheckKind::Tcp)).await, Ok(()));
}

#[tokio::test]
async fn endless_line_is_cut_off() {
    let (l, addr) = listen().await;
    serve_on(l, |mut tcp| async move {
        let junk = [b'x'; 1024];
        for _ in 0..1024 {
            if tcp.write_all(&junk).await.is_err() {
                break;
            }
        }
    })
    .await;
    let err = check_once(addr, &hc(CheckKind::Smtp)).await.unwrap_err();
    assert_eq!(err, CheckFailure::LineTooLong);
}

#[tokio::test]
async fn flood_of_reply_lines_is_cut_off() {
    let (l, addr) = listen().await;
    serve_on(l, |mut tcp| async move {
        for _ in 0..10_000 {
            if tcp.write_all(b"220-more banner\r\n").await.is_err() {
                break;
            }
        }
    })
    .await;
    let err = check_once(addr, &hc(CheckKind::Smtp)).await.unwrap_err();
    assert_eq!(err, CheckFailure::TooMuchData);
}

// ---- the runner ----

fn pool_of(addrs: Vec<SocketAddr>, check: HealthCheck) -> Arc<PoolRuntime> {
    let mut pool = Pool::quick("mx", addrs);
    pool.health = check;
    Arc::new(PoolRuntime::new(pool, 1, None))
}

/// Polls `cond` every 10 ms for at most `max`; returns whether it became true.
async fn wait_for(max: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

#[tokio::test]
async fn first_failing_check_marks_down_at_once() {
    let (l, dead) = listen().await;
    drop(l);
    let (live, _log, _t) = smtp_server(Smtp::plain()).await;
    let mut check = hc(CheckKind::Smtp);
    check.interval = Duration::from_secs(5);
    let pool = pool_of(vec![dead, live], check);
    let checker = healthcheck::spawn(vec![Arc::clone(&pool)]).unwrap();
    let (d, l) = (&pool.backends[0], &pool.backends[1]);
    assert!(
        wait_for(Duration::from_secs(3), || {
            d.checks_failed.load(Ordering::Relaxed) == 1 && l.checks_ok.load(Ordering::Relaxed) == 1
        })
        .await
    );
    assert!(
        wait_for(Duration::from_millis(500), || !d.is_up()).await,
        "dead backend still up"
    );
    assert!(l.is_up());
    let reason = d.last_check_error.lock().unwrap().clone().unwrap();
    assert!(reason.starts_with("connect failed: "), "{reason}");
    assert_eq!(l.last_check_error.lock().unwrap().clone(), None);
    checker.stop();
}

#[tokio::test]
async fn dying_backend_goes_down_after_fall_and_recovers_after_rise() {
    let (addr, log, server) = smtp_server(Smtp::plain()).await;
    let mut check = hc(CheckKind::Smtp);
    check.interval = Duration::from_millis(100);
    check.timeout = Duration::from_millis(300);
    let (interval, timeout, rise, fall) = (check.interval, check.timeout, check.rise, check.fall);
    let pool = pool_of(vec![addr], check);
    let checker = healthcheck::spawn(vec![Arc::clone(&pool)]).unwrap();
    let b = Arc::clone(&pool.backends[0]);

    // Healthy and confirmed; every check ends politely.
    assert!(
        wait_for(Duration::from_secs(3), || b
            .checks_ok
            .load(Ordering::Relaxed)
            >= 2)
        .await
    );
    assert!(b.is_up());
    assert!(log.count("QUIT") >= 2);
    let generation = pool.generation.load(Ordering::Relaxed);

    // Kill the server: the listener goes away, connects are refused.
    let failed_before = b.checks_failed.load(Ordering::Relaxed);
    server.abort();
    let _ = server.await;
    let killed = Instant::now();
    // fall checks, each followed by an interval and at most 10 % jitter, plus one check that
    // may have been in flight, plus scheduling slack.
    let bound = (interval + interval / 10) * (fall + 1) + timeout + Duration::from_millis(500);
    assert!(
        wait_for(bound, || !b.is_up()).await,
        "not down within {bound:?}"
    );
    let took = killed.elapsed();
    let failures = b.checks_failed.load(Ordering::Relaxed) - failed_before;
    assert!(
        failures >= u64::from(fall),
        "down after {failures} failures"
    );
    let earliest = interval * (fall - 1) - Duration::from_millis(20);
    assert!(took >= earliest, "down too early: {took:?}");
    assert!(pool.generation.load(Ordering::Relaxed) > generation);
    let reason = b.last_check_error.lock().unwrap().clone().unwrap();
    assert!(reason.starts_with("connect failed"), "{reason}");

    // Bring it back on the same address.
    let mut listener = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let listener = listener.expect("rebind");
    let ok_before = b.checks_ok.load(Ordering::Relaxed);
    let log2 = log.clone();
    let _server = serve_on(listener, move |tcp| {
        smtp_session(tcp, Smtp::plain(), log2.clone())
    })
    .await;
    let bound = (interval + interval / 10) * (rise + 1) + timeout + Duration::from_millis(500);
    assert!(
        wait_for(bound, || b.is_up()).await,
        "not up within {bound:?}"
    );
    let successes = b.checks_ok.load(Ordering::Relaxed) - ok_before;
    assert!(
        successes >= u64::from(rise),
        "up after {successes} successes"
    );

    let start = Instant::now();
    checker.stop();
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn stop_returns_promptly_with_checks_in_flight() {
    let silent = silent_server().await;
    let mut check = hc(CheckKind::Imap);
    check.timeout = Duration::from_secs(30);
    let pools = vec![
        pool_of(vec![silent; 8], check.clone()),
        pool_of(vec![silent], check),
    ];
    let checker = healthcheck::spawn(pools.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    checker.stop();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    // Nothing was decided: every check was still waiting for a greeting.
    for pool in &pools {
        for b in &pool.backends {
            assert_eq!(b.checks_failed.load(Ordering::Relaxed), 0);
            assert!(b.is_up());
        }
    }
}

#[tokio::test]
async fn empty_pool_list_starts_and_stops() {
    let checker = healthcheck::spawn(Vec::new()).unwrap();
    let start = Instant::now();
    checker.stop();
    assert!(start.elapsed() < Duration::from_secs(1));
}
