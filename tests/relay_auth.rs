//! Relaying to the next hop with STARTTLS and AUTH: an MSA (`ringmail msa`, quick mode)
//! relays to a real `ringmail mta` that requires AUTH (an account store with a relay account,
//! STARTTLS with a certificate from a test CA, no trusted addresses), which delivers to a
//! smart-host sink. Messages are submitted with Python's smtplib.
//!
//! * right credentials: the messages arrive, authenticated at the MTA (ESMTPSA), sessions reused;
//! * wrong password: the message stays in the MSA's queue with the 535 as its last reply;
//! * `encrypt` to a next hop without STARTTLS: stays queued, the reason recorded;
//! * `may` to the same hop: delivered in plaintext;
//! * the password never shows up in any log (debug level), and config mistakes are refused
//!   with file:line.
//!
//! Needs python3; a test without it prints `SKIP:` (fails under `RINGMAIL_REQUIRE_ALL=1`).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const ALICE_PW: &str = "alice-Submission-pw";
const RELAY_PW: &str = "Relay-Secret-7f3a9c";
const WRONG_PW: &str = "Wrong-Secret-52be01";

fn have_python() -> bool {
    if Path::new("/usr/bin/python3").exists() {
        true
    } else {
        skip("python3 not installed");
        false
    }
}

/// A test CA and a certificate from it for the MTA (`mta.example.test` and 127.0.0.1).
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &TempDir) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "ringmail test internal CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec![
            "mta.example.test".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "mta.example.test");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
        Pki {
            ca: dir.write("ca.pem", &ca.pem()),
            cert: dir.write("mta.crt", &leaf.pem()),
            key: dir.write("mta.key", &key.serialize_pem()),
        }
    }
}

/// A running `ringmail mta` that accepts only AUTH (the trusted range holds no real client)
/// and sends everything to `sink`.
struct Mta {
    child: ChildGuard,
    addr: SocketAddr,
}

impl Mta {
    fn start(dir: &TempDir, pki: &Pki, sink: SocketAddr) -> Mta {
        let db = format!("sqlite:{}", dir.path().join("mta-accounts.db").display());
        accounts(&db, &["domain", "add", "example.test"], None);
        accounts(
            &db,
            &["add", "relay@example.test", "--password-stdin"],
            Some(&format!("{RELAY_PW}\n")),
        );
        let addr = free_addr();
        let config = format!(
            r#"[mta]
hostname = "mta.example.test"
listen = ["{addr}"]
spool = "{spool}"
trusted_clients = ["192.0.2.1/32"]
accounts = "{db}"
relay = "{sink}"
relay_tls = "none"
mta_sts = false
retry_min = "1s"
retry_max = "2s"
tls = {{ cert = "{cert}", key = "{key}" }}
"#,
            spool = dir.path().join("mta-spool").display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
        );
        let path = dir.write("mta.toml", &config);
        let child = ChildGuard::spawn(
            "ringmail mta",
            Command::new(RINGMAIL)
                .env("RUST_LOG", "debug")
                .args(["mta", "--config"])
                .arg(path),
            dir.path().join("mta.log"),
        )
        .unwrap();
        wait_for(Duration::from_secs(20), || {
            TcpStream::connect(addr).ok().map(|_| ())
        })
        .unwrap_or_else(|| panic!("the MTA did not start: {}", child.log_text()));
        Mta { child, addr }
    }
}

/// A running `ringmail msa` in quick mode relaying to `relay` with the hop flags `hop`.
struct Msa {
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    spool: PathBuf,
}

impl Msa {
    fn start(dir: &TempDir, relay: SocketAddr, hop: &[&str]) -> Msa {
        let db = format!("sqlite:{}", dir.path().join("msa-accounts.db").display());
        accounts(&db, &["domain", "add", "example.test"], None);
        accounts(
            &db,
            &["add", "alice@example.test", "--password-stdin"],
            Some(&format!("{ALICE_PW}\n")),
        );
        let (addr, admin) = (free_addr(), free_addr());
        let spool = dir.path().join("msa-spool");
        let child = ChildGuard::spawn(
            "ringmail msa",
            Command::new(RINGMAIL)
                .env("RUST_LOG", "debug")
                .args(["msa", "--listen", &addr.to_string()])
                .args(["--accounts", &db, "--relay", &relay.to_string()])
                .args(["--hostname", "smtp.example.test"])
                .args(["--admin", &admin.to_string()])
                .arg("--spool")
                .arg(&spool)
                .args(hop),
            dir.path().join("msa.log"),
        )
        .unwrap();
        wait_for(Duration::from_secs(20), || {
            TcpStream::connect(addr).ok().map(|_| ())
        })
        .unwrap_or_else(|| panic!("the MSA did not start: {}", child.log_text()));
        Msa {
            child,
            addr,
            admin,
            spool,
        }
    }

