//! `ringmail mx` against real clients and peers: Python's `smtplib` (with STARTTLS), `swaks`
//! (plain, TLS, pipelining), raw sockets for SMTP smuggling, STARTTLS command injection, relay
//! tricks, limits and the PROXY protocol, a private Postfix instance as the sending MTA (it uses
//! STARTTLS and BDAT against us), and NSD serving SPF/DKIM/DMARC/DNSBL records for the sender
//! checks (the fixture of `roles/mailauth/tests/common/mod.rs`, with dkimpy as the signer).
//!
//! Every test starts its own MX on free loopback ports (and its own next hop: a small SMTP sink
//! in this file, or Postfix's `smtp-sink`); every wait is bounded and every process is killed
//! when its guard drops. A test that lacks a tool prints `SKIP:` and returns, unless
//! `RINGMAIL_REQUIRE_ALL=1`, when it fails.
//!
//! Debian packages: postfix (smtp-sink, postfix, sendmail), swaks, python3, nsd, python3-dkim,
//! python3-nacl, python3-authres, openssl.

#[macro_use]
mod common;
#[path = "../roles/mailauth/tests/common/mod.rs"]
mod dnsfix;
#[path = "common/postfix.rs"]
mod postfix;

use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use postfix::{POSTFIX, Postfix, SENDMAIL};

const HOST: &str = "mx.example.test";
const PY: &str = "/usr/bin/python3";
const SWAKS: &str = "/usr/bin/swaks";
const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

// ---------------------------------------------------------------------------------------------
// The next hop: a small SMTP/LMTP sink that records every transaction

#[derive(Clone, Debug, Default)]
struct Delivered {
    helo: String,
    mail_from: String,
    rcpts: Vec<String>,
    data: Vec<u8>,
}

impl Delivered {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The header fields of the message, unfolded, in order.
    fn headers(&self) -> Vec<String> {
        headers_of(&self.text())
    }
}

fn headers_of(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            out.push(line.to_string());
        }
    }
    out
}

struct SinkShared {
    stop: AtomicBool,
    msgs: Mutex<Vec<Delivered>>,
    conns: Mutex<Vec<TcpStream>>,
}

/// An SMTP (or LMTP) server on a free loopback port that accepts everything and keeps it.
struct Sink {
    addr: SocketAddr,
    shared: Arc<SinkShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(lmtp: bool) -> Sink {
        Sink::start_on("127.0.0.1:0".parse().unwrap(), lmtp)
    }

