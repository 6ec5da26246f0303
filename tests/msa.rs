//! The MSA (`ringmail msa`) against real clients: Python smtplib, swaks, curl, Postfix with
//! Cyrus SASL SCRAM-SHA-256; through the LB with PROXY v2; the same login and
//! sender-authorisation checks against SQLite, PostgreSQL and LDAP (OpenLDAP slapd) account
//! stores.

mod common;
#[path = "common/postfix.rs"]
mod postfix;

#[path = "../roles/accounts/tests/fixtures/mod.rs"]
mod fixtures;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// An SMTP next hop that accepts everything and keeps the messages' text.
struct Sink {
    addr: SocketAddr,
    msgs: Arc<Mutex<Vec<String>>>,
}

impl Sink {
    fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = Arc::clone(&msgs);
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                let m = Arc::clone(&m);
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    let _ = sink_session(s, &m);
                });
            }
        });
        Sink { addr, msgs }
    }

    fn wait(&self, n: usize) -> Vec<String> {
        wait_for(Duration::from_secs(20), || {
            let v = self.msgs.lock().unwrap().clone();
            (v.len() >= n).then_some(v)
        })
        .unwrap_or_else(|| panic!("{n} messages did not reach the next hop"))
    }
}

fn sink_session(s: TcpStream, msgs: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 sink.test ESMTP\r\n")?;
    loop {
        let mut line = String::new();
        if r.by_ref().take(65536).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let up = line.trim_end().to_ascii_uppercase();
        if up.starts_with("EHLO") {
            w.write_all(b"250-sink.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")?;
        } else if up == "DATA" {
            w.write_all(b"354 go\r\n")?;
            let mut text = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                text.push_str(&l);
            }
            msgs.lock().unwrap().push(text);
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if up == "QUIT" {
            w.write_all(b"221 Bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        }
    }
}

fn accounts(db: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(RINGMAIL)
        .arg("accounts")
        .args(["--db", db])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "accounts {args:?}: {out:?}");
}

const PASSWORD: &str = "alice-password";

fn seed(db: &str) {
    accounts(db, &["domain", "add", "example.test"], None);
    accounts(
        db,
        &["add", "alice@example.test", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    accounts(
        db,
        &["alias", "add", "sales@example.test", "alice@example.test"],
        None,
    );
    accounts(
        db,
        &["add", "bob@example.test", "--password-stdin"],
        Some("bob-password\n"),
    );
    // A SCRAM-SHA-256 secret (Dovecot's {SCRAM-SHA-256} form) with a non-default count.
    accounts(
        db,
        &[
            "add",
            "carol@example.test",
            "--password-stdin",
            "--scheme",
            "scram-sha-256",
            "--scram-iterations",
            "5000",
        ],
        Some(&format!("{SCRAM_PASSWORD}\n")),
    );
}

const SCRAM_USER: &str = "carol@example.test";
const SCRAM_PASSWORD: &str = "carol, the =scram= password";

struct Msa {
    _child: ChildGuard,
    addr: SocketAddr,
    tls_addr: SocketAddr,
    _dir: TempDir,
}

impl Msa {
    fn start(db: Option<&str>, relay: SocketAddr, extra: &[&str]) -> Msa {
        let dir = TempDir::new("msa");
        let db = match db {
            Some(d) => d.to_string(),
            None => {
                let d = format!("sqlite:{}", dir.path().join("accounts.db").display());
                seed(&d);
                d
            }
        };
        let (addr, tls_addr) = (free_addr(), free_addr());
        let child = ChildGuard::spawn(
            "ringmail msa",
            Command::new(RINGMAIL)
                .env("RUST_LOG", "info")
                .args(["msa", "--listen", &addr.to_string()])
                .args(["--listen-tls", &tls_addr.to_string()])
                .args(["--accounts", &db, "--relay", &relay.to_string()])
                .args(["--hostname", "smtp.example.test"])
                .arg("--spool")
                .arg(dir.path().join("spool"))
                .args(extra),
            dir.path().join("msa.log"),
        )
        .unwrap();
        Msa::ready(child, addr, tls_addr, dir)
    }

    fn from_config(dir: TempDir, config: &str, addr: SocketAddr) -> Msa {
        let path = dir.write("msa.toml", config);
        let child = ChildGuard::spawn(
            "ringmail msa",
            Command::new(RINGMAIL)
                .env("RUST_LOG", "info")
                .args(["msa", "--config"])
                .arg(path),
            dir.path().join("msa.log"),
        )
        .unwrap();
        Msa::ready(child, addr, addr, dir)
    }

    fn ready(child: ChildGuard, addr: SocketAddr, tls_addr: SocketAddr, dir: TempDir) -> Msa {
        wait_for(Duration::from_secs(20), || {
            TcpStream::connect(addr).ok().map(|_| ())
        })
        .unwrap_or_else(|| panic!("msa did not start: {}", child.log_text()));
        Msa {
            _child: child,
            addr,
            tls_addr,
            _dir: dir,
        }
    }
}

/// Runs a Python script with HOST, PORT and PW defined; returns (success, output).
fn python(addr: SocketAddr, script: &str) -> (bool, String) {
    let full = format!(
        "import smtplib, ssl, socket, time\nHOST='{}'\nPORT={}\nPW='{PASSWORD}'\nctx=ssl.create_default_context()\nctx.check_hostname=False\nctx.verify_mode=ssl.CERT_NONE\n{script}",
        addr.ip(),
        addr.port()
    );
    let (status, out) = run_bounded(
        Command::new("python3").arg("-c").arg(&full),
        Duration::from_secs(60),
    );
    (status.success(), out)
}

fn send_ok(addr: SocketAddr) {
    let (ok, out) = python(
        addr,
        "s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)\n\
         s.sendmail('alice@example.test', ['bob@example.org'], 'From: Alice <alice@example.test>\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n'); s.quit()",
    );
    assert!(ok, "{out}");
}

fn check_trace(msg: &str) {
    check_trace_for(msg, "alice@example.test", PASSWORD);
}

fn check_trace_for(msg: &str, user: &str, password: &str) {
    assert!(msg.contains("with ESMTPSA"), "{msg}");
    assert!(
        msg.contains(&format!("(Authenticated sender: {user})")),
        "{msg}"
    );
    let lower = msg.to_ascii_lowercase();
    assert_eq!(lower.matches("\nmessage-id: <").count(), 1, "{msg}");
    assert_eq!(lower.matches("\ndate: ").count(), 1, "{msg}");
    assert!(!msg.contains(password), "{msg}");
}

#[test]
fn smtplib_starttls_login_and_send_adds_trace_headers() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &[]);
    send_ok(msa.addr);
    let msgs = sink.wait(1);
    check_trace(&msgs[0]);
    assert!(msgs[0].contains("hello"));
}

#[test]
fn identical_recipients_are_accepted_and_queued_once() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &[]);
    let (ok, out) = python(
        msa.addr,
        "s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)\n\
         print(s.sendmail('alice@example.test', ['bob@example.org'] * 5, 'From: Alice <alice@example.test>\\r\\nSubject: dup\\r\\n\\r\\nonce\\r\\n')); s.quit()",
    );
    assert!(ok, "{out}");
    assert!(out.contains("{}"), "every RCPT accepted: {out}");
    let msgs = sink.wait(1);
    // One envelope recipient: the Received field names it.
    assert!(msgs[0].contains("\tfor <bob@example.org>"), "{}", msgs[0]);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.msgs.lock().unwrap().len(), 1);
}

