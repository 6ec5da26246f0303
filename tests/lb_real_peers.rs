//! Real SMTP software on both sides of the load balancer: Postfix's `smtp-sink` (Debian
//! package `postfix`) as the backend, checked with the SMTP health check (banner, EHLO,
//! QUIT), and `swaks` and Python's `smtplib` as clients sending a message through the LB.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SWAKS: &str = "/usr/bin/swaks";
const POOL: &str = "default";

/// Starts `smtp-sink` on `addr` and waits until it listens.
fn smtp_sink(addr: SocketAddr, dir: &TempDir) -> ChildGuard {
    let mut cmd = Command::new(SMTP_SINK);
    if is_root() {
        // smtp-sink refuses to run as root without a user to switch to.
        cmd.args(["-u", "nobody"]);
    }
    cmd.args([&addr.to_string(), "64"]);
    let sink = ChildGuard::spawn(
        "smtp-sink",
        &mut cmd,
        dir.path().join(format!("smtp-sink-{}.log", addr.port())),
    )
    .expect("start smtp-sink");
    let up = wait_for(Duration::from_secs(5), || {
        is_listening(addr.port()).then_some(())
    });
    assert!(up.is_some(), "smtp-sink did not start listening on {addr}");
    sink
}

fn run(engine: &str) {
    skip_unless!(engine_available(engine));
    skip_unless!(find_binary(SMTP_SINK));
    skip_unless!(find_binary(SWAKS));
    let dir = TempDir::new("smtp");
    let backend = free_addr();
    let mut sink = smtp_sink(backend, &dir);
    let lb = Quick::new(engine)
        .backend(backend)
        .opt("--health", "smtp")
        .opt("--health-interval", "200ms")
        .opt("--rise", "1")
        .opt("--fall", "1")
        .start();
    // Up through a real SMTP dialogue with a real server.
    lb.wait_backend_up(POOL, backend, true, Duration::from_secs(5));
    let label = backend.to_string();
    let ok_checks = || {
        lb.metric(
            "ringmail_lb_backend_health_checks_total",
            &[("pool", POOL), ("backend", &label), ("result", "ok")],
        )
    };
    assert!(ok_checks() >= 1.0);

    // swaks: a whole SMTP transaction through the load balancer.
    let lb_addr = lb.addr();
    let (status, out) = run_bounded(
        Command::new(SWAKS).args([
            "--server",
            &lb_addr.ip().to_string(),
            "--port",
            &lb_addr.port().to_string(),
            "--from",
            "sender@example.com",
            "--to",
            "rcpt@example.net",
            "--timeout",
            "10",
        ]),
        Duration::from_secs(20),
    );
    assert!(
        status.success(),
        "[{engine}] swaks through the LB failed:\n{out}"
    );
    for (reply, what) in [
        ("<-  250 2.1.5", "recipient accepted"),
        ("<-  250 2.0.0", "message accepted"),
        ("<-  221", "reply to QUIT"),
    ] {
        assert!(
            out.contains(reply),
            "[{engine}] no {what} ({reply}) in:\n{out}"
        );
    }

    // Python's smtplib, pipelining and all.
    let script = format!(
        "import smtplib\n\
         s = smtplib.SMTP('{ip}', {port}, timeout=10)\n\
         code, _ = s.ehlo('client.example.com')\n\
         assert code == 250, code\n\
         refused = s.sendmail('sender@example.com', ['a@example.net', 'b@example.net'],\n\
         \x20   'Subject: through the LB\\r\\n\\r\\nhello\\r\\n.leading dot\\r\\n')\n\
         assert refused == {{}}, refused\n\
         s.quit()\n\
         print('sent')\n",
        ip = lb_addr.ip(),
        port = lb_addr.port()
    );
    let (status, out) = run_bounded(
        Command::new("python3").args(["-c", &script]),
        Duration::from_secs(20),
    );
    assert!(
        status.success() && out.contains("sent"),
        "[{engine}] smtplib failed:\n{out}"
    );

    // The server goes away: the SMTP check notices and the backend leaves rotation.
    sink.signal(libc::SIGKILL);
    let _ = sink.wait_timeout(Duration::from_secs(5));
    lb.wait_backend_up(POOL, backend, false, Duration::from_secs(5));
    // And comes back once smtp-sink answers again.
    let _sink2 = smtp_sink(backend, &dir);
    lb.wait_backend_up(POOL, backend, true, Duration::from_secs(5));
}

#[test]
fn smtp_clients_through_lb_to_smtp_sink_uring() {
    run("uring");
}

#[test]
fn smtp_clients_through_lb_to_smtp_sink_epoll() {
    run("epoll");
}