    fn start_on(bind: SocketAddr, lmtp: bool) -> Sink {
        let listener = TcpListener::bind(bind).expect("bind sink");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(SinkShared {
            stop: AtomicBool::new(false),
            msgs: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
        });
        let sh = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                while !sh.stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                            let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                            if let Ok(c) = s.try_clone() {
                                sh.conns.lock().unwrap().push(c);
                            }
                            let sh2 = Arc::clone(&sh);
                            let _ =
                                thread::Builder::new()
                                    .name("sink-conn".into())
                                    .spawn(move || {
                                        let _ = sink_session(s, lmtp, &sh2);
                                    });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .unwrap();
        Sink {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    fn messages(&self) -> Vec<Delivered> {
        self.shared.msgs.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.shared.msgs.lock().unwrap().len()
    }

    /// Waits until at least `n` messages arrived; returns whether they did.
    fn wait_count(&self, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, || (self.count() >= n).then_some(())).is_some()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// The address inside `<...>` of a MAIL/RCPT argument.
fn angle_addr(arg: &str) -> String {
    match (arg.find('<'), arg.find('>')) {
        (Some(a), Some(b)) if a < b => arg[a + 1..b].to_string(),
        _ => arg.trim().to_string(),
    }
}

fn sink_session(s: TcpStream, lmtp: bool, sh: &SinkShared) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 sink.test ESMTP test sink\r\n")?;
    let mut helo = String::new();
    let mut cur: Option<Delivered> = None;
    loop {
        let mut line = Vec::new();
        if r.by_ref().take(64 * 1024).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO ") || upper.starts_with("LHLO ") {
            helo = text[5..].to_string();
            cur = None;
            w.write_all(
                b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n",
            )?;
        } else if upper.starts_with("HELO ") {
            helo = text[5..].to_string();
            w.write_all(b"250 sink.test\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            cur = Some(Delivered {
                helo: helo.clone(),
                mail_from: angle_addr(&text[10..]),
                ..Delivered::default()
            });
            w.write_all(b"250 2.1.0 Ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            match cur.as_mut() {
                Some(d) => {
                    d.rcpts.push(angle_addr(&text[8..]));
                    w.write_all(b"250 2.1.5 Ok\r\n")?;
                }
                None => w.write_all(b"503 5.5.1 need MAIL\r\n")?,
            }
        } else if upper == "DATA" {
            let Some(mut d) = cur.take().filter(|d| !d.rcpts.is_empty()) else {
                w.write_all(b"554 5.5.1 no valid recipients\r\n")?;
                continue;
            };
            w.write_all(b"354 go ahead\r\n")?;
            loop {
                let mut l = Vec::new();
                if r.by_ref().take(1 << 20).read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                if l.starts_with(b"..") {
                    l.remove(0);
                }
                d.data.extend_from_slice(&l);
            }
            let replies = if lmtp { d.rcpts.len() } else { 1 };
            sh.msgs.lock().unwrap().push(d);
            for _ in 0..replies {
                w.write_all(b"250 2.0.0 Ok: delivered\r\n")?;
            }
        } else if upper == "RSET" {
            cur = None;
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if upper == "NOOP" {
            w.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"502 5.5.2 not implemented\r\n")?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The MX under test

struct Mx {
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    spool: PathBuf,
    args: Vec<String>,
    dir: TempDir,
    starts: usize,
}

impl Mx {
    /// Quick mode relaying to `next_hop` (over SMTP unless `extra` says `--relay-protocol`), one
    /// worker, with an admin listener.
    fn quick(next_hop: SocketAddr, extra: &[&str]) -> Mx {
        let dir = TempDir::new("mx");
        let addr = free_addr();
        let admin = free_addr();
        let spool = dir.path().join("spool");
        let mut args: Vec<String> = [
            "mx",
            "--listen",
            &addr.to_string(),
            "--domain",
            "example.test",
            "--spool",
            &spool.display().to_string(),
            "--relay",
            &next_hop.to_string(),
            "--hostname",
            HOST,
            "--admin",
            &admin.to_string(),
            "--workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--relay-protocol") {
            args.extend(["--relay-protocol".to_string(), "smtp".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Mx::spawn(args, dir, addr, admin, spool)
    }

    /// Config mode: `mx_extra` are more `[mx]` keys, `checks` the `[mx.checks]` body.
    fn config(next_hop: SocketAddr, mx_extra: &str, checks: &str) -> Mx {
        Mx::config_with_relay(next_hop, mx_extra, checks, "")
    }

    /// Config mode with more `[mx.relay]` keys (`relay_extra`).
    fn config_with_relay(
        next_hop: SocketAddr,
        mx_extra: &str,
        checks: &str,
        relay_extra: &str,
    ) -> Mx {
        let dir = TempDir::new("mx");
        let addr = free_addr();
        let admin = free_addr();
        let spool = dir.path().join("spool");
        let text = format!(
            "[mx]\nhostname = \"{HOST}\"\nlisten = [\"{addr}\"]\ndomains = [\"example.test\"]\n\
             spool = \"{}\"\nworkers = 1\nadmin = \"{admin}\"\n{mx_extra}\n\n\
             [mx.checks]\n{checks}\n\n[mx.relay]\nnext_hop = \"{next_hop}\"\nprotocol = \"smtp\"\n\
             {relay_extra}\n",
            spool.display()
        );
        let path = dir.write("mx.toml", &text);
        let args = vec![
            "mx".to_string(),
            "--config".to_string(),
            path.display().to_string(),
        ];
        Mx::spawn(args, dir, addr, admin, spool)
    }

    fn launch(
        args: &[String],
        dir: &Path,
        n: usize,
        addr: SocketAddr,
        admin: SocketAddr,
    ) -> ChildGuard {
        let mut cmd = Command::new(RINGMAIL);
        cmd.args(args).env("RUST_LOG", "info");
        let mut child = ChildGuard::spawn("ringmail mx", &mut cmd, dir.join(format!("mx{n}.log")))
            .expect("spawn");
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(st) = child.try_wait() {
                panic!("ringmail mx exited with {st}:\n{}", child.log_text());
            }
            (is_listening(addr.port()) && is_listening(admin.port())).then_some(())
        });
        assert!(
            ready.is_some(),
            "ringmail mx did not listen on {addr} and {admin} within 20 s:\n{}",
            child.log_text()
        );
        child
    }

    fn spawn(
        args: Vec<String>,
        dir: TempDir,
        addr: SocketAddr,
        admin: SocketAddr,
        spool: PathBuf,
    ) -> Mx {
        let child = Mx::launch(&args, dir.path(), 0, addr, admin);
        Mx {
            child,
            addr,
            admin,
            spool,
            args,
            dir,
            starts: 1,
        }
    }

    /// SIGKILL (a crash), then the same command again on the same spool and ports.
    fn crash_and_restart(&mut self) {
        self.child.signal(libc::SIGKILL);
        assert!(
            self.child.wait_timeout(Duration::from_secs(10)).is_some(),
            "ringmail mx did not die on SIGKILL"
        );
        let gone = wait_for(Duration::from_secs(10), || {
            (!is_listening(self.addr.port()) && !is_listening(self.admin.port())).then_some(())
        });
        assert!(gone.is_some(), "ports still listening after SIGKILL");
        self.child = Mx::launch(
            &self.args,
            self.dir.path(),
            self.starts,
            self.addr,
            self.admin,
        );
        self.starts += 1;
    }

    fn metrics(&self) -> Vec<Sample> {
        let (status, body) = http(self.admin, "GET", "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        parse_metrics(&body).expect("valid Prometheus text")
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    fn accepted(&self) -> f64 {
        self.metric("ringmail_mx_messages_accepted_total", &[])
    }

    fn delivered(&self) -> f64 {
        self.metric("ringmail_mx_deliveries_total", &[("result", "delivered")])
    }

    /// Waits until `n` deliveries are recorded.
    fn wait_delivered(&self, n: f64, timeout: Duration) -> bool {
        wait_for(timeout, || (self.delivered() >= n).then_some(())).is_some()
    }

    fn log(&self) -> String {
        self.child.log_text()
    }

    fn child_alive(&mut self) -> bool {
        self.child.try_wait().is_none()
    }
}

// ---------------------------------------------------------------------------------------------
// A raw SMTP client

#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The first line starts with `prefix` (e.g. "550 5.7.1").
    fn is(&self, prefix: &str) -> bool {
        self.lines.first().is_some_and(|l| l.starts_with(prefix))
    }
}

struct Smtp {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Smtp {
    fn connect(addr: SocketAddr) -> Smtp {
        let s = connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Smtp::over(s)
    }

    fn over(s: TcpStream) -> Smtp {
        Smtp {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// Connects and reads the greeting, which must be 220.
    fn open(addr: SocketAddr) -> Smtp {
        let mut c = Smtp::connect(addr);
        let g = c.reply().expect("greeting");
        assert!(g.is("220 "), "greeting: {g:?}");
        c
    }

    /// Connects, greets, EHLO.
    fn ehlo(addr: SocketAddr, name: &str) -> Smtp {
        let mut c = Smtp::open(addr);
        let r = c.cmd(&format!("EHLO {name}"));
        assert_eq!(r.code, 250, "{r:?}");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("write to the MX");
    }

    fn try_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = self.r.by_ref().take(8192).read_until(b'\n', &mut raw)?;
            if n == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("EOF after {lines:?}"),
                ));
            }
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, format!("{line:?}")))?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    fn reply(&mut self) -> io::Result<Reply> {
        self.try_reply()
    }

    fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
            .unwrap_or_else(|e| panic!("reply to {:?}: {e}", trunc(line)))
    }

    /// DATA, the dot-stuffed message and the final dot; the reply to the message.
    fn data(&mut self, msg: &[u8]) -> Reply {
        let r = self.cmd("DATA");
        assert_eq!(r.code, 354, "{r:?}");
        let mut out = Vec::with_capacity(msg.len() + 16);
        let mut at_line_start = true;
        for &b in msg {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            at_line_start = b == b'\n';
        }
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.send(&out);
        self.reply().expect("reply to the message")
    }

    /// MAIL, RCPT (each must get 250), DATA; the reply to the message.
    fn transaction(&mut self, from: &str, to: &[&str], msg: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(r.code, 250, "MAIL FROM:<{from}>: {r:?}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert_eq!(r.code, 250, "RCPT TO:<{t}>: {r:?}");
        }
        self.data(msg)
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout, with
    /// nothing more sent; anything received is returned as the error.
    fn expect_closed(&mut self) -> Result<(), String> {
        let mut rest = Vec::new();
        match self.r.by_ref().take(64 * 1024).read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err(format!(
                "more data before close: {:?}",
                String::from_utf8_lossy(&rest)
            )),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!(
                "not closed ({e}); got {:?}",
                String::from_utf8_lossy(&rest)
            )),
        }
    }
}

fn trunc(s: &str) -> String {
    if s.len() > 80 {
        format!("{}...({} bytes)", &s[..80], s.len())
    } else {
        s.to_string()
    }
}

/// A small RFC 5322 message with CRLF line ends.
fn message(from: &str, to: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}"
    )
    .into_bytes()
}

/// The first header of a relayed message must be our Received header.
fn assert_our_received_on_top(d: &Delivered, proto: &str) -> String {
    let headers = d.headers();
    let first = headers.first().cloned().unwrap_or_default();
    assert!(
        first.starts_with("Received: from ")
            && first.contains(&format!("by {HOST} (ringmail) with {proto} id ")),
        "first header is not our Received with {proto}: {first:?}\n{}",
        d.text()
    );
    first
}

fn python(script: &str, args: &[String], timeout: Duration) -> (ExitStatus, String) {
    run_bounded(Command::new(PY).arg("-c").arg(script).args(args), timeout)
}