    fn queue(&self, args: &[&str]) -> String {
        let (st, out) = run_bounded(
            Command::new(RINGMAIL)
                .arg("queue")
                .arg("--spool")
                .arg(&self.spool)
                .args(["--admin", &self.admin.to_string()])
                .args(args),
            Duration::from_secs(30),
        );
        assert!(st.success(), "ringmail queue {args:?}: {out}");
        out
    }

    /// Waits until the queue listing shows `want` (a last reply); returns the listing.
    fn wait_queue(&self, want: &str) -> String {
        wait_for(Duration::from_secs(30), || {
            let l = self.queue(&["list"]);
            l.contains(want).then_some(l)
        })
        .unwrap_or_else(|| {
            panic!(
                "the queue never showed {want:?}: {}\n{}",
                self.queue(&["list"]),
                self.child.log_text()
            )
        })
    }
}

/// Submits `n` messages as alice (STARTTLS, AUTH) with smtplib, one session each.
fn submit(msa: SocketAddr, n: usize, subject: &str) {
    let script = format!(
        "import smtplib, ssl\n\
         ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE\n\
         for i in range({n}):\n\
         \x20   s = smtplib.SMTP('{ip}', {port}, timeout=20); s.starttls(context=ctx)\n\
         \x20   s.login('alice@example.test', '{ALICE_PW}')\n\
         \x20   s.sendmail('alice@example.test', ['bob@example.org'], 'From: Alice <alice@example.test>\\r\\nTo: bob@example.org\\r\\nSubject: {subject} %d\\r\\nMessage-ID: <{subject}-%d@example.test>\\r\\n\\r\\nhello %d\\r\\n' % (i, i, i))\n\
         \x20   s.quit()\n",
        ip = msa.ip(),
        port = msa.port(),
    );
    let (st, out) = run_bounded(
        Command::new("python3").arg("-c").arg(&script),
        Duration::from_secs(60),
    );
    assert!(st.success(), "smtplib: {out}");
}

fn delivered(sink: &IdSink) -> usize {
    sink.ids.lock().unwrap().values().sum()
}

/// No password in any log, at debug level.
fn assert_no_secrets(logs: &[String]) {
    for log in logs {
        for pw in [RELAY_PW, WRONG_PW, ALICE_PW] {
            assert!(!log.contains(pw), "a password appears in a log:\n{log}");
        }
    }
}

#[test]
fn msa_relays_to_an_mta_with_starttls_and_auth() {
    if !have_python() {
        return;
    }
    let dir = TempDir::new("relay-auth-ok");
    let pki = Pki::new(&dir);
    let sink = IdSink::start(Duration::ZERO);
    let mta = Mta::start(&dir, &pki, sink.addr);
    let pw = dir.write("relay.pass", &format!("{RELAY_PW}\n"));
    let ca = pki.ca.display().to_string();
    let pw = pw.display().to_string();
    let msa = Msa::start(
        &dir,
        mta.addr,
        &[
            "--relay-tls",
            "encrypt",
            "--relay-ca",
            &ca,
            "--relay-auth-user",
            "relay@example.test",
            "--relay-password-file",
            &pw,
        ],
    );
    const N: usize = 8;
    submit(msa.addr, N, "authrelay");
    wait_for(Duration::from_secs(30), || {
        (delivered(&sink) >= N).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of {N} messages arrived\nMSA:\n{}\nMTA:\n{}",
            delivered(&sink),
            msa.child.log_text(),
            mta.child.log_text()
        )
    });
    assert_eq!(
        delivered(&sink),
        N,
        "duplicates: {:?}",
        sink.ids.lock().unwrap()
    );
    // The MTA took it over TLS from an authenticated client.
    let last = sink.last.lock().unwrap().clone();
    assert!(
        last.contains("by mta.example.test (ringmail) with ESMTPSA"),
        "{last}"
    );
    assert!(msa.queue(&["list"]).contains("Mail queue is empty"));
    // Connections to the MTA are reused: one AUTH per relay connection, and the MSA runs at
    // most four of them (its default `connections`) for eight messages.
    let mta_log = mta.child.log_text();
    let auths = mta_log
        .lines()
        .filter(|l| l.contains("authenticated") && l.contains("relay@example.test"))
        .count();
    assert!(
        (1..=4).contains(&auths),
        "{auths} AUTHs for {N} messages:\n{mta_log}"
    );
    assert!(!mta_log.contains("authentication failed"), "{mta_log}");
    assert_no_secrets(&[msa.child.log_text(), mta_log]);
}

