//! Destination resolution and MTA-STS against a real DNS server (NSD on loopback, from the
//! sender-authentication fixture) and a local HTTPS server with certificates from a test CA.
//!
//! Skips with `SKIP: nsd not installed` unless `RINGMAIL_REQUIRE_ALL=1`.

#[path = "../../mailauth/tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{DnsServer, TempDir, Zone, tools_available};
use ringmail_mx::resolve::{MxHost, MxResolver, ResolveError};
use ringmail_mx::sts::{Mode, Sts, StsConfig, StsError, tls_opportunistic, tls_verified};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ENFORCE: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx.secure.dest.test\r\nmx: *.pool.dest.test\r\nmax_age: 86400\r\n";
const TESTING: &str = "version: STSv1\nmode: testing\nmx: mx.testing.dest.test\nmax_age: 600\n";

fn zone() -> Zone {
    Zone::new("dest.test")
        // Preference order and equal-preference shuffling.
        .rr("pref MX 30 c.pref")
        .rr("pref MX 10 a.pref")
        .rr("pref MX 20 b.pref")
        .rr("eq MX 10 x.eq")
        .rr("eq MX 10 y.eq")
        .rr("eq MX 10 z.eq")
        .rr("eq MX 5 first.eq")
        // No MX: implicit MX.
        .rr("implicit A 192.0.2.20")
        .rr("implicit AAAA 2001:db8::20")
        // Null MX (RFC 7505).
        .rr("null MX 0 .")
        // An IP address written as an MX name.
        .rr("numeric MX 10 192.0.2.1.")
        // IDN: bücher.dest.test.
        .rr("xn--bcher-kva MX 10 mx.xn--bcher-kva")
        // Host addresses.
        .rr("dual A 192.0.2.30")
        .rr("dual A 192.0.2.31")
        .rr("dual AAAA 2001:db8::30")
        .rr("v4only A 192.0.2.40")
        .txt("textonly", "hello")
        // MTA-STS domains; their mta-sts hosts are on loopback.
        .rr("secure MX 10 mx.secure")
        .txt("_mta-sts.secure", "v=STSv1; id=20260101T000000;")
        .rr("mta-sts.secure A 127.0.0.1")
        .rr("testing MX 10 mx.testing")
        .txt("_mta-sts.testing", "v=STSv1; id=1")
        .rr("mta-sts.testing A 127.0.0.1")
        .txt("_mta-sts.nofetch", "v=STSv1; id=1")
        .txt("_mta-sts.twotxt", "v=STSv1; id=1")
        .txt("_mta-sts.twotxt", "v=STSv1; id=2")
        .rr("mta-sts.twotxt A 127.0.0.1")
}

fn start() -> Option<(DnsServer, MxResolver)> {
    if !tools_available(&["nsd"]) {
        return None;
    }
    let dns = DnsServer::start(&[zone()]);
    let r = MxResolver::new(Some(dns.addr()), Duration::from_secs(2)).expect("resolver");
    Some((dns, r))
}

fn names(h: &[MxHost]) -> Vec<&str> {
    h.iter().map(|h| h.name.as_str()).collect()
}

fn permanent_code(e: &ResolveError) -> &str {
    match e {
        ResolveError::Permanent { code, .. } => code,
        other => panic!("not permanent: {other:?}"),
    }
}

#[tokio::test]
async fn mx_preference_order() {
    let Some((_dns, r)) = start() else { return };
    let h = r.mx_hosts("pref.dest.test").await.unwrap();
    assert_eq!(
        names(&h),
        ["a.pref.dest.test", "b.pref.dest.test", "c.pref.dest.test"]
    );
    assert_eq!(
        h.iter().map(|h| h.preference).collect::<Vec<_>>(),
        [10, 20, 30]
    );
    assert!(h.iter().all(|h| !h.implicit && h.literal.is_none()));
    // Case and a trailing dot do not matter.
    let h2 = r.mx_hosts("PREF.Dest.Test.").await.unwrap();
    assert_eq!(names(&h2), names(&h));
}

#[tokio::test]
async fn equal_preference_is_shuffled() {
    let Some((_dns, r)) = start() else { return };
    let mut orders = HashSet::new();
    for _ in 0..60 {
        let h = r.mx_hosts("eq.dest.test").await.unwrap();
        assert_eq!(h[0].name, "first.eq.dest.test");
        assert_eq!(h.len(), 4);
        orders.insert(names(&h[1..]).join(","));
    }
    // 6 orders of 3 hosts; 60 draws miss one with probability ~ 6 * (5/6)^60 < 1e-4.
    assert!(orders.len() >= 5, "orders seen: {orders:?}");
}