fn have(paths: &[&str]) -> Result<(), String> {
    for p in paths {
        find_binary(p)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. smtplib with STARTTLS, smtp-sink as the next hop, queue and metrics afterwards

const SMTPLIB_SCRIPT: &str = r#"
import smtplib, ssl, sys
port = int(sys.argv[1])
s = smtplib.SMTP('127.0.0.1', port, local_hostname='client.test', timeout=20)
code, resp = s.ehlo()
assert code == 250 and b'STARTTLS' in resp, (code, resp)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
code, resp = s.starttls(context=ctx)
assert code == 220, (code, resp)
print('TLS', s.sock.version())
code, resp = s.ehlo()
assert code == 250 and b'STARTTLS' not in resp, (code, resp)
code, resp = s.mail('alice@sender.test')
assert code == 250, (code, resp)
code, resp = s.rcpt('bob@example.test')
assert code == 250, (code, resp)
msg = (b'From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\n'
       b'Subject: smtplib over TLS\r\nMessage-ID: <smtplib@sender.test>\r\n\r\n'
       b'Hello Bob.\r\n.leading dot\r\n')
code, resp = s.data(msg)
print('DATA', code, resp.decode())
assert code == 250, (code, resp)
s.quit()
"#;

#[test]
fn smtplib_starttls_end_to_end() {
    skip_unless!(have(&[PY, SMTP_SINK]));
    let dir = TempDir::new("smtplib");
    let dump = dir.path().join("dump");
    fs::create_dir_all(&dump).unwrap();
    // smtp-sink drops privileges to postfix when run as root; it must write the dumps.
    run_bounded(
        Command::new("chmod").arg("777").arg(&dump),
        Duration::from_secs(5),
    );
    let sink_addr = free_addr();
    let mut cmd = Command::new(SMTP_SINK);
    if is_root() {
        cmd.args(["-u", "postfix"]);
    }
    cmd.arg("-c")
        .arg("-d")
        .arg(format!("{}/%M.", dump.display()))
        .arg(sink_addr.to_string())
        .arg("64");
    let _sink = ChildGuard::spawn("smtp-sink", &mut cmd, dir.path().join("sink.log")).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || is_listening(sink_addr.port())
            .then_some(()))
        .is_some(),
        "smtp-sink did not listen"
    );
    let mx = Mx::quick(sink_addr, &[]);

    let (st, out) = python(
        SMTPLIB_SCRIPT,
        &[mx.addr.port().to_string()],
        Duration::from_secs(60),
    );
    assert!(
        st.success(),
        "smtplib failed:\n{out}\nMX log:\n{}",
        mx.log()
    );
    let data_line = out
        .lines()
        .find(|l| l.starts_with("DATA "))
        .expect("DATA line");
    let id = data_line
        .split("queued as ")
        .nth(1)
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    assert!(
        data_line.starts_with("DATA 250 2.0.0 Ok: queued as ") && !id.is_empty(),
        "{data_line}"
    );

    assert!(
        mx.wait_delivered(1.0, Duration::from_secs(30)),
        "not delivered:\n{}",
        mx.log()
    );
    // The dump is complete once smtp-sink acknowledged it, which the delivery count implies.
    let files: Vec<PathBuf> = fs::read_dir(&dump)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = fs::read_to_string(&files[0]).unwrap();
    let content: String = text
        .lines()
        .skip_while(|l| l.starts_with("X-"))
        .map(|l| format!("{}\n", l.trim_end_matches('\r')))
        .collect();
    // smtp-sink puts a Received header of its own on top; ours comes right after it.
    let headers: Vec<String> = headers_of(&content)
        .into_iter()
        .skip_while(|h| h.contains("by smtp-sink (smtp-sink)"))
        .collect();
    assert!(
        headers[0].starts_with("Received: from client.test (")
            && headers[0].contains("[127.0.0.1]")
            && headers[0].contains(&format!("by {HOST} (ringmail) with ESMTPS id {id}"))
            && headers[0].contains("for <bob@example.test>"),
        "{content}"
    );
    assert!(content.contains("\n.leading dot\n"), "{content}");
    assert!(
        text.contains("\nX-Mail-Args: <alice@sender.test>"),
        "{text}"
    );
    assert!(
        text.contains("\nX-Rcpt-Args: <bob@example.test>")
            && text.contains(&format!("\nX-Helo-Args: {HOST}\n")),
        "{text}"
    );

    let out = wait_for(Duration::from_secs(10), || {
        let o = Command::new(RINGMAIL)
            .args(["queue", "--spool"])
            .arg(&mx.spool)
            .args(["--admin", &mx.admin.to_string(), "list"])
            .output()
            .expect("ringmail queue");
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        (o.status.success() && s.contains("Mail queue is empty")).then_some(s)
    });
    assert!(out.is_some(), "queue not empty after delivery");

    let m = mx.metrics();
    assert_eq!(
        metric_sum(&m, "ringmail_mx_messages_accepted_total", &[]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "ringmail_mx_deliveries_total",
            &[("result", "delivered")]
        ),
        1.0
    );
    assert_eq!(metric_sum(&m, "ringmail_mx_tls_sessions_total", &[]), 1.0);
    assert_eq!(metric_sum(&m, "ringmail_queue_messages", &[]), 0.0);
}

// ---------------------------------------------------------------------------------------------
// 2. swaks: plain, TLS, pipelining

#[test]
fn swaks_plain_tls_and_pipelining() {
    skip_unless!(have(&[SWAKS]));
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let server = mx.addr.to_string();
    let runs: [(&str, &[&str]); 4] = [
        ("plain", &[]),
        ("tls", &["--tls"]),
        ("pipeline", &["--pipeline"]),
        ("tls-pipeline", &["--tls", "--pipeline"]),
    ];
    for (name, flags) in runs {
        let (st, out) = run_bounded(
            Command::new(SWAKS)
                .args(["--server", &server, "--helo", "client.test"])
                .args(["--from", "alice@sender.test", "--to", "bob@example.test"])
                .args(["--header", &format!("Subject: swaks {name}")])
                .args(["--timeout", "20"])
                .args(flags),
            Duration::from_secs(60),
        );
        assert!(st.success(), "swaks {name} failed:\n{out}");
        assert!(out.contains("250 2.0.0 Ok: queued as "), "{name}:\n{out}");
        if flags.contains(&"--tls") {
            assert!(out.contains("TLS started"), "{name}:\n{out}");
        }
    }
    assert!(sink.wait_count(4, Duration::from_secs(30)), "{}", mx.log());
    for d in sink.messages() {
        let subject = d
            .headers()
            .into_iter()
            .find(|h| h.starts_with("Subject: "))
            .unwrap();
        let proto = if subject.contains("tls") {
            "ESMTPS"
        } else {
            "ESMTP"
        };
        assert_our_received_on_top(&d, proto);
        assert_eq!(d.mail_from, "alice@sender.test");
        assert_eq!(d.rcpts, ["bob@example.test"]);
        assert_eq!(d.helo, HOST, "the MX introduces itself to the next hop");
    }
    assert_eq!(mx.accepted(), 4.0);
}

// ---------------------------------------------------------------------------------------------
// 3. Relay refusal tricks

#[test]
fn relay_tricks_are_refused() {
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.cmd("MAIL FROM:<alice@sender.test>");
    assert_eq!(r.code, 250, "{r:?}");
    // (recipient, must be exactly "550 5.7.1" (policy) rather than any 5xx (grammar))
    let cases = [
        ("bob@other.test", true),
        ("user%other.test@example.test", true),
        ("other.test!user@example.test", true),
        ("\"user@other.test\"@example.test", true),
        ("user@[127.0.0.1]", true),
        ("@a.test,@b.test:user@example.test", false),
        ("user@example.test.other.test", true),
        ("user@other.test.", false),
        ("postmaster@other.test", true),
        ("bob@sub.example.test", true),
    ];
    let mut failures = Vec::new();
    for (rcpt, policy) in cases {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        let ok = if policy {
            r.is("550 5.7.1")
        } else {
            (500..600).contains(&r.code)
        };
        if !ok {
            failures.push(format!("RCPT TO:<{rcpt}> -> {}", r.text()));
        }
    }
    let r = c.cmd("RCPT TO:<BOB@EXAMPLE.TEST>");
    assert_eq!(r.code, 250, "uppercase local domain refused: {r:?}");
    let r = c.data(&message(
        "alice@sender.test",
        "BOB@EXAMPLE.TEST",
        "relay",
        "hi\r\n",
    ));
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(
        failures.is_empty(),
        "not refused as expected:\n{}",
        failures.join("\n")
    );
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    thread::sleep(Duration::from_millis(300));
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].rcpts,
        ["BOB@EXAMPLE.TEST"],
        "only the local recipient"
    );
    assert!(mx.metric("ringmail_mx_refused_total", &[("reason", "relay")]) >= 8.0);
}