#[test]
fn wrong_password_keeps_the_mail_queued_with_the_535() {
    if !have_python() {
        return;
    }
    let dir = TempDir::new("relay-auth-bad");
    let pki = Pki::new(&dir);
    let sink = IdSink::start(Duration::ZERO);
    let mta = Mta::start(&dir, &pki, sink.addr);
    let pw = dir.write("relay.pass", &format!("{WRONG_PW}\n"));
    let ca = pki.ca.display().to_string();
    let pw = pw.display().to_string();
    let msa = Msa::start(
        &dir,
        mta.addr,
        &[
            "--relay-tls",
            "encrypt",
            "--relay-ca",
            &ca,
            "--relay-auth-user",
            "relay@example.test",
            "--relay-password-file",
            &pw,
        ],
    );
    submit(msa.addr, 1, "badpw");
    let list = msa.wait_queue("535");
    assert!(list.contains("bob@example.org  pending"), "{list}");
    assert!(list.contains("authentication failed"), "{list}");
    let id = list
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('!');
    let shown = msa.queue(&["show", id]);
    assert!(shown.contains("535"), "{shown}");
    assert!(msa.queue(&["--json", "list"]).contains("535"));
    // Nothing reached the MTA's queue or the final sink.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(delivered(&sink), 0);
    let msa_log = msa.child.log_text();
    assert!(
        msa_log.contains("cannot open a session to the next hop") && msa_log.contains("535"),
        "{msa_log}"
    );
    let mta_log = mta.child.log_text();
    assert!(mta_log.contains("authentication failed"), "{mta_log}");
    assert_no_secrets(&[msa_log, mta_log, list, shown]);
}