#[test]
fn swaks_plain_and_login_and_curl_implicit_tls() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &[]);
    for mech in ["PLAIN", "LOGIN"] {
        let (status, out) = run_bounded(
            Command::new("swaks")
                .args([
                    "--server",
                    "127.0.0.1",
                    "--port",
                    &msa.addr.port().to_string(),
                ])
                .args(["--tls", "--auth", mech, "--auth-user", "alice@example.test"])
                .args(["--auth-password", PASSWORD])
                .args(["--from", "alice@example.test", "--to", "bob@example.org"]),
            Duration::from_secs(60),
        );
        assert!(status.success(), "swaks {mech}: {out}");
        assert!(out.contains("235 2.7.0"), "{out}");
    }
    let dir = TempDir::new("curl");
    let body = dir.write(
        "message.txt",
        "From: alice@example.test\r\nSubject: curl\r\n\r\nvia 465\r\n",
    );
    let (status, out) = run_bounded(
        Command::new("curl")
            .args(["-sS", "--url", &format!("smtps://{}", msa.tls_addr)])
            .args(["--ssl-reqd", "-k", "--mail-from", "alice@example.test"])
            .args(["--mail-rcpt", "bob@example.org"])
            .args(["-u", &format!("alice@example.test:{PASSWORD}")])
            .arg("-T")
            .arg(&body),
        Duration::from_secs(60),
    );
    assert!(status.success(), "curl: {out}");
    let msgs = sink.wait(3);
    assert!(msgs.iter().any(|m| m.contains("via 465")));
    for m in &msgs {
        check_trace(m);
    }
}

#[test]
fn refusals() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &[]);
    let (ok, out) = python(
        msa.addr,
        r#"
def code(r): return r[0]
s=smtplib.SMTP(HOST, PORT, timeout=20); s.ehlo()
assert not s.has_extn('auth'), 'AUTH advertised before TLS'
assert code(s.docmd('AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB4')) in (503, 538)
r = s.docmd('MAIL FROM:<alice@example.test>'); assert r[0] == 530 and b'5.7.0' in r[1], r
s.starttls(context=ctx); s.ehlo()
assert s.has_extn('auth')
r = s.docmd('MAIL FROM:<alice@example.test>'); assert r[0] == 530, r
r = s.docmd('RCPT TO:<bob@example.org>'); assert r[0] in (503, 530), r
try:
    s.login('alice@example.test', 'wrong'); raise SystemExit('wrong password accepted')
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
s.login('alice@example.test', PW)
r = s.docmd('MAIL FROM:<eve@example.test>'); assert r[0] == 553 and b'5.7.1' in r[1] and b'not owned by user alice@example.test' in r[1], r
r = s.docmd('MAIL FROM:<>'); assert r[0] == 553, r
r = s.docmd('MAIL FROM:<sales@example.test>'); assert r[0] == 250, r
s.docmd('RSET')
try:
    s.sendmail('alice@example.test', ['bob@example.org'], 'From: Eve <eve@example.test>\r\nSubject: x\r\n\r\nforged\r\n')
    raise SystemExit('forged From accepted')
except smtplib.SMTPDataError as e:
    assert e.smtp_code == 553, e
s.sendmail('sales@example.test', ['bob@example.org'], 'From: "Sales, Team" <sales@example.test>,\r\n alice@example.test (me)\r\nMessage-ID: <mine@example.test>\r\nSubject: x\r\n\r\nalias ok\r\n')
s.quit()
# The header From check parses strictly: every form another parser could read as someone else,
# a missing From, and Sender/Resent-* of another account are refused.
s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.ehlo(); s.login('alice@example.test', PW)
for head in [
    'From: bob@example.test <alice@example.test>\r\n',
    'From: "alice@example.test\\" <bob@example.test>\r\n',
    'From: "bob@example.test" alice@example.test\r\n',
    'From: <alice@example.test> bob@example.test\r\n',
    'From: undisclosed-recipients:;\r\n',
    '',
    'From: alice@example.test\r\nFrom: alice@example.test\r\n',
    'From: alice@example.test\r\nSender: eve@example.test\r\n',
    'From: alice@example.test\r\nResent-From: eve@example.test\r\n',
    'From: alice@example.test\r\nResent-Sender: Eve <eve@example.test>\r\n',
]:
    try:
        s.sendmail('alice@example.test', ['bob@example.org'], head + 'Subject: x\r\n\r\nforged\r\n')
        raise SystemExit('accepted: ' + repr(head))
    except smtplib.SMTPDataError as e:
        assert e.smtp_code == 553 and b'5.7.1' in e.smtp_error, (head, e)
s.sendmail('alice@example.test', ['bob@example.org'], 'From: "Alice, A." <alice@example.test>\r\nSender: alice@example.test (Alice)\r\nSubject: x\r\n\r\nlegit\r\n')
s.sendmail('alice@example.test', ['bob@example.org'], 'From: =?utf-8?q?Alice_A=2E?=\r\n <"alice"@example.test>\r\nSubject: x\r\n\r\nlegit\r\n')
s.quit()
# Commands pipelined with STARTTLS are discarded, not executed after the handshake.
sock = socket.create_connection((HOST, PORT), timeout=20)
f = sock.makefile('rb')
def reply():
    lines = []
    while True:
        l = f.readline(); lines.append(l)
        if l[3:4] != b'-': return lines
reply(); sock.sendall(b'EHLO x\r\n'); reply()
sock.sendall(b'STARTTLS\r\nMAIL FROM:<alice@example.test>\r\n')
assert reply()[0].startswith(b'220')
t = ctx.wrap_socket(sock); g = t.makefile('rb')
def treply():
    while True:
        l = g.readline()
        if l[3:4] != b'-': return l
t.sendall(b'EHLO x\r\n'); treply()
import base64
t.sendall(b'AUTH PLAIN ' + base64.b64encode(b'\0alice@example.test\0' + PW.encode()) + b'\r\n')
assert treply().startswith(b'235')
t.sendall(b'MAIL FROM:<alice@example.test>\r\n'); r = treply()
assert r.startswith(b'250'), r
print('ok')
"#,
    );
    assert!(ok && out.contains("ok"), "{out}");
    let msgs = sink.wait(3);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert!(msgs.iter().all(|m| !m.contains("forged")), "{msgs:?}");
    assert_eq!(msgs.iter().filter(|m| m.contains("legit")).count(), 2);
    let alias = msgs
        .iter()
        .find(|m| m.contains("alias ok"))
        .expect("alias message");
    assert!(alias.contains("Message-ID: <mine@example.test>"));
    assert_eq!(alias.matches("Message-ID:").count(), 1, "{alias}");
}