// ---------------------------------------------------------------------------------------------
// 4. SMTP smuggling

#[test]
fn smtp_smuggling_is_refused() {
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let smuggled = "MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n\
                    From: <admin@example.test>\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n";
    let variants: [(&str, &str); 4] = [
        ("\\n.\\n", "\n.\n"),
        ("\\n.\\r\\n", "\n.\r\n"),
        ("\\r.\\r\\n", "\r.\r\n"),
        ("\\r\\n.\\n", "\r\n.\n"),
    ];
    for (name, end) in variants {
        let mut c = Smtp::ehlo(mx.addr, "client.test");
        assert_eq!(c.cmd("MAIL FROM:<alice@sender.test>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        let payload = format!(
            "From: <alice@sender.test>\r\nSubject: carrier\r\n\r\ncarrier body{end}{smuggled}QUIT\r\n"
        );
        c.send(payload.as_bytes());
        let r = c
            .reply()
            .unwrap_or_else(|e| panic!("{name}: no reply: {e}\n{}", mx.log()));
        assert!(
            (500..600).contains(&r.code) && r.text().contains("bare"),
            "{name}: {r:?}"
        );
        if let Err(e) = c.expect_closed() {
            panic!("{name}: {e}");
        }
    }
    // A correct message on a new connection still works.
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.transaction(
        "alice@sender.test",
        &["bob@example.test"],
        &message("alice@sender.test", "bob@example.test", "legit", "fine\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    thread::sleep(Duration::from_millis(500));
    assert_eq!(mx.accepted(), 1.0);
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(!msgs[0].text().contains("smuggled"));
    assert!(!msgs[0].text().contains("carrier"));
}

// ---------------------------------------------------------------------------------------------
// 5. STARTTLS command injection

const STARTTLS_INJECTION_SCRIPT: &str = r#"
import socket, ssl, sys
port = int(sys.argv[1])
injected = sys.argv[2].encode()

def reply(s):
    lines = []
    while True:
        line = b''
        while not line.endswith(b'\n'):
            b = s.recv(1)
            if not b:
                raise SystemExit('EOF after %r %r' % (lines, line))
            line += b
        lines.append(line.decode().rstrip('\r\n'))
        if len(line) < 4 or line[3:4] != b'-':
            return lines

s = socket.create_connection(('127.0.0.1', port), timeout=10)
r = reply(s); assert r[0].startswith('220 '), r
s.sendall(b'EHLO client.test\r\n')
r = reply(s); assert r[0].startswith('250'), r
# STARTTLS and the injected command in one write.
s.sendall(b'STARTTLS\r\n' + injected + b'\r\n')
r = reply(s); assert r[0].startswith('220 '), r
# Nothing else may come in plaintext.
s.settimeout(0.5)
try:
    extra = s.recv(1, socket.MSG_PEEK)
    raise SystemExit('plaintext after 220: %r' % extra)
except socket.timeout:
    pass
s.settimeout(10)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, server_hostname='mx.example.test')
t.sendall(b'EHLO client.test\r\n')
r = reply(t)
print('first reply inside TLS:', r)
assert r[0].startswith('250-mx.example.test'), r
assert any('PIPELINING' in l for l in r), r
assert not any('STARTTLS' in l for l in r), r
# An injected MAIL FROM must not have opened a transaction.
t.sendall(b'RCPT TO:<bob@example.test>\r\n')
r = reply(t); print('RCPT:', r); assert r[0].startswith('503'), r
t.sendall(b'NOOP\r\n')
r = reply(t); assert r[0].startswith('250 '), r
t.settimeout(0.5)
try:
    extra = t.recv(1)
    raise SystemExit('unexpected extra reply bytes: %r' % extra)
except socket.timeout:
    pass
t.settimeout(10)
t.sendall(b'QUIT\r\n')
r = reply(t); assert r[0].startswith('221'), r
print('PASS')
"#;

#[test]
fn starttls_command_injection_is_not_answered() {
    skip_unless!(have(&[PY]));
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    for injected in ["RSET", "MAIL FROM:<evil@attacker.test>", "NOOP\r\nRSET"] {
        let (st, out) = python(
            STARTTLS_INJECTION_SCRIPT,
            &[mx.addr.port().to_string(), injected.to_string()],
            Duration::from_secs(60),
        );
        assert!(
            st.success() && out.contains("PASS"),
            "injection of {injected:?}:\n{out}\nMX log:\n{}",
            mx.log()
        );
    }
    assert_eq!(mx.metric("ringmail_mx_tls_sessions_total", &[]), 3.0);
}

// ---------------------------------------------------------------------------------------------
// 6. Limits

#[test]
fn command_limits_and_informational_commands() {
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);

    // A command line longer than 2048 bytes; the session goes on.
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.cmd(&format!("NOOP {}", "x".repeat(3000)));
    assert!(r.is("500 5.5.2"), "{r:?}");
    let r = c.cmd(&format!("MAIL FROM:<{}@sender.test>", "a".repeat(2100)));
    assert!(r.is("500"), "{r:?}");
    assert_eq!(c.cmd("NOOP").code, 250);
    // SIZE beyond the limit.
    let r = c.cmd("MAIL FROM:<alice@sender.test> SIZE=999999999999");
    assert!(r.is("552"), "{r:?}");
    // HELP, VRFY, EXPN.
    let r = c.cmd("HELP");
    assert_eq!(r.code, 214, "{r:?}");
    // AUTH is not offered by the MX: HELP does not list it.
    assert!(!r.lines.concat().contains("AUTH"), "{r:?}");
    let r = c.cmd("VRFY bob");
    assert_eq!(r.code, 252, "{r:?}");
    let r = c.cmd("EXPN staff");
    assert_eq!(r.code, 502, "{r:?}");
    assert_eq!(c.cmd("QUIT").code, 221);

    // 1001 recipients: 452 for the one after 1000; the message goes to the first 1000.
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    assert_eq!(c.cmd("MAIL FROM:<alice@sender.test>").code, 250);
    let mut codes = Vec::new();
    for batch in 0..11 {
        let n = if batch == 10 { 1 } else { 100 };
        let mut cmds = String::new();
        for i in 0..n {
            cmds.push_str(&format!(
                "RCPT TO:<user{}@example.test>\r\n",
                batch * 100 + i
            ));
        }
        c.send(cmds.as_bytes());
        for _ in 0..n {
            codes.push(c.reply().expect("RCPT reply"));
        }
    }
    assert!(
        codes[..1000].iter().all(|r| r.code == 250),
        "{:?}",
        codes.iter().find(|r| r.code != 250)
    );
    assert!(codes[1000].is("452"), "{:?}", codes[1000]);
    let r = c.data(&message(
        "alice@sender.test",
        "user0@example.test",
        "many",
        "hi\r\n",
    ));
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    assert_eq!(sink.messages()[0].rcpts.len(), 1000);

    // Too many errors: 421 and close.
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let mut errors = 0;
    let mut closed_with = None;
    for _ in 0..21 {
        c.send(b"XYZZY\r\n");
        let r = c.reply().expect("reply to a bad command");
        if r.code == 421 {
            closed_with = Some(r);
            break;
        }
        assert!(r.code >= 500, "{r:?}");
        errors += 1;
        // The 421 may follow the error reply at once.
        if errors == 20 {
            let r = c.reply().expect("421 after 20 errors");
            closed_with = Some(r);
            break;
        }
    }
    let r = closed_with.expect("no 421 after 21 errors");
    assert!(r.is("421 4.7.0"), "{r:?}");
    assert_eq!(errors, 20, "error replies before the 421");
    c.expect_closed().unwrap();
}

#[test]
fn message_size_limit_from_config() {
    let sink = Sink::start(false);
    let mx = Mx::config(sink.addr, "max_message_size = 102400", "enabled = false");
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.text().contains("SIZE 102400"), "{ehlo:?}");
    // Declared too big.
    let r = c.cmd("MAIL FROM:<alice@sender.test> SIZE=102401");
    assert!(r.is("552"), "{r:?}");
    // Undeclared, 150 KiB of content.
    let line = format!("{}\r\n", "y".repeat(76));
    let body = line.repeat(150 * 1024 / line.len());
    let r = c.transaction(
        "alice@sender.test",
        &["bob@example.test"],
        &message("alice@sender.test", "bob@example.test", "big", &body),
    );
    assert!(r.is("552 5.3.4"), "{r:?}");
    // The session goes on: a small message is accepted.
    let r = c.transaction(
        "alice@sender.test",
        &["bob@example.test"],
        &message("alice@sender.test", "bob@example.test", "small", "hi\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    thread::sleep(Duration::from_millis(300));
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].text().contains("Subject: small"));
    assert_eq!(mx.accepted(), 1.0);
}