#[test]
fn encrypt_to_a_hop_without_starttls_stays_queued_and_may_does_not() {
    if !have_python() {
        return;
    }
    // The sink offers no STARTTLS.
    let dir = TempDir::new("relay-auth-notls");
    let pki = Pki::new(&dir);
    let sink = IdSink::start(Duration::ZERO);
    let ca = pki.ca.display().to_string();
    let msa = Msa::start(
        &dir,
        sink.addr,
        &["--relay-tls", "encrypt", "--relay-ca", &ca],
    );
    submit(msa.addr, 1, "notls");
    let list = msa.wait_queue("STARTTLS required but not offered");
    assert!(list.contains("bob@example.org  pending"), "{list}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(delivered(&sink), 0);
    drop(msa);

    let dir = TempDir::new("relay-auth-may");
    let msa = Msa::start(&dir, sink.addr, &["--relay-tls", "may"]);
    submit(msa.addr, 1, "maytls");
    wait_for(Duration::from_secs(30), || {
        (delivered(&sink) >= 1).then_some(())
    })
    .unwrap_or_else(|| panic!("not delivered with may: {}", msa.child.log_text()));
}

#[test]
fn encrypt_verifies_the_certificate() {
    if !have_python() {
        return;
    }
    // The MTA's certificate is from the test CA; pinning another CA fails the handshake (the
    // mail stays queued), `--relay-tls-no-verify` delivers.
    let dir = TempDir::new("relay-auth-verify");
    let pki = Pki::new(&dir);
    let other_dir = TempDir::new("relay-auth-other-ca");
    let other = Pki::new(&other_dir);
    let sink = IdSink::start(Duration::ZERO);
    let mta = Mta::start(&dir, &pki, sink.addr);
    let pw = dir.write("relay.pass", RELAY_PW);
    let pw = pw.display().to_string();
    let other_ca = other.ca.display().to_string();
    let auth = [
        "--relay-auth-user",
        "relay@example.test",
        "--relay-password-file",
        &pw,
    ];
    let mut args = vec!["--relay-tls", "encrypt", "--relay-ca", &other_ca];
    args.extend(auth);
    let msa = Msa::start(&dir, mta.addr, &args);
    submit(msa.addr, 1, "wrongca");
    let list = msa.wait_queue("TLS handshake");
    assert!(list.contains("bob@example.org  pending"), "{list}");
    assert_eq!(delivered(&sink), 0);
    drop(msa);

    let dir2 = TempDir::new("relay-auth-noverify");
    let mut args = vec!["--relay-tls", "encrypt", "--relay-tls-no-verify"];
    args.extend(auth);
    let msa = Msa::start(&dir2, mta.addr, &args);
    submit(msa.addr, 1, "noverify");
    wait_for(Duration::from_secs(30), || {
        (delivered(&sink) >= 1).then_some(())
    })
    .unwrap_or_else(|| panic!("not delivered: {}", msa.child.log_text()));
    assert_no_secrets(&[msa.child.log_text(), mta.child.log_text()]);
}

#[test]
fn config_mistakes_are_refused_with_file_and_line() {
    let dir = TempDir::new("relay-auth-config");
    let pw = dir.write("relay.pass", &format!("{RELAY_PW}\n"));
    let base = format!(
        "[msa]\nhostname = \"smtp.example.test\"\nlisten = [\"127.0.0.1:2587\"]\naccounts = \"sqlite:{}\"\nspool = \"{}\"\nrelay = \"127.0.0.1:2525\"\n",
        dir.path().join("a.db").display(),
        dir.path().join("spool").display(),
    );
    // AUTH under `may`: refused (AUTH is only ever sent under a required TLS).
    let (code, out) = check_config(
        dir.path(),
        "msa",
        &format!(
            "{base}relay_tls = \"may\"\nrelay_auth = {{ user = \"relay@example.test\", password_file = \"{}\" }}\n",
            pw.display()
        ),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("msa.toml:8:") && out.contains("encrypt"),
        "{out}"
    );
    // An inline password: refused, and not echoed.
    let (code, out) = check_config(
        dir.path(),
        "msa",
        &format!(
            "{base}relay_tls = \"encrypt\"\nrelay_auth = {{ user = \"relay@example.test\", password = \"{RELAY_PW}\" }}\n"
        ),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("msa.toml:8:") && out.contains("password_file"),
        "{out}"
    );
    assert!(!out.contains(RELAY_PW), "{out}");
    // A good one passes and shows the hop's security without the password.
    let (code, out) = check_config(
        dir.path(),
        "msa",
        &format!(
            "{base}relay_tls = {{ level = \"encrypt\", verify = false }}\nrelay_auth = {{ user = \"relay@example.test\", password_file = \"{}\" }}\n",
            pw.display()
        ),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("auth as relay@example.test"), "{out}");
    assert!(!out.contains(RELAY_PW), "{out}");
    // The MX: credentials for the bounce route need `bounce_tls = "encrypt"`.
    let (code, out) = check_config(
        dir.path(),
        "mx",
        &format!(
            "[mx]\nhostname = \"mx.example.test\"\nlisten = [\"127.0.0.1:2525\"]\ndomains = [\"example.test\"]\nspool = \"/tmp/x\"\n[mx.relay]\nnext_hop = \"127.0.0.1:24\"\nbounce_auth = {{ user = \"mx\", password_file = \"{}\" }}\n",
            pw.display()
        ),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("mx.toml:8:") && out.contains("bounce_auth"),
        "{out}"
    );
    // Quick mode: AUTH without --relay-tls encrypt is refused at start.
    let (st, out) = run_bounded(
        Command::new(RINGMAIL)
            .args([
                "msa",
                "--listen",
                "127.0.0.1:2587",
                "--accounts",
                "sqlite:/nonexistent.db",
            ])
            .args(["--spool", "/nonexistent", "--relay", "127.0.0.1:2525"])
            .args([
                "--relay-auth-user",
                "relay@example.test",
                "--relay-password-file",
            ])
            .arg(&pw),
        Duration::from_secs(20),
    );
    assert!(!st.success(), "{out}");
    assert!(out.contains("encrypt"), "{out}");
    assert!(!out.contains(RELAY_PW), "{out}");
}
