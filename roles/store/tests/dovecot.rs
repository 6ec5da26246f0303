//! Interoperability with Dovecot 2.3 on the same Maildir, through `doveadm` with a private
//! configuration (no running server needed). Needs the Debian packages `dovecot-core` and
//! `dovecot-imapd` (for `doveadm`); skipped with a message when `doveadm` is not installed,
//! unless `RINGMAIL_REQUIRE_DOVECOT=1` is set (CI), which turns the skip into a failure.
//!
//! Checked both ways: Dovecot reads what the store wrote (UIDVALIDITY, UIDs, flags, keywords,
//! folders, subscriptions, contents), and the store picks up what Dovecot changed (flags,
//! a message Dovecot saved, with the UID Dovecot gave it).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ringmail_store::{Flag, FlagOp, Store, StoreOptions};

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn doveadm() -> Option<PathBuf> {
    ["/usr/bin/doveadm", "/usr/local/bin/doveadm"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The uid/gid Dovecot accesses the mail as: ours, or `nobody` when we are root (Dovecot
/// refuses mail access as root).
fn mail_owner(root: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(root).unwrap();
    if meta.uid() == 0 {
        (65534, 65534)
    } else {
        (meta.uid(), meta.gid())
    }
}

/// A private configuration: no auth service, the user's home comes from `$HOME`.
fn config(dir: &Path, root: &Path) -> PathBuf {
    let (uid, gid) = mail_owner(root);
    let conf = format!(
        r#"base_dir = {run}
state_dir = {state}
log_path = /dev/stderr
ssl = no
protocols =
first_valid_uid = 0
first_valid_gid = 0
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
"#,
        run = dir.join("run").display(),
        state = dir.join("state").display(),
    );
    std::fs::create_dir_all(dir.join("run")).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let path = dir.join("dovecot.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

struct Doveadm {
    bin: PathBuf,
    conf: PathBuf,
    home: PathBuf,
    /// The store root (chowned to `owner` before each run when we are root).
    root: PathBuf,
    owner: (u32, u32),
}

impl Doveadm {
    fn command(&self, args: &[&str]) -> Command {
        // Files the store wrote since the last run are ours: hand them to Dovecot's user.
        let ours = std::fs::metadata(self.root.parent().unwrap())
            .unwrap()
            .uid();
        if self.owner.0 != ours {
            chown_tree(&self.root, self.owner.0, self.owner.1);
        }
        let mut c = Command::new(&self.bin);
        c.arg("-c")
            .arg(&self.conf)
            .args(args)
            .env("HOME", &self.home)
            .env("USER", "bob");
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "doveadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// `doveadm -f tab` output as rows of column -> value.
fn rows(tab: &str) -> Vec<HashMap<String, String>> {
    let mut lines = tab.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.split('\t').collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            cols.iter()
                .zip(l.split('\t'))
                .map(|(c, v)| (c.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn dovecot_reads_the_store_and_the_store_reads_dovecot() {
    let Some(bin) = doveadm() else {
        if std::env::var("RINGMAIL_REQUIRE_DOVECOT").as_deref() == Ok("1")
            || std::env::var("RINGMAIL_REQUIRE_ALL").as_deref() == Ok("1")
        {
            panic!("doveadm not installed (apt-get install dovecot-core dovecot-imapd)");
        }
        eprintln!("skipped: doveadm not installed (apt-get install dovecot-core dovecot-imapd)");
        return;
    };
    let tmp = TempDir(
        std::env::temp_dir().join(format!("ringmail-store-dovecot-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&tmp.0);
    let root = tmp.0.join("vmail");
    std::fs::create_dir_all(&root).unwrap();
    let conf = config(&tmp.0, &root);

    // Written by the store.
    let store = Store::open(
        &root,
        StoreOptions {
            hostname: "mda.example.net".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let user = store.user("Bob@Example.org").unwrap();
    user.create("Work/Projects").unwrap();
    user.subscribe("Work/Projects", true).unwrap();
    for n in 1..=3 {
        let m = format!("Subject: m{n}\nFrom: a@example.net\n\nbody {n}\n");
        user.deliver(None, &mut m.as_bytes(), None).unwrap();
    }
    let d = user
        .deliver(
            Some("Work/Projects"),
            &mut &b"Subject: p\n\nproject\n"[..],
            None,
        )
        .unwrap();
    assert_eq!(d.mailbox, "Work/Projects");
    let mut inbox = user.open("INBOX").unwrap();
    inbox
        .store_flags(&[1], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    inbox.expunge(None).unwrap();
    inbox
        .store_flags(
            &[2],
            FlagOp::Add,
            &[
                Flag::Seen,
                Flag::Answered,
                Flag::Keyword("Important".into()),
            ],
            None,
        )
        .unwrap();
    let uidvalidity = inbox.uidvalidity();

    let dv = Doveadm {
        bin,
        conf,
        home: user.maildir().parent().unwrap().to_owned(),
        root: root.clone(),
        owner: mail_owner(&root),
    };
    let status = rows(&dv.run(&[
        "-f",
        "tab",
        "mailbox",
        "status",
        "messages uidnext uidvalidity",
        "INBOX",
    ]));
    assert_eq!(status[0]["messages"], "2");
    assert_eq!(status[0]["uidnext"], "4");
    assert_eq!(status[0]["uidvalidity"], uidvalidity.to_string());

    let fetched = rows(&dv.run(&["-f", "tab", "fetch", "uid flags", "mailbox", "INBOX", "all"]));
    let uids: Vec<&str> = fetched.iter().map(|r| r["uid"].as_str()).collect();
    assert_eq!(uids, vec!["2", "3"]);
    let flags = &fetched[0]["flags"];
    for f in ["\\Seen", "\\Answered", "Important"] {
        assert!(flags.contains(f), "{flags:?} lacks {f}");
    }
    let body = dv.run(&["fetch", "body", "mailbox", "INBOX", "uid", "3"]);
    assert!(body.contains("body 3"), "{body}");

    let list = dv.run(&["mailbox", "list"]);
    let mut names: Vec<&str> = list.lines().collect();
    names.sort();
    assert_eq!(names, vec!["INBOX", "Work", "Work/Projects"]);
    let subscribed = dv.run(&["mailbox", "list", "-s"]);
    assert_eq!(subscribed.trim(), "Work/Projects");
    let p = rows(&dv.run(&[
        "-f",
        "tab",
        "fetch",
        "uid text",
        "mailbox",
        "Work/Projects",
        "all",
    ]));
    assert_eq!(p[0]["uid"], "1");

    // Changed by Dovecot, seen by the store.
    dv.run(&[
        "flags",
        "add",
        "\\Flagged $Custom",
        "mailbox",
        "INBOX",
        "uid",
        "3",
    ]);
    let saved = dv
        .command(&["save", "-m", "INBOX"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"Subject: from dovecot\n\nhello\n")?;
            c.wait()
        })
        .unwrap();
    assert!(saved.success());
    let dovecot_uid = rows(&dv.run(&[
        "-f", "tab", "search", "mailbox", "INBOX", "subject", "dovecot",
    ]))[0]["uid"]
        .clone();
    let changes = inbox.refresh().unwrap();
    assert!(!changes.uidvalidity_changed);
    assert_eq!(changes.flags, vec![3]);
    assert_eq!(changes.new.len(), 1);
    assert_eq!(
        changes.new[0].to_string(),
        dovecot_uid,
        "Dovecot's UID is kept"
    );
    assert!(inbox.messages()[1].flags.contains(&Flag::Flagged));
    assert!(
        inbox.messages()[1]
            .flags
            .contains(&Flag::Keyword("$Custom".into())),
        "a keyword Dovecot defined is read: {:?}",
        inbox.messages()[1].flags
    );
    let m = inbox.read(changes.new[0]).unwrap();
    assert!(String::from_utf8_lossy(&m).contains("from dovecot"));
    // And back: a delivery after that is visible to Dovecot with the next UID.
    let d = user
        .deliver(None, &mut &b"Subject: after\n\nx\n"[..], None)
        .unwrap();
    let fetched = rows(&dv.run(&["-f", "tab", "fetch", "uid", "mailbox", "INBOX", "all"]));
    assert_eq!(fetched.last().unwrap()["uid"], d.uid.to_string());
}
