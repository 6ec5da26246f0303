//! `ringmail mda`'s IMAP server against real clients: Python's `imaplib` over implicit TLS and
//! STARTTLS, `curl imaps://`, two concurrent sessions with IDLE seeing new mail and expunges,
//! APPEND/FETCH byte-exact round trips, isolation between users and mailbox-name traversal.
//! Mail arrives over LMTP (`smtplib.LMTP`) into the same Maildir++ store.
//!
//! Debian packages: python3, curl.

mod common;

use std::fs;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const PY: &str = "/usr/bin/python3";
const CURL: &str = "/usr/bin/curl";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringmail")
}

struct Server {
    lmtp: SocketAddr,
    imap: SocketAddr,
    imaps: SocketAddr,
    _child: ChildGuard,
    log: std::path::PathBuf,
}

fn start(dir: &Path) -> Server {
    start_with(dir, &[])
}

fn start_with(dir: &Path, extra: &[&str]) -> Server {
    let db = format!("sqlite:{}", dir.join("accounts.db").display());
    accounts(&db, &["domain", "add", "example.test"], None);
    for (u, p) in [("bob", "bob-pw"), ("alice", "alice-pw")] {
        accounts(
            &db,
            &["add", &format!("{u}@example.test"), "--password-stdin"],
            Some(&format!("{p}\n")),
        );
    }
    let (lmtp, imap, imaps) = (free_addr(), free_addr(), free_addr());
    let log = dir.join("mda.log");
    let child = ChildGuard::spawn(
        "ringmail mda",
        Command::new(bin())
            .args(["mda", "--lmtp", &lmtp.to_string()])
            .args(["--imap", &imap.to_string(), "--imaps", &imaps.to_string()])
            .arg("--maildir")
            .arg(dir.join("mail"))
            .args(["--accounts", &db, "--hostname", "mda.example.test"])
            .args(extra)
            .env("RUST_LOG", "info"),
        log.clone(),
    )
    .unwrap();
    for a in [lmtp, imap, imaps] {
        assert!(
            wait_for(Duration::from_secs(20), || TcpStream::connect(a)
                .ok()
                .map(|_| ()))
            .is_some(),
            "not listening on {a}: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Server {
        lmtp,
        imap,
        imaps,
        _child: child,
        log,
    }
}

/// Runs a Python script (bounded), asserting that it succeeds and prints `OK` (each script
/// ends with that once its checks passed); returns its output.
fn python(script: &str) -> String {
    let (st, out) = run_bounded(
        Command::new(PY).arg("-c").arg(script),
        Duration::from_secs(90),
    );
    assert!(st.success(), "python failed:\n{out}\n--- script:\n{script}");
    assert!(out.contains("OK"), "{out}");
    out
}

const PRELUDE: &str = r#"
import imaplib, smtplib, socket, ssl, sys, time
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
def lmtp(host, port, rcpt, body):
    s = smtplib.LMTP(host, port); s.sendmail('carol@example.net', [rcpt], body); s.quit()
def check(cond, what):
    if not cond:
        print('FAILED:', what); sys.exit(1)
"#;

#[test]
fn imap_clients_read_mail_delivered_over_lmtp() {
    if !Path::new(PY).exists() || !Path::new(CURL).exists() {
        skip("python3 or curl not installed");
        return;
    }
    let tmp = TempDir::new("imap");
    let s = start(tmp.path());
    let script = format!(
        "{PRELUDE}
L = ('{li}', {lp}); S = ('{si}', {sp}); P = ('{pi}', {pp})
lmtp(*L, 'bob@example.test', b'From: <carol@example.net>\\r\\nSubject: first\\r\\n\\r\\nHello Bob.\\r\\n')
m = imaplib.IMAP4_SSL(*S, ssl_context=ctx)
check(b'IMAP4rev2' in m.capability()[1][0] or b'IMAP4REV2' in m.capability()[1][0].upper(), 'IMAP4rev2 capability')
m.login('bob@example.test', 'bob-pw')
typ, data = m.select('INBOX')
check(typ == 'OK' and data[0] == b'1', 'one message: %r' % data)
typ, data = m.fetch('1', '(BODY.PEEK[])')
body = data[0][1]
check(body.startswith(b'Return-Path: <carol@example.net>') and body.endswith(b'Hello Bob.\\r\\n'), 'fetched: %r' % body)
# APPEND then FETCH: byte-exact round trip (8-bit, long lines, a lone dot line).
msg = b'From: <bob@example.test>\\r\\nSubject: kept\\r\\n\\r\\n.\\r\\n' + ('\\u00e9' * 300).encode() + b'\\r\\n' + bytes(range(32, 127)) + b'\\r\\n'
typ, data = m.append('INBOX', '(\\\\Seen)', None, msg)
check(typ == 'OK' and b'APPENDUID' in data[0], 'append: %r' % data)
import re; uid = re.search(rb'APPENDUID \\d+ (\\d+)', data[0]).group(1).decode()
typ, data = m.uid('FETCH', uid, '(BODY[] FLAGS)')
check(data[0][1] == msg, 'round trip differs')
typ, data = m.uid('FETCH', uid, '(FLAGS)')
check(b'\\\\Seen' in data[0], 'flags: %r' % data)
# Flags, search, copy, expunge.
m.create('Archive')
typ, data = m.uid('COPY', uid, 'Archive')
check(typ == 'OK', 'copy: %r' % data)
check(m.response('COPYUID')[1][0] is not None, 'no COPYUID')
typ, data = m.search(None, 'SUBJECT', 'first')
check(data[0] == b'1', 'search: %r' % data)
typ, data = m.status('Archive', '(MESSAGES UIDNEXT)')
check(b'MESSAGES 1' in data[0], 'status: %r' % data)
# STATUS SIZE is the sum of the RFC822.SIZEs; DELETED counts \\Deleted.
typ, data = m.fetch('1:*', '(RFC822.SIZE)')
total = sum(int(re.search(rb'RFC822.SIZE (\\d+)', d).group(1)) for d in data)
m.store('2', '+FLAGS', '\\\\Deleted')
typ, data = m.status('INBOX', '(MESSAGES SIZE DELETED)')
check(data[0] == b'INBOX (MESSAGES 2 DELETED 1 SIZE %d)' % total, 'status size: %r' % data)
m.store('2', '-FLAGS', '\\\\Deleted')
# SEARCHRES: the saved result feeds FETCH and STORE.
typ, data = m.search(None, 'RETURN', '(SAVE)', 'SUBJECT', 'kept')
check(typ == 'OK' and data == [None], 'search save: %r' % data)
typ, data = m.fetch('$', '(UID)')
check(typ == 'OK' and len(data) == 1 and (b'UID %s' % uid.encode()) in data[0], 'fetch $: %r' % data)
typ, data = m.store('$', '+FLAGS', '\\\\Flagged')
check(typ == 'OK' and b'\\\\Flagged' in data[0], 'store $: %r' % data)
typ, data = m.list()
names = b' '.join(data)
check(b'INBOX' in names and b'Archive' in names, 'list: %r' % data)
m.logout()
# STARTTLS on the plain port; no login before it.
p = imaplib.IMAP4(*P)
check(b'LOGINDISABLED' in p.capability()[1][0].upper(), 'LOGINDISABLED before TLS')
try:
    p.login('bob@example.test', 'bob-pw'); check(False, 'login before STARTTLS accepted')
except imaplib.IMAP4.error:
    pass
p.starttls(ssl_context=ctx)
p.login('bob@example.test', 'bob-pw')
typ, data = p.select('INBOX')
check(data[0] == b'2', 'after STARTTLS: %r' % data)
p.logout()
# Wrong password.
try:
    x = imaplib.IMAP4_SSL(*S, ssl_context=ctx); x.login('bob@example.test', 'wrong'); check(False, 'bad password accepted')
except imaplib.IMAP4.error:
    pass
print('OK')
",
        li = s.lmtp.ip(),
        lp = s.lmtp.port(),
        si = s.imaps.ip(),
        sp = s.imaps.port(),
        pi = s.imap.ip(),
        pp = s.imap.port(),
    );
    python(&script);

    // curl: list and fetch over imaps://.
    let (st, out) = run_bounded(
        Command::new(CURL)
            .args(["-sk", "--max-time", "20", "-u", "bob@example.test:bob-pw"])
            .arg(format!("imaps://{}/", s.imaps)),
        Duration::from_secs(30),
    );
    assert!(
        st.success() && out.contains("INBOX") && out.contains("Archive"),
        "curl list: {out}"
    );
    let (st, out) = run_bounded(
        Command::new(CURL)
            .args(["-sk", "--max-time", "20", "-u", "bob@example.test:bob-pw"])
            .arg(format!("imaps://{}/INBOX;UID=1", s.imaps)),
        Duration::from_secs(30),
    );
    assert!(
        st.success() && out.contains("Hello Bob."),
        "curl fetch: {out}\n{}",
        fs::read_to_string(&s.log).unwrap_or_default()
    );
}

#[test]
fn idle_sessions_see_new_mail_and_expunges_and_users_are_isolated() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-idle");
    let s = start(tmp.path());
    let script = format!(
        "{PRELUDE}
L = ('{li}', {lp}); S = ('{si}', {sp})
lmtp(*L, 'bob@example.test', b'Subject: one\\r\\n\\r\\nx\\r\\n')
# Session A idles on INBOX (raw protocol over TLS).
raw = ctx.wrap_socket(socket.create_connection(S), server_hostname='mda')
f = raw.makefile('rb')
def send(line): raw.sendall(line + b'\\r\\n')
def until(pred, secs):
    raw.settimeout(secs); end = time.time() + secs; seen = []
    while time.time() < end:
        try:
            l = f.readline()
        except socket.timeout:
            break
        if not l: break
        seen.append(l)
        if pred(l): return seen
    print('SEEN', seen); check(False, 'timed out')
until(lambda l: l.startswith(b'* OK'), 10)
send(b'a1 LOGIN bob@example.test bob-pw'); until(lambda l: l.startswith(b'a1 OK'), 10)
send(b'a2 SELECT INBOX'); until(lambda l: l.startswith(b'a2 OK'), 10)
send(b'a3 IDLE'); until(lambda l: l.startswith(b'+'), 10)
t0 = time.time()
lmtp(*L, 'bob@example.test', b'Subject: two\\r\\n\\r\\ny\\r\\n')
until(lambda l: l.strip() == b'* 2 EXISTS', 5)
print('new mail seen in IDLE after %.2fs' % (time.time() - t0))
# Session B expunges message 1; A sees it while idling.
b = imaplib.IMAP4_SSL(*S, ssl_context=ctx); b.login('bob@example.test', 'bob-pw'); b.select('INBOX')
b.store('1', '+FLAGS', '(\\\\Deleted)'); b.expunge(); b.logout()
until(lambda l: l.strip() == b'* 1 EXPUNGE', 5)
send(b'DONE'); until(lambda l: l.startswith(b'a3 OK'), 10)
send(b'a4 LOGOUT')
# Isolation: alice sees none of bob's mail, and names cannot escape her store.
a = imaplib.IMAP4_SSL(*S, ssl_context=ctx); a.login('alice@example.test', 'alice-pw')
typ, data = a.select('INBOX'); check(data[0] == b'0', 'alice INBOX: %r' % data)
for name in ['../bob/Maildir', '../../example.test/bob', '/etc', '..', 'a/../../b', 'x\\x7fy']:
    try:
        typ, data = a.select('\"%s\"' % name)
    except Exception as e:
        typ = 'ERR'
    check(typ != 'OK', 'selected %r' % name)
    try:
        typ, data = a.create('\"%s\"' % name)
    except Exception as e:
        typ = 'ERR'
    check(typ != 'OK', 'created %r' % name)
typ, data = a.list(); check(b'bob' not in b' '.join(data), 'list leaks: %r' % data)
a.logout()
print('OK')
",
        li = s.lmtp.ip(),
        lp = s.lmtp.port(),
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    let out = python(&script);
    eprintln!(
        "{}",
        out.lines().find(|l| l.contains("IDLE after")).unwrap_or("")
    );
    // Nothing was created outside the users' Maildirs.
    let root = tmp.path().join("mail");
    for e in walk(&root) {
        let rel = e.strip_prefix(&root).unwrap().to_string_lossy().to_string();
        assert!(
            rel.starts_with("example.test/bob")
                || rel.starts_with("example.test/alice")
                || rel == "example.test",
            "unexpected path {rel}"
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[test]
fn proxy_headers_are_accepted_from_trusted_balancers_only() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-proxy");
    let s = start_with(tmp.path(), &["--trusted-proxy", "127.0.0.1"]);
    let script = format!(
        "{PRELUDE}
S = ('{si}', {sp})
class Proxied(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout)
        sock.sendall(b'PROXY TCP4 192.0.2.9 127.0.0.1 40000 993\\r\\n')
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
m = Proxied(*S, ssl_context=ctx); m.login('bob@example.test', 'bob-pw'); m.select('INBOX'); m.logout()
# A direct TLS client from the same (trusted) address still works on the implicit TLS port.
d = imaplib.IMAP4_SSL(*S, ssl_context=ctx); d.login('bob@example.test', 'bob-pw'); d.logout()
# Garbage instead of a header from a trusted address: dropped.
raw = socket.create_connection(S, 10); raw.sendall(b'HELLO THERE\\r\\n'); raw.settimeout(15)
try:
    got = raw.recv(100)
except ConnectionResetError:
    got = b''
check(got == b'', 'garbage from a trusted proxy was served: %r' % got)
print('OK')
",
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    python(&script);
}

#[test]
fn bare_lf_append_is_stored_with_crlf_matching_its_size() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-lf");
    let s = start(tmp.path());
    // A raw client: imaplib would turn the LFs into CRLFs itself.
    let script = format!(
        "{PRELUDE}
raw = ctx.wrap_socket(socket.create_connection(('{si}', {sp}), timeout=20))
f = raw.makefile('rb')
def until(tag):
    out = b''
    while True:
        l = f.readline()
        check(l, 'connection closed: %r' % out)
        out += l
        if l.startswith(tag):
            return out
f.readline()
raw.sendall(b'a LOGIN bob@example.test bob-pw\\r\\n'); check(b'a OK' in until(b'a '), 'login')
msg = b'Subject: lf\\n\\nline one\\nline two\\n'
raw.sendall(b'b APPEND INBOX {{%d}}\\r\\n' % len(msg)); check(f.readline().startswith(b'+'), 'continuation')
raw.sendall(msg + b'\\r\\n'); check(b'b OK' in until(b'b '), 'append')
raw.sendall(b'c SELECT INBOX\\r\\n'); until(b'c ')
raw.sendall(b'd FETCH 1 (RFC822.SIZE BODY[])\\r\\n')
out = until(b'd ')
import re
size = int(re.search(rb'RFC822.SIZE (\\d+)', out).group(1))
n = int(re.search(rb'BODY\\[\\] \\{{(\\d+)\\}}', out).group(1))
body = out[out.index(b'}}\\r\\n') + 3:][:n]
want = msg.replace(b'\\n', b'\\r\\n')
check(size == n == len(want), 'RFC822.SIZE %d, BODY[] %d bytes, want %d' % (size, n, len(want)))
check(body == want, 'body %r' % body)
# BINARY: a literal8 APPEND whose binary part (NUL, bare CR and LF) survives the Maildir store.
bin = bytes([0, 1, 10, 13, 255, 10, 10]) + b'x'
m8 = b'Subject: bin\\r\\nMIME-Version: 1.0\\r\\nContent-Type: multipart/mixed; boundary=B\\r\\n\\r\\n--B\\r\\n\\r\\nhi\\r\\n--B\\r\\nContent-Type: application/octet-stream\\r\\nContent-Transfer-Encoding: binary\\r\\n\\r\\n' + bin + b'\\r\\n--B--\\r\\n'
raw.sendall(b'e APPEND INBOX ~{{%d}}\\r\\n' % len(m8)); check(f.readline().startswith(b'+'), 'literal8 continuation')
raw.sendall(m8 + b'\\r\\n'); out = until(b'e '); check(b'e OK' in out, 'literal8 append: %r' % out)
raw.sendall(b'f FETCH 2 (BINARY.PEEK[2] BINARY.SIZE[2])\\r\\n'); out = until(b'f ')
check(b'BINARY[2] ~{{%d}}\\r\\n' % len(bin) + bin + b' BINARY.SIZE[2] %d)' % len(bin) in out, 'binary fetch: %r' % out)
print('OK')
",
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    python(&script);
}

/// Password guessing is braked per client address: every failure is answered after a delay
/// that grows with the address's recent failures, the address is locked out after
/// `--imap-max-auth-failures`, and another address is affected by neither. The failure log
/// names the client address, never the password.
#[test]
fn login_failures_are_delayed_and_locked_out_per_address() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-brake");
    let s = start_with(tmp.path(), &["--imap-max-auth-failures", "3"]);
    let script = format!(
        "{PRELUDE}
S = ('{si}', {sp})
class From(imaplib.IMAP4_SSL):
    src = '127.0.0.1'
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.src, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
class Other(From):
    src = '127.0.0.2'
def attempt(cls, user, pw):
    m = cls(*S, ssl_context=ctx)
    t = time.monotonic()
    try:
        m.login(user, pw); ok = True
    except imaplib.IMAP4.error:
        ok = False
    took = time.monotonic() - t
    try:
        m.logout()
    except Exception:
        pass
    return ok, took
times = [attempt(From, 'bob@example.test', 'guess-%d' % i) for i in range(3)]
print('times', times)
check(not any(ok for ok, _ in times), 'a wrong password was accepted')
check(times[1][1] >= 0.9 and times[2][1] >= 1.8, 'failures not delayed: %r' % times)
# Locked out: even the right password is refused.
ok, took = attempt(From, 'bob@example.test', 'bob-pw')
check(not ok, 'locked-out address logged in')
# Another address: not delayed beyond its own first failure, and not locked out.
ok, took = attempt(Other, 'alice@example.test', 'wrong')
check(not ok and took < 1.5, 'other address delayed: %r' % took)
ok, took = attempt(Other, 'alice@example.test', 'alice-pw')
check(ok, 'other address locked out')
print('OK')
",
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    python(&script);
    let log = fs::read_to_string(&s.log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("imap login failed") && l.contains("rip=127.0.0.1")),
        "{log}"
    );
    assert!(log.contains("too many authentication failures"), "{log}");
    assert!(!log.contains("guess-") && !log.contains("bob-pw"), "{log}");
}

/// Connections that do not log in are closed after `--imap-login-timeout` (plain, and implicit
/// TLS without a handshake); `--imap-max-connections-per-ip` refuses with BYE.
#[test]
fn login_timeout_and_connection_limit() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-timeout");
    let s = start_with(
        tmp.path(),
        &[
            "--imap-login-timeout",
            "2",
            "--imap-max-connections-per-ip",
            "3",
            "--imap-max-userip-connections",
            "1",
        ],
    );
    let script = format!(
        "{PRELUDE}
P = ('{pi}', {pp}); S = ('{si}', {sp})
def read_all(sock, limit):
    sock.settimeout(limit); got = b''
    t = time.monotonic()
    while True:
        try:
            b = sock.recv(1000)
        except (ConnectionResetError, socket.timeout):
            break
        if not b:
            break
        got += b
    return got, time.monotonic() - t
# One logged-in session per user and address: a second one of bob fails, alice's works, and
# bob's place is free again once his first session ends.
b1 = imaplib.IMAP4_SSL(*S, ssl_context=ctx); b1.login('bob@example.test', 'bob-pw')
b2 = imaplib.IMAP4_SSL(*S, ssl_context=ctx)
try:
    b2.login('bob@example.test', 'bob-pw'); second = True
except imaplib.IMAP4.error:
    second = False
check(not second, 'second session of bob from one address')
a1 = imaplib.IMAP4_SSL(*S, ssl_context=ctx); a1.login('alice@example.test', 'alice-pw'); a1.logout()
b1.logout(); b2.logout(); time.sleep(1.0)
b3 = imaplib.IMAP4_SSL(*S, ssl_context=ctx); b3.login('bob@example.test', 'bob-pw'); b3.logout()
time.sleep(0.3)
# Plain, idle after the greeting: BYE and close after about 2 s.
c = socket.create_connection(P, 10)
got, took = read_all(c, 15)
check(got.startswith(b'* OK') and b'* BYE' in got and took < 6, 'plain: %r after %.1f s' % (got, took))
# Implicit TLS, no handshake at all: closed.
c = socket.create_connection(S, 10)
got, took = read_all(c, 15)
check(got == b'' and took < 6, 'tls: %r after %.1f s' % (got, took))
# A fourth connection from one address: BYE Too many connections; another address is served.
held = [socket.create_connection(P, 10) for _ in range(3)]
for h in held:
    check(h.recv(1000).startswith(b'* OK'), 'greeting')
c = socket.create_connection(P, 10)
got, _ = read_all(c, 5)
check(got == b'* BYE Too many connections\\r\\n', 'limit: %r' % got)
o = socket.create_connection(P, 10, source_address=('127.0.0.2', 0))
check(o.recv(1000).startswith(b'* OK'), 'other address refused')
print('OK')
",
        pi = s.imap.ip(),
        pp = s.imap.port(),
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    python(&script);
}

/// A command that fails to parse with a LITERAL+ message: the message's lines are never run
/// as commands (a real TLS client, raw bytes).
#[test]
fn literal_of_a_bad_command_is_not_run() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-literal");
    let s = start(tmp.path());
    let script = format!(
        "{PRELUDE}
S = ('{si}', {sp})
m = imaplib.IMAP4_SSL(*S, ssl_context=ctx); m.login('bob@example.test', 'bob-pw')
check(m.create('VictimFolder')[0] == 'OK', 'create'); m.logout()
c = ctx.wrap_socket(socket.create_connection(S, 10), server_hostname='x'); c.settimeout(10)
def until(tag):
    got = b''
    while not got.endswith(b'\\r\\n') or (b'\\r\\n' + tag + b' ') not in b'\\r\\n' + got:
        b = c.recv(65536)
        if not b:
            break
        got += b
    return got
until(b'* OK')
c.sendall(b'l LOGIN bob@example.test bob-pw\\r\\n'); until(b'l')
c.sendall(b'e ENABLE IMAP4rev2\\r\\n'); until(b'e')
body = b'From: x@example.org\\r\\nSubject: hi\\r\\n\\r\\nz1 DELETE VictimFolder\\r\\nz2 CREATE pwned\\r\\n'
# a6 fails to parse (a quoted string that is not UTF-8); a7 (literal8) parses and fails for
# the missing mailbox.
for head, want in [(b'a6 APPEND \"Entw\\xfcrfe\" (\\\\Seen) {{%d+}}' % len(body), b' BAD '), (b'a7 APPEND rt ~{{%d+}}' % len(body), b' NO [TRYCREATE] ')]:
    c.sendall(head + b'\\r\\n' + body + b'\\r\\nn NOOP\\r\\n')
    got = until(b'n')
    check(got.count(want) == 1 and b'z1' not in got and b'z2' not in got, 'reply: %r' % got)
c.sendall(b'x LIST \"\" *\\r\\n'); got = until(b'x')
check(b'VictimFolder' in got and b'pwned' not in got, 'list: %r' % got)
print('OK')
",
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    python(&script);
}

/// Conformance with real clients against the Maildir store: UTF-8 quoted strings after
/// ENABLE IMAP4rev2 (BAD before), RENAME INBOX, subscriptions that outlive their mailboxes,
/// keywords in FLAGS, and APPEND of `\Recent`.
#[test]
fn utf8_names_rename_inbox_and_subscriptions() {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return;
    }
    let tmp = TempDir::new("imap-conf");
    let s = start(tmp.path());
    let script = format!(
        r#"{PRELUDE}
L = ('{li}', {lp}); S = ('{si}', {sp})
lmtp(*L, 'bob@example.test', b'Subject: one\r\n\r\nfirst\r\n')
lmtp(*L, 'bob@example.test', b'Subject: two\r\n\r\nsecond\r\n')
m = imaplib.IMAP4_SSL(*S, ssl_context=ctx); m.login('bob@example.test', 'bob-pw')
uni = '\u00dcn\u00efc\u00f6d\u00e9'.encode()
def bad(f, *args):
    try:
        f(*args)
    except imaplib.IMAP4.error:
        return True
    return False
# IMAP4rev1: quoted strings are 7-bit.
check(bad(m.create, b'"' + uni + b'"'), 'rev1 accepted 8-bit')
typ, data = m.enable('IMAP4rev2')
check(typ == 'OK', 'enable: %r' % data)
# IMAP4rev2: UTF-8 in quoted strings (not when invalid).
typ, data = m.create(b'"' + uni + b'"')
check(typ == 'OK', 'create: %r' % data)
check(bad(m.create, b'"Entw\xfcrfe"'), 'Latin-1 accepted')
typ, data = m.list('""', b'"\xc3\x9c*"')
flat = b' '.join(x if isinstance(x, bytes) else b' '.join(x) for x in data)
check(uni in flat, 'list: %r' % data)
typ, data = m.append(b'"' + uni + b'"', '(\\Seen $Custom)', None, b'Subject: u\r\n\r\nutf\r\n')
check(typ == 'OK', 'append: %r' % data)
typ, data = m.select(b'"' + uni + b'"')
check(typ == 'OK' and data[0] == b'1', 'select: %r' % data)
check(b'$Custom' in m.response('FLAGS')[1][0], 'FLAGS: %r' % m.response('FLAGS')[1])
typ, data = m.store('1', '+FLAGS', '(Fresh)')
check(typ == 'OK' and b'Fresh' in m.response('FLAGS')[1][-1], 'FLAGS after STORE: %r' % (data,))
check(bad(m.append, b'"' + uni + b'"', '(\\Recent)', None, b'Subject: r\r\n\r\nr\r\n'), 'APPEND \\Recent')
m.unselect()
# RENAME INBOX: its messages move, INBOX stays, empty.
typ, data = m.rename('INBOX', 'Old')
check(typ == 'OK', 'rename INBOX: %r' % data)
typ, data = m.status('INBOX', '(MESSAGES)')
check(b'MESSAGES 0' in data[0], 'INBOX after rename: %r' % data)
typ, data = m.select('Old')
check(typ == 'OK' and data[0] == b'2', 'Old: %r' % data)
typ, data = m.fetch('1:2', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
check(b'one' in data[0][1] and b'two' in data[2][1], 'Old messages: %r' % data)
m.unselect()
lmtp(*L, 'bob@example.test', b'Subject: three\r\n\r\nthird\r\n')
typ, data = m.status('INBOX', '(MESSAGES)')
check(b'MESSAGES 1' in data[0], 'INBOX gets new mail: %r' % data)
typ, data = m.rename('Old', 'INBOX')
check(typ == 'NO' and b'[ALREADYEXISTS]' in data[0], 'renamed to INBOX: %r' % data)
# Subscriptions outlive their mailboxes.
m.subscribe('NotThere'); m.create('Temp'); m.subscribe('Temp'); m.delete('Temp')
typ, data = m.lsub('""', '*')
check(b'(\\Noselect) "/" NotThere' in data and b'(\\Noselect) "/" Temp' in data, 'lsub: %r' % data)
typ, data = m._simple_command('LIST', '(SUBSCRIBED)', '""', '"*"')
typ, data = m._untagged_response(typ, data, 'LIST')
check(b'(\\NonExistent \\Subscribed) "/" NotThere' in data and b'(\\NonExistent \\Subscribed) "/" Temp' in data, 'list subscribed: %r' % data)
typ, data = m.list('""', '*')
check(not any(b'NotThere' in d for d in data if isinstance(d, bytes)), 'plain list: %r' % data)
m.logout()
print('OK')
"#,
        li = s.lmtp.ip(),
        lp = s.lmtp.port(),
        si = s.imaps.ip(),
        sp = s.imaps.port(),
    );
    python(&script);
    // Dovecot's layout: the UTF-8 name is stored in modified UTF-7, the old INBOX messages
    // in .Old, the missing subscriptions kept.
    let md = tmp.path().join("mail/example.test/bob/Maildir");
    assert!(md.join(".&ANw-n&AO8-c&APY-d&AOk-/cur").is_dir());
    assert_eq!(fs::read_dir(md.join(".Old/cur")).unwrap().count(), 2);
    let subs = fs::read_to_string(md.join("subscriptions")).unwrap();
    assert!(
        subs.contains("\nNotThere\n") && subs.contains("\nTemp\n"),
        "{subs}"
    );
}