#[test]
fn failures_are_delayed_more_each_time_then_421() {
    let sink = Sink::start();
    let dir = TempDir::new("msa-fail");
    let db = format!("sqlite:{}", dir.path().join("a.db").display());
    seed(&db);
    let addr = free_addr();
    let config = format!(
        "[msa]\nhostname = \"smtp.example.test\"\nlisten = [\"{addr}\"]\naccounts = \"{db}\"\nspool = \"{}\"\nrelay = \"{}\"\nmax_auth_failures = 3\n",
        dir.path().join("spool").display(),
        sink.addr
    );
    let msa = Msa::from_config(dir, &config, addr);
    let (ok, out) = python(
        msa.addr,
        r#"
s=smtplib.SMTP(HOST, PORT, timeout=30); s.starttls(context=ctx); s.ehlo()
times = []
for i in range(2):
    t = time.time()
    r = s.docmd('AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==')
    times.append(time.time() - t)
    assert r[0] == 535, r
assert times[1] > times[0] and times[0] >= 0.4, times
r = s.docmd('AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==')
assert r[0] == 421, r
print('ok', times)
"#,
    );
    assert!(ok && out.contains("ok"), "{out}");
}

#[test]
fn per_account_limits_and_config_check() {
    let sink = Sink::start();
    let dir = TempDir::new("msa-rate");
    let db = format!("sqlite:{}", dir.path().join("a.db").display());
    seed(&db);
    let addr = free_addr();
    let config = format!(
        "[msa]\nhostname = \"smtp.example.test\"\nlisten = [\"{addr}\"]\naccounts = \"{db}\"\nspool = \"{}\"\nrelay = \"{}\"\nmax_messages_per_hour = 1\nmax_recipients = 2\n",
        dir.path().join("spool").display(),
        sink.addr
    );
    let path = dir.write("check.toml", &config);
    let (status, out) = run_bounded(
        Command::new(RINGMAIL)
            .args(["msa", "--check", "--config"])
            .arg(&path),
        Duration::from_secs(20),
    );
    assert!(status.success() && out.contains("ok"), "{out}");
    let bad = dir.write("bad.toml", "[msa]\nhostname = \"x\"\ncolour = 1\n");
    let (status, out) = run_bounded(
        Command::new(RINGMAIL)
            .args(["msa", "--check", "--config"])
            .arg(&bad),
        Duration::from_secs(20),
    );
    assert!(
        !status.success() && out.contains("bad.toml:3") && out.contains("colour"),
        "{out}"
    );
    let msa = Msa::from_config(dir, &config, addr);
    let (ok, out) = python(
        msa.addr,
        r#"
s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)
s.mail('alice@example.test')
for r in ['a@x.test', 'b@x.test']: assert s.rcpt(r)[0] == 250
r = s.rcpt('c@x.test'); assert r[0] == 452, r
s.rset()
s.sendmail('alice@example.test', ['a@x.test'], 'From: alice@example.test\r\nSubject: 1\r\n\r\none\r\n')
r = s.docmd('MAIL FROM:<alice@example.test>'); assert r[0] == 450 and b'4.7.1' in r[1], r
print('ok')
"#,
    );
    assert!(ok && out.contains("ok"), "{out}");
    sink.wait(1);
}

#[test]
fn through_the_lb_with_proxy_v2_the_real_client_is_recorded() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &["--trusted-proxy", "127.0.0.1"]);
    let lb_addr = free_addr();
    let dir = TempDir::new("msa-lb");
    let _lb = ChildGuard::spawn(
        "ringmail lb",
        Command::new(RINGMAIL)
            .args(["lb", "--listen", &lb_addr.to_string()])
            .args(["--backend", &msa.addr.to_string()])
            .args(["--proxy-protocol", "v2", "--engine", "epoll"]),
        dir.path().join("lb.log"),
    )
    .unwrap();
    wait_for(Duration::from_secs(20), || {
        TcpStream::connect(lb_addr).ok().map(|_| ())
    })
    .expect("lb listening");
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        let (ok, out) = python(
            lb_addr,
            "s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)\n\
             s.sendmail('alice@example.test', ['bob@example.org'], 'From: alice@example.test\\r\\nSubject: lb\\r\\n\\r\\nvia lb\\r\\n'); s.quit()",
        );
        if ok {
            last.clear();
            break;
        }
        last = out;
        thread::sleep(Duration::from_millis(300));
    }
    assert!(last.is_empty(), "{last}");
    let msgs = sink.wait(1);
    // The LB connects from 127.0.0.1 as well; the PROXY header names the client's port too,
    // and without it the session would have been refused (a trusted peer must send one).
    assert!(msgs[0].contains("[127.0.0.1]"), "{}", msgs[0]);
    check_trace(&msgs[0]);
    // PROXY v1 from the trusted address: the client it names is the one recorded.
    let (ok, out) = python(
        msa.addr,
        r#"
class P(smtplib.SMTP):
    def _get_socket(self, host, port, timeout):
        s = socket.create_connection((host, port), timeout)
        s.sendall(b'PROXY TCP4 192.0.2.7 127.0.0.1 40000 587\r\n')
        return s
s=P(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)
s.sendmail('alice@example.test', ['bob@example.org'], 'From: alice@example.test\r\nSubject: v1\r\n\r\nvia v1\r\n'); s.quit()
"#,
    );
    assert!(ok, "{out}");
    let msgs = sink.wait(2);
    let v1 = msgs.iter().find(|m| m.contains("via v1")).unwrap();
    assert!(v1.contains("[192.0.2.7]"), "{v1}");
    // A direct implicit-TLS client from the trusted address (no PROXY header) still works.
    let body = dir.write(
        "message.txt",
        "From: alice@example.test\r\nSubject: direct\r\n\r\ndirect 465\r\n",
    );
    let (status, out) = run_bounded(
        Command::new("curl")
            .args(["-sS", "--url", &format!("smtps://{}", msa.tls_addr)])
            .args(["--ssl-reqd", "-k", "--mail-from", "alice@example.test"])
            .args(["--mail-rcpt", "bob@example.org"])
            .args(["-u", &format!("alice@example.test:{PASSWORD}")])
            .arg("-T")
            .arg(&body),
        Duration::from_secs(60),
    );
    assert!(status.success(), "curl: {out}");
    assert!(sink.wait(3).iter().any(|m| m.contains("direct 465")));
}

