//! `ringmail mta` against real peers: a private Postfix instance as the remote domains' MX
//! (virtual mailboxes in a Maildir, STARTTLS, per-recipient 4xx/5xx from an access map),
//! NSD serving the test zones (MX order, implicit MX, null MX), dkimpy verifying the DKIM
//! signatures (RSA and Ed25519), Python's smtplib as the submitting client, and a Python
//! server that injects a reply behind its STARTTLS answer.
//!
//! Every remote address is on loopback (127.0.0.2, 127.0.0.3, ...: Linux routes all of
//! 127/8 to `lo`); the MTA's `--remote-port` points it at the port Postfix listens on there.
//! Every wait is bounded; every process is killed when its guard drops. A test that lacks a
//! tool prints `SKIP:` and returns, unless `RINGMAIL_REQUIRE_ALL=1`, when it fails.
//!
//! Debian packages: postfix, nsd, python3, python3-dkim, python3-nacl, openssl.

#[macro_use]
mod common;
#[path = "../roles/mailauth/tests/common/mod.rs"]
mod dnsfix;
#[path = "common/postfix.rs"]
mod postfix;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use postfix::{POSTFIX, Postfix};

const PY: &str = "/usr/bin/python3";
const OPENSSL: &str = "/usr/bin/openssl";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringmail")
}

fn have(tools: &[&str]) -> bool {
    for t in tools {
        if !Path::new(t).exists() {
            skip(&format!("{t} not installed"));
            return false;
        }
    }
    true
}

/// A running `ringmail mta`, killed on drop.
struct Mta {
    addr: SocketAddr,
    admin: SocketAddr,
    spool: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<ChildGuard>,
    starts: u32,
}

impl Mta {
    fn start(dir: &Path, extra: &[String]) -> Mta {
        Mta::start_on(dir, free_addr(), extra)
    }

