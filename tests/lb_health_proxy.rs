//! Health checks of pools that send the PROXY protocol, against real ringmail role servers that
//! trust the LB (`--trusted-proxy`): the check's connection starts with a PROXY v2 LOCAL header
//! (HAProxy's `check-send-proxy`), so a backend that requires a header from its LBs is seen up.
//! Without the header the MSA refuses the LB's own connection and the backend stays down, which
//! is what every rendered deployment (`ringmail deploy render`) would have met.

#[macro_use]
mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;

fn accounts_db(dir: &TempDir) -> String {
    let db = format!("sqlite:{}", dir.path().join("accounts.db").display());
    let st = Command::new(RINGMAIL)
        .args(["accounts", "--db", &db, "domain", "add", "example.test"])
        .status()
        .unwrap();
    assert!(st.success());
    db
}

fn wait_listening(addr: SocketAddr, child: &ChildGuard) {
    wait_for(Duration::from_secs(30), || {
        TcpStream::connect(addr).ok().map(|_| ())
    })
    .unwrap_or_else(|| panic!("{addr} not listening: {}", child.log_text()));
}

fn lb_config(
    admin: SocketAddr,
    listen: &[SocketAddr],
    pools: &[(&str, SocketAddr, &str, bool)],
) -> String {
    let mut c = format!("[global]\nadmin = \"{admin}\"\nengine = \"epoll\"\n");
    for (i, (name, _, _, _)) in pools.iter().enumerate() {
        c.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\nbind = \"{}\"\npool = \"{name}\"\n",
            listen[i]
        ));
    }
    for (name, backend, check, proxy) in pools {
        c.push_str(&format!("\n[pool.{name}]\n"));
        if *proxy {
            c.push_str("proxy_protocol = \"v2\"\n");
        }
        c.push_str(&format!(
            "health = {{ check = \"{check}\", interval = \"1s\", timeout = \"1s\", rise = 2, fall = 2 }}\nbackends = [\"{backend}\"]\n"
        ));
    }
    c
}

#[test]
fn proxied_pools_check_with_a_local_header_and_see_trusting_backends_up() {
    let dir = TempDir::new("lb-health-proxy");
    let db = accounts_db(&dir);
    let (sub, subs) = (free_addr(), free_addr());
    let msa = ChildGuard::spawn(
        "ringmail msa",
        Command::new(RINGMAIL)
            .env("RUST_LOG", "info")
            .args(["msa", "--listen", &sub.to_string()])
            .args(["--listen-tls", &subs.to_string()])
            .args(["--accounts", &db, "--relay", "127.0.0.1:9"])
            .args([
                "--hostname",
                "smtp.example.test",
                "--trusted-proxy",
                "127.0.0.1",
            ])
            .arg("--spool")
            .arg(dir.path().join("spool")),
        dir.path().join("msa.log"),
    )
    .unwrap();
    let (lmtp, imap, imaps) = (free_addr(), free_addr(), free_addr());
    let mda = ChildGuard::spawn(
        "ringmail mda",
        Command::new(RINGMAIL)
            .env("RUST_LOG", "info")
            .args(["mda", "--lmtp", &lmtp.to_string()])
            .args(["--imap", &imap.to_string(), "--imaps", &imaps.to_string()])
            .args(["--accounts", &db, "--hostname", "imap.example.test"])
            .args(["--trusted-proxy", "127.0.0.1"])
            .arg("--maildir")
            .arg(dir.path().join("mail")),
        dir.path().join("mda.log"),
    )
    .unwrap();
    for (a, c) in [(sub, &msa), (subs, &msa), (imap, &mda), (imaps, &mda)] {
        wait_listening(a, c);
    }

    let listen: Vec<SocketAddr> = (0..5).map(|_| free_addr()).collect();
    let admin = free_addr();
    let pools = [
        // Proxied pools: the check sends PROXY v2 LOCAL first.
        ("submission", sub, "smtp-starttls", true),
        ("submissions", subs, "tls", true),
        ("imap", imap, "imap", true),
        ("imaps", imaps, "tls", true),
        // The control: the same STARTTLS check without the header is refused by the MSA.
        ("noheader", sub, "smtp-starttls", false),
    ];
    let lb = Lb::from_config(&lb_config(admin, &listen, &pools), listen.clone(), admin);
    for (name, backend, _, proxy) in pools {
        if proxy {
            lb.wait_backend_up(name, backend, true, Duration::from_secs(20));
        }
    }
    // By now the control has been checked several times, and never passed.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        lb.metric(
            "ringmail_lb_backend_up",
            &[("pool", "noheader"), ("backend", &sub.to_string())]
        ),
        0.0,
        "a check without PROXY header passed against a backend that requires one"
    );
    // The backends saw the checks as the LB's own connections, not as clients it proxied.
    let log = msa.log_text();
    assert!(!log.contains("panicked"), "msa log:\n{log}");
}