/// What the shared login/authorisation checks need to know about a store's contents.
struct Store {
    url: String,
    /// Login name and primary address.
    user: &'static str,
    password: &'static str,
    /// An alias the user may send as.
    alias: &'static str,
    /// Another account's address, which the user may not send as.
    other: &'static str,
    /// Whether the store holds SCRAM secrets (seeded with [`SCRAM_USER`]); LDAP does not.
    scram: bool,
}

/// The login and sender-authorisation checks every backend must pass, through `ringmail msa`
/// on 587 (STARTTLS) and 465 (implicit TLS): AUTH PLAIN and LOGIN; a wrong password and LDAP
/// filter metacharacters in the user name (with the right password) refused with 535; MAIL FROM
/// and header From: for the own address and an alias accepted, another user's refused with
/// 553 5.7.1; what was accepted, and only that, reaches the next hop.
fn login_and_authorisation(store: &Store) {
    let sink = Sink::start();
    let msa = Msa::start(Some(&store.url), sink.addr, &[]);
    let (ok, out) = python(
        msa.addr,
        &format!(
            r#"
import smtplib
USER={user:?}; PW={pw:?}; ALIAS={alias:?}; OTHER={other:?}; TLS_PORT={tls_port}
def connect(port):
    if port == TLS_PORT:
        s = smtplib.SMTP_SSL(HOST, port, timeout=30, context=ctx)
    else:
        s = smtplib.SMTP(HOST, port, timeout=30); s.starttls(context=ctx)
    s.ehlo()
    assert s.has_extn('auth') and 'PLAIN' in s.esmtp_features['auth'] and 'LOGIN' in s.esmtp_features['auth'], s.esmtp_features
    # Not offered by default: Cyrus SASL clients would pick it for argon2id accounts.
    assert 'SCRAM' not in s.esmtp_features['auth'], s.esmtp_features
    return s
def auth(s, mech, user, pw):
    s.user, s.password = user, pw
    if mech == 'PLAIN':
        return s.auth('PLAIN', s.auth_plain)
    # The two-step exchange (334 Username:, 334 Password:), no initial response.
    return s.auth('LOGIN', s.auth_login, initial_response_ok=False)
def refused(s, mech, user, pw):
    try:
        auth(s, mech, user, pw)
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535, (mech, user, e)
        return
    raise SystemExit(f'{{mech}} login {{user!r}} accepted')
def forged(s, env_from, hdr_from, what):
    try:
        s.sendmail(env_from, ['rcpt@example.net'], f'From: {{hdr_from}}\r\nSubject: forged\r\n\r\nforged {{what}}\r\n')
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
        assert e.smtp_code == 553 and b'5.7.1' in e.smtp_error, (what, e)
        s.rset()
        return
    raise SystemExit(f'forged {{what}} accepted')
# The recipient is in no domain of any store (the LDAP fixture's include example.org, whose
# unknown users the MSA refuses). (port, mechanism, refused attempts before the good login). Unescaped in an LDAP filter,
# '*)(uid=*' would match every entry and 'alice@example.tes*' exactly the user's own.
plan = [
    (PORT, 'PLAIN', [(USER, 'wrong-password'), ('*)(uid=*', PW)]),
    (PORT, 'LOGIN', []),
    (TLS_PORT, 'PLAIN', []),
    (TLS_PORT, 'LOGIN', [(USER, PW + 'x'), (USER[:-1] + '*', PW)]),
]
for port, mech, bad in plan:
    s = connect(port)
    for user, pw in bad:
        refused(s, mech, user, pw)
    r = auth(s, mech, USER, PW); assert r[0] == 235, r
    r = s.docmd(f'MAIL FROM:<{{OTHER}}>'); assert r[0] == 553 and b'5.7.1' in r[1], r
    s.rset()
    forged(s, OTHER, OTHER, 'envelope')
    forged(s, USER, OTHER, 'header')
    forged(s, ALIAS, f'"Someone" <{{OTHER}}>', 'header behind an alias')
    r = s.docmd(f'MAIL FROM:<{{ALIAS}}>'); assert r[0] == 250, r
    s.rset()
    sender = ALIAS if mech == 'LOGIN' else USER
    s.sendmail(sender, ['rcpt@example.net'], f'From: <{{sender}}>\r\nSubject: ok\r\n\r\nsent via {{port}} {{mech}}\r\n')
    s.quit()
print('ok')
"#,
            user = store.user,
            pw = store.password,
            alias = store.alias,
            other = store.other,
            tls_port = msa.tls_addr.port(),
        ),
    );
    assert!(ok && out.contains("ok"), "{out}");
    sink.wait(4);
    // Anything refused must not follow late.
    thread::sleep(Duration::from_millis(500));
    let msgs = sink.msgs.lock().unwrap().clone();
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    for port in [msa.addr.port(), msa.tls_addr.port()] {
        for mech in ["PLAIN", "LOGIN"] {
            let m = msgs
                .iter()
                .find(|m| m.contains(&format!("sent via {port} {mech}")))
                .unwrap_or_else(|| panic!("{port} {mech} missing: {msgs:#?}"));
            check_trace_for(m, store.user, store.password);
        }
    }
    assert!(!msgs.iter().any(|m| m.contains("forged")), "{msgs:#?}");
    if store.scram {
        scram_logins(store, &sink);
    } else {
        scram_refused_for_store(store);
    }
}

