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

fn tls_pair_pem() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = ck.cert.pem();
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
    (Arc::new(server), Arc::new(client), pem)
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
    let (addr, client_tls, _) = start_pem(implicit, store).await;
    (addr, client_tls)
}

async fn start_pem(
    implicit: bool,
    store: &MemoryStore,
) -> (std::net::SocketAddr, Arc<rustls::ClientConfig>, String) {
    let (server_tls, client_tls, pem) = tls_pair_pem();
    let cfg = Arc::new(ServerConfig {
        tls: Some(server_tls),
        idle_poll: Duration::from_millis(100),
        ..ServerConfig::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(TestBackend(store.clone()));
    tokio::spawn(serve(listener, implicit, cfg, backend));
    (addr, client_tls, pem)
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

const IMAPLIB_SCRIPT: &str = r#"
import imaplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
M = imaplib.IMAP4("localhost", port)
assert "STARTTLS" in M.capabilities, M.capabilities
M.starttls(ssl_context=ctx)
assert "AUTH=PLAIN" in M.capabilities, M.capabilities
typ, d = M.login("alice", "secret"); assert typ == "OK", d
msg = b"From: a@example.org\r\nSubject: interop\r\n\r\nhello imaplib\r\n"
typ, d = M.append("INBOX", r"(\Seen)", imaplib.Time2Internaldate(1700000000), msg)
assert typ == "OK" and b"APPENDUID" in d[0], d
typ, d = M.select("INBOX"); assert typ == "OK" and d[0] == b"1", d
typ, d = M.search(None, "SUBJECT", "interop"); assert d[0] == b"1", d
typ, d = M.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY[TEXT] INTERNALDATE)")
assert typ == "OK", d
assert d[0][1] == b"Subject: interop\r\n\r\n", d
assert d[1][1] == b"hello imaplib\r\n", d
typ, d = M.uid("STORE", "1", "+FLAGS", r"(\Flagged)"); assert typ == "OK", d
assert b"\\Flagged" in d[0], d
typ, d = M.copy("1", "Trash"); assert typ == "OK", d
typ, d = M.store("1", "+FLAGS", r"\Deleted"); assert typ == "OK", d
typ, d = M.expunge(); assert d == [b"1"], d
typ, d = M.list(); assert typ == "OK" and any(b"Trash" in x for x in d), d
typ, d = M.status("Trash", "(MESSAGES)"); assert d == [b"Trash (MESSAGES 1)"], d
typ, d = M.namespace(); assert typ == "OK", d
M.close()
M.logout()
print("imaplib ok")
"#;

/// Python's imaplib against the driver: STARTTLS, LOGIN, APPEND, SELECT, SEARCH, FETCH,
/// UID STORE, COPY, EXPUNGE, LIST, STATUS, NAMESPACE, CLOSE, LOGOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_imaplib_interop() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var("RINGMAIL_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("python3 is not installed (RINGMAIL_REQUIRE_ALL=1)");
        }
        eprintln!("SKIP: python3 is not installed");
        return;
    }
    let store = MemoryStore::new();
    let (addr, _, pem) = start_pem(false, &store).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let port = addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .args(["60", "python3", "-c", IMAPLIB_SCRIPT, &port])
            .arg(&ca)
            .output()
    });
    let out = out.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("imaplib ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