    fn start_on(dir: &Path, addr: SocketAddr, extra: &[String]) -> Mta {
        let admin = free_addr();
        let spool = dir.join("mta-spool");
        let mut args: Vec<String> = vec![
            "mta".into(),
            "--listen".into(),
            addr.to_string(),
            "--spool".into(),
            spool.display().to_string(),
            "--hostname".into(),
            "mta.example.test".into(),
            "--admin".into(),
            admin.to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut m = Mta {
            addr,
            admin,
            spool,
            args,
            dir: dir.to_path_buf(),
            child: None,
            starts: 0,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        self.child = None;
        self.starts += 1;
        let mut cmd = Command::new(bin());
        cmd.args(&self.args).env("RUST_LOG", "info");
        let log = self.dir.join(format!("mta-{}.log", self.starts));
        self.child = Some(ChildGuard::spawn("ringmail mta", &mut cmd, log).expect("spawn"));
        assert!(
            wait_for(Duration::from_secs(20), || TcpStream::connect(self.addr)
                .ok()
                .map(|_| ()))
            .is_some(),
            "the MTA did not listen:\n{}",
            self.log()
        );
    }

    fn kill9(&mut self) {
        if let Some(c) = &self.child {
            c.signal(libc::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait_timeout(Duration::from_secs(10));
        }
    }

    fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| fs::read_to_string(self.dir.join(format!("mta-{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    fn queue(&self, args: &[&str]) -> String {
        let (st, out) = run_bounded(
            Command::new(bin())
                .arg("queue")
                .arg("--spool")
                .arg(&self.spool)
                .arg("--admin")
                .arg(self.admin.to_string())
                .args(args),
            Duration::from_secs(30),
        );
        assert!(st.success(), "ringmail queue {args:?}: {out}");
        out
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

/// Submits one message with Python's smtplib; returns what it printed (the refusals).
fn submit(addr: SocketAddr, from: &str, to: &[&str], msg: &str) -> String {
    let script = format!(
        "import smtplib, sys\n\
         s = smtplib.SMTP('{ip}', {port}, timeout=30)\n\
         s.ehlo('msa.example.test')\n\
         r = s.sendmail({from:?}, {to:?}, sys.stdin.buffer.read())\n\
         print('refused', r)\n\
         s.quit()\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    let mut child = Command::new(PY)
        .arg("-c")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(msg.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            let _ = child.stdout.take().unwrap().read_to_string(&mut out);
            let _ = child.stderr.take().unwrap().read_to_string(&mut out);
            assert!(st.success(), "smtplib: {out}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("smtplib did not finish within 60 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn message(from: &str, to: &str, subject: &str, body: &str) -> String {
    format!(
        "From: Alice <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 03:00:00 +0000\r\nMessage-ID: <{}@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        subject.replace(' ', "-")
    )
}

/// `ringmail dkim keygen`: writes the key; returns (record name, TXT data).
fn keygen(dir: &Path, algo: &str, selector: &str) -> (PathBuf, String, String) {
    let key = dir.join(format!("{selector}.key"));
    let (st, out) = run_bounded(
        Command::new(bin())
            .args(["dkim", "keygen", "--domain", "example.test", "--selector"])
            .arg(selector)
            .args(["--algo", algo, "--out"])
            .arg(&key),
        Duration::from_secs(60),
    );
    assert!(st.success(), "dkim keygen: {out}");
    let line = out
        .lines()
        .find(|l| l.contains("_domainkey"))
        .unwrap_or_else(|| panic!("no record printed: {out}"))
        .to_string();
    let name = line
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('.')
        .to_string();
    assert_eq!(
        name,
        format!("{selector}._domainkey.example.test"),
        "{line}"
    );
    // The TXT data: every quoted string of the record, concatenated.
    let mut txt = String::new();
    let mut rest = line.as_str();
    while let Some(i) = rest.find('"') {
        let after = &rest[i + 1..];
        let j = after.find('"').expect("closing quote");
        txt.push_str(&after[..j]);
        rest = &after[j + 1..];
    }
    assert!(txt.starts_with("v=DKIM1;"), "{txt}");
    (key, name, txt)
}

/// Header fields of a message, unfolded.
fn headers(msg: &str) -> Vec<String> {
    let head = msg
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n", "\n");
    let head = head.split("\n\n").next().unwrap_or("");
    let mut out: Vec<String> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(l) = out.last_mut() {
                l.push(' ');
                l.push_str(line.trim());
            }
        } else {
            out.push(line.to_string());
        }
    }
    out
}

/// The Postfix that plays the remote domains' MX on `ip:port`: virtual mailboxes for
/// remote.test, implicit.test and example.test (so our own bounces land there too), all in
/// one Maildir `inbox`; `nobody@remote.test` refused with 550, `later@remote.test` with 450.
fn remote_mx(dir: &Path, ip: IpAddr, port: u16) -> Postfix {
    let uid = String::from_utf8(
        Command::new("id")
            .args(["-u", "postfix"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let gid = String::from_utf8(
        Command::new("id")
            .args(["-g", "postfix"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let (crt, key) = self_signed(dir, "remote", "mx2.remote.test");
    let pf = Postfix::with_config(
        "postfix-remote",
        &format!(
            "myhostname = mx2.remote.test\nmydomain = remote.test\nmydestination =\n\
             inet_interfaces = loopback-only\ninet_protocols = ipv4\nmynetworks =\n\
             smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {crt}\nsmtpd_tls_key_file = {key}\n\
             smtpd_tls_received_header = yes\nsmtpd_tls_loglevel = 1\n\
             virtual_mailbox_domains = remote.test implicit.test example.test\n\
             virtual_mailbox_base = {base}\nvirtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:{uid}\nvirtual_gid_maps = static:{gid}\nvirtual_minimum_uid = 1\n\
             smtpd_recipient_restrictions = check_recipient_access inline:{{ {{ nobody@remote.test = 550 5.1.1 no such user here }}, {{ later@remote.test = 450 4.2.1 mailbox busy, try later }} }}, permit_mynetworks, reject_unauth_destination\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n",
            crt = crt.display(),
            key = key.display(),
            base = dir.join("postfix-mail").display(),
            uid = uid.trim(),
            gid = gid.trim(),
        ),
        &format!("{ip}:{port} inet n - n - - smtpd\n"),
    );
    let base = dir.join("postfix-mail");
    fs::create_dir_all(&base).unwrap();
    run_bounded(
        Command::new("chown").args(["-R", "postfix"]).arg(&base),
        Duration::from_secs(5),
    );
    run_bounded(
        Command::new("chmod").arg("755").arg(dir),
        Duration::from_secs(5),
    );
    pf
}

/// An RSA certificate for `cn`, self-signed with openssl: (`name.crt`, `name.key`) in `dir`.
fn self_signed(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let (st, out) = run_bounded(
        Command::new(OPENSSL)
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            ])
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
        Duration::from_secs(60),
    );
    assert!(st.success(), "openssl: {out}");
    (crt, key)
}

fn inbox(dir: &Path) -> Vec<String> {
    let new = dir.join("postfix-mail/inbox/new");
    let mut files: Vec<_> = fs::read_dir(&new)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|p| fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

/// Waits until a message in the inbox satisfies `f`.
fn wait_inbox(dir: &Path, secs: u64, f: impl Fn(&str) -> bool) -> Option<String> {
    wait_for(Duration::from_secs(secs), || {
        inbox(dir).into_iter().find(|m| f(m))
    })
}

fn with_crlf(m: &str) -> Vec<u8> {
    m.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
}

#[test]
fn mta_delivers_through_dns_to_postfix_with_dkim_retries_and_bounces() {
    if !have(&[POSTFIX, PY, OPENSSL]) || !dnsfix::tools_available(&["nsd"]) {
        return;
    }
    if !dkimverify::dkimpy_available() {
        return;
    }
    if !is_root() {
        skip("a private Postfix instance needs root");
        return;
    }
    let tmp = TempDir::new("mta-e2e");
    let dir = tmp.path().to_path_buf();
    let (rsa_key, rsa_name, rsa_txt) = keygen(&dir, "rsa", "rsa2026");
    let (ed_key, ed_name, ed_txt) = keygen(&dir, "ed25519", "ed2026");
    let records = vec![(rsa_name, rsa_txt.clone()), (ed_name, ed_txt.clone())];

    // mx1 (127.0.0.2) has nothing listening: the first MX is down.
    let mx2: IpAddr = "127.0.0.3".parse().unwrap();
    let port = free_port_on(mx2);
    let zones = [
        dnsfix::Zone::new("remote.test")
            .rr("@ MX 10 mx1.remote.test.")
            .rr("@ MX 20 mx2.remote.test.")
            .rr("mx1 A 127.0.0.2")
            .rr("mx2 A 127.0.0.3"),
        dnsfix::Zone::new("implicit.test").rr("@ A 127.0.0.3"),
        dnsfix::Zone::new("nullmx.test").rr("@ MX 0 ."),
        // Neither MX nor A nor AAAA: every lookup answers NODATA.
        dnsfix::Zone::new("noaddr.test").txt("@", "v=spf1 -all"),
        dnsfix::Zone::new("example.test")
            .rr("@ MX 10 mx2.remote.test.")
            .txt("rsa2026._domainkey", &rsa_txt)
            .txt("ed2026._domainkey", &ed_txt),
    ];
    let dns = dnsfix::DnsServer::start(&zones);
    let pf = remote_mx(&dir, mx2, port);
    pf.start();
    let mta = Mta::start(
        &dir,
        &[
            "--resolver".into(),
            dns.addr().to_string(),
            "--remote-port".into(),
            port.to_string(),
            "--dkim".into(),
            format!("example.test:rsa2026:{}", rsa_key.display()),
            "--dkim".into(),
            format!("example.test:ed2026:{}", ed_key.display()),
            "--delay-warning".into(),
            "6s".into(),
        ],
    );
    let ctx = |what: &str| {
        format!(
            "{what}\n--- MTA log:\n{}\n--- Postfix maillog:\n{}\n--- queue:\n{}",
            mta.log(),
            pf.maillog(),
            mta.queue(&["list"])
        )
    };

    // 1. Two domains in one message: remote.test (first MX down, the second takes it) and
    //    implicit.test (no MX: its A record). Both signed with RSA and Ed25519.
    let m1 = message(
        "alice@example.test",
        "bob@remote.test",
        "two domains",
        "Hello over DNS.",
    );
    submit(
        mta.addr,
        "alice@example.test",
        &["bob@remote.test", "carol@implicit.test"],
        &m1,
    );
    let got_bob = wait_inbox(&dir, 60, |m| {
        m.contains("two-domains") && m.contains("bob@remote.test")
    })
    .unwrap_or_else(|| panic!("{}", ctx("bob@remote.test not delivered")));
    let got_carol = wait_inbox(&dir, 60, |m| {
        m.contains("two-domains") && m.contains("carol@implicit.test")
    })
    .unwrap_or_else(|| panic!("{}", ctx("carol@implicit.test (implicit MX) not delivered")));
    for got in [&got_bob, &got_carol] {
        let h = headers(got);
        // Postfix's Received shows the TLS session (opportunistic STARTTLS).
        let received = h
            .iter()
            .find(|l| l.starts_with("Received: from mta.example.test"))
            .unwrap_or_else(|| panic!("no Received from us: {got}"));
        assert!(received.contains("using TLS"), "{received}");
        let results = dkimverify::dkim_verify(&with_crlf(got), &records)
            .unwrap_or_else(|e| panic!("dkimverify: {e}\n{got}"));
        assert_eq!(results.len(), 2, "{results:?}\n{got}");
        assert!(
            results
                .iter()
                .any(|r| r.contains("a=rsa-sha256") && r.ends_with("pass")),
            "{results:?}"
        );
        assert!(
            results
                .iter()
                .any(|r| r.contains("a=ed25519-sha256") && r.ends_with("pass")),
            "{results:?}"
        );
    }
    // An altered body fails both signatures.
    let altered = with_crlf(&got_bob.replace("Hello over DNS.", "Hello over DNS!"));
    let results = dkimverify::dkim_verify(&altered, &records).unwrap();
    assert!(
        results.iter().all(|r| r.contains(" fail")),
        "altered body still verifies: {results:?}"
    );
    let log = pf.maillog();
    assert!(
        log.contains("TLS connection established from"),
        "no TLS in Postfix's log:\n{log}"
    );

    // 2. 5xx from the remote: one DSN to the sender, through our own MTA, signed.
    let m2 = message(
        "alice@example.test",
        "nobody@remote.test",
        "to nobody",
        "Nobody reads this.",
    );
    submit(mta.addr, "alice@example.test", &["nobody@remote.test"], &m2);
    let dsn = wait_inbox(&dir, 60, |m| {
        m.contains("alice@example.test")
            && m.contains("multipart/report")
            && m.contains("nobody@remote.test")
    })
    .unwrap_or_else(|| panic!("{}", ctx("no DSN for the 5xx")));
    let h = headers(&dsn);
    assert!(
        h.iter()
            .any(|l| l.to_ascii_lowercase().starts_with("return-path: <>")),
        "a DSN has a null sender: {dsn}"
    );
    assert!(dsn.contains("report-type=delivery-status"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; nobody@remote.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Action: failed"), "{dsn}");
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(
        dsn.contains("550 5.1.1"),
        "the remote's reply is quoted: {dsn}"
    );
    let results = dkimverify::dkim_verify(&with_crlf(&dsn), &records).unwrap();
    assert!(
        !results.is_empty() && results.iter().all(|r| r.ends_with("pass")),
        "the DSN is signed for example.test: {results:?}"
    );

    // 3. Null MX: an immediate bounce, no retry.
    let m3 = message(
        "alice@example.test",
        "x@nullmx.test",
        "to null mx",
        "Nowhere.",
    );
    submit(mta.addr, "alice@example.test", &["x@nullmx.test"], &m3);
    let dsn = wait_inbox(&dir, 60, |m| {
        m.contains("multipart/report") && m.contains("x@nullmx.test")
    })
    .unwrap_or_else(|| panic!("{}", ctx("no DSN for the null MX")));
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");

    // 3b. No MX and no address record (RFC 5321 section 5.1): a bounce at once, 5.4.4, as
    //     Postfix does, not a retry for days.
    let m3b = message(
        "alice@example.test",
        "x@noaddr.test",
        "to no address",
        "Nowhere either.",
    );
    submit(mta.addr, "alice@example.test", &["x@noaddr.test"], &m3b);
    let dsn = wait_inbox(&dir, 60, |m| {
        m.contains("multipart/report") && m.contains("x@noaddr.test")
    })
    .unwrap_or_else(|| panic!("{}", ctx("no DSN for the domain without addresses")));
    assert!(dsn.contains("Status: 5.4.4"), "{dsn}");
    assert!(dsn.contains("no MX and no address record"), "{dsn}");
    // The delivery log names each recipient, the MX host that answered and the outcome.
    let log = mta.log();
    assert!(
        log.lines().any(|l| l.contains("to=bob@remote.test")
            && l.contains(&format!("relay=mx2.remote.test[127.0.0.3]:{port}"))
            && l.contains("dsn=2.0.0")
            && l.contains("status=sent")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("to=nobody@remote.test")
            && l.contains("dsn=5.1.1")
            && l.contains("status=bounced")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("to=x@noaddr.test")
            && l.contains("relay=none")
            && l.contains("status=bounced")),
        "{log}"
    );

    // 4. 4xx: the message stays queued with the remote's reply, then goes when it recovers.
    let m4 = message(
        "alice@example.test",
        "later@remote.test",
        "deferred once",
        "Patience.",
    );
    submit(mta.addr, "alice@example.test", &["later@remote.test"], &m4);
    let listed = wait_for(Duration::from_secs(60), || {
        let l = mta.queue(&["list"]);
        (l.contains("later@remote.test") && l.contains("450 4.2.1")).then_some(l)
    })
    .unwrap_or_else(|| panic!("{}", ctx("the 4xx was not recorded")));
    assert!(listed.contains("next attempt"), "{listed}");
    // Still deferred after --delay-warning (6 s): one delay notice to the sender (RFC 3464
    // Action: delayed), and the message stays queued.
    std::thread::sleep(Duration::from_secs(6));
    mta.queue(&["flush"]);
    let notice = wait_inbox(&dir, 60, |m| {
        m.contains("multipart/report") && m.contains("later@remote.test")
    })
    .unwrap_or_else(|| panic!("{}", ctx("no delay notice")));
    assert!(notice.contains("Action: delayed"), "{notice}");
    assert!(notice.contains("Status: 4.2.1"), "{notice}");
    assert!(
        headers(&notice)
            .iter()
            .any(|l| l.to_ascii_lowercase().starts_with("return-path: <>")),
        "a delay notice has a null sender: {notice}"
    );
    assert!(mta.queue(&["list"]).contains("later@remote.test"));
    pf.reconfigure(&[
        "smtpd_recipient_restrictions = check_recipient_access inline:{ { nobody@remote.test = 550 5.1.1 no such user here } }, permit_mynetworks, reject_unauth_destination",
    ]);
    mta.queue(&["flush"]);
    wait_inbox(&dir, 60, |m| m.contains("deferred-once"))
        .unwrap_or_else(|| panic!("{}", ctx("not delivered after the remote recovered")));
    assert!(
        wait_for(Duration::from_secs(20), || mta
            .queue(&["list"])
            .contains("Mail queue is empty")
            .then_some(()))
        .is_some(),
        "{}",
        ctx("the queue is not empty")
    );

    // 5. Several messages for one destination share connections.
    for i in 0..6 {
        let m = message(
            "alice@example.test",
            "bob@remote.test",
            &format!("burst {i}"),
            "x",
        );
        submit(mta.addr, "alice@example.test", &["bob@remote.test"], &m);
    }
    for i in 0..6 {
        wait_inbox(&dir, 60, |m| m.contains(&format!("burst-{i}")))
            .unwrap_or_else(|| panic!("{}", ctx("burst not delivered")));
    }
    let reused = mta
        .metric("ringmail_mta_connections_reused_total")
        .unwrap_or(0.0);
    assert!(
        reused >= 1.0,
        "{}",
        ctx(&format!("no connection reuse: {reused}"))
    );
}

// ---------------------------------------------------------------------------------------------
// A remote that answers STARTTLS with 220 and an injected reply in the same packet

const INJECTOR: &str = r#"
import socket, ssl, sys
crt, key, port_file, out_file = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(crt, key)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(5)
open(port_file, "w").write(str(srv.getsockname()[1]))
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(30)
log = []
def lines(f):
    while True:
        l = f.readline()
        if not l:
            return
        log.append(l.decode("latin-1").rstrip("\r\n"))
        yield l
conn.sendall(b"220 inject.test ESMTP\r\n")
f = conn.makefile("rb")
for l in lines(f):
    u = l.upper()
    if u.startswith(b"EHLO"):
        conn.sendall(b"250-inject.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    elif u.startswith(b"STARTTLS"):
        # The attack: a reply the client must not take as the answer to its next command.
        conn.sendall(b"220 2.0.0 go ahead\r\n250-injected.test\r\n250 AUTH PLAIN\r\n")
        break
tls = ctx.wrap_socket(conn, server_side=True)
f = tls.makefile("rb")
data = False
for l in lines(f):
    u = l.upper()
    if data:
        if l == b".\r\n":
            data = False
            tls.sendall(b"250 2.0.0 queued\r\n")
        continue
    if u.startswith(b"EHLO"):
        tls.sendall(b"250-inject.test\r\n250 PIPELINING\r\n")
    elif u.startswith(b"MAIL") or u.startswith(b"RCPT"):
        tls.sendall(b"250 2.1.0 ok\r\n")
    elif u.startswith(b"DATA"):
        data = True
        tls.sendall(b"354 go\r\n")
    elif u.startswith(b"QUIT"):
        tls.sendall(b"221 bye\r\n")
        break
    else:
        tls.sendall(b"500 what\r\n")
open(out_file, "w").write("\n".join(log))
"#;

#[test]
fn starttls_reply_injection_by_the_remote_is_discarded() {
    if !have(&[PY, OPENSSL]) {
        return;
    }
    let tmp = TempDir::new("mta-inject");
    let dir = tmp.path().to_path_buf();
    let (crt, key) = self_signed(&dir, "i", "inject.test");
    let script = dir.join("inject.py");
    fs::write(&script, INJECTOR).unwrap();
    let port_file = dir.join("port");
    let out_file = dir.join("session.txt");
    let mut cmd = Command::new(PY);
    cmd.arg(&script)
        .arg(&crt)
        .arg(&key)
        .arg(&port_file)
        .arg(&out_file);
    let _server = ChildGuard::spawn("injector", &mut cmd, dir.join("inject.log")).unwrap();
    let port: u16 = wait_for(Duration::from_secs(20), || {
        fs::read_to_string(&port_file).ok()?.trim().parse().ok()
    })
    .expect("injector did not start");
    let mta = Mta::start(
        &dir,
        &[
            "--relay".into(),
            format!("127.0.0.1:{port}"),
            "--no-mta-sts".into(),
        ],
    );
    submit(
        mta.addr,
        "alice@example.test",
        &["bob@inject.test"],
        &message("alice@example.test", "bob@inject.test", "inject", "x"),
    );
    let session = wait_for(Duration::from_secs(60), || {
        fs::read_to_string(&out_file).ok()
    })
    .unwrap_or_else(|| panic!("no session recorded:\n{}", mta.log()));
    // After the handshake the client said EHLO again (it did not take the injected 250 as
    // the answer), then ran the transaction.
    let after: Vec<&str> = session
        .lines()
        .skip_while(|l| !l.to_ascii_uppercase().starts_with("STARTTLS"))
        .skip(1)
        .collect();
    assert!(
        after
            .first()
            .is_some_and(|l| l.to_ascii_uppercase().starts_with("EHLO")),
        "{session}"
    );
    assert!(
        after
            .iter()
            .any(|l| l.starts_with("MAIL FROM:<alice@example.test>")),
        "{session}"
    );
    assert!(
        wait_for(Duration::from_secs(20), || mta
            .queue(&["list"])
            .contains("Mail queue is empty")
            .then_some(()))
        .is_some(),
        "not delivered:\n{}",
        mta.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Crash safety: kill -9 while delivering

#[test]
fn kill9_during_delivery_loses_no_acknowledged_message() {
    if !have(&[PY]) {
        return;
    }
    let tmp = TempDir::new("mta-crash");
    let dir = tmp.path().to_path_buf();
    // A slow remote (1 s per message, 20 connections): the messages accepted in the last second
    // before the kill are still in delivery however fast the MTA signs and sends.
    let sink = IdSink::start(Duration::from_secs(1));
    let mut mta = Mta::start(
        &dir,
        &[
            "--relay".into(),
            sink.addr.to_string(),
            "--no-mta-sts".into(),
        ],
    );
    const N: usize = 60;
    let script = format!(
        "import smtplib\n\
         s = smtplib.SMTP('{ip}', {port}, timeout=30)\n\
         for i in range({N}):\n\
         \x20   s.sendmail('alice@example.test', ['bob@remote.test'], ('From: <alice@example.test>\\r\\nMessage-ID: <crash-%d@example.test>\\r\\nSubject: %d\\r\\n\\r\\nbody\\r\\n' % (i, i)).encode())\n\
         s.quit()\n",
        ip = mta.addr.ip(),
        port = mta.addr.port()
    );
    let (st, out) = run_bounded(
        Command::new(PY).arg("-c").arg(&script),
        Duration::from_secs(120),
    );
    assert!(st.success(), "smtplib: {out}");
    // Every message was acknowledged; kill the MTA while it is still delivering.
    assert!(
        wait_for(Duration::from_secs(30), || (!sink
            .ids
            .lock()
            .unwrap()
            .is_empty())
        .then_some(()))
        .is_some(),
        "no delivery started:\n{}",
        mta.log()
    );
    mta.kill9();
    let before = sink.ids.lock().unwrap().len();
    assert!(
        before < N,
        "everything was delivered before the kill ({before})"
    );
    mta.restart();
    let all = wait_for(Duration::from_secs(90), || {
        (sink.ids.lock().unwrap().len() >= N).then_some(())
    });
    let ids = sink.ids.lock().unwrap().clone();
    let dups: usize = ids.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {before} delivered before kill -9, {} unique after restart, {dups} duplicates",
        ids.len()
    );
    assert!(
        all.is_some(),
        "only {} of {N} messages delivered after the restart:\n{}",
        ids.len(),
        mta.log()
    );
    for i in 0..N {
        assert!(
            ids.contains_key(&format!("<crash-{i}@example.test>")),
            "lost crash-{i}"
        );
    }
    assert!(dups <= 20, "too many duplicates: {dups}");
}

// ---------------------------------------------------------------------------------------------
// Nothing from outside: only trusted clients relay

#[test]
fn untrusted_clients_are_refused_and_bad_configs_are_reported() {
    let tmp = TempDir::new("mta-refuse");
    let dir = tmp.path().to_path_buf();
    // Loopback is not trusted here, and there is no AUTH: 554 at connect.
    let mta = Mta::start(
        &dir,
        &[
            "--relay".into(),
            "127.0.0.1:9".into(),
            "--trusted".into(),
            "10.0.0.0/8".into(),
        ],
    );
    let s = TcpStream::connect(mta.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.starts_with("554 5.7.1"), "{line}");
    assert!(
        mta.queue(&["list"]).contains("Mail queue is empty"),
        "{}",
        mta.log()
    );

    // --check reports every error with file and line, and exits 2.
    let (code, out) = check_config(
        &dir,
        "mta",
        "[mta]\nhostname = \"mta\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/tmp/x\"\nmax_per_destination = 0\ncolour = \"blue\"\n",
    );
    assert_eq!(code, Some(2), "{out}");
    let err = out;
    for want in ["mta.toml:2:", "mta.toml:5:", "mta.toml:6:", "colour"] {
        assert!(err.contains(want), "{want} missing from {err}");
    }
    // A missing key file is a configuration error too.
    let (code, out) = check_config(
        &dir,
        "mta",
        "[mta]\nhostname = \"mta.example.test\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/tmp/x\"\ndkim = [{ domain = \"example.test\", selector = \"s1\", key = \"/nonexistent/s1.key\" }]\n",
    );
    assert_eq!(code, Some(2), "{out}");
    let err = out;
    assert!(err.contains("/nonexistent/s1.key"), "{err}");
    // Transports: checked with file and line, and listed when good.
    let (code, out) = check_config(
        &dir,
        "mta",
        "[mta]\nhostname = \"mta.example.test\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/tmp/x\"\ntransport = { \"example.test\" = \"10.0.0.10\" }\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("mta.toml:5:") && out.contains("mta.transport.example.test"),
        "{out}"
    );
    let (code, out) = check_config(
        &dir,
        "mta",
        "[mta]\nhostname = \"mta.example.test\"\nlisten = [\"127.0.0.1:25\"]\nspool = \"/tmp/x\"\ntransport = { \"Example.Test\" = [\"10.0.0.10:25\", \"10.0.0.11:25\"] }\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("example.test to 10.0.0.10:25, 10.0.0.11:25; other domains by MX lookups"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// MTA-STS: policies fetched over HTTPS, enforce mode honoured

const POLICY_SERVER: &str = r#"
import http.server, ssl, sys
crt, key, ip, root = sys.argv[1:5]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        try:
            body = open(root + "/" + host + ".txt", "rb").read()
        except OSError:
            self.send_error(404)
            return
        if self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        sys.stderr.write((a[0] % a[1:]) + "\n")
srv = http.server.HTTPServer((ip, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(crt, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

#[test]
fn mta_sts_enforce_refuses_unlisted_mx_and_plaintext() {
    if !have(&[PY, OPENSSL]) || !dnsfix::tools_available(&["nsd"]) {
        return;
    }
    if !is_root() {
        skip("the MTA-STS policy server listens on port 443, which needs root");
        return;
    }
    let tmp = TempDir::new("mta-sts");
    let dir = tmp.path().to_path_buf();
    let domains = ["mismatch.test", "notls.test", "testing.test"];
    // A lab CA and one certificate for every mta-sts.<domain> name.
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.crt");
    let key = dir.join("sts.key");
    let csr = dir.join("sts.csr");
    let crt = dir.join("sts.crt");
    let ext = dir.join("ext.cnf");
    let sans: Vec<String> = domains.iter().map(|d| format!("DNS:mta-sts.{d}")).collect();
    fs::write(&ext, format!("subjectAltName={}\n", sans.join(","))).unwrap();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ringmail test CA",
            "-keyout",
            ca_key.to_str().unwrap(),
            "-out",
            ca.to_str().unwrap(),
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=mta-sts.testing.test",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ],
        vec![
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ],
    ] {
        let (st, out) = run_bounded(Command::new(OPENSSL).args(&args), Duration::from_secs(60));
        assert!(st.success(), "openssl {args:?}: {out}");
    }
    let policies = dir.join("policies");
    fs::create_dir_all(&policies).unwrap();
    for (d, mode, mx) in [
        ("mismatch.test", "enforce", "mx.elsewhere.test"),
        ("notls.test", "enforce", "mx.notls.test"),
        ("testing.test", "testing", "mx.elsewhere.test"),
    ] {
        fs::write(
            policies.join(format!("mta-sts.{d}.txt")),
            format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"),
        )
        .unwrap();
    }
    let https_ip = "127.0.0.4";
    let script = dir.join("policy.py");
    fs::write(&script, POLICY_SERVER).unwrap();
    let mut cmd = Command::new(PY);
    cmd.arg(&script)
        .arg(&crt)
        .arg(&key)
        .arg(https_ip)
        .arg(&policies);
    let _https = ChildGuard::spawn("policy server", &mut cmd, dir.join("policy.log")).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || TcpStream::connect((
            https_ip, 443
        ))
        .ok()
        .map(|_| ()))
        .is_some(),
        "policy server did not start"
    );
    // Every MX is a plaintext SMTP server (no STARTTLS) on 127.0.0.6.
    let mx_ip: IpAddr = "127.0.0.6".parse().unwrap();
    let port = free_port_on(mx_ip);
    let sink = IdSink::start_on(SocketAddr::new(mx_ip, port), Duration::ZERO);
    let zones: Vec<dnsfix::Zone> = domains
        .iter()
        .map(|d| {
            let label = d.split('.').next().unwrap();
            dnsfix::Zone::new(d)
                .rr(&format!("@ MX 10 mx.{d}."))
                .rr("mx A 127.0.0.6")
                .rr(&format!("mta-sts A {https_ip}"))
                .txt("_mta-sts", &format!("v=STSv1; id={label}1;"))
        })
        .collect();
    let dns = dnsfix::DnsServer::start(&zones);
    let mta = Mta::start(
        &dir,
        &[
            "--resolver".into(),
            dns.addr().to_string(),
            "--remote-port".into(),
            port.to_string(),
            "--mta-sts-ca".into(),
            ca.display().to_string(),
        ],
    );
    for d in domains {
        submit(
            mta.addr,
            "alice@example.test",
            &[&format!("u@{d}")],
            &message(
                "alice@example.test",
                &format!("u@{d}"),
                &format!("to {d}"),
                "x",
            ),
        );
    }
    // testing mode: delivered in plaintext to the unlisted MX (the policy only reports).
    assert!(
        wait_for(Duration::from_secs(60), || sink
            .ids
            .lock()
            .unwrap()
            .contains_key("<to-testing.test@example.test>")
            .then_some(()))
        .is_some(),
        "testing-mode domain not delivered:\n{}",
        mta.log()
    );
    // enforce mode: an MX the policy does not list is never used; a listed one without TLS
    // is not used either. Both stay queued with the reason.
    let listed = wait_for(Duration::from_secs(60), || {
        let l = mta.queue(&["list"]);
        (l.contains("u@mismatch.test")
            && l.contains("4.7.5")
            && l.contains("u@notls.test")
            && l.contains("STARTTLS"))
        .then_some(l)
    })
    .unwrap_or_else(|| {
        panic!(
            "enforce not applied:\n{}\n{}",
            mta.queue(&["list"]),
            mta.log()
        )
    });
    let ids = sink.ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 1, "{ids:?}\n{listed}");
    assert!(
        mta.metric("ringmail_mta_sts_enforced_total").unwrap_or(0.0) >= 2.0,
        "{}",
        mta.log()
    );
}

// ---------------------------------------------------------------------------------------------
// IPv6 MX hosts, and a remote that cannot take what we have

#[test]
fn delivers_to_an_ipv6_only_mx() {
    if !have(&[PY]) || !dnsfix::tools_available(&["nsd"]) {
        return;
    }
    if let Err(e) = ipv6_available() {
        skip(&e);
        return;
    }
    let tmp = TempDir::new("mta-v6");
    let dir = tmp.path().to_path_buf();
    let port = free_port_on("::1".parse().unwrap());
    let sink = IdSink::start_on(
        SocketAddr::new("::1".parse().unwrap(), port),
        Duration::ZERO,
    );
    let dns = dnsfix::DnsServer::start(&[dnsfix::Zone::new("v6.test")
        .rr("@ MX 10 mx.v6.test.")
        .rr("mx AAAA ::1")]);
    let mta = Mta::start(
        &dir,
        &[
            "--resolver".into(),
            dns.addr().to_string(),
            "--remote-port".into(),
            port.to_string(),
            "--no-mta-sts".into(),
        ],
    );
    submit(
        mta.addr,
        "alice@example.test",
        &["u@v6.test"],
        &message("alice@example.test", "u@v6.test", "over v6", "x"),
    );
    assert!(
        wait_for(Duration::from_secs(60), || sink
            .ids
            .lock()
            .unwrap()
            .contains_key("<over-v6@example.test>")
            .then_some(()))
        .is_some(),
        "not delivered over IPv6:\n{}\n{}",
        mta.queue(&["list"]),
        mta.log()
    );
}

#[test]
fn smtputf8_mail_to_a_remote_without_it_bounces() {
    if !have(&[PY]) || !dnsfix::tools_available(&["nsd"]) {
        return;
    }
    let tmp = TempDir::new("mta-utf8");
    let dir = tmp.path().to_path_buf();
    // example.net's MX offers neither SMTPUTF8 nor 8BITMIME; example.test's (where the bounce
    // goes) offers both.
    let ip: IpAddr = "127.0.0.7".parse().unwrap();
    let port = free_port_on(ip);
    let old = IdSink::start_on(SocketAddr::new(ip, port), Duration::ZERO);
    let ip2: IpAddr = "127.0.0.8".parse().unwrap();
    let home = IdSink::start_with(
        SocketAddr::new(ip2, port),
        Duration::ZERO,
        "250-8BITMIME\r\n250-SMTPUTF8\r\n",
    );
    let dns = dnsfix::DnsServer::start(&[
        dnsfix::Zone::new("example.net")
            .rr("@ MX 10 mx.example.net.")
            .rr("mx A 127.0.0.7"),
        dnsfix::Zone::new("example.test")
            .rr("@ MX 10 mx.example.test.")
            .rr("mx A 127.0.0.8"),
    ]);
    let mta = Mta::start(
        &dir,
        &[
            "--resolver".into(),
            dns.addr().to_string(),
            "--remote-port".into(),
            port.to_string(),
            "--no-mta-sts".into(),
        ],
    );
    let script = format!(
        "import smtplib\n\
         s = smtplib.SMTP('{ip}', {port}, timeout=30)\n\
         s.ehlo('msa.example.test')\n\
         msg = 'From: <alice@example.test>\\r\\nTo: <jörg@example.net>\\r\\nMessage-ID: <utf8@example.test>\\r\\nSubject: grüße\\r\\n\\r\\nhallo\\r\\n'.encode()\n\
         s.sendmail('alice@example.test', ['jörg@example.net'], msg, mail_options=['SMTPUTF8', 'BODY=8BITMIME'])\n\
         s.quit()\n",
        ip = mta.addr.ip(),
        port = mta.addr.port()
    );
    let (st, out) = run_bounded(
        Command::new(PY).arg("-c").arg(&script),
        Duration::from_secs(60),
    );
    assert!(st.success(), "smtplib: {out}");
    let dsn = wait_for(Duration::from_secs(60), || {
        let t = home.last.lock().unwrap().clone();
        t.contains("multipart/report").then_some(t)
    })
    .unwrap_or_else(|| panic!("no bounce:\n{}\n{}", mta.queue(&["list"]), mta.log()));
    assert!(dsn.contains("Status: 5.6.7"), "{dsn}");
    // About an SMTPUTF8 message, the report is an internationalised one (RFC 6533).
    assert!(dsn.contains("message/global-delivery-status"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: utf-8; jörg@example.net"),
        "{dsn}"
    );
    assert!(
        old.ids.lock().unwrap().is_empty(),
        "the UTF-8 message was sent to a server without SMTPUTF8"
    );
}

/// An MX that is this MTA (its address and the port it would connect to): the message bounces
/// at once with 5.4.6 instead of looping (Postfix: "mail for ... loops back to myself").
#[test]
fn mail_for_a_domain_whose_mx_is_this_mta_bounces_as_a_loop() {
    if !have(&[PY]) || !dnsfix::tools_available(&["nsd"]) {
        return;
    }
    let tmp = TempDir::new("mta-loop");
    let dir = tmp.path().to_path_buf();
    // The MTA listens on 127.0.0.1:P and delivers to port P; loop.test's MX is 127.0.0.1,
    // example.test's (where the bounce goes) a sink on 127.0.0.9:P.
    let mta_addr = free_addr();
    let port = mta_addr.port();
    let home = IdSink::start_on(
        SocketAddr::new("127.0.0.9".parse().unwrap(), port),
        Duration::ZERO,
    );
    let dns = dnsfix::DnsServer::start(&[
        dnsfix::Zone::new("loop.test")
            .rr("@ MX 10 mx.loop.test.")
            .rr("mx A 127.0.0.1"),
        dnsfix::Zone::new("example.test")
            .rr("@ MX 10 mx.example.test.")
            .rr("mx A 127.0.0.9"),
    ]);
    let mta = Mta::start_on(
        &dir,
        mta_addr,
        &[
            "--resolver".into(),
            dns.addr().to_string(),
            "--remote-port".into(),
            port.to_string(),
            "--no-mta-sts".into(),
        ],
    );
    let m = message(
        "alice@example.test",
        "bob@loop.test",
        "loop",
        "Round and round.",
    );
    submit(mta.addr, "alice@example.test", &["bob@loop.test"], &m);
    let dsn = wait_for(Duration::from_secs(60), || {
        let t = home.last.lock().unwrap().clone();
        t.contains("multipart/report").then_some(t)
    })
    .unwrap_or_else(|| panic!("no bounce:\n{}\n{}", mta.queue(&["list"]), mta.log()));
    assert!(dsn.contains("Status: 5.4.6"), "{dsn}");
    assert!(
        dsn.contains("mail for loop.test loops back to myself"),
        "{dsn}"
    );
    assert_eq!(mta.metric("ringmail_mta_loops_total"), Some(1.0));
    // Exactly one message reached the sink: the bounce; the MTA never talked to itself.
    assert_eq!(home.ids.lock().unwrap().len(), 1);
}