/// A SCRAM-SHA-256 client in a few lines of Python (hashlib/hmac) over smtplib's `docmd`.
const PY_SCRAM: &str = r#"
import base64, hashlib, hmac, os
def b64(x):
    return base64.b64encode(x.encode() if isinstance(x, str) else x).decode()
def esc(n):
    return n.replace('=', '=3D').replace(',', '=2C')
def scram(s, user, pw, ir=True, authzid='', cancel_after_first=False):
    '''Returns (code, reply, server-first attributes).'''
    cnonce = b64(os.urandom(18))
    gs2 = 'n,' + ('a=' + esc(authzid) if authzid else '') + ','
    bare = f'n={esc(user)},r={cnonce}'
    if ir:
        code, resp = s.docmd('AUTH', 'SCRAM-SHA-256 ' + b64(gs2 + bare))
    else:
        code, resp = s.docmd('AUTH', 'SCRAM-SHA-256')
        assert (code, resp) == (334, b''), (code, resp)
        code, resp = s.docmd(b64(gs2 + bare))
    if code != 334:
        return code, resp, None
    sf = base64.b64decode(resp).decode()
    keys = [a.split('=', 1)[0] for a in sf.split(',')]
    assert keys == ['r', 's', 'i'], sf
    attrs = dict(a.split('=', 1) for a in sf.split(','))
    assert attrs['r'].startswith(cnonce) and len(attrs['r']) >= len(cnonce) + 16, sf
    if cancel_after_first:
        code, resp = s.docmd('*')
        return code, resp, attrs
    salt, it = base64.b64decode(attrs['s']), int(attrs['i'])
    salted = hashlib.pbkdf2_hmac('sha256', pw.encode(), salt, it)
    ck = hmac.new(salted, b'Client Key', 'sha256').digest()
    without = f"c={b64(gs2)},r={attrs['r']}"
    am = f'{bare},{sf},{without}'.encode()
    sig = hmac.new(hashlib.sha256(ck).digest(), am, 'sha256').digest()
    proof = bytes(a ^ b for a, b in zip(ck, sig))
    code, resp = s.docmd(b64(f'{without},p={b64(proof)}'))
    if code != 334:
        return code, resp, attrs
    # The client's half of mutual authentication: the server must prove it holds ServerKey.
    sv = hmac.new(hmac.new(salted, b'Server Key', 'sha256').digest(), am, 'sha256').digest()
    assert base64.b64decode(resp) == b'v=' + b64(sv).encode(), ('server signature does not verify', resp)
    code, resp = s.docmd('')
    return code, resp, attrs
"#;

/// SCRAM-SHA-256 through `ringmail msa --auth-mechanisms PLAIN,LOGIN,SCRAM-SHA-256`: the
/// right password logs in (initial response or not) and relays with the identity in
/// Received, and the server's `v=` verifies; a wrong password, an unknown user and a user
/// whose password is stored as argon2id get 535 after the usual failure delay, the last two
/// with a stable fake salt and Dovecot's 4096 iterations; `*` cancels with 501; PLAIN works
/// against the SCRAM secret too.
fn scram_logins(store: &Store, sink: &Sink) {
    let msa = Msa::start(
        Some(&store.url),
        sink.addr,
        &["--auth-mechanisms", "PLAIN,LOGIN,SCRAM-SHA-256"],
    );
    let (ok, out) = python(
        msa.addr,
        &format!(
            r#"{PY_SCRAM}
USER={user:?}; PW={pw:?}; OTHER={other:?}
s = smtplib.SMTP(HOST, PORT, timeout=30); s.starttls(context=ctx); s.ehlo()
assert s.esmtp_features['auth'].split() == ['PLAIN', 'LOGIN', 'SCRAM-SHA-256'], s.esmtp_features
def failed(user, pw, **kw):
    t = time.monotonic()
    code, resp, attrs = scram(s, user, pw, **kw)
    took = time.monotonic() - t
    assert code == 535 and b'5.7.8' in resp, (user, code, resp)
    assert took >= 0.45, ('failure not delayed', user, took)
    return attrs
wrong = failed(USER, PW + 'x')
assert wrong['i'] == '5000', wrong
nobody1 = failed('nobody@example.test', PW)
nobody2 = failed('Nobody@Example.test', PW)
assert (nobody1['s'], nobody1['i']) == (nobody2['s'], '4096'), (nobody1, nobody2)
assert len(base64.b64decode(nobody1['s'])) == 16
argon = failed(OTHER, 'bob-password')
assert argon['s'] != nobody1['s'] and argon['i'] == '4096', argon
code, resp, _ = scram(s, USER, PW, cancel_after_first=True)
assert code == 501, (code, resp)
code, resp, _ = scram(s, USER, PW, authzid=OTHER)
assert code == 535, (code, resp)
code, resp, _ = scram(s, USER, PW, ir=False)
assert code == 235 and b'2.7.0' in resp, (code, resp)
s.sendmail(USER, ['rcpt@example.org'], f'From: <{{USER}}>\r\nSubject: scram\r\n\r\nsent via SCRAM\r\n')
s.quit()
# Initial response on implicit TLS, and PLAIN against the SCRAM secret.
s = smtplib.SMTP_SSL(HOST, {tls_port}, timeout=30, context=ctx); s.ehlo()
code, resp, _ = scram(s, USER, PW)
assert code == 235, (code, resp)
s.quit()
s = smtplib.SMTP(HOST, PORT, timeout=30); s.starttls(context=ctx); s.login(USER, PW); s.quit()
print('ok')
"#,
            user = SCRAM_USER,
            pw = SCRAM_PASSWORD,
            other = "bob@example.test",
            tls_port = msa.tls_addr.port(),
        ),
    );
    assert!(ok && out.contains("ok"), "{out}");
    let msgs = sink.wait(5);
    let m = msgs
        .iter()
        .find(|m| m.contains("sent via SCRAM"))
        .unwrap_or_else(|| panic!("{msgs:#?}"));
    check_trace_for(m, SCRAM_USER, SCRAM_PASSWORD);
    let log = std::fs::read_to_string(msa._dir.path().join("msa.log")).unwrap_or_default();
    assert!(log.contains("SCRAM-SHA-256"), "{log}");
    assert!(!log.contains(SCRAM_PASSWORD), "password in the log");
}