#[tokio::test]
async fn implicit_mx_and_addresses() {
    let Some((_dns, r)) = start() else { return };
    let h = r.mx_hosts("implicit.dest.test").await.unwrap();
    assert_eq!(
        h,
        [MxHost {
            name: "implicit.dest.test".into(),
            preference: 0,
            implicit: true,
            literal: None,
        }]
    );
    let a = r.addresses(&h[0].name).await.unwrap();
    assert_eq!(
        a,
        [
            "2001:db8::20".parse::<IpAddr>().unwrap(),
            "192.0.2.20".parse().unwrap()
        ]
    );
}

#[tokio::test]
async fn null_mx_nxdomain_and_numeric_mx() {
    let Some((_dns, r)) = start() else { return };
    let e = r.mx_hosts("null.dest.test").await.unwrap_err();
    assert_eq!(permanent_code(&e), "5.1.10", "{e}");
    let e = r.mx_hosts("nope.dest.test").await.unwrap_err();
    assert_eq!(permanent_code(&e), "5.1.2", "{e}");
    let e = r.mx_hosts("numeric.dest.test").await.unwrap_err();
    assert_eq!(permanent_code(&e), "5.4.4", "{e}");
    let e = r.mx_hosts("bad..name").await.unwrap_err();
    assert_eq!(permanent_code(&e), "5.1.2", "{e}");
}

#[tokio::test]
async fn idn_domain_uses_a_labels() {
    let Some((_dns, r)) = start() else { return };
    let h = r.mx_hosts("bücher.dest.test").await.unwrap();
    assert_eq!(names(&h), ["mx.xn--bcher-kva.dest.test"]);
}

#[tokio::test]
async fn domain_literals_skip_dns() {
    let Some((_dns, r)) = start() else { return };
    let h = r.mx_hosts("[192.0.2.1]").await.unwrap();
    assert_eq!(h[0].literal, Some("192.0.2.1".parse().unwrap()));
    let h = r.mx_hosts("[IPv6:2001:db8::1]").await.unwrap();
    assert_eq!(h[0].literal, Some("2001:db8::1".parse().unwrap()));
    let e = r.mx_hosts("[2001:db8::1]").await.unwrap_err();
    assert_eq!(permanent_code(&e), "5.1.2");
}

#[tokio::test]
async fn addresses_v6_first_then_v4() {
    let Some((_dns, r)) = start() else { return };
    let a = r.addresses("dual.dest.test").await.unwrap();
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a[0], "2001:db8::30".parse::<IpAddr>().unwrap());
    let v4: HashSet<IpAddr> = a[1..].iter().copied().collect();
    assert_eq!(
        v4,
        HashSet::from(["192.0.2.30".parse().unwrap(), "192.0.2.31".parse().unwrap()])
    );
    assert_eq!(
        r.addresses("v4only.dest.test").await.unwrap(),
        ["192.0.2.40".parse::<IpAddr>().unwrap()]
    );
    // No address records, or no such host: empty, not an error.
    assert!(r.addresses("textonly.dest.test").await.unwrap().is_empty());
    assert!(r.addresses("nope.dest.test").await.unwrap().is_empty());
}

#[tokio::test]
async fn txt_records() {
    let Some((_dns, r)) = start() else { return };
    assert_eq!(r.txt("textonly.dest.test").await.unwrap(), ["hello"]);
    assert!(r.txt("nope.dest.test").await.unwrap().is_empty());
    assert_eq!(
        r.txt("_mta-sts.secure.dest.test").await.unwrap(),
        ["v=STSv1; id=20260101T000000;"]
    );
}

