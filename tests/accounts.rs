//! `ringmail accounts` against SQLite and a real PostgreSQL, and the MX refusing unknown users
//! with an account store.

mod common;

#[path = "../roles/accounts/tests/fixtures/mod.rs"]
mod fixtures;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs `ringmail accounts --db DB ARGS`, feeding `stdin`; returns (success, stdout+stderr).
fn accounts(db: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(RINGMAIL)
        .arg("accounts")
        .args(["--db", db])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringmail accounts");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The same administrative story against any writable store.
fn admin_story(db: &str) {
    let ok = |args: &[&str], stdin: Option<&str>| {
        let (s, out) = accounts(db, args, stdin);
        assert!(s, "{args:?} failed: {out}");
        out
    };
    ok(&["domain", "add", "example.test"], None);
    assert!(ok(&["domain", "list"], None).contains("example.test"));
    ok(
        &["add", "Bob@Example.test", "--password-stdin"],
        Some("s3cret pass\n"),
    );
    ok(
        &["add", "alice@example.test", "--password-stdin"],
        Some("alice-pw\n"),
    );
    ok(
        &["alias", "add", "robert@example.test", "bob@example.test"],
        None,
    );
    let list = ok(&["--json", "list"], None);
    let v: serde_json::Value = serde_json::from_str(&list).expect(&list);
    let bob = v
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["address"] == "bob@example.test")
        .expect("bob listed, lowercased");
    assert_eq!(bob["aliases"][0], "robert@example.test");
    // Logins.
    let (s, out) = accounts(
        db,
        &["auth", "bob@example.test", "--password-stdin"],
        Some("s3cret pass\n"),
    );
    assert!(s, "{out}");
    let (s, _) = accounts(
        db,
        &["auth", "bob@example.test", "--password-stdin"],
        Some("wrong\n"),
    );
    assert!(!s, "a wrong password is refused");
    let (s, _) = accounts(
        db,
        &["auth", "nobody@example.test", "--password-stdin"],
        Some("x\n"),
    );
    assert!(!s, "an unknown user is refused");
    ok(&["disable", "bob@example.test"], None);
    let (s, out) = accounts(
        db,
        &["auth", "bob@example.test", "--password-stdin"],
        Some("s3cret pass\n"),
    );
    assert!(!s && out.contains("disabled"), "{out}");
    ok(&["enable", "bob@example.test"], None);
    ok(
        &["passwd", "bob@example.test", "--password-stdin"],
        Some("new-pw\n"),
    );
    let (s, _) = accounts(
        db,
        &["auth", "bob@example.test", "--password-stdin"],
        Some("new-pw\n"),
    );
    assert!(s);
    // Refusals: passwords never on the command line; unknown domain; domain with accounts.
    let (s, out) = accounts(db, &["add", "carol@example.test"], None);
    assert!(!s && out.contains("--password-stdin"), "{out}");
    let (s, _) = accounts(
        db,
        &["add", "carol@nowhere.test", "--password-stdin"],
        Some("pw\n"),
    );
    assert!(!s, "an account in an unknown domain is refused");
    let (s, _) = accounts(db, &["domain", "del", "example.test"], None);
    assert!(!s, "a domain with accounts cannot be removed");
    ok(&["del", "bob@example.test"], None);
    let list = ok(&["alias", "list"], None);
    assert!(
        !list.contains("robert@"),
        "aliases go with their account: {list}"
    );
}

#[test]
fn accounts_cli_with_sqlite() {
    let dir = TempDir::new("acct-sqlite");
    let db = format!("sqlite:{}", dir.path().join("sub/accounts.db").display());
    admin_story(&db);
}

#[test]
fn accounts_cli_with_postgresql() {
    let Some(pg) = fixtures::PgCluster::start() else {
        if require_all() {
            panic!("PostgreSQL is not installed (RINGMAIL_REQUIRE_ALL=1)");
        }
        skip("PostgreSQL is not installed");
        return;
    };
    admin_story(&pg.url());
}

fn reply(r: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return all;
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            return all;
        }
    }
}

#[test]
fn mx_refuses_unknown_users_with_an_account_store() {
    let dir = TempDir::new("mx-accounts");
    let db = format!("sqlite:{}", dir.path().join("accounts.db").display());
    accounts(&db, &["domain", "add", "example.test"], None);
    let (s, out) = accounts(
        &db,
        &["add", "bob@example.test", "--password-stdin"],
        Some("pw\n"),
    );
    assert!(s, "{out}");
    accounts(
        &db,
        &["alias", "add", "robert@example.test", "bob@example.test"],
        None,
    );
    let listen = free_addr();
    let _mx = ChildGuard::spawn(
        "mx",
        Command::new(RINGMAIL)
            .args([
                "mx",
                "--listen",
                &listen.to_string(),
                "--domain",
                "example.test",
            ])
            .arg("--spool")
            .arg(dir.path().join("spool"))
            .args([
                "--relay",
                &free_addr().to_string(),
                "--hostname",
                "mx.example.test",
            ])
            .args(["--accounts", &db]),
        dir.path().join("mx.log"),
    )
    .unwrap();
    let stream =
        wait_for(Duration::from_secs(15), || TcpStream::connect(listen).ok()).expect("mx listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    assert!(reply(&mut r).starts_with("220"));
    let mut cmd = |c: &str| {
        w.write_all(format!("{c}\r\n").as_bytes()).unwrap();
        reply(&mut r)
    };
    assert!(cmd("EHLO client.test").starts_with("250"));
    assert!(cmd("MAIL FROM:<a@sender.test>").starts_with("250"));
    assert!(cmd("RCPT TO:<bob@example.test>").starts_with("250"));
    assert!(
        cmd("RCPT TO:<ROBERT@example.test>").starts_with("250"),
        "alias"
    );
    assert!(cmd("RCPT TO:<postmaster@example.test>").starts_with("250"));
    // A detail (user+detail@, filed into a folder by the MDA) of a known user.
    assert!(cmd("RCPT TO:<bob+lists@example.test>").starts_with("250"));
    let unknown = cmd("RCPT TO:<nobody@example.test>");
    assert!(unknown.starts_with("550 5.1.1"), "{unknown}");
    let unknown = cmd("RCPT TO:<nobody+x@example.test>");
    assert!(unknown.starts_with("550 5.1.1"), "{unknown}");
    let relay = cmd("RCPT TO:<bob@other.test>");
    assert!(relay.starts_with("550 5.7.1"), "{relay}");
    assert!(cmd("QUIT").starts_with("221"));
}
