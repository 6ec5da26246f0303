//! The tokio driver over loopback TCP: STARTTLS and implicit TLS with a self-signed
//! certificate, login through the async backend, IDLE woken by the store poll.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use ringmail_imap::server::{Backend, LoginFuture, ServerConfig, serve};
use ringmail_imap::{MailStore, MemoryStore, Secret};

struct TestBackend(MemoryStore);

impl Backend for TestBackend {
    fn login(&self, user: String, password: Secret) -> LoginFuture {
        let store = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            (user == "alice" && password.expose() == b"secret")
                .then(|| Box::new(store.session()) as Box<dyn MailStore>)
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

async fn read_until<S: AsyncRead + Unpin>(
    s: &mut S,
    pending: &mut Vec<u8>,
    needle: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(i) = pending
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
        {
            // Up to the end of the line holding the needle.
            let end = pending[i..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(pending.len(), |e| i + e + 2);
            let out: Vec<u8> = pending.drain(..end).collect();
            return String::from_utf8_lossy(&out).into_owned();
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {needle:?}; got {:?}",
                    String::from_utf8_lossy(pending)
                )
            })
            .unwrap();
        assert!(n > 0, "closed while waiting for {needle:?}");
        pending.extend_from_slice(&buf[..n]);
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    pending: &mut Vec<u8>,
    line: &str,
    until: &str,
) -> String {
    s.write_all(line.as_bytes()).await.unwrap();
    read_until(s, pending, until).await
}

async fn start(
    implicit: bool,
    store: &MemoryStore,
) -> (std::net::SocketAddr, Arc<rustls::ClientConfig>) {
    let (server_tls, client_tls) = tls_pair();
    let cfg = Arc::new(ServerConfig {
        tls: Some(server_tls),
        idle_poll: Duration::from_millis(100),
        ..ServerConfig::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(TestBackend(store.clone()));
    tokio::spawn(serve(listener, implicit, cfg, backend));
    (addr, client_tls)
}

async fn session_over_tls<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    p: &mut Vec<u8>,
    store: &MemoryStore,
) {
    let r = cmd(s, p, "b LOGIN alice wrong\r\n", "b ").await;
    assert!(r.contains("b NO [AUTHENTICATIONFAILED]"), "{r}");
    let r = cmd(s, p, "c LOGIN alice secret\r\n", "c ").await;
    assert!(r.contains("c OK"), "{r}");
    let r = cmd(s, p, "d SELECT INBOX\r\n", "d ").await;
    assert!(r.contains("* 0 EXISTS"), "{r}");
    let r = cmd(s, p, "e IDLE\r\n", "+ idling").await;
    assert!(r.contains("+ idling"), "{r}");
    store
        .deliver("INBOX", b"Subject: hi\r\n\r\nhello\r\n")
        .unwrap();
    let r = read_until(s, p, "* 1 EXISTS").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    let r = cmd(s, p, "DONE\r\n", "e ").await;
    assert!(r.contains("e OK IDLE terminated"), "{r}");
    let r = cmd(s, p, "f FETCH 1 BODY[HEADER]\r\n", "f ").await;
    assert!(r.contains("Subject: hi"), "{r}");
    let r = cmd(s, p, "g LOGOUT\r\n", "g ").await;
    assert!(r.contains("* BYE"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_login_idle() {
    let store = MemoryStore::new();
    let (addr, client_tls) = start(false, &store).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut p = Vec::new();
    let g = read_until(&mut tcp, &mut p, "* OK").await;
    assert!(g.contains("STARTTLS LOGINDISABLED"), "{g}");
    let r = cmd(&mut tcp, &mut p, "a LOGIN alice secret\r\n", "a ").await;
    assert!(r.contains("a NO [PRIVACYREQUIRED]"), "{r}");
    let r = cmd(&mut tcp, &mut p, "a STARTTLS\r\n", "a ").await;
    assert!(r.contains("a OK Begin TLS"), "{r}");
    assert!(p.is_empty());
    let connector = tokio_rustls::TlsConnector::from(client_tls);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let r = cmd(&mut tls, &mut p, "x CAPABILITY\r\n", "x ").await;
    assert!(r.contains("AUTH=PLAIN") && !r.contains("STARTTLS"), "{r}");
    session_over_tls(&mut tls, &mut p, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls() {
    let store = MemoryStore::new();
    let (addr, client_tls) = start(true, &store).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_tls);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut p = Vec::new();
    let g = read_until(&mut tls, &mut p, "* OK").await;
    assert!(g.contains("AUTH=PLAIN") && !g.contains("STARTTLS"), "{g}");
    session_over_tls(&mut tls, &mut p, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_injection_fails_the_handshake() {
    let store = MemoryStore::new();
    let (addr, _) = start(false, &store).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut p = Vec::new();
    read_until(&mut tcp, &mut p, "* OK").await;
    // STARTTLS and a pipelined plaintext command in one segment.
    tcp.write_all(b"a STARTTLS\r\nb LOGIN alice secret\r\n")
        .await
        .unwrap();
    let r = read_until(&mut tcp, &mut p, "a ").await;
    assert!(r.contains("a OK"), "{r}");
    // The server waits for a TLS ClientHello; the injected command is never answered.
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await;
    if let Ok(Ok(n)) = n {
        assert!(!String::from_utf8_lossy(&buf[..n]).contains("b OK"));
    }
}