// ---------------------------------------------------------------------------------------------
// 7. PROXY protocol

#[test]
fn proxy_protocol_from_trusted_proxy_only() {
    let sink = Sink::start(false);
    let mx = Mx::config(
        sink.addr,
        "trusted_proxies = [\"127.0.0.1\"]",
        "enabled = false",
    );
    // With the header: the client is 192.0.2.7.
    let mut c = Smtp::connect(mx.addr);
    c.send(
        format!(
            "PROXY TCP4 192.0.2.7 127.0.0.1 40000 {}\r\n",
            mx.addr.port()
        )
        .as_bytes(),
    );
    let g = c.reply().expect("greeting after the PROXY header");
    assert!(g.is("220 "), "{g:?}");
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction(
        "alice@sender.test",
        &["bob@example.test"],
        &message("alice@sender.test", "bob@example.test", "proxied", "hi\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    let received = assert_our_received_on_top(&sink.messages()[0], "ESMTP");
    assert!(received.contains("[192.0.2.7]"), "{received}");
    assert!(!received.contains("127.0.0.1"), "{received}");

    // Without the header: no greeting, and dropped once it sends SMTP.
    let s = connect(mx.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut c = Smtp::over(s);
    match c.try_reply() {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected no greeting from a trusted peer without a header: {other:?}"),
    }
    c.w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.send(b"EHLO client.test\r\n");
    c.expect_closed()
        .unwrap_or_else(|e| panic!("headerless connection: {e}"));
    assert_eq!(
        mx.metric("ringmail_mx_refused_total", &[("reason", "proxy")]),
        1.0
    );

    // Quick mode (no trusted proxies): a PROXY line is SMTP garbage.
    let mx2 = Mx::quick(sink.addr, &[]);
    let mut c = Smtp::open(mx2.addr);
    let r = c.cmd(&format!(
        "PROXY TCP4 192.0.2.7 127.0.0.1 40000 {}",
        mx2.addr.port()
    ));
    assert!((500..600).contains(&r.code), "{r:?}");
    // The session's client is still the TCP peer.
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction(
        "alice@sender.test",
        &["bob@example.test"],
        &message(
            "alice@sender.test",
            "bob@example.test",
            "unproxied",
            "hi\r\n",
        ),
    );
    assert_eq!(r.code, 250, "{r:?}");
    assert!(sink.wait_count(2, Duration::from_secs(30)), "{}", mx2.log());
    let m = sink
        .messages()
        .into_iter()
        .find(|m| m.text().contains("Subject: unproxied"))
        .unwrap();
    let received = assert_our_received_on_top(&m, "ESMTP");
    assert!(received.contains("[127.0.0.1]"), "{received}");
}

// ---------------------------------------------------------------------------------------------
// 8. Connection rate limit

#[test]
fn connection_rate_limit() {
    let sink = Sink::start(false);
    let mx = Mx::config(
        sink.addr,
        "connection_rate = { max = 3, period = \"1m\" }",
        "enabled = false",
    );
    for i in 0..3 {
        let mut c = Smtp::connect(mx.addr);
        let g = c.reply().expect("greeting");
        assert!(g.is("220 "), "connection {}: {g:?}", i + 1);
        assert_eq!(c.cmd("QUIT").code, 221);
    }
    let mut c = Smtp::connect(mx.addr);
    let g = c.reply().expect("greeting of the 4th connection");
    assert!(g.is("421 4.7.0"), "4th connection: {g:?}");
    c.expect_closed().unwrap();
    assert_eq!(
        mx.metric("ringmail_mx_refused_total", &[("reason", "rate")]),
        1.0
    );
}

#[test]
fn message_rate_and_per_address_connection_limits() {
    let sink = Sink::start(false);
    let mx = Mx::config(
        sink.addr,
        "message_rate = { max = 2, period = \"1m\" }\nmax_connections_per_ip = 2",
        "enabled = false",
    );
    let mut a = Smtp::ehlo(mx.addr, "client.test");
    let mut b = Smtp::open(mx.addr);
    let mut c = Smtp::connect(mx.addr);
    let g = c
        .reply()
        .expect("greeting of the 3rd concurrent connection");
    assert!(g.is("421 4.7.0"), "3rd concurrent connection: {g:?}");
    c.expect_closed().unwrap();
    assert_eq!(b.cmd("QUIT").code, 221);
    b.expect_closed().unwrap();
    // The slot is free again once the session is gone.
    let again = wait_for(Duration::from_secs(5), || {
        let mut c = Smtp::connect(mx.addr);
        let g = c.reply().ok()?;
        g.is("220 ").then_some(c)
    });
    let mut again = again.expect("a new connection after one closed");
    assert_eq!(again.cmd("QUIT").code, 221);

    for i in 0..2 {
        let r = a.transaction(
            "alice@sender.test",
            &["bob@example.test"],
            &message("alice@sender.test", "bob@example.test", "rated", "hi\r\n"),
        );
        assert_eq!(r.code, 250, "message {}: {r:?}", i + 1);
    }
    let r = a.cmd("MAIL FROM:<alice@sender.test>");
    assert!(r.is("450 4.7.1"), "3rd message: {r:?}");
    assert_eq!(a.cmd("QUIT").code, 221);
}

#[test]
fn lmtp_next_hop_null_sender_and_several_recipients() {
    let sink = Sink::start(true);
    let mx = Mx::quick(sink.addr, &["--relay-protocol", "lmtp"]);
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let rcpts = [
        "bob@example.test",
        "carol@example.test",
        "dave@example.test",
    ];
    let r = c.transaction(
        "",
        &rcpts,
        &message(
            "mailer-daemon@sender.test",
            "bob@example.test",
            "bounce",
            "undeliverable\r\n",
        ),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    assert!(
        mx.wait_delivered(3.0, Duration::from_secs(10)),
        "{}",
        mx.log()
    );
    let d = &sink.messages()[0];
    assert_eq!(d.helo, HOST);
    assert_eq!(d.mail_from, "", "the null sender is kept");
    assert_eq!(d.rcpts, rcpts);
    let received = assert_our_received_on_top(d, "ESMTP");
    assert!(
        !received.contains(" for <"),
        "several recipients: no `for`: {received}"
    );
    assert_eq!(mx.metric("ringmail_queue_messages", &[]), 0.0);
}

#[test]
fn accepted_message_survives_a_crash_and_is_delivered_once() {
    let hop = free_addr();
    let mut mx = Mx::config_with_relay(
        hop,
        "",
        "enabled = false",
        "retry_min = \"1s\"\nretry_max = \"2s\"",
    );
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.transaction(
        "alice@sender.test",
        &["bob@example.test"],
        &message(
            "alice@sender.test",
            "bob@example.test",
            "durable",
            "keep me\r\n",
        ),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    // The next hop is down: the attempt is deferred.
    let deferred = wait_for(Duration::from_secs(20), || {
        (mx.metric("ringmail_mx_deliveries_total", &[("result", "deferred")]) >= 1.0).then_some(())
    });
    assert!(deferred.is_some(), "{}", mx.log());
    // Committed into a segment (one flush), then moved to files of its own (two more).
    assert!(mx.metric("ringmail_queue_files_synced_total", &[]) >= 3.0);
    assert_eq!(mx.metric("ringmail_queue_segments", &[]), 1.0);
    mx.crash_and_restart();
    assert_eq!(
        mx.metric("ringmail_queue_messages", &[]),
        1.0,
        "recovered from the spool"
    );
    let sink = Sink::start_on(hop, false);
    assert!(
        sink.wait_count(1, Duration::from_secs(30)),
        "not delivered after the restart:\n{}",
        mx.log()
    );
    assert!(mx.wait_delivered(1.0, Duration::from_secs(10)));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.count(), 1, "delivered more than once");
    assert!(sink.messages()[0].text().contains("keep me"));
    assert_eq!(mx.metric("ringmail_queue_messages", &[]), 0.0);
    // SIGTERM: a clean stop, bounded.
    mx.child.signal(libc::SIGTERM);
    let st = mx.child.wait_timeout(Duration::from_secs(20));
    assert!(
        st.is_some_and(|s| s.success()),
        "exit on SIGTERM: {st:?}\n{}",
        mx.log()
    );
}

#[test]
fn idle_and_data_timeouts() {
    let sink = Sink::start(false);
    let mx = Mx::config(
        sink.addr,
        "command_timeout = \"1s\"\ndata_timeout = \"2s\"",
        "enabled = false",
    );
    let t0 = Instant::now();
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.reply().expect("421 after the idle timeout");
    assert!(r.is("421 4.4.2"), "{r:?}");
    c.expect_closed().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());

    // Inside DATA a byte every 300 ms keeps the command timer away, not the DATA timer.
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    assert_eq!(c.cmd("MAIL FROM:<alice@sender.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let t0 = Instant::now();
    c.w.set_nonblocking(false).unwrap();
    c.r.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let reply = loop {
        assert!(t0.elapsed() < Duration::from_secs(10), "no DATA timeout");
        if c.w.write_all(b"x").is_err() {
            break c.reply().ok();
        }
        match c.try_reply() {
            Ok(r) => break Some(r),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}"),
        }
    };
    let r = reply.expect("a reply to the stalled DATA");
    assert!(r.is("421 4.4.2"), "{r:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "DATA timed out after {:?}, before data_timeout",
        t0.elapsed()
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(mx.accepted(), 0.0);
    assert_eq!(mx.metric("ringmail_queue_messages", &[]), 0.0);
}

#[test]
fn large_message_is_relayed_byte_for_byte() {
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let mut rng = Rng::from_time();
    let mut msg = message("alice@sender.test", "bob@example.test", "big", "").to_vec();
    // Lines that need dot-stuffing, empty lines and long printable lines.
    let specials: [&[u8]; 6] = [b".", b"..", b". ", b"...x", b" .", b".\t"];
    while msg.len() < 3 << 20 {
        match rng.range(0, 9) {
            0 => msg.extend_from_slice(specials[rng.range(0, 5) as usize]),
            1 => {}
            _ => {
                let n = rng.range(1, 998) as usize;
                msg.extend((0..n).map(|_| b' ' + (rng.range(0, 94) as u8)));
            }
        }
        msg.extend_from_slice(b"\r\n");
    }
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.transaction("alice@sender.test", &["bob@example.test"], &msg);
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(60)), "{}", mx.log());
    let got = &sink.messages()[0].data;
    assert!(
        got.len() > msg.len() && got.ends_with(&msg),
        "content changed in transit"
    );
    let trace = String::from_utf8_lossy(&got[..got.len() - msg.len()]).into_owned();
    assert!(
        trace.starts_with("Received: ")
            && trace
                .split("\r\n")
                .skip(1)
                .all(|l| l.is_empty() || l.starts_with('\t')),
        "only our Received header is added: {trace:?}"
    );
    assert_eq!(
        mx.metric("ringmail_mx_bytes_accepted_total", &[]),
        msg.len() as f64
    );
}

const TLS_CERT_SCRIPT: &str = r#"
import hashlib, smtplib, ssl, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
code, resp = s.starttls(context=ctx)
assert code == 220, (code, resp)
print('CERT', hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest())
s.quit()
"#;

/// Generates a self-signed certificate and key with openssl; returns the SHA-256 fingerprint.
fn make_cert(dir: &Path, cert: &str, key: &str) -> String {
    let (st, out) = run_bounded(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=mx.example.test", "-keyout"])
            .arg(dir.join(key))
            .arg("-out")
            .arg(dir.join(cert)),
        Duration::from_secs(60),
    );
    assert!(st.success(), "openssl req: {out}");
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(dir.join(cert))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    text.split('=')
        .nth(1)
        .expect("fingerprint")
        .trim()
        .replace(':', "")
        .to_ascii_lowercase()
}

fn served_cert(port: u16) -> String {
    let (st, out) = python(
        TLS_CERT_SCRIPT,
        &[port.to_string()],
        Duration::from_secs(30),
    );
    assert!(st.success(), "{out}");
    out.lines()
        .find_map(|l| l.strip_prefix("CERT "))
        .expect("CERT line")
        .trim()
        .to_string()
}

#[test]
fn configured_certificate_and_reload_on_sighup() {
    skip_unless!(have(&[PY, "/usr/bin/openssl"]));
    let sink = Sink::start(false);
    let certs = TempDir::new("mx-certs");
    let first = make_cert(certs.path(), "a.crt", "a.key");
    let second = make_cert(certs.path(), "b.crt", "b.key");
    assert_ne!(first, second);
    let cert = certs.path().join("mx.crt");
    let key = certs.path().join("mx.key");
    fs::copy(certs.path().join("a.crt"), &cert).unwrap();
    fs::copy(certs.path().join("a.key"), &key).unwrap();
    let mut mx = Mx::config(
        sink.addr,
        &format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        ),
        "enabled = false",
    );
    assert_eq!(served_cert(mx.addr.port()), first);
    fs::copy(certs.path().join("b.crt"), &cert).unwrap();
    fs::copy(certs.path().join("b.key"), &key).unwrap();
    mx.child.signal(libc::SIGHUP);
    let reloaded = wait_for(Duration::from_secs(10), || {
        (served_cert(mx.addr.port()) == second).then_some(())
    });
    assert!(
        reloaded.is_some(),
        "certificate not reloaded:\n{}",
        mx.log()
    );
    // A broken file on reload: the previous certificate stays.
    fs::write(&cert, "not a certificate\n").unwrap();
    mx.child.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(served_cert(mx.addr.port()), second);
    assert!(mx.child_alive(), "the MX died on a bad reload");
}

#[test]
fn smtputf8_message_keeps_its_addresses() {
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let mut c = Smtp::ehlo(mx.addr, "client.test");
    let r = c.cmd("MAIL FROM:<jösé@sender.test> SMTPUTF8");
    assert_eq!(r.code, 250, "{r:?}");
    let r = c.cmd("RCPT TO:<bøb@example.test>");
    assert_eq!(r.code, 250, "{r:?}");
    let r = c.data("From: <jösé@sender.test>\r\nSubject: ünïcode\r\n\r\nhi\r\n".as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
    let _ = c.cmd("QUIT");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    let d = &sink.messages()[0];
    assert_eq!(d.mail_from, "jösé@sender.test");
    assert_eq!(d.rcpts, ["bøb@example.test"]);
    let received = assert_our_received_on_top(d, "UTF8SMTP");
    // The trace header must name the recipient as given (RFC 6531 allows UTF-8 there), or
    // leave the `for` clause out; never another mailbox.
    assert!(
        received.contains("for <bøb@example.test>") || !received.contains(" for <"),
        "{received}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Postfix as the sending MTA

/// The sending Postfix: relays everything to `relay` (us), with opportunistic STARTTLS.
fn postfix_sender(relay: SocketAddr) -> Postfix {
    Postfix::with_config(
        "postfix",
        &format!(
            "myhostname = mta.sender.test\nmydomain = sender.test\nmyorigin = $mydomain\n\
             mydestination =\nlocal_recipient_maps =\n\
             relayhost = [{}]:{}\n\
             inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmynetworks = 127.0.0.0/8\n\
             smtp_dns_support_level = disabled\nsmtp_host_lookup = native\n\
             smtp_tls_security_level = may\nsmtp_tls_loglevel = 1\n",
            relay.ip(),
            relay.port()
        ),
        "",
    )
}

#[test]
fn postfix_relays_to_us_over_starttls() {
    skip_unless!(have(&[POSTFIX, SENDMAIL]));
    if !is_root() {
        skip("a private Postfix instance needs root");
        return;
    }
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let pf = postfix_sender(mx.addr);
    pf.start();
    pf.sendmail(
        "a@sender.test",
        "bob@example.test",
        b"From: A <a@sender.test>\r\nTo: <bob@example.test>\r\nSubject: via postfix\r\n\r\nHello from Postfix.\r\n",
    );
    assert!(
        sink.wait_count(1, Duration::from_secs(60)),
        "Postfix did not deliver through the MX.\nmaillog:\n{}\nMX log:\n{}",
        pf.maillog(),
        mx.log()
    );
    let d = &sink.messages()[0];
    let received = assert_our_received_on_top(d, "ESMTPS");
    assert!(
        received.starts_with("Received: from mta.sender.test ("),
        "{received}"
    );
    assert_eq!(d.mail_from, "a@sender.test");
    assert_eq!(d.rcpts, ["bob@example.test"]);
    assert!(d.text().contains("Hello from Postfix."));
    // Postfix's own trace header follows ours.
    assert!(
        d.headers()
            .get(1)
            .is_some_and(|h| h.starts_with("Received: by mta.sender.test")),
        "{}",
        d.text()
    );
    let log = pf.maillog();
    assert!(log.contains("TLS connection established to"), "{log}");
    assert!(log.contains("status=sent"), "{log}");
    assert_eq!(mx.metric("ringmail_mx_tls_sessions_total", &[]), 1.0);
}

// ---------------------------------------------------------------------------------------------
// 10./11. Sender authentication and DNSBL with NSD

const DNS_TOOLS: &[&str] = &["nsd", "dknewkey", "dkimsign", "openssl"];

struct DnsFixture {
    dns: dnsfix::DnsServer,
    key: dnsfix::DkimKey,
    _dir: dnsfix::TempDir,
}

fn dns_fixture() -> Option<DnsFixture> {
    if !dnsfix::tools_available(DNS_TOOLS) {
        return None;
    }
    let dir = dnsfix::TempDir::new("mx-dkim");
    let key = dnsfix::DkimKey::cached(dir.path(), "sel", "sender.test", dnsfix::KeyType::Rsa2048);
    let zones = [
        dnsfix::Zone::new("sender.test")
            .txt("@", "v=spf1 ip4:127.0.0.1 -all")
            .txt(&key.owner(), &key.dns_txt)
            .txt("_dmarc", "v=DMARC1; p=reject"),
        dnsfix::Zone::new("reject.test")
            .txt("@", "v=spf1 ip4:192.0.2.10 -all")
            .txt("_dmarc", "v=DMARC1; p=reject; adkim=r; aspf=r"),
        dnsfix::Zone::new("spffail.test").txt("@", "v=spf1 -all"),
        dnsfix::Zone::new("bl.test")
            .rr("1.0.0.127 A 127.0.0.2")
            .txt("1.0.0.127", "listed for testing"),
        dnsfix::Zone::new("clean.test"),
    ];
    let dns = dnsfix::DnsServer::start(&zones);
    Some(DnsFixture {
        dns,
        key,
        _dir: dir,
    })
}

fn auth_results(d: &Delivered) -> String {
    d.headers()
        .into_iter()
        .find(|h| h.starts_with("Authentication-Results:"))
        .unwrap_or_else(|| panic!("no Authentication-Results:\n{}", d.text()))
}

#[test]
fn sender_authentication_with_real_dns() {
    let Some(f) = dns_fixture() else { return };
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &["--dns", &f.dns.addr().to_string()]);

    let raw = message(
        "alice@sender.test",
        "bob@example.test",
        "signed",
        "Pay 10 EUR.\r\n",
    );
    let signed = f.key.sign(&raw);
    let tampered = String::from_utf8(signed.clone())
        .unwrap()
        .replacen("Pay 10 EUR.", "Pay 9999 EUR.", 1)
        .into_bytes();

    let mut c = Smtp::ehlo(mx.addr, "mail.sender.test");
    let r = c.transaction("alice@sender.test", &["bob@example.test"], &signed);
    assert_eq!(r.code, 250, "signed: {r:?}\n{}", mx.log());
    let r = c.transaction("alice@sender.test", &["bob@example.test"], &tampered);
    assert_eq!(r.code, 250, "tampered: {r:?}\n{}", mx.log());

    // From: reject.test (p=reject), envelope in sender.test (SPF pass, not aligned), unsigned.
    let forged = message("x@reject.test", "bob@example.test", "forged", "Hi.\r\n");
    let r = c.transaction("bounce@sender.test", &["bob@example.test"], &forged);
    assert!(r.is("550 5.7.1"), "DMARC reject: {r:?}");

    // SPF -all for the envelope domain.
    let r = c.cmd("MAIL FROM:<a@spffail.test>");
    assert!(r.is("550 5.7.23"), "SPF fail: {r:?}");
    let _ = c.cmd("QUIT");

    assert!(sink.wait_count(2, Duration::from_secs(30)), "{}", mx.log());
    thread::sleep(Duration::from_millis(500));
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 2, "only the two accepted messages");
    assert!(msgs.iter().all(|m| !m.text().contains("Subject: forged")));
    for m in &msgs {
        assert_our_received_on_top(m, "ESMTP");
        let ar = auth_results(m);
        assert!(
            ar.starts_with(&format!("Authentication-Results: {HOST};")),
            "{ar}"
        );
        assert!(ar.contains("spf=pass"), "{ar}");
        assert!(ar.contains("dmarc=pass"), "{ar}");
        assert!(ar.contains("header.from=sender.test"), "{ar}");
        if m.text().contains("Pay 9999 EUR.") {
            assert!(ar.contains("dkim=fail"), "tampered: {ar}");
        } else {
            assert!(ar.contains("dkim=pass"), "signed: {ar}");
            assert!(ar.contains("header.d=sender.test"), "signed: {ar}");
        }
    }
    assert_eq!(mx.accepted(), 2.0);
    let m = mx.metrics();
    assert_eq!(
        metric_sum(&m, "ringmail_mx_refused_total", &[("reason", "dmarc")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "ringmail_mx_refused_total", &[("reason", "spf")]),
        1.0
    );
}

#[test]
fn dnsbl_listed_client_is_refused_at_greeting() {
    let Some(f) = dns_fixture() else { return };
    let sink = Sink::start(false);
    let dns = f.dns.addr();
    let listed = Mx::config(
        sink.addr,
        "",
        &format!("dns = \"{dns}\"\ndnsbl = [\"clean.test\", \"bl.test\"]"),
    );
    let mut c = Smtp::connect(listed.addr);
    let g = c.reply().expect("greeting");
    assert!(g.is("554 5.7.1"), "{g:?}");
    assert!(g.text().contains("bl.test"), "{g:?}");
    c.expect_closed().unwrap();
    assert_eq!(
        listed.metric("ringmail_mx_refused_total", &[("reason", "connect")]),
        1.0
    );

    // Not listed there: a normal session.
    let clean = Mx::config(
        sink.addr,
        "",
        &format!("dns = \"{dns}\"\ndnsbl = [\"clean.test\"]"),
    );
    let mut c = Smtp::open(clean.addr);
    assert_eq!(c.cmd("QUIT").code, 221);
}

// ---------------------------------------------------------------------------------------------
// ringmail mx --check

#[test]
fn check_reports_good_and_bad_files() {
    let dir = TempDir::new("mx-check");
    let good = dir.write(
        "good.toml",
        "[mx]\nhostname = \"mx.example.test\"\nlisten = [\"127.0.0.1:2525\"]\n\
         domains = [\"example.test\"]\nspool = \"/tmp/unused-spool\"\n\
         trusted_proxies = [\"10.0.0.0/24\"]\n\n[mx.checks]\ndnsbl = [\"bl.test\"]\n\n\
         [mx.relay]\nnext_hop = \"127.0.0.1:2424\"\n",
    );
    let o = Command::new(RINGMAIL)
        .args(["mx", "--check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains(": ok"), "{out}");
    assert!(
        !Path::new("/tmp/unused-spool").exists(),
        "--check must not create the spool"
    );

    let bad = dir.write(
        "bad.toml",
        "[mx]\nhostname = \"mx\"\nlisten = [\"127.0.0.1:2525\"]\n\
         domains = [\"example.test\"]\nspool = \"/tmp/unused-spool\"\ncolour = \"blue\"\n\
         max_message_size = 10\n\n[mx.relay]\nnext_hop = \"127.0.0.1:2424\"\n",
    );
    let o = Command::new(RINGMAIL)
        .args(["mx", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let name = bad.display().to_string();
    for want in [
        format!("{name}:2:"),
        format!("{name}:6:"),
        format!("{name}:7:"),
        "colour".to_string(),
    ] {
        assert!(err.contains(&want), "{want} missing from:\n{err}");
    }
}

const FORGED_AR_SCRIPT: &str = r#"
import smtplib, sys
msg = (b"Authentication-Results: mx.example.test; dkim=pass header.d=example.test; spf=pass; dmarc=pass\r\n"
       b"Authentication-Results: (forged)\r\n MX.EXAMPLE.TEST;\r\n\tspf=pass\r\n"
       b"ARC-Authentication-Results: i=1; mx.example.test; spf=pass\r\n"
       b"Authentication-Results: other.example; spf=fail\r\n"
       b"From: <alice@sender.test>\r\nTo: <bob@example.test>\r\nSubject: forged\r\n\r\nbody\r\n")
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30)
s.ehlo('client.test')
print(s.sendmail('alice@sender.test', ['bob@example.test'], msg))
s.quit()
"#;

#[test]
fn forged_authentication_results_in_our_name_are_removed() {
    skip_unless!(have(&[PY]));
    let sink = Sink::start(false);
    let mx = Mx::quick(sink.addr, &[]);
    let (st, out) = python(
        FORGED_AR_SCRIPT,
        &[mx.addr.port().to_string()],
        Duration::from_secs(60),
    );
    assert!(st.success(), "smtplib: {out}\n{}", mx.log());
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    let d = &sink.messages()[0];
    let ar: Vec<String> = d
        .headers()
        .into_iter()
        .filter(|h| {
            h.to_ascii_lowercase().starts_with("authentication-results")
                || h.to_ascii_lowercase()
                    .starts_with("arc-authentication-results")
        })
        .collect();
    // Only what the MX itself adds may name mx.example.test; the forged two are gone, the
    // ARC field and the other authserv-id's field stay.
    let ours: Vec<&String> = ar
        .iter()
        .filter(|h| {
            h.to_ascii_lowercase().starts_with("authentication-results")
                && h.to_ascii_lowercase().contains("mx.example.test")
        })
        .collect();
    assert!(
        ours.iter()
            .all(|h| !h.contains("dmarc=pass") && !h.contains("(forged)")),
        "{ar:#?}"
    );
    assert!(
        ar.iter()
            .any(|h| h.starts_with("ARC-Authentication-Results: i=1; mx.example.test")),
        "{ar:#?}"
    );
    assert!(
        ar.iter()
            .any(|h| h.starts_with("Authentication-Results: other.example; spf=fail")),
        "{ar:#?}"
    );
    assert!(d.text().contains("Subject: forged\r\n\r\nbody\r\n"));
    assert!(
        mx.log().contains("removed Authentication-Results"),
        "{}",
        mx.log()
    );
}

const DUPLICATE_RCPT_SCRIPT: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30)
s.ehlo('client.test')
s.mail('alice@sender.test')
for r in ['bob@example.test', 'bob@example.test', 'bob@EXAMPLE.test', 'BOB@example.test']:
    print('RCPT', s.rcpt(r)[0])
print('DATA', s.data(b'Subject: dup\r\n\r\nonce\r\n')[0])
s.quit()
"#;

#[test]
fn duplicate_recipients_are_accepted_and_queued_once() {
    skip_unless!(have(&[PY]));
    let sink = Sink::start(true);
    let mx = Mx::quick(sink.addr, &["--relay-protocol", "lmtp"]);
    let (st, out) = python(
        DUPLICATE_RCPT_SCRIPT,
        &[mx.addr.port().to_string()],
        Duration::from_secs(60),
    );
    assert!(st.success(), "smtplib: {out}\n{}", mx.log());
    // Every RCPT gets its 250, as from Postfix.
    assert_eq!(out.matches("RCPT 250").count(), 4, "{out}");
    assert!(out.contains("DATA 250"), "{out}");
    assert!(sink.wait_count(1, Duration::from_secs(30)), "{}", mx.log());
    assert!(
        mx.wait_delivered(2.0, Duration::from_secs(10)),
        "{}",
        mx.log()
    );
    // The domain compares ignoring case; the local part is the MDA's business.
    let d = &sink.messages()[0];
    assert_eq!(d.rcpts, ["bob@example.test", "BOB@example.test"], "{d:?}");
    assert_eq!(sink.messages().len(), 1);
}