/// An LDAP store authenticates by bind: SCRAM-SHA-256 cannot be offered with it.
fn scram_refused_for_store(store: &Store) {
    let dir = TempDir::new("msa-scram-ldap");
    let (status, out) = run_bounded(
        Command::new(RINGMAIL)
            .args(["msa", "--listen", &free_addr().to_string()])
            .args(["--accounts", &store.url, "--relay", "127.0.0.1:25"])
            .args(["--hostname", "smtp.example.test"])
            .arg("--spool")
            .arg(dir.path().join("spool"))
            .args(["--auth-mechanisms", "PLAIN,SCRAM-SHA-256"]),
        Duration::from_secs(20),
    );
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("LDAP") && out.contains("SCRAM-SHA-256"),
        "{out}"
    );
}

#[test]
fn sqlite_store_login_and_sender_authorisation() {
    let dir = TempDir::new("msa-sqlite");
    let url = format!("sqlite:{}", dir.path().join("accounts.db").display());
    seed(&url);
    login_and_authorisation(&Store {
        url,
        user: "alice@example.test",
        password: PASSWORD,
        alias: "sales@example.test",
        other: "bob@example.test",
        scram: true,
    });
}

#[test]
fn postgres_store_login_and_sender_authorisation() {
    let Some(pg) = fixtures::PgCluster::start() else {
        skip("PostgreSQL not installed");
        return;
    };
    let url = pg.url();
    seed(&url);
    login_and_authorisation(&Store {
        url,
        user: "alice@example.test",
        password: PASSWORD,
        alias: "sales@example.test",
        other: "bob@example.test",
        scram: true,
    });
}

#[test]
fn ldap_store_login_and_sender_authorisation() {
    // alice's other `mail` values are her aliases; bob is another account (fixtures::USERS).
    let Some(slapd) = fixtures::Slapd::start() else {
        skip("slapd not installed");
        return;
    };
    login_and_authorisation(&Store {
        url: slapd.url(),
        user: "alice@example.test",
        password: "alice-pw",
        alias: "al@example.test",
        other: "bob@example.test",
        scram: false,
    });
}

/// Concurrent sessions per client address (Postfix's smtpd_client_connection_count_limit): the
/// one over the limit gets 421 4.7.0 in the protocol, and a freed slot is usable again.
#[test]
fn connections_per_client_address_are_limited() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &["--max-connections-per-ip", "2"]);
    let greet = |s: &TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    // Two sessions at once are served. Retried while an earlier connection (the start-up
    // readiness probe) still holds a slot: its session ends only once the server has read
    // its close, which on a loaded machine can come after our next connect.
    let pair = wait_for(Duration::from_secs(10), || {
        let a = TcpStream::connect(msa.addr).ok()?;
        let b = TcpStream::connect(msa.addr).ok()?;
        (greet(&a).starts_with("220 ") && greet(&b).starts_with("220 ")).then_some((a, b))
    });
    let (a, b) = pair.expect("two concurrent sessions are not both served");
    let c = TcpStream::connect(msa.addr).unwrap();
    let refused = greet(&c);
    assert!(
        refused.starts_with("421 4.7.0 ")
            && refused.contains("too many connections from 127.0.0.1"),
        "{refused}"
    );
    drop(a);
    // The slot frees when the first session ends.
    let again = wait_for(Duration::from_secs(10), || {
        let d = TcpStream::connect(msa.addr).ok()?;
        greet(&d).starts_with("220 ").then_some(d)
    });
    assert!(again.is_some(), "a freed slot is not reused");
    drop(b);
}

/// Cyrus SASL's SCRAM plugin (Debian: libsasl2-modules).
const CYRUS_SCRAM: &str = "/usr/lib/x86_64-linux-gnu/sasl2/libscram.so";

