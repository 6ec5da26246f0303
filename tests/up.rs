//! `ringmail up`, the README's first command: it starts what exists on loopback, prints how to
//! try it, and what it prints works.

mod common;
#[path = "../roles/mailauth/tests/common/mod.rs"]
mod dnsfix;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn up_starts_the_mx_the_msa_the_mta_and_the_lb_and_its_try_lines_work() {
    let dir = TempDir::new("up");
    let (lb, admin, mx, mx_admin) = (free_addr(), free_addr(), free_addr(), free_addr());
    let data = dir.path().join("data");
    // The outside world: remote.test's MX is a small SMTP server on 127.0.0.5, found through a
    // real DNS server (NSD), so the MTA's outbound path is the real one.
    let world = dnsfix::tools_available(&["nsd"]).then(|| {
        let ip: std::net::IpAddr = "127.0.0.5".parse().unwrap();
        let port = free_port_on(ip);
        let sink = IdSink::start_on(std::net::SocketAddr::new(ip, port), Duration::ZERO);
        let dns = dnsfix::DnsServer::start(&[dnsfix::Zone::new("remote.test")
            .rr("@ MX 10 mx.remote.test.")
            .rr("mx A 127.0.0.5")]);
        (sink, dns, port)
    });
    let mut up = ChildGuard::spawn(
        "ringmail up",
        Command::new(RINGMAIL)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .args([
                "up",
                "--listen",
                &lb.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args(["--mx-listen", &mx.to_string(), "--domain", "example.test"])
            .args(["--mx-admin", &mx_admin.to_string()])
            .args(["--mx-relay", &free_addr().to_string()])
            .args(["--msa-listen", &free_addr().to_string()])
            .args(["--msa-listen-tls", &free_addr().to_string()])
            .args(["--msa-admin", &free_addr().to_string()])
            .args(["--mta-listen", &free_addr().to_string()])
            .args(["--mta-admin", &free_addr().to_string()])
            .args(["--imap-listen", &free_addr().to_string()])
            .args(["--imaps-listen", &free_addr().to_string()])
            .args(["--lb-imaps", &free_addr().to_string()])
            .args(match &world {
                Some((_, dns, port)) => vec![
                    "--mta-resolver".to_string(),
                    dns.addr().to_string(),
                    "--mta-remote-port".to_string(),
                    port.to_string(),
                ],
                None => vec![],
            })
            .arg("--data")
            .arg(&data),
        dir.path().join("up.log"),
    )
    .unwrap();
    let banner = wait_for(Duration::from_secs(30), || {
        let t = up.log_text();
        t.contains("Stop with Ctrl-C").then_some(t)
    })
    .expect("up prints its banner");
    for want in [
        "started  MX",
        "started  MSA",
        "started  MTA",
        "started  MDA (LMTP)",
        "started  IMAP",
        "._domainkey.example.test",
        "started  load balancer",
        "--auth-user alice@example.test",
        "smtps://",
        "swaks --server",
        "ringmail queue",
    ] {
        assert!(banner.contains(want), "{want} missing from:\n{banner}");
    }
    // The python line, as printed: through the LB to the MSA (STARTTLS to the self-signed
    // certificate, login), which hands the message to the MX.
    let line = banner
        .lines()
        .find(|l| l.trim_start().starts_with("python3 -c"))
        .expect("a python line")
        .trim()
        .to_string();
    let (status, out) = run_bounded(
        Command::new("sh").arg("-c").arg(&line),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{line}\n{out}");
    // MSA -> MX -> MDA: the message lands in bob's Maildir (Dovecot's layout).
    let maildir = data.join("mail/example.test/bob/Maildir");
    let delivered = wait_for(Duration::from_secs(30), || {
        ["cur", "new"].iter().find_map(|d| {
            std::fs::read_dir(maildir.join(d))
                .ok()?
                .flatten()
                .find_map(|e| std::fs::read_to_string(e.path()).ok())
        })
    })
    .unwrap_or_else(|| panic!("nothing in {}:\n{}", maildir.display(), up.log_text()));
    assert!(
        delivered.starts_with("Return-Path: <alice@example.test>"),
        "{delivered}"
    );
    assert!(
        delivered.contains("Delivered-To: bob@example.test"),
        "{delivered}"
    );
    assert!(delivered.contains("hello"), "{delivered}");
    // The imaplib line, as printed: IMAPS through the LB to the MDA, bob reads the message.
    let iline = banner
        .lines()
        .find(|l| l.trim_start().starts_with("python3 -c \"import imaplib"))
        .expect("an imaplib line")
        .trim()
        .to_string();
    let (status, out) = run_bounded(
        Command::new("sh").arg("-c").arg(&iline),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{iline}\n{out}");
    assert!(out.contains("Subject: hi"), "{iline}\n{out}");
    // The curl submission line, as printed, with a message file written the usual way (LF line
    // ends): curl's --crlf makes it SMTP.
    let cline = banner
        .lines()
        .find(|l| l.trim_start().starts_with("curl --url smtps://"))
        .expect("a curl submission line")
        .split("   #")
        .next()
        .unwrap()
        .trim()
        .to_string();
    std::fs::write(
        dir.path().join("message.txt"),
        "From: alice@example.test\nSubject: by curl\n\nhello from curl\n",
    )
    .unwrap();
    let (status, out) = run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg(&cline)
            .current_dir(dir.path()),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{cline}\n{out}");
    wait_for(Duration::from_secs(30), || {
        ["cur", "new"].iter().find_map(|d| {
            std::fs::read_dir(maildir.join(d))
                .ok()?
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .find(|m| m.contains("hello from curl\r\n"))
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "curl's message not in {}:\n{}",
            maildir.display(),
            up.log_text()
        )
    });
    // The queue line works (the MX's queue is empty again).
    let qline = banner
        .lines()
        .find(|l| l.trim_start().starts_with("ringmail queue"))
        .unwrap()
        .trim()
        .replacen("ringmail", RINGMAIL, 1);
    let (s, listed) = run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg(&qline)
            .current_dir(dir.path()),
        Duration::from_secs(10),
    );
    assert!(
        s.success() && listed.contains("Mail queue is empty"),
        "{listed}"
    );
    // Outbound: the same python line to a remote address goes MSA -> MTA -> remote.test's MX,
    // DKIM-signed with up's key.
    if let Some((sink, _dns, _)) = &world {
        let out_line = line.replace("bob@example.test", "carol@remote.test");
        assert!(out_line.contains("From: alice@example.test"), "{out_line}");
        let (status, out) = run_bounded(
            Command::new("sh").arg("-c").arg(&out_line),
            Duration::from_secs(30),
        );
        assert!(status.success(), "{out_line}\n{out}");
        assert!(
            wait_for(Duration::from_secs(60), || (!sink
                .ids
                .lock()
                .unwrap()
                .is_empty())
            .then_some(()))
            .is_some(),
            "nothing reached remote.test's MX:\n{}",
            up.log_text()
        );
        let text = sink.last.lock().unwrap().clone();
        assert!(
            text.starts_with("DKIM-Signature:") && text.contains("d=example.test"),
            "{text}"
        );
        assert!(
            text.contains("(Authenticated sender: alice@example.test)"),
            "{text}"
        );
        // An address literal: the MTA connects to that address, no MX lookup (RFC 5321
        // section 4.1.3).
        let lit_line = line.replace("bob@example.test", "carol@[127.0.0.5]");
        let (status, out) = run_bounded(
            Command::new("sh").arg("-c").arg(&lit_line),
            Duration::from_secs(30),
        );
        assert!(status.success(), "{lit_line}\n{out}");
        assert!(
            wait_for(Duration::from_secs(60), || sink
                .last
                .lock()
                .unwrap()
                .contains("for <carol@[127.0.0.5]>")
                .then_some(()))
            .is_some(),
            "nothing reached [127.0.0.5]:\n{}",
            up.log_text()
        );
        // A recipient that bounces (no such domain): the DSN reaches alice's INBOX through the
        // MTA's transport to up's MX, though the resolver knows nothing of example.test.
        let bounce_line = line.replace("bob@example.test", "nobody@nowhere.remote.test");
        let (status, out) = run_bounded(
            Command::new("sh").arg("-c").arg(&bounce_line),
            Duration::from_secs(30),
        );
        assert!(status.success(), "{bounce_line}\n{out}");
        let alice = data.join("mail/example.test/alice/Maildir");
        let dsn = wait_for(Duration::from_secs(60), || {
            ["cur", "new"].iter().find_map(|d| {
                std::fs::read_dir(alice.join(d))
                    .ok()?
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .find(|m| m.contains("nobody@nowhere.remote.test"))
            })
        })
        .unwrap_or_else(|| panic!("no DSN in {}:\n{}", alice.display(), up.log_text()));
        assert!(dsn.starts_with("Return-Path: <>"), "{dsn}");
        assert!(dsn.contains("Undelivered Mail Returned to Sender"), "{dsn}");
        assert!(dsn.contains("Status: 5.1.2"), "{dsn}");
        let log = up.log_text();
        assert!(
            log.lines().any(|l| l.contains("to=alice@example.test")
                && l.contains(&format!("relay={}[{}]:{}", mx.ip(), mx.ip(), mx.port()))
                && l.contains("status=sent")),
            "the bounce did not go to the MX:\n{log}"
        );
    }
    up.signal(libc::SIGTERM);
    let status = up
        .wait_timeout(Duration::from_secs(30))
        .expect("up exits on SIGTERM");
    assert!(status.success(), "{}", up.log_text());
}