#[tokio::test]
async fn refused_and_unanswered_queries_are_temporary() {
    let Some((dns, r)) = start() else { return };
    // NSD is not authoritative for this zone: REFUSED.
    let e = r.mx_hosts("example.zz").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    drop(dns);
    // A server that never answers: timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let r = MxResolver::new(
        Some(silent.local_addr().unwrap()),
        Duration::from_millis(200),
    )
    .unwrap();
    let e = r.mx_hosts("dest.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    let e = r.addresses("dual.dest.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    let e = r.txt("dest.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// MTA-STS

/// A test CA and a server certificate signed by it for `names`.
struct Pki {
    ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        let ca = p.self_signed(&ca_key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    fn leaf(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Arc::new(cfg)
    }

    fn write_ca(&self, dir: &TempDir) -> PathBuf {
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, &self.ca_pem).unwrap();
        p
    }
}

/// What the HTTPS server answers: (status line, content type, body).
#[derive(Clone)]
struct Reply {
    status: &'static str,
    ctype: &'static str,
    body: String,
}

impl Reply {
    fn ok(body: &str) -> Reply {
        Reply {
            status: "200 OK",
            ctype: "text/plain; charset=utf-8",
            body: body.to_string(),
        }
    }
}

/// A minimal HTTPS server on 127.0.0.1: answers every request with the current [`Reply`]
/// chosen by the request's Host header (default: the first entry), and counts requests.
struct Https {
    port: u16,
    replies: Arc<Mutex<Vec<(String, Reply)>>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Https {
    async fn start(tls: Arc<rustls::ServerConfig>, replies: Vec<(&str, Reply)>) -> Https {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let replies: Arc<Mutex<Vec<(String, Reply)>>> = Arc::new(Mutex::new(
            replies
                .into_iter()
                .map(|(h, r)| (h.to_string(), r))
                .collect(),
        ));
        let hits = Arc::new(AtomicUsize::new(0));
        let acceptor = TlsAcceptor::from(tls);
        let (rep, h) = (replies.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, rep, h) = (acceptor.clone(), rep.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    let reply = {
                        let rep = rep.lock().unwrap();
                        rep.iter()
                            .find(|(host, _)| text.contains(&format!("host: {host}")))
                            .unwrap_or(&rep[0])
                            .1
                            .clone()
                    };
                    let resp = format!(
                        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nLocation: https://elsewhere.test/\r\nConnection: close\r\n\r\n{}",
                        reply.status,
                        reply.ctype,
                        reply.body.len(),
                        reply.body
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Https {
            port,
            replies,
            hits,
            task,
        }
    }

    fn set(&self, host: &str, reply: Reply) {
        let mut rep = self.replies.lock().unwrap();
        if let Some(e) = rep.iter_mut().find(|(h, _)| h == host) {
            e.1 = reply;
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sts(r: &MxResolver, port: u16, ca: Option<PathBuf>) -> Sts {
    Sts::new(
        StsConfig {
            enabled: true,
            port,
            extra_ca: ca,
            timeout: Duration::from_secs(5),
        },
        r.clone(),
    )
    .expect("sts")
}

const SECURE: &str = "mta-sts.secure.dest.test";
const TESTING_HOST: &str = "mta-sts.testing.dest.test";

#[tokio::test]
async fn sts_discovery_fetch_and_cache() {
    let Some((_dns, r)) = start() else { return };
    let pki = Pki::new("ringmail STS test CA");
    let dir = TempDir::new("sts");
    let ca = pki.write_ca(&dir);
    let srv = Https::start(
        pki.leaf(&[SECURE, TESTING_HOST, "mta-sts.twotxt.dest.test"]),
        vec![
            (SECURE, Reply::ok(ENFORCE)),
            (TESTING_HOST, Reply::ok(TESTING)),
        ],
    )
    .await;
    let s = sts(&r, srv.port, Some(ca));

    assert_eq!(
        s.discover("secure.dest.test").await.unwrap(),
        "20260101T000000"
    );
    let p = s.policy("secure.dest.test").await.expect("enforce policy");
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(p.max_age(), 86400);
    assert_eq!(p.id(), "20260101T000000");
    assert!(p.mx_matches("mx.secure.dest.test"));
    assert!(p.mx_matches("a.pool.dest.test"));
    assert!(!p.mx_matches("a.b.pool.dest.test"));
    assert!(!p.mx_matches("mx.evil.test"));
    // The MX of the domain matches its policy.
    let mx = r.mx_hosts("secure.dest.test").await.unwrap();
    assert!(p.mx_matches(&mx[0].name));
    assert_eq!(srv.hits(), 1);

    // Same TXT id: the cached policy, no new fetch, even when the server changed or broke.
    srv.set(SECURE, Reply::ok(TESTING));
    let again = s.policy("secure.dest.test").await.unwrap();
    assert!(Arc::ptr_eq(&p, &again));
    assert_eq!(srv.hits(), 1);

    let t = s.policy("testing.dest.test").await.expect("testing policy");
    assert_eq!(t.mode(), Mode::Testing);
    assert!(t.mx_matches("MX.testing.dest.test."));
    assert_eq!(srv.hits(), 2);

    // No TXT record: no policy. A TXT record but nothing serving the policy: no policy.
    assert!(s.policy("dest.test").await.is_none());
    assert!(s.policy("nofetch.dest.test").await.is_none());
    // Two STSv1 records: no policy (RFC 8461 §3.1), nothing fetched.
    assert!(s.policy("twotxt.dest.test").await.is_none());
    // Domain literals have no policy.
    assert!(s.policy("[127.0.0.1]").await.is_none());
    assert_eq!(srv.hits(), 2);

    // Disabled: nothing at all.
    let off = Sts::new(
        StsConfig {
            enabled: false,
            ..StsConfig::default()
        },
        r.clone(),
    )
    .unwrap();
    assert!(off.policy("secure.dest.test").await.is_none());
}

#[tokio::test]
async fn sts_fetch_rules() {
    let Some((_dns, r)) = start() else { return };
    let pki = Pki::new("ringmail STS test CA");
    let dir = TempDir::new("sts");
    let s_ca = pki.write_ca(&dir);
    let srv = Https::start(pki.leaf(&[SECURE]), vec![(SECURE, Reply::ok(ENFORCE))]).await;
    let s = sts(&r, srv.port, Some(s_ca));
    assert_eq!(
        s.fetch("secure.dest.test").await.unwrap().mode(),
        Mode::Enforce
    );
    let fails = |reply: Reply| {
        srv.set(SECURE, reply);
        let s = s.clone();
        async move { s.fetch("secure.dest.test").await }
    };
    // Redirects are not followed.
    let e = fails(Reply {
        status: "301 Moved Permanently",
        ..Reply::ok(ENFORCE)
    })
    .await
    .unwrap_err();
    assert!(e.to_string().contains("301"), "{e}");
    let e = fails(Reply {
        status: "404 Not Found",
        ..Reply::ok("")
    })
    .await
    .unwrap_err();
    assert!(matches!(e, StsError::Fetch { .. }), "{e}");
    let e = fails(Reply {
        ctype: "text/html",
        ..Reply::ok(ENFORCE)
    })
    .await
    .unwrap_err();
    assert!(e.to_string().contains("text/plain"), "{e}");
    let e = fails(Reply::ok(&"x".repeat(70_000))).await.unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
    let e = fails(Reply::ok("version: STSv1\nmode: enforce\n"))
        .await
        .unwrap_err();
    assert!(matches!(e, StsError::Policy(_)), "{e}");
}

#[tokio::test]
async fn sts_wrong_certificate_fails() {
    let Some((_dns, r)) = start() else { return };
    let trusted = Pki::new("trusted CA");
    let other = Pki::new("untrusted CA");
    let dir = TempDir::new("sts");
    let ca = trusted.write_ca(&dir);

    // Right name, untrusted CA.
    let srv = Https::start(other.leaf(&[SECURE]), vec![(SECURE, Reply::ok(ENFORCE))]).await;
    let s = sts(&r, srv.port, Some(ca.clone()));
    let e = s.fetch("secure.dest.test").await.unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(s.policy("secure.dest.test").await.is_none());
    assert_eq!(srv.hits(), 0);

    // Trusted CA, wrong name.
    let srv = Https::start(
        trusted.leaf(&["mta-sts.other.test"]),
        vec![(SECURE, Reply::ok(ENFORCE))],
    )
    .await;
    let s = sts(&r, srv.port, Some(ca));
    let e = s.fetch("secure.dest.test").await.unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    assert_eq!(srv.hits(), 0);
}

/// A TLS handshake with `cfg` to a server presenting `server` as `name`.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut s) = acceptor.accept(tcp).await {
            let _ = s.write_all(b"220 ok\r\n").await;
            let _ = s.shutdown().await;
        }
    });
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut s = TlsConnector::from(cfg).connect(name, tcp).await?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    srv.abort();
    assert_eq!(buf, b"220 ok\r\n");
    Ok(())
}

#[tokio::test]
async fn delivery_tls_configs() {
    let trusted = Pki::new("trusted CA");
    let other = Pki::new("untrusted CA");
    let dir = TempDir::new("tls");
    let ca = trusted.write_ca(&dir);
    let verified = tls_verified(Some(&ca)).unwrap();
    let mx = "mx.secure.dest.test";

    handshake(trusted.leaf(&[mx]), verified.clone(), mx)
        .await
        .expect("valid certificate");
    assert!(
        handshake(trusted.leaf(&["mx.other.test"]), verified.clone(), mx)
            .await
            .is_err(),
        "wrong name accepted"
    );
    assert!(
        handshake(other.leaf(&[mx]), verified, mx).await.is_err(),
        "untrusted CA accepted"
    );
    // Opportunistic: anything goes.
    handshake(other.leaf(&["mx.other.test"]), tls_opportunistic(), mx)
        .await
        .expect("opportunistic TLS");
}