/// Postfix as the submission client, authenticating with Cyrus SASL SCRAM-SHA-256 only
/// (`smtp_sasl_mechanism_filter = scram-sha-256`) over mandatory STARTTLS: the message is
/// relayed with the SCRAM identity in Received; with a wrong password Postfix gets 535 and
/// nothing is relayed.
#[test]
fn postfix_submits_with_cyrus_scram_sha_256() {
    for tool in [postfix::POSTFIX, postfix::SENDMAIL, CYRUS_SCRAM] {
        if !std::path::Path::new(tool).exists() {
            skip(&format!("{tool} not installed (postfix, libsasl2-modules)"));
            return;
        }
    }
    if !is_root() {
        skip("a private Postfix instance needs root");
        return;
    }
    let sink = Sink::start();
    let msa = Msa::start(
        None,
        sink.addr,
        &["--auth-mechanisms", "PLAIN,LOGIN,SCRAM-SHA-256"],
    );
    let relay = format!("[{}]:{}", msa.addr.ip(), msa.addr.port());
    let pf = postfix::Postfix::with_config(
        "postfix-scram",
        &format!(
            "myhostname = client.example.test\nmydomain = example.test\nmyorigin = $mydomain\n\
             mydestination =\nlocal_recipient_maps =\n\
             relayhost = {relay}\n\
             inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             smtp_dns_support_level = disabled\nsmtp_host_lookup = native\n\
             smtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n\
             smtp_sasl_auth_enable = yes\n\
             smtp_sasl_mechanism_filter = scram-sha-256\n\
             smtp_sasl_security_options = noanonymous\n\
             smtp_sasl_tls_security_options = noanonymous\n\
             smtp_sasl_password_maps = texthash:${{config_directory}}/sasl_passwd\n"
        ),
        "",
    );
    std::fs::write(
        pf.etc().join("sasl_passwd"),
        format!("{relay} {SCRAM_USER}:{SCRAM_PASSWORD}\n"),
    )
    .unwrap();
    pf.start();
    pf.sendmail(
        SCRAM_USER,
        "rcpt@example.org",
        format!(
            "From: Carol <{SCRAM_USER}>\r\nSubject: via postfix\r\n\r\nSCRAM from Postfix.\r\n"
        )
        .as_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.msgs.lock().unwrap().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let msgs = sink.msgs.lock().unwrap().clone();
    assert_eq!(
        msgs.len(),
        1,
        "Postfix did not submit through the MSA.\nmaillog:\n{}\nMSA log:\n{}",
        pf.maillog(),
        std::fs::read_to_string(msa._dir.path().join("msa.log")).unwrap_or_default()
    );
    assert!(msgs[0].contains("SCRAM from Postfix."), "{}", msgs[0]);
    check_trace_for(&msgs[0], SCRAM_USER, SCRAM_PASSWORD);
    let msa_log = std::fs::read_to_string(msa._dir.path().join("msa.log")).unwrap_or_default();
    assert!(
        msa_log.contains("\"SCRAM-SHA-256\"") && msa_log.contains("\"ok\""),
        "{msa_log}"
    );
    let log = pf.maillog();
    assert!(log.contains("TLS connection established to"), "{log}");
    assert!(log.contains("status=sent"), "{log}");

    // A wrong password: 535 5.7.8, the message stays in Postfix's queue.
    std::fs::write(
        pf.etc().join("sasl_passwd"),
        format!("{relay} {SCRAM_USER}:{SCRAM_PASSWORD}-wrong\n"),
    )
    .unwrap();
    pf.reconfigure(&["smtp_sasl_auth_cache_name ="]);
    pf.sendmail(
        SCRAM_USER,
        "rcpt@example.org",
        format!("From: <{SCRAM_USER}>\r\nSubject: wrong\r\n\r\nwrong password\r\n").as_bytes(),
    );
    let failed = wait_for(Duration::from_secs(60), || {
        let log = pf.maillog();
        (log.contains("535 5.7.8") && log.contains("SASL authentication failed")).then_some(())
    });
    assert!(
        failed.is_some(),
        "no SASL failure in the maillog:\n{}",
        pf.maillog()
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.msgs.lock().unwrap().len(), 1);
}

/// One transaction as a [`DsnSink`] saw it: the MAIL and accepted RCPT command lines, and the
/// message.
#[derive(Clone, Debug, Default)]
struct SeenTxn {
    mail: String,
    rcpts: Vec<String>,
    text: String,
}

/// An SMTP next hop that advertises DSN, keeps each transaction's command lines and text, and
/// refuses the recipients in `refuse` with 550 5.1.1.
struct DsnSink {
    addr: SocketAddr,
    txns: Arc<Mutex<Vec<SeenTxn>>>,
}

impl DsnSink {
    fn start(refuse: &'static [&'static str]) -> DsnSink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let txns: Arc<Mutex<Vec<SeenTxn>>> = Arc::default();
        let t = Arc::clone(&txns);
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    let _ = dsn_sink_session(s, &t, refuse);
                });
            }
        });
        DsnSink { addr, txns }
    }

    fn find(&self, f: impl Fn(&SeenTxn) -> bool) -> Option<SeenTxn> {
        self.txns.lock().unwrap().iter().find(|t| f(t)).cloned()
    }

    fn wait(&self, what: &str, f: impl Fn(&SeenTxn) -> bool) -> SeenTxn {
        wait_for(Duration::from_secs(60), || self.find(&f))
            .unwrap_or_else(|| panic!("{what}: not seen in {:#?}", self.txns.lock().unwrap()))
    }
}

fn dsn_sink_session(
    s: TcpStream,
    txns: &Mutex<Vec<SeenTxn>>,
    refuse: &[&str],
) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 dsn-sink.test ESMTP\r\n")?;
    let mut txn = SeenTxn::default();
    loop {
        let mut line = String::new();
        if r.by_ref().take(65536).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_string();
        let up = line.to_ascii_uppercase();
        if up.starts_with("EHLO") {
            w.write_all(b"250-dsn-sink.test\r\n250-8BITMIME\r\n250-DSN\r\n250 PIPELINING\r\n")?;
        } else if up.starts_with("MAIL FROM:") {
            txn = SeenTxn {
                mail: line,
                ..SeenTxn::default()
            };
            w.write_all(b"250 2.1.0 Ok\r\n")?;
        } else if up.starts_with("RCPT TO:") {
            if refuse
                .iter()
                .any(|a| up.contains(&format!("<{}>", a.to_ascii_uppercase())))
            {
                w.write_all(b"550 5.1.1 no such user here\r\n")?;
            } else {
                txn.rcpts.push(line);
                w.write_all(b"250 2.1.5 Ok\r\n")?;
            }
        } else if up == "DATA" {
            if txn.rcpts.is_empty() {
                w.write_all(b"554 5.5.1 no valid recipients\r\n")?;
                continue;
            }
            w.write_all(b"354 go\r\n")?;
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                txn.text.push_str(&l);
            }
            txns.lock().unwrap().push(std::mem::take(&mut txn));
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if up == "QUIT" {
            w.write_all(b"221 Bye\r\n")?;
            return Ok(());
        } else {
            txn = SeenTxn::default();
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        }
    }
}

