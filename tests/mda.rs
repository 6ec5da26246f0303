//! `ringmail mda`'s delivery side against real clients: Python's `smtplib.LMTP` delivering to
//! accounts of an SQLite store, per-recipient replies, plus-addressing into folders, delivery
//! to programs (exit codes mapped to 2xx/4xx/5xx), quotas, and `kill -9` while delivering.
//!
//! Every test starts its own MDA on free loopback ports and its own account store in a
//! temporary directory; every wait is bounded.
//!
//! Debian packages: python3.

mod common;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const PY: &str = "/usr/bin/python3";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringmail")
}

struct Mda {
    lmtp: SocketAddr,
    maildir: PathBuf,
    child: Option<ChildGuard>,
    dir: PathBuf,
    args: Vec<String>,
    starts: u32,
}

impl Mda {
    fn start(dir: &Path, extra: &[String]) -> Mda {
        let db = format!("sqlite:{}", dir.join("accounts.db").display());
        if !dir.join("accounts.db").exists() {
            accounts(&db, &["domain", "add", "example.test"], None);
            accounts(
                &db,
                &["add", "bob@example.test", "--password-stdin"],
                Some("pw\n"),
            );
            accounts(
                &db,
                &[
                    "add",
                    "tiny@example.test",
                    "--password-stdin",
                    "--quota",
                    "5000",
                ],
                Some("pw\n"),
            );
            accounts(
                &db,
                &["alias", "add", "robert@example.test", "bob@example.test"],
                None,
            );
        }
        let lmtp = free_addr();
        let maildir = dir.join("mail");
        let mut args = vec![
            "mda".to_string(),
            "--lmtp".into(),
            lmtp.to_string(),
            "--maildir".into(),
            maildir.display().to_string(),
            "--accounts".into(),
            db,
            "--hostname".into(),
            "mda.example.test".into(),
        ];
        args.extend(extra.iter().cloned());
        let mut m = Mda {
            lmtp,
            maildir,
            child: None,
            dir: dir.to_path_buf(),
            args,
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
        let log = self.dir.join(format!("mda-{}.log", self.starts));
        self.child = Some(ChildGuard::spawn("ringmail mda", &mut cmd, log).unwrap());
        assert!(
            wait_for(Duration::from_secs(20), || TcpStream::connect(self.lmtp)
                .ok()
                .map(|_| ()))
            .is_some(),
            "the MDA did not listen:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| fs::read_to_string(self.dir.join(format!("mda-{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// Every message file of a user's mailbox (`""`: INBOX, `"lists"`: folder .lists).
    fn messages(&self, user: &str, folder: &str) -> Vec<String> {
        let mut dir = self.maildir.join("example.test").join(user).join("Maildir");
        if !folder.is_empty() {
            dir = dir.join(format!(".{folder}"));
        }
        let mut out = Vec::new();
        for sub in ["cur", "new"] {
            if let Ok(rd) = fs::read_dir(dir.join(sub)) {
                for e in rd.flatten() {
                    if let Ok(t) = fs::read_to_string(e.path()) {
                        out.push(t);
                    }
                }
            }
        }
        out
    }
}

/// One LMTP transaction with smtplib.LMTP; returns python's printout: the refused recipients
/// dict (per-recipient replies) or the exception.
fn lmtp(addr: SocketAddr, rcpts: &[&str], msg: &str) -> String {
    let script = format!(
        "import smtplib, sys\n\
         s = smtplib.LMTP('{ip}', {port})\n\
         try:\n\
         \x20   r = s.sendmail('alice@example.test', {rcpts:?}, sys.stdin.buffer.read())\n\
         \x20   print('refused', r)\n\
         except smtplib.SMTPRecipientsRefused as e:\n\
         \x20   print('all refused', e.recipients)\n\
         except smtplib.SMTPDataError as e:\n\
         \x20   print('data error', e.smtp_code, e.smtp_error)\n\
         s.quit()\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    let mut child = Command::new(PY)
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(msg.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "smtplib.LMTP: {text}");
    text
}

fn skip_without_python() -> bool {
    if !Path::new(PY).exists() {
        skip("python3 not installed");
        return true;
    }
    false
}

#[test]
fn lmtp_delivers_per_recipient_into_maildirs_folders_and_programs() {
    if skip_without_python() {
        return;
    }
    let tmp = TempDir::new("mda");
    let dir = tmp.path().to_path_buf();
    let out_file = dir.join("list-copy.eml");
    let tee = dir.join("tee.sh");
    fs::write(
        &tee,
        format!("#!/bin/sh\nexec cat > {}\n", out_file.display()),
    )
    .unwrap();
    let busy = dir.join("busy.sh");
    fs::write(&busy, "#!/bin/sh\ncat >/dev/null\nexit 75\n").unwrap();
    for p in [&tee, &busy] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mda = Mda::start(
        &dir,
        &[
            "--program".into(),
            format!("list@example.test={}", tee.display()),
            "--program".into(),
            format!("busy@example.test={}", busy.display()),
            "--program".into(),
            "broken@example.test=/bin/false".into(),
        ],
    );
    // Folder "lists" exists for bob (Maildir++: .lists with cur/new/tmp).
    let lists = mda.maildir.join("example.test/bob/Maildir/.lists");
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(lists.join(sub)).unwrap();
    }
    fs::write(lists.join("maildirfolder"), "").unwrap();

    let msg = "From: <alice@example.test>\r\nSubject: lmtp\r\nMessage-ID: <m1@example.test>\r\n\r\nHello bob.\r\n";
    let out = lmtp(
        mda.lmtp,
        &[
            "bob@example.test",
            "nobody@example.test",
            "robert@example.test",
            "bob+lists@example.test",
            "list@example.test",
            "busy@example.test",
            "broken@example.test",
        ],
        msg,
    );
    // nobody: refused at RCPT; busy: 4xx after the data, broken: 5xx after the data.
    assert!(
        out.contains("nobody@example.test") && out.contains("550"),
        "{out}"
    );
    let inbox = mda.messages("bob", "");
    // bob directly, and robert (an alias of bob): the same mailbox, so one copy.
    assert_eq!(inbox.len(), 1, "{inbox:?}\n{}", mda.log());
    assert!(
        inbox
            .iter()
            .all(|m| m.starts_with("Return-Path: <alice@example.test>"))
    );
    assert!(
        inbox
            .iter()
            .any(|m| m.contains("Delivered-To: bob@example.test"))
    );
    let folder = mda.messages("bob", "lists");
    assert_eq!(folder.len(), 1, "plus-address into .lists: {folder:?}");
    assert!(folder[0].contains("Delivered-To: bob+lists@example.test"));
    let copy = fs::read_to_string(&out_file).unwrap_or_default();
    assert!(copy.contains("Hello bob."), "program got: {copy:?}");
    let log = mda.log();
    assert!(log.contains("exit 75"), "{log}");
    assert!(log.contains("exit 1"), "{log}");

    // Per-recipient replies after the data: drive LMTP by hand to see each one.
    let s = TcpStream::connect(mda.lmtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    let mut read = |r: &mut std::io::BufReader<TcpStream>| {
        let mut lines = Vec::new();
        loop {
            line.clear();
            std::io::BufRead::read_line(r, &mut line).unwrap();
            lines.push(line.trim_end().to_string());
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return lines;
            }
        }
    };
    read(&mut r);
    for cmd in [
        "LHLO mx.example.test",
        "MAIL FROM:<alice@example.test>",
        "RCPT TO:<bob@example.test>",
        "RCPT TO:<busy@example.test>",
        "RCPT TO:<broken@example.test>",
        "DATA",
    ] {
        write!(w, "{cmd}\r\n").unwrap();
        read(&mut r);
    }
    write!(w, "Subject: by hand\r\n\r\nx\r\n.\r\n").unwrap();
    let replies: Vec<String> = (0..3).map(|_| read(&mut r).join(" ")).collect();
    assert!(replies[0].starts_with("250 2.0.0"), "{replies:?}");
    assert!(replies[1].starts_with("451 4.3.0"), "{replies:?}");
    assert!(replies[2].starts_with("550 5.3.0"), "{replies:?}");

    // A body line far over RFC 5322's 998 octets is delivered intact, as Postfix and Dovecot
    // do (such mail is common; refusing it would bounce it).
    let long = "x".repeat(20_000);
    let msg = format!("From: <alice@example.test>\r\nSubject: long\r\n\r\n{long}\r\nend\r\n");
    let out = lmtp(mda.lmtp, &["bob@example.test"], &msg);
    assert!(out.contains("refused {}"), "{out}");
    let inbox = mda.messages("bob", "");
    assert!(
        inbox
            .iter()
            .any(|m| m.contains(&format!("\r\n{long}\r\nend\r\n"))),
        "the long line is stored intact"
    );
}

#[test]
fn quota_and_untrusted_clients_are_refused() {
    if skip_without_python() {
        return;
    }
    let tmp = TempDir::new("mda-quota");
    let dir = tmp.path().to_path_buf();
    let mda = Mda::start(&dir, &[]);
    let big = format!(
        "From: <alice@example.test>\r\nSubject: big\r\n\r\n{}\r\n",
        "x".repeat(1000)
            .repeat(2)
            .chars()
            .collect::<String>()
            .replace("xx", "x\r\n")
    );
    let first = lmtp(mda.lmtp, &["tiny@example.test"], &big);
    assert!(first.contains("refused {}"), "{first}");
    let second = lmtp(mda.lmtp, &["tiny@example.test"], &big);
    assert!(second.contains("552"), "over quota: {second}");
    assert_eq!(mda.messages("tiny", "").len(), 1);

    // Only trusted clients may deliver.
    let mda2 = Mda::start(&dir.join("x"), &["--trusted".into(), "10.9.9.9".into()]);
    let s = TcpStream::connect(mda2.lmtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    assert!(line.starts_with("554 5.7.1"), "{line}");
}

#[test]
fn kill9_during_lmtp_delivery_loses_no_acknowledged_message() {
    if skip_without_python() {
        return;
    }
    let tmp = TempDir::new("mda-crash");
    let dir = tmp.path().to_path_buf();
    let mut mda = Mda::start(&dir, &[]);
    let acked = dir.join("acked.txt");
    // A client that records every message the MDA acknowledged, until the connection dies.
    let script = format!(
        "import smtplib\n\
         f = open('{acked}', 'w')\n\
         try:\n\
         \x20   s = smtplib.LMTP('{ip}', {port})\n\
         \x20   for i in range(100000):\n\
         \x20       m = ('From: <alice@example.test>\\r\\nMessage-ID: <k%d@example.test>\\r\\n\\r\\nbody %d\\r\\n' % (i, i)).encode()\n\
         \x20       s.sendmail('alice@example.test', ['bob@example.test'], m)\n\
         \x20       f.write('<k%d@example.test>\\n' % i); f.flush()\n\
         except Exception as e:\n\
         \x20   print('stopped:', e)\n",
        acked = acked.display(),
        ip = mda.lmtp.ip(),
        port = mda.lmtp.port()
    );
    let mut client = ChildGuard::spawn(
        "lmtp client",
        Command::new(PY).arg("-c").arg(&script),
        dir.join("client.log"),
    )
    .unwrap();
    let enough = wait_for(Duration::from_secs(60), || {
        let n = fs::read_to_string(&acked)
            .unwrap_or_default()
            .lines()
            .count();
        (n >= 50).then_some(n)
    });
    assert!(enough.is_some(), "deliveries too slow:\n{}", mda.log());
    if let Some(c) = &mda.child {
        c.signal(libc::SIGKILL);
    }
    let _ = client.wait_timeout(Duration::from_secs(30));
    mda.restart();
    let acked: Vec<String> = fs::read_to_string(&acked)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let stored = mda.messages("bob", "");
    for id in &acked {
        assert!(
            stored.iter().any(|m| m.contains(id.as_str())),
            "{id} was acknowledged but is not in the Maildir ({} stored, {} acked)",
            stored.len(),
            acked.len()
        );
    }
    // No half-written file is visible.
    assert!(
        stored.iter().all(|m| m.contains("\r\n\r\nbody ")),
        "a truncated message is visible"
    );
    eprintln!(
        "crash test: {} acknowledged, {} stored after kill -9",
        acked.len(),
        stored.len()
    );
}

#[test]
fn mda_config_check_reports_every_error() {
    let tmp = TempDir::new("mda-check");
    let dir = tmp.path().to_path_buf();
    let (code, out) = check_config(
        &dir,
        "mda",
        "[mda]\nhostname = \"mda\"\nlmtp = [\"127.0.0.1:24\"]\nmaildir = \"/var/vmail\"\naccounts = \"sqlite:/tmp/a.db\"\nimaps = [\"nowhere\"]\nquota = 5\n",
    );
    assert_eq!(code, Some(2), "{out}");
    let err = out;
    for want in ["mda.toml:2:", "mda.toml:6:", "mda.toml:7:", "quota"] {
        assert!(err.contains(want), "{want} missing from {err}");
    }
    let (code, out) = check_config(
        &dir,
        "mda",
        "[mda]\nhostname = \"mda.example.test\"\nlmtp = [\"127.0.0.1:24\"]\nmaildir = \"/var/vmail\"\naccounts = \"sqlite:/tmp/a.db\"\n",
    );
    assert_eq!(code, Some(0), "{out}");
}

/// One LMTP transaction over a raw socket (Python): every reply line after DATA, one per
/// accepted recipient (RFC 2033 4.2), printed as `code text`.
fn lmtp_raw(addr: SocketAddr, rcpts: &[&str], msg: &str) -> Vec<String> {
    let script = format!(
        "import socket, sys\n\
         s = socket.create_connection(('{ip}', {port}), timeout=20)\n\
         f = s.makefile('rb')\n\
         def reply():\n\
         \x20   lines = []\n\
         \x20   while True:\n\
         \x20       l = f.readline().decode().rstrip()\n\
         \x20       lines.append(l)\n\
         \x20       if len(l) < 4 or l[3] != '-':\n\
         \x20           return lines[-1]\n\
         reply()\n\
         s.sendall(b'LHLO test\\r\\n'); reply()\n\
         s.sendall(b'MAIL FROM:<alice@example.test>\\r\\n'); reply()\n\
         ok = 0\n\
         for r in {rcpts:?}:\n\
         \x20   s.sendall(('RCPT TO:<%s>\\r\\n' % r).encode())\n\
         \x20   if reply().startswith('250'): ok += 1\n\
         s.sendall(b'DATA\\r\\n'); reply()\n\
         s.sendall(sys.stdin.buffer.read() + b'.\\r\\n')\n\
         for _ in range(ok):\n\
         \x20   print(reply())\n\
         s.sendall(b'QUIT\\r\\n'); reply()\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    let mut child = Command::new(PY)
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(msg.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "lmtp client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

#[test]
fn duplicate_recipients_are_delivered_once_with_a_reply_each() {
    if skip_without_python() {
        return;
    }
    let tmp = TempDir::new("mda-dup");
    let dir = tmp.path().to_path_buf();
    let mda = Mda::start(&dir, &[]);
    for folder in ["Rt", "lists"] {
        let f = mda
            .maildir
            .join(format!("example.test/bob/Maildir/.{folder}"));
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(f.join(sub)).unwrap();
        }
        fs::write(f.join("maildirfolder"), "").unwrap();
    }
    let msg = "From: <alice@example.test>\r\nSubject: dup\r\n\r\nOnce.\r\n";
    let replies = lmtp_raw(
        mda.lmtp,
        &[
            "bob@example.test",
            "bob@example.test",
            "BOB@example.test",
            "bob@EXAMPLE.test",
            "robert@example.test",
            "bob+Rt@example.test",
            "BOB+Rt@example.test",
            "bob+rt@example.test",
            "bob+LISTS@example.test",
        ],
        msg,
    );
    // One reply per accepted RCPT, all 250.
    assert_eq!(replies.len(), 9, "{replies:?}\n{}", mda.log());
    assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
    // The detail keeps its case: "Rt" is reached by +Rt, and +rt / +LISTS fold to the one
    // folder equal to them ignoring case.
    assert!(
        replies[5].contains("saved to Rt"),
        "{replies:?}\n{}",
        mda.log()
    );
    assert!(replies[8].contains("saved to lists"), "{replies:?}");
    assert_eq!(mda.messages("bob", "").len(), 1, "{}", mda.log());
    assert_eq!(mda.messages("bob", "Rt").len(), 1, "{}", mda.log());
    assert_eq!(mda.messages("bob", "lists").len(), 1, "{}", mda.log());

    // A second transaction is a second delivery (deduplication is per transaction).
    let replies = lmtp_raw(mda.lmtp, &["bob@example.test"; 5], msg);
    assert_eq!(replies.len(), 5, "{replies:?}");
    assert_eq!(mda.messages("bob", "").len(), 2, "{}", mda.log());
}