/// RFC 3461 through the MSA: RET, ENVID, NOTIFY and ORCPT given at submission are queued with
/// the message and relayed to the MTA, which honours them (NOTIFY=NEVER: no bounce; RET=HDRS:
/// the headers only; ORCPT: Original-Recipient in the DSN) and hands them on to a remote that
/// offers DSN. The MTA sends our own domain's mail (the bounces) to its transport, and logs a
/// line per recipient (status=sent, status=bounced) and the double bounce it discards.
#[test]
fn dsn_parameters_travel_through_the_msa_and_the_mta() {
    let remote = DsnSink::start(&["nobody@remote.test"]);
    // Our own domain's MX: sales@ (an alias of alice) does not take the bounce.
    let ours = DsnSink::start(&["sales@example.test"]);
    let dir = TempDir::new("msa-dsn");
    let mta_addr = free_addr();
    let mta = ChildGuard::spawn(
        "ringmail mta",
        Command::new(RINGMAIL)
            .env("RUST_LOG", "info")
            .args(["mta", "--listen", &mta_addr.to_string()])
            .arg("--spool")
            .arg(dir.path().join("mta-spool"))
            .args(["--hostname", "mta.example.test", "--no-mta-sts"])
            .args(["--relay", &remote.addr.to_string()])
            .args(["--transport", &format!("example.test={}", ours.addr)]),
        dir.path().join("mta.log"),
    )
    .unwrap();
    wait_for(Duration::from_secs(20), || {
        TcpStream::connect(mta_addr).ok().map(|_| ())
    })
    .unwrap_or_else(|| panic!("mta did not start: {}", mta.log_text()));
    let msa = Msa::start(None, mta_addr, &[]);
    let (ok, out) = python(
        msa.addr,
        r#"
s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)
def msg(subject): return ('From: alice@example.test\r\nSubject: ' + subject + '\r\n\r\nBODY-MARKER of ' + subject + '\r\n').encode()
print(s.sendmail('alice@example.test', ['nobody@remote.test'], msg('never'), rcpt_options=['NOTIFY=NEVER']))
print(s.sendmail('alice@example.test', ['nobody@remote.test'], msg('hdrs'), mail_options=['RET=HDRS', 'ENVID=env-hdrs'], rcpt_options=['NOTIFY=FAILURE', 'ORCPT=rfc822;orig@remote.test']))
print(s.sendmail('alice@example.test', ['bob@remote.test'], msg('success'), mail_options=['RET=FULL', 'ENVID=env-ok'], rcpt_options=['NOTIFY=SUCCESS,DELAY', 'ORCPT=rfc822;Bob@Remote.Test']))
print(s.sendmail('sales@example.test', ['nobody@remote.test'], msg('double')))
s.quit()
print('ok')
"#,
    );
    assert!(ok && out.contains("ok"), "{out}");
    let ctx = || {
        format!(
            "--- MTA log:\n{}\n--- MSA log:\n{}",
            mta.log_text(),
            std::fs::read_to_string(msa._dir.path().join("msa.log")).unwrap_or_default()
        )
    };
    // The remote that offers DSN gets the parameters as submitted.
    let ok = remote.wait("the message to bob", |t| {
        t.text.contains("BODY-MARKER of success")
    });
    assert!(
        ok.mail.contains("RET=FULL") && ok.mail.contains("ENVID=env-ok"),
        "{ok:?}\n{}",
        ctx()
    );
    assert_eq!(ok.rcpts.len(), 1, "{ok:?}");
    assert!(
        ok.rcpts[0].contains("NOTIFY=SUCCESS,DELAY")
            && ok.rcpts[0].contains("ORCPT=rfc822;Bob@Remote.Test"),
        "{ok:?}"
    );
    // RET=HDRS and ORCPT: a DSN with the headers only, naming the original recipient.
    let dsn = ours.wait("the DSN of the hdrs message", |t| {
        t.text.contains("Subject: hdrs")
    });
    assert!(dsn.mail.contains("MAIL FROM:<>"), "{dsn:?}");
    assert!(dsn.rcpts[0].contains("<alice@example.test>"), "{dsn:?}");
    let text = &dsn.text;
    assert!(text.contains("Original-Envelope-Id: env-hdrs"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@remote.test"),
        "{text}"
    );
    assert!(
        text.contains("Original-Recipient: rfc822;orig@remote.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("text/rfc822-headers"), "{text}");
    assert!(
        !text.contains("BODY-MARKER"),
        "RET=HDRS returns no body: {text}"
    );
    // The double bounce: the DSN to sales@ is refused, and discarded with a warning.
    let log = wait_for(Duration::from_secs(60), || {
        let log = mta.log_text();
        log.contains("undeliverable bounce discarded")
            .then_some(log)
    })
    .unwrap_or_else(|| panic!("no double-bounce warning\n{}", ctx()));
    let warning = log
        .lines()
        .find(|l| l.contains("undeliverable bounce discarded"))
        .unwrap();
    assert!(
        warning.contains("WARN")
            && warning.contains("original_sender=sales@example.test")
            && warning.contains("original_recipients=nobody@remote.test")
            && warning.contains("550 5.1.1"),
        "{warning}"
    );
    // NOTIFY=NEVER: no DSN at all (the other two bounces have arrived by now).
    thread::sleep(Duration::from_secs(1));
    assert!(
        ours.find(|t| t.text.contains("Subject: never")).is_none(),
        "a DSN despite NOTIFY=NEVER\n{}",
        ctx()
    );
    // The delivery log: a line per recipient, Postfix-style.
    let delivery = |status: &str, to: &str| {
        log.lines().any(|l| {
            l.contains(" INFO ")
                && l.contains(&format!("to={to} "))
                && l.contains(&format!("status={status} "))
                && l.contains("relay=127.0.0.1[127.0.0.1]:")
                && l.contains("dsn=")
                && l.contains("delay=")
        })
    };
    assert!(delivery("sent", "bob@remote.test"), "{log}");
    assert!(delivery("bounced", "nobody@remote.test"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("status=bounced") && l.contains("dsn=5.1.1")),
        "{log}"
    );
    // The MSA logs its hop to the MTA the same way.
    let msa_log = std::fs::read_to_string(msa._dir.path().join("msa.log")).unwrap_or_default();
    assert!(
        msa_log.lines().any(|l| l.contains("status=sent")
            && l.contains(&format!(
                "relay={}[{}]:{}",
                mta_addr.ip(),
                mta_addr.ip(),
                mta_addr.port()
            ))),
        "{msa_log}"
    );
}

/// Recipients in our own domains must exist (Postfix's smtpd_reject_unlisted_recipient): an
/// unknown one gets 550 5.1.1 at RCPT; accounts, aliases, details (user+detail@) and
/// postmaster pass, and so does any address elsewhere.
#[test]
fn unknown_local_recipients_are_refused_at_rcpt() {
    let sink = Sink::start();
    let msa = Msa::start(None, sink.addr, &[]);
    let (ok, out) = python(
        msa.addr,
        r#"
s=smtplib.SMTP(HOST, PORT, timeout=20); s.starttls(context=ctx); s.login('alice@example.test', PW)
r = s.docmd('MAIL FROM:<alice@example.test>'); assert r[0] == 250, r
for a in ['nobody@example.test', 'NoBody@EXAMPLE.test', 'nobody+x@example.test']:
    r = s.docmd('RCPT TO:<%s>' % a); assert r[0] == 550 and b'5.1.1' in r[1], (a, r)
for a in ['bob@example.test', 'Bob@Example.Test', 'sales@example.test', 'bob+lists@example.test', 'postmaster@example.test', 'anyone@example.org']:
    r = s.docmd('RCPT TO:<%s>' % a); assert r[0] == 250, (a, r)
s.docmd('RSET')
refused = s.sendmail('alice@example.test', ['bob@example.test', 'ghost@example.test'], 'From: alice@example.test\r\nSubject: x\r\n\r\nto bob\r\n')
assert list(refused) == ['ghost@example.test'] and refused['ghost@example.test'][0] == 550, refused
s.quit()
print('ok')
"#,
    );
    assert!(ok && out.contains("ok"), "{out}");
    let msgs = sink.wait(1);
    assert!(msgs[0].contains("to bob"), "{msgs:?}");
}
