//! Unit tests of the store.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::index::{self, State};
use crate::*;

/// A temporary directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ringmail-store-{tag}-{}-{}",
            std::process::id(),
            crate::sync::random_guid()
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn store(dir: &TempDir) -> Store {
    Store::open(
        dir.path(),
        StoreOptions {
            hostname: "mda1.example.net".into(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn msg(n: u32) -> Vec<u8> {
    format!("Subject: message {n}\r\nX-N: {n}\r\n\r\nbody {n}\r\n").into_bytes()
}

fn deliver(u: &UserStore, folder: Option<&str>, n: u32) -> Delivered {
    u.deliver(folder, &mut &msg(n)[..], None).unwrap()
}

fn uids(mb: &Mailbox) -> Vec<u32> {
    mb.messages().iter().map(|m| m.uid).collect()
}

fn cur_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("cur"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------- names

#[test]
fn mailbox_names_map_to_maildir_plus_plus() {
    let n = |s: &str| MailboxName::parse(s).unwrap();
    assert_eq!(n("INBOX").dir_name(), "");
    assert_eq!(n("inbox").as_str(), "INBOX");
    assert_eq!(n("InBoX/Sub").as_str(), "INBOX/Sub");
    assert_eq!(n("InBoX/Sub").dir_name(), ".INBOX.Sub");
    assert_eq!(n("Sent").dir_name(), ".Sent");
    assert_eq!(n("A/B/C").dir_name(), ".A.B.C");
    assert_eq!(n("cur").dir_name(), ".cur");
    assert_eq!(n("&AOQ-rger").dir_name(), ".&AOQ-rger");
    assert_eq!(n("with space").dir_name(), ".with space");
    assert_eq!(MailboxName::from_dir_name(".A.B.C"), Some(n("A/B/C")));
    assert_eq!(MailboxName::from_dir_name(".cur"), Some(n("cur")));
    assert_eq!(
        MailboxName::from_dir_name(".INBOX.Sub"),
        Some(n("INBOX/Sub"))
    );
    for not_a_mailbox in [
        "",
        ".",
        "..",
        "...",
        ".A..B",
        ".A.",
        "cur",
        "new",
        "tmp",
        "..ringmail-deleted-x",
        ".inbox",
        ".INBOX",
        ".a*b",
    ] {
        assert_eq!(
            MailboxName::from_dir_name(not_a_mailbox),
            None,
            "{not_a_mailbox:?}"
        );
    }
    assert_eq!(n("A/B").parent(), Some(n("A")));
    assert_eq!(n("A").parent(), None);
}

#[test]
fn hostile_mailbox_names_are_refused() {
    let long = "x".repeat(MAX_NAME_LEN + 1);
    for bad in [
        "",
        "..",
        ".",
        "../../etc",
        "a/../b",
        "/etc",
        "/",
        "a/",
        "a//b",
        ".hidden",
        "a.b",
        "a\0b",
        "a\nb",
        "a\rb",
        "a\tb",
        "a\x7fb",
        "caf\u{e9}",
        "*",
        "a%",
        long.as_str(),
    ] {
        match MailboxName::parse(bad) {
            Err(StoreError::InvalidName(..)) => {}
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    assert!(MailboxName::parse(&"x".repeat(MAX_NAME_LEN)).is_ok());
}

#[test]
fn hostile_names_never_leave_the_maildir() {
    let dir = TempDir::new("hostile");
    let s = store(&dir);
    let u = s.user("Alice@Example.ORG").unwrap();
    assert_eq!(u.address().to_string(), "alice@example.org");
    assert_eq!(
        u.maildir(),
        dir.path().join("example.org/alice/Maildir").as_path()
    );
    for bad in [
        "..",
        "../x",
        "/tmp/x",
        "a/../../b",
        "x\0y",
        ".x",
        "a//b",
        "",
    ] {
        assert!(
            matches!(u.create(bad), Err(StoreError::InvalidName(..))),
            "{bad:?}"
        );
        assert!(
            matches!(u.open(bad), Err(StoreError::InvalidName(..))),
            "{bad:?}"
        );
        assert!(u.delete(bad).is_err());
        assert!(u.rename("INBOX", bad).is_err());
        assert!(matches!(
            u.subscribe(bad, true),
            Err(StoreError::InvalidName(..))
        ));
    }
    // A hostile folder in a delivery goes to INBOX.
    let d = u
        .deliver(Some("../../../etc"), &mut &b"x\n"[..], None)
        .unwrap();
    assert_eq!(d.mailbox, "INBOX");
    // Everything created is inside the user's Maildir.
    for e in fs::read_dir(dir.path()).unwrap() {
        assert_eq!(e.unwrap().file_name(), "example.org");
    }
}

#[test]
fn hostile_user_addresses_are_refused() {
    for bad in [
        "",
        "alice",
        "@example.org",
        "alice@",
        "a@b@c",
        "../x@example.org",
        "a/b@example.org",
        ".alice@example.org",
        "alice.@example.org",
        "al..ice@example.org",
        "alice@../..",
        "alice@exa/mple.org",
        "alice@example..org",
        "alice@.example.org",
        "alice@-x.org",
        "al\0ice@example.org",
        "al ice@example.org",
        "alice@exa mple.org",
        "\u{e9}@example.org",
    ] {
        assert!(
            matches!(UserAddress::parse(bad), Err(StoreError::InvalidUser(..))),
            "{bad:?} accepted"
        );
    }
    let a = UserAddress::parse("John.Doe+tag@Mail.Example.COM").unwrap();
    assert_eq!(a.local(), "john.doe+tag");
    assert_eq!(a.domain(), "mail.example.com");
}

#[test]
fn special_use_by_conventional_name() {
    let s = |n: &str| SpecialUse::by_name(&MailboxName::parse(n).unwrap());
    assert_eq!(s("Sent"), Some(SpecialUse::Sent));
    assert_eq!(s("Sent Messages"), Some(SpecialUse::Sent));
    assert_eq!(s("Drafts"), Some(SpecialUse::Drafts));
    assert_eq!(s("Trash"), Some(SpecialUse::Trash));
    assert_eq!(s("Junk"), Some(SpecialUse::Junk));
    assert_eq!(s("Spam"), Some(SpecialUse::Junk));
    assert_eq!(s("Archive"), Some(SpecialUse::Archive));
    assert_eq!(s("Work/Sent"), None);
    assert_eq!(SpecialUse::Trash.attribute(), "\\Trash");
}

// ---------------------------------------------------------------- file names

#[test]
fn file_names_parse_and_format() {
    let f = FileName::parse("1732761600.M12P34Q5.mx1,S=100,W=104:2,TSFa").unwrap();
    assert_eq!(f.base, "1732761600.M12P34Q5.mx1,S=100,W=104");
    assert_eq!(f.info.as_deref(), Some("TSFa"));
    assert_eq!(f.to_name(), "1732761600.M12P34Q5.mx1,S=100,W=104:2,FSTa");
    assert_eq!(f.size(), Some(100));
    assert_eq!(f.vsize(), Some(104));
    let kw = vec!["$Forwarded".to_string()];
    assert_eq!(
        f.flags(&kw),
        vec![
            Flag::Deleted,
            Flag::Flagged,
            Flag::Seen,
            Flag::Keyword("$Forwarded".into())
        ]
    );
    // Keyword letters without a name are dropped; unknown upper-case letters are preserved.
    let g = FileName::parse("1.M1P1.h:2,PRz").unwrap();
    assert_eq!(g.flags(&kw), vec![Flag::Answered]);
    assert_eq!(maildir::foreign_letters("PRz"), "P");
    // new/ files have no info; no S= means unknown size.
    let n = FileName::parse("1.M1P1.h").unwrap();
    assert_eq!(n.info, None);
    assert_eq!(n.size(), None);
    assert_eq!(n.to_name(), "1.M1P1.h");
    for not_mail in [".", "..", ".nfs123", "", ":2,S", "a\nb"] {
        assert_eq!(FileName::parse(not_mail), None, "{not_mail:?}");
    }
    // Experimental ":1," info: no flags.
    assert_eq!(
        FileName::parse("1.x:1,foo").unwrap().info.as_deref(),
        Some("")
    );
}

#[test]
fn new_base_names_are_unique_and_carry_sizes() {
    let host = maildir::escape_host("mx/1:2,x");
    assert_eq!(host, "mx\\0571\\0722_x");
    let mut seen = HashSet::new();
    for _ in 0..1000 {
        let b = maildir::new_base(&host, 10, 12);
        let f = FileName::parse(&b).unwrap();
        assert_eq!((f.size(), f.vsize()), (Some(10), Some(12)));
        assert!(seen.insert(b));
    }
}

#[test]
fn vsize_counts_bare_lf_across_chunks() {
    let mut c = VsizeCounter::default();
    c.update(b"a\nb\r");
    c.update(b"\nc\n");
    assert_eq!((c.size, c.vsize), (7, 9));
}

#[test]
fn bare_lf_becomes_crlf_across_chunks() {
    let input: &[u8] = b"a\nb\r\nc\rd\n\n\r";
    let want: &[u8] = b"a\r\nb\r\nc\rd\r\n\r\n\r";
    for split in 1..=input.len() {
        let mut w = crate::store::CrlfWriter::default();
        let mut out = Vec::new();
        for c in input.chunks(split) {
            w.convert(c, &mut out);
        }
        assert_eq!(out, want, "chunks of {split}");
    }
}

#[test]
fn stored_messages_have_crlf_lines_matching_their_size() {
    let dir = TempDir::new("crlf");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    // LMTP delivery and APPEND of a bare-LF message.
    u.deliver(
        None,
        &mut &b"Subject: message 1\nX-N: 1\n\nbody 1\n"[..],
        None,
    )
    .unwrap();
    let uid = u
        .open("INBOX")
        .unwrap()
        .append(b"Subject: x\n\nbody\n", &[], None)
        .unwrap();
    let mb = u.open("INBOX").unwrap();
    for m in mb.messages() {
        let bytes = mb.read(m.uid).unwrap();
        assert!(!bytes.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
        assert_eq!(bytes.len() as u64, m.size, "uid {}", m.uid);
        assert_eq!(m.size, m.vsize, "uid {}", m.uid);
    }
    assert_eq!(mb.read(uid).unwrap(), b"Subject: x\r\n\r\nbody\r\n");
    assert_eq!(
        mb.read(1).unwrap(),
        b"Subject: message 1\r\nX-N: 1\r\n\r\nbody 1\r\n"
    );
}

#[test]
fn flags_parse_from_imap() {
    assert_eq!(Flag::parse("\\SEEN"), Some(Flag::Seen));
    assert_eq!(Flag::parse("\\Recent"), None);
    assert_eq!(Flag::parse("$Junk"), Some(Flag::Keyword("$Junk".into())));
    assert_eq!(Flag::parse("bad word"), None);
    assert_eq!(Flag::parse("(x"), None);
    assert_eq!(Flag::Answered.as_imap(), "\\Answered");
}

// ---------------------------------------------------------------- index formats

fn sample_state() -> State {
    let mut st = State::new(1234, "00ff".repeat(8), 5, 77);
    st.keywords = vec!["$Forwarded".into(), "Work".into()];
    st.records.push(index::Record {
        uid: 2,
        modseq: 70,
        size: 10,
        vsize: 11,
        date: 1_700_000_000,
        in_new: false,
        file: "1.M1P1.h,S=10,W=11:2,S".into(),
    });
    st.records.push(index::Record {
        uid: 4,
        modseq: 77,
        size: 5,
        vsize: 5,
        date: 1_700_000_001,
        in_new: true,
        file: "2.M1P1.with space".into(),
    });
    st
}

#[test]
fn index_round_trips_and_detects_damage() {
    let st = sample_state();
    let bytes = st.encode();
    assert_eq!(State::decode(&bytes), Some(st.clone()));
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        assert_eq!(State::decode(&b), None, "flipped byte {i} accepted");
    }
    for cut in 0..bytes.len() {
        assert_eq!(State::decode(&bytes[..cut]), None, "truncated at {cut}");
    }
}

#[test]
fn uidlist_round_trips_and_reads_dovecot_lines() {
    let st = sample_state();
    let text = String::from_utf8(st.encode_uidlist()).unwrap();
    assert!(text.starts_with("3 V1234 N5 G00ff"));
    assert!(text.contains("\n2 :1.M1P1.h,S=10,W=11\n"));
    let u = index::parse_uidlist(text.as_bytes()).unwrap();
    assert_eq!((u.uidvalidity, u.uidnext), (1234, 5));
    assert_eq!(u.uids.get("1.M1P1.h,S=10,W=11"), Some(&2));
    // As Dovecot writes it, with extension fields and flags in the name.
    let dovecot = "3 V1700000000 N12 G0123456789abcdef0123456789abcdef\n\
                   7 W2110 :1700000000.M1P2.host,S=2048,W=2110:2,S\n\
                   11 :1700000001.M1P2.host,S=5\n";
    let u = index::parse_uidlist(dovecot.as_bytes()).unwrap();
    assert_eq!(u.uids.get("1700000000.M1P2.host,S=2048,W=2110"), Some(&7));
    assert_eq!(u.uids.get("1700000001.M1P2.host,S=5"), Some(&11));
    assert_eq!(u.uidnext, 12);
    assert!(
        index::parse_uidlist(b"3 V1 N2\n2 :a\n1 :b\n").is_none(),
        "unsorted"
    );
    assert!(index::parse_uidlist(b"garbage").is_none());
}

#[test]
fn keywords_file_round_trips() {
    let kw = vec!["$Forwarded".to_string(), String::new(), "Work".into()];
    let text = String::from_utf8(index::encode_keywords(&kw)).unwrap();
    assert_eq!(text, "0 $Forwarded\n2 Work\n");
    assert_eq!(index::parse_keywords(&text), kw);
    assert_eq!(
        index::parse_keywords("30 Toomuch\nx y\n1 ok\n"),
        vec!["", "ok"]
    );
}

// ---------------------------------------------------------------- delivery and views

#[test]
fn deliver_open_read_status() {
    let dir = TempDir::new("basic");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    let d1 = deliver(&u, None, 1);
    let d2 = deliver(&u, None, 2);
    assert_eq!((d1.mailbox.as_str(), d1.uid, d2.uid), ("INBOX", 1, 2));
    assert_eq!(d1.uidvalidity, d2.uidvalidity);
    let st = u.status("INBOX").unwrap();
    assert_eq!(
        (st.messages, st.recent, st.unseen, st.uidnext),
        (2, 2, 2, 3)
    );
    assert_eq!(st.size, (msg(1).len() + msg(2).len()) as u64);
    assert_eq!(st.vsize, st.size);
    assert_eq!(st.deleted, 0);
    let mb = u.open("inbox").unwrap();
    assert_eq!(uids(&mb), vec![1, 2]);
    assert!(mb.messages().iter().all(|m| m.recent && m.flags.is_empty()));
    assert_eq!(mb.read(2).unwrap(), msg(2));
    assert!(matches!(mb.read(9), Err(StoreError::NoSuchMessage(9))));
    // Stored with CRLF line ends, so vsize equals size; file names carry S= and W=, info ":2,".
    let m = &mb.messages()[0];
    assert_eq!(m.vsize, m.size);
    for f in cur_files(u.maildir()) {
        assert!(f.contains(",S=") && f.ends_with(":2,"), "{f}");
    }
    // Another session does not get \Recent again.
    assert_eq!(u.status("INBOX").unwrap().recent, 0);
    let mb2 = u.open("INBOX").unwrap();
    assert!(mb2.messages().iter().all(|m| !m.recent));
    // Mail is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&mb.path_of(1).unwrap()), 0o600);
    assert_eq!(mode(&u.maildir().join("ringmail-index")), 0o600);
    assert_eq!(mode(u.maildir()), 0o700);
    assert_eq!(mode(&u.maildir().join("cur")), 0o700);
    // The Dovecot files are there.
    let uidlist = fs::read_to_string(u.maildir().join("dovecot-uidlist")).unwrap();
    assert!(uidlist.starts_with(&format!("3 V{} N3 G", d1.uidvalidity)));
    assert!(u.maildir().join("ringmail-index").exists());
}

#[test]
fn delivery_folder_keeps_case_then_folds_when_unique() {
    let dir = TempDir::new("foldercase");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    u.create("Rt").unwrap();
    u.create("Work").unwrap();
    u.create("WORK").unwrap();
    // Exact names first: capitals can be targeted.
    assert_eq!(deliver(&u, Some("Rt"), 1).mailbox, "Rt");
    assert_eq!(deliver(&u, Some("WORK"), 2).mailbox, "WORK");
    assert_eq!(deliver(&u, Some("Work"), 3).mailbox, "Work");
    // No exact match: the one mailbox equal ignoring case.
    assert_eq!(deliver(&u, Some("rt"), 4).mailbox, "Rt");
    assert_eq!(u.delivery_mailbox(Some("RT")).unwrap().as_str(), "Rt");
    // Ambiguous or missing: INBOX.
    assert_eq!(deliver(&u, Some("work"), 5).mailbox, "INBOX");
    assert_eq!(deliver(&u, Some("Nope"), 6).mailbox, "INBOX");
    assert_eq!(deliver(&u, Some("inbox"), 7).mailbox, "INBOX");
    assert_eq!(u.delivery_mailbox(None).unwrap().as_str(), "INBOX");
    assert_eq!(u.status("Rt").unwrap().messages, 2);
}

#[test]
fn delivery_to_folder_or_inbox() {
    let dir = TempDir::new("folder");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    u.create("Lists/Rust").unwrap();
    assert!(u.maildir().join(".Lists.Rust/cur").is_dir());
    assert!(u.maildir().join(".Lists.Rust/maildirfolder").is_file());
    assert_eq!(deliver(&u, Some("Lists/Rust"), 1).mailbox, "Lists/Rust");
    assert_eq!(deliver(&u, Some("Nope"), 2).mailbox, "INBOX");
    assert!(!u.maildir().join(".Nope").exists());
    assert_eq!(u.status("Lists/Rust").unwrap().messages, 1);
    assert_eq!(u.status("INBOX").unwrap().messages, 1);
    assert!(matches!(
        u.status("Nope"),
        Err(StoreError::NoSuchMailbox(_))
    ));
}

#[test]
fn concurrent_delivery_loses_nothing_and_uids_are_unique() {
    let dir = TempDir::new("concurrent");
    let s = store(&dir);
    let threads = 8;
    let per = 25;
    let mut handles = Vec::new();
    for t in 0..threads {
        // Half the threads use their own Store (as another process would: no shared state).
        let s = if t % 2 == 0 { s.clone() } else { store(&dir) };
        handles.push(std::thread::spawn(move || {
            let u = s.user("bob@example.org").unwrap();
            (0..per)
                .map(|i| {
                    let n = t * 1000 + i;
                    (deliver(&u, None, n).uid, n)
                })
                .collect::<Vec<_>>()
        }));
    }
    let got: Vec<(u32, u32)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let unique: HashSet<u32> = got.iter().map(|g| g.0).collect();
    assert_eq!(unique.len(), (threads * per) as usize);
    let u = s.user("bob@example.org").unwrap();
    let mb = u.open("INBOX").unwrap();
    assert_eq!(mb.messages().len(), (threads * per) as usize);
    for (uid, n) in got {
        assert_eq!(mb.read(uid).unwrap(), msg(n), "uid {uid}");
    }
}

#[test]
fn two_views_see_each_others_changes() {
    let dir = TempDir::new("views");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    for n in 1..=4 {
        deliver(&u, None, n);
    }
    let mut a = u.open("INBOX").unwrap();
    // The other view comes from another Store (as from another process).
    let mut b = store(&dir)
        .user("bob@example.org")
        .unwrap()
        .open("INBOX")
        .unwrap();
    assert!(b.refresh().unwrap().is_empty());

    let up = a
        .store_flags(
            &[2, 3],
            FlagOp::Add,
            &[Flag::Seen, Flag::Keyword("Work".into())],
            None,
        )
        .unwrap();
    assert_eq!(up.updated.len(), 2);
    assert!(
        a.refresh().unwrap().is_empty(),
        "own changes are not reported back"
    );
    let c = b.refresh().unwrap();
    assert_eq!(c.flags, vec![2, 3]);
    assert!(c.new.is_empty() && c.expunged.is_empty());
    assert_eq!(
        b.messages()[1].flags,
        vec![Flag::Seen, Flag::Keyword("Work".into())]
    );
    assert_eq!(b.highestmodseq(), a.highestmodseq());

    deliver(&u, None, 5);
    let c = b.refresh().unwrap();
    assert_eq!(c.new, vec![5]);
    assert_eq!(b.messages().len(), 5);

    a.store_flags(&[1, 3], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    let gone = a.expunge(None).unwrap();
    assert_eq!(
        gone,
        vec![Expunged { seq: 3, uid: 3 }, Expunged { seq: 1, uid: 1 }]
    );
    let c = b.refresh().unwrap();
    assert_eq!(
        c.expunged,
        vec![Expunged { seq: 3, uid: 3 }, Expunged { seq: 1, uid: 1 }]
    );
    assert_eq!(uids(&b), vec![2, 4, 5]);
    // `a` has not seen 5 yet; it does now.
    assert_eq!(a.refresh().unwrap().new, vec![5]);
    assert_eq!(uids(&a), uids(&b));
}

#[test]
fn refresh_is_cheap_when_nothing_changed() {
    let dir = TempDir::new("cheap");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    deliver(&u, None, 1);
    let mut mb = u.open("INBOX").unwrap();
    // Past the 2 s window in which directory mtimes are not trusted.
    std::thread::sleep(Duration::from_millis(2100));
    assert!(mb.refresh().unwrap().is_empty());
    let idx = u.maildir().join("ringmail-index");
    let ino = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(&idx).unwrap());
    let before = ino();
    for _ in 0..10 {
        assert!(mb.refresh().unwrap().is_empty());
    }
    assert_eq!(ino(), before, "a quiet refresh does not rewrite the index");
    // ...and picks up a change right away.
    deliver(&u, None, 2);
    assert_eq!(mb.refresh().unwrap().new, vec![2]);
}

#[test]
fn external_maildir_writers_are_picked_up() {
    let dir = TempDir::new("external");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    deliver(&u, None, 1);
    let mut mb = u.open("INBOX").unwrap();
    // Another MDA drops a file into new/.
    let md = u.maildir().to_owned();
    fs::write(md.join("new/1700000000.M1P1.other"), b"Subject: x\n\nhi\n").unwrap();
    let c = mb.refresh().unwrap();
    assert_eq!(c.new, vec![2]);
    assert!(fs::read_dir(md.join("new")).unwrap().next().is_none());
    assert!(md.join("cur/1700000000.M1P1.other:2,").exists());
    assert_eq!(mb.read(2).unwrap(), b"Subject: x\n\nhi\n");
    assert_eq!(mb.messages()[1].size, 15);
    // A mail client renames a file to set flags (as mutt would).
    fs::rename(
        md.join("cur/1700000000.M1P1.other:2,"),
        md.join("cur/1700000000.M1P1.other:2,FS"),
    )
    .unwrap();
    let c = mb.refresh().unwrap();
    assert_eq!(c.flags, vec![2]);
    assert_eq!(mb.messages()[1].flags, vec![Flag::Flagged, Flag::Seen]);
    // ...and deletes one.
    let f = cur_files(&md)
        .into_iter()
        .find(|f| f.ends_with(",FS"))
        .unwrap();
    fs::remove_file(md.join("cur").join(f)).unwrap();
    let c = mb.refresh().unwrap();
    assert_eq!(c.expunged, vec![Expunged { seq: 2, uid: 2 }]);
}

// ---------------------------------------------------------------- index recovery

#[test]
fn index_rebuilt_after_deletion_keeps_uids_via_uidlist() {
    let dir = TempDir::new("rebuild");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    for n in 1..=5 {
        deliver(&u, None, n);
    }
    let mut mb = u.open("INBOX").unwrap();
    mb.store_flags(&[1], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    mb.expunge(None).unwrap(); // uids 2..=5 left: UIDs are not dense
    mb.store_flags(
        &[3],
        FlagOp::Add,
        &[Flag::Seen, Flag::Keyword("$Label1".into())],
        None,
    )
    .unwrap();
    let v = mb.uidvalidity();
    let modseq = mb.highestmodseq();
    fs::remove_file(u.maildir().join("ringmail-index")).unwrap();

    let mb2 = u.open("INBOX").unwrap();
    assert_eq!(mb2.uidvalidity(), v);
    assert_eq!(uids(&mb2), vec![2, 3, 4, 5]);
    assert_eq!(mb2.uidnext(), 6);
    assert_eq!(
        mb2.messages()[1].flags,
        vec![Flag::Seen, Flag::Keyword("$Label1".into())]
    );
    assert!(
        mb2.highestmodseq() > modseq,
        "MODSEQs restart above the old ones"
    );
    for m in mb2.messages() {
        assert_eq!(mb2.read(m.uid).unwrap(), msg(m.uid));
    }
    // The old view notices nothing but MODSEQ changes.
    let c = mb.refresh().unwrap();
    assert!(!c.uidvalidity_changed && c.new.is_empty() && c.expunged.is_empty());
}

#[test]
fn index_rebuilt_after_corruption() {
    let dir = TempDir::new("corrupt");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    for n in 1..=3 {
        deliver(&u, None, n);
    }
    let mut mb = u.open("INBOX").unwrap();
    mb.store_flags(&[2], FlagOp::Replace, &[Flag::Answered], None)
        .unwrap();
    let v = mb.uidvalidity();
    let idx = u.maildir().join("ringmail-index");
    let mut bytes = fs::read(&idx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    fs::write(&idx, &bytes).unwrap();
    let mb2 = u.open("INBOX").unwrap();
    assert_eq!((mb2.uidvalidity(), uids(&mb2)), (v, vec![1, 2, 3]));
    assert_eq!(mb2.messages()[1].flags, vec![Flag::Answered]);
    assert!(
        State::decode(&fs::read(&idx).unwrap()).is_some(),
        "rewritten"
    );

    // Index and uidlist both gone: UIDs cannot be recovered, so a new UIDVALIDITY.
    fs::write(&idx, b"garbage").unwrap();
    fs::write(u.maildir().join("dovecot-uidlist"), b"garbage").unwrap();
    let mut mb3 = u.open("INBOX").unwrap();
    assert_ne!(mb3.uidvalidity(), v);
    assert!(mb3.uidvalidity() > v);
    assert_eq!(mb3.messages().len(), 3);
    assert_eq!(
        mb3.messages()
            .iter()
            .filter(|m| m.flags == [Flag::Answered])
            .count(),
        1,
        "flags come from the file names"
    );
    let c = mb.refresh().unwrap();
    assert!(c.uidvalidity_changed);
    assert!(mb3.refresh().unwrap().is_empty());
}

#[test]
fn dovecot_maildir_is_adopted_with_its_uids() {
    let dir = TempDir::new("adopt");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    let md = u.maildir().to_owned();
    fs::write(md.join("cur/1700000000.M1P1.old,S=6,W=7:2,Sa"), b"one\nx\n").unwrap();
    fs::write(md.join("cur/1700000001.M1P1.old,S=4:2,"), b"two\n").unwrap();
    fs::write(md.join("new/1700000002.M1P1.old"), b"three\n").unwrap();
    fs::write(
        md.join("dovecot-uidlist"),
        "3 V1600000000 N50 G0123456789abcdef0123456789abcdef\n\
         17 W7 :1700000000.M1P1.old,S=6,W=7\n\
         42 :1700000001.M1P1.old,S=4\n",
    )
    .unwrap();
    fs::write(md.join("dovecot-keywords"), "0 Important\n").unwrap();
    let mb = u.open("INBOX").unwrap();
    assert_eq!(mb.uidvalidity(), 1_600_000_000);
    assert_eq!(uids(&mb), vec![17, 42, 50]);
    assert_eq!(
        mb.messages()[0].flags,
        vec![Flag::Seen, Flag::Keyword("Important".into())]
    );
    assert_eq!(mb.read(50).unwrap(), b"three\n");
    // The sizes STATUS reports: as stored, and the RFC822.SIZEs (W= where the name has it).
    let st = u.status("INBOX").unwrap();
    assert_eq!((st.size, st.vsize), (16, 17));
    assert_eq!(st.vsize, mb.messages().iter().map(|m| m.vsize).sum::<u64>());
    let ul = fs::read_to_string(md.join("dovecot-uidlist")).unwrap();
    assert!(ul.starts_with("3 V1600000000 N51 G0123456789abcdef0123456789abcdef\n"));
    assert!(ul.contains("\n50 :1700000002.M1P1.old\n"));
}

// ---------------------------------------------------------------- quota

#[test]
fn quota_refuses_over_limit() {
    let dir = TempDir::new("quota");
    let s = Store::open(
        dir.path(),
        StoreOptions {
            quota_messages: Some(3),
            quota_bytes: Some(120),
            hostname: "h".into(),
        },
    )
    .unwrap();
    let u = s.user("bob@example.org").unwrap();
    u.create("Archive").unwrap();
    deliver(&u, None, 1);
    deliver(&u, Some("Archive"), 2);
    let (bytes, count) = u.quota().unwrap();
    assert_eq!((bytes, count), ((msg(1).len() + msg(2).len()) as u64, 2));
    // Refused by size hint before reading.
    let err = u.deliver(None, &mut &[0u8; 0][..], Some(1000)).unwrap_err();
    assert!(matches!(err, StoreError::QuotaExceeded { .. }));
    assert!(!err.is_temporary());
    // Refused by the real size, and nothing is left behind.
    let big = [b'x'; 80];
    assert!(matches!(
        u.deliver(None, &mut &big[..], None),
        Err(StoreError::QuotaExceeded { .. })
    ));
    assert!(
        fs::read_dir(u.maildir().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    deliver(&u, None, 3);
    // Message count limit.
    assert!(matches!(
        u.deliver(None, &mut &b"x"[..], None),
        Err(StoreError::QuotaExceeded { .. })
    ));
    let mut mb = u.open("INBOX").unwrap();
    assert!(matches!(
        mb.append(b"x", &[], None),
        Err(StoreError::QuotaExceeded { .. })
    ));
    assert!(matches!(
        mb.copy(&[1], "Archive"),
        Err(StoreError::QuotaExceeded { .. })
    ));
    // Moving within the user is a copy first, so it also needs room.
    mb.store_flags(&[1], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    mb.expunge(None).unwrap();
    assert_eq!(u.quota().unwrap().1, 2);
    deliver(&u, None, 4);
}

// ---------------------------------------------------------------- copy, move, expunge, condstore

#[test]
fn copy_and_move_map_uids() {
    let dir = TempDir::new("copy");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    u.create("Archive").unwrap();
    // Archive already has a message and a different keyword table.
    deliver(&u, Some("Archive"), 100);
    let mut arch = u.open("Archive").unwrap();
    arch.store_flags(&[1], FlagOp::Add, &[Flag::Keyword("Other".into())], None)
        .unwrap();
    for n in 1..=4 {
        deliver(&u, None, n);
    }
    let mut inbox = u.open("INBOX").unwrap();
    inbox
        .store_flags(
            &[2],
            FlagOp::Add,
            &[Flag::Flagged, Flag::Keyword("Work".into())],
            None,
        )
        .unwrap();
    let c = inbox.copy(&[4, 2, 99], "Archive").unwrap();
    assert_eq!(c.uidvalidity, arch.uidvalidity());
    assert_eq!(c.uids, vec![(2, 2), (4, 3)]);
    assert!(c.expunged.is_empty());
    assert_eq!(uids(&inbox), vec![1, 2, 3, 4]);
    let ch = arch.refresh().unwrap();
    assert_eq!(ch.new, vec![2, 3]);
    assert_eq!(arch.read(2).unwrap(), msg(2));
    assert_eq!(
        arch.messages()[1].flags,
        vec![Flag::Flagged, Flag::Keyword("Work".into())],
        "keywords are mapped by name, not by letter"
    );
    assert_eq!(
        arch.messages()[1].internal_date,
        inbox.messages()[1].internal_date
    );
    let kw = fs::read_to_string(u.maildir().join(".Archive/dovecot-keywords")).unwrap();
    assert_eq!(kw, "0 Other\n1 Work\n");
    // Hard links: same inode.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(inbox.path_of(2).unwrap()).unwrap().ino(),
        fs::metadata(arch.path_of(2).unwrap()).unwrap().ino()
    );

    let m = inbox.move_to(&[1, 3], "Archive").unwrap();
    assert_eq!(m.uids, vec![(1, 4), (3, 5)]);
    assert_eq!(
        m.expunged,
        vec![Expunged { seq: 3, uid: 3 }, Expunged { seq: 1, uid: 1 }]
    );
    assert_eq!(uids(&inbox), vec![2, 4]);
    assert_eq!(arch.refresh().unwrap().new, vec![4, 5]);
    assert_eq!(arch.read(5).unwrap(), msg(3));
    assert!(matches!(
        inbox.copy(&[2], "Missing"),
        Err(StoreError::NoSuchMailbox(_))
    ));
    // Copy into the same mailbox gets new UIDs.
    let c = inbox.copy(&[2], "INBOX").unwrap();
    assert_eq!(c.uids, vec![(2, 5)]);
}

/// RENAME INBOX: the messages move into a new mailbox (flags, keywords, dates and order
/// kept; new UIDVALIDITY), INBOX stays empty without reusing UIDs, its folders stay, and a
/// session on INBOX sees the messages expunged.
#[test]
fn rename_inbox_moves_its_messages() {
    let dir = TempDir::new("rename-inbox");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    u.create("INBOX/Sub").unwrap();
    deliver(&u, Some("INBOX/Sub"), 50);
    for n in 1..=4 {
        deliver(&u, None, n);
    }
    let mut inbox = u.open("INBOX").unwrap();
    inbox
        .store_flags(
            &[2],
            FlagOp::Add,
            &[Flag::Seen, Flag::Keyword("$Work".into())],
            None,
        )
        .unwrap();
    inbox
        .store_flags(&[3], FlagOp::Add, &[Flag::Keyword("Zz".into())], None)
        .unwrap();
    inbox
        .store_flags(&[1], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    inbox.expunge(None).unwrap();
    // Delivered after the session opened INBOX: still \Recent for the next one.
    deliver(&u, None, 5);
    // A file another MDA left in new/.
    fs::write(u.maildir().join("new/1700000000.M1P1.other"), msg(6)).unwrap();
    let before = u.status("INBOX").unwrap();
    let dates: Vec<_> = inbox.messages().iter().map(|m| m.internal_date).collect();

    u.rename("INBOX", "Old/2026").unwrap();

    let st = u.status("INBOX").unwrap();
    assert_eq!(st.messages, 0);
    assert_eq!(
        (st.uidvalidity, st.uidnext),
        (before.uidvalidity, before.uidnext)
    );
    assert!(st.highestmodseq > before.highestmodseq);
    assert_eq!(u.status("INBOX/Sub").unwrap().messages, 1, "folders stay");
    let names: Vec<String> = u.list().unwrap().into_iter().map(|m| m.name).collect();
    assert!(names.contains(&"Old".to_string()) && names.contains(&"Old/2026".to_string()));
    let old = u.open("Old/2026").unwrap();
    assert_ne!(old.uidvalidity(), before.uidvalidity);
    let m = old.messages();
    assert_eq!(uids(&old), vec![1, 2, 3, 4, 5]);
    let bodies: Vec<Vec<u8>> = (1..=5).map(|u| old.read(u).unwrap()).collect();
    assert_eq!(bodies, vec![msg(2), msg(3), msg(4), msg(5), msg(6)]);
    assert_eq!(m[0].flags, vec![Flag::Seen, Flag::Keyword("$Work".into())]);
    assert_eq!(m[1].flags, vec![Flag::Keyword("Zz".into())]);
    assert!(m[2].flags.is_empty());
    assert_eq!(m[0].internal_date, dates[0]);
    assert_eq!(
        m.iter().map(|m| m.recent).collect::<Vec<_>>(),
        vec![false, false, false, true, true]
    );
    let kw = fs::read_to_string(u.maildir().join(".Old.2026/dovecot-keywords")).unwrap();
    assert_eq!(kw, "0 $Work\n1 Zz\n");
    assert_eq!(old.keywords(), ["$Work", "Zz"]);
    assert!(
        fs::read_dir(u.maildir().join("cur"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(
        fs::read_dir(u.maildir().join("new"))
            .unwrap()
            .next()
            .is_none()
    );
    // The open INBOX session sees every message go.
    let ch = inbox.refresh().unwrap();
    assert_eq!(ch.expunged.len(), 3);
    assert_eq!(ch.new, Vec::<u32>::new());
    assert!(inbox.is_empty());
    // New mail goes to the (empty) INBOX with fresh UIDs.
    let d = deliver(&u, None, 7);
    assert_eq!((d.mailbox.as_str(), d.uid), ("INBOX", before.uidnext));
    // Renamed again onto an existing name: refused, nothing moved.
    assert!(matches!(
        u.rename("INBOX", "Old/2026"),
        Err(StoreError::MailboxExists(_))
    ));
    assert_eq!(u.status("INBOX").unwrap().messages, 1);
    // Empty INBOX: an empty mailbox; below INBOX works too.
    u.rename("INBOX", "INBOX/Older").unwrap();
    assert_eq!(u.status("INBOX/Older").unwrap().messages, 1);
    assert_eq!(u.status("INBOX").unwrap().messages, 0);
    u.rename("INBOX", "Empty").unwrap();
    assert_eq!(u.status("Empty").unwrap().messages, 0);
    assert_eq!(u.status("Old/2026").unwrap().messages, 5);
}

#[test]
fn expunge_removes_only_deleted_and_respects_uid_set() {
    let dir = TempDir::new("expunge");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    for n in 1..=5 {
        deliver(&u, None, n);
    }
    let mut mb = u.open("INBOX").unwrap();
    mb.store_flags(&[1, 2, 4], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    assert_eq!(u.status("INBOX").unwrap().deleted, 3);
    assert_eq!(
        mb.expunge(Some(&[2, 3])).unwrap(),
        vec![Expunged { seq: 2, uid: 2 }]
    );
    assert_eq!(uids(&mb), vec![1, 3, 4, 5]);
    assert_eq!(
        mb.expunge(None).unwrap(),
        vec![Expunged { seq: 3, uid: 4 }, Expunged { seq: 1, uid: 1 }]
    );
    assert_eq!(uids(&mb), vec![3, 5]);
    assert_eq!(cur_files(u.maildir()).len(), 2);
    assert!(matches!(mb.read(1), Err(StoreError::NoSuchMessage(1))));
    assert_eq!(u.status("INBOX").unwrap().messages, 2);
}

#[test]
fn condstore_unchanged_since() {
    let dir = TempDir::new("condstore");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    for n in 1..=3 {
        deliver(&u, None, n);
    }
    let mut mb = u.open("INBOX").unwrap();
    let base = mb.highestmodseq();
    let first = mb
        .store_flags(&[2], FlagOp::Add, &[Flag::Seen], None)
        .unwrap();
    let m2 = first.updated[0].2;
    assert!(m2 > base);
    assert_eq!(mb.highestmodseq(), m2);
    // 2 changed after `base`: refused; 1 and 3 are not.
    let r = mb
        .store_flags(&[1, 2, 3], FlagOp::Add, &[Flag::Flagged], Some(base))
        .unwrap();
    assert_eq!(r.modified, vec![2]);
    assert_eq!(
        r.updated.iter().map(|u| u.0).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert!(r.updated.iter().all(|u| u.2 > m2));
    assert_eq!(mb.messages()[1].flags, vec![Flag::Seen]);
    // No-op stores keep the MODSEQ.
    let again = mb
        .store_flags(&[1], FlagOp::Add, &[Flag::Flagged], None)
        .unwrap();
    assert_eq!(again.updated[0].2, r.updated[0].2);
    // Remove and replace.
    let rm = mb
        .store_flags(&[1], FlagOp::Remove, &[Flag::Flagged], None)
        .unwrap();
    assert!(rm.updated[0].1.is_empty());
    let rp = mb
        .store_flags(&[3], FlagOp::Replace, &[Flag::Draft], None)
        .unwrap();
    assert_eq!(rp.updated[0].1, vec![Flag::Draft]);
    assert!(cur_files(u.maildir()).iter().any(|f| f.ends_with(":2,D")));
}

#[test]
fn keywords_are_limited_to_26_letters() {
    let dir = TempDir::new("keywords");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    deliver(&u, None, 1);
    let mut mb = u.open("INBOX").unwrap();
    let kws: Vec<Flag> = (0..26).map(|i| Flag::Keyword(format!("k{i}"))).collect();
    mb.store_flags(&[1], FlagOp::Add, &kws, None).unwrap();
    assert_eq!(mb.messages()[0].flags.len(), 26);
    assert!(matches!(
        mb.store_flags(&[1], FlagOp::Add, &[Flag::Keyword("one-more".into())], None),
        Err(StoreError::InvalidKeyword(..))
    ));
    assert!(matches!(
        mb.store_flags(&[1], FlagOp::Add, &[Flag::Keyword("bad(".into())], None),
        Err(StoreError::InvalidKeyword(..))
    ));
}

#[test]
fn append_with_flags_and_date() {
    let dir = TempDir::new("append");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    u.create("Sent").unwrap();
    let mut mb = u.open("Sent").unwrap();
    let date = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let uid = mb
        .append(
            b"Subject: hi\r\n\r\nx\r\n",
            &[Flag::Seen, Flag::Keyword("$MDNSent".into())],
            Some(date),
        )
        .unwrap();
    assert_eq!(uid, 1);
    assert_eq!(mb.refresh().unwrap().new, vec![1]);
    let m = &mb.messages()[0];
    assert_eq!(m.internal_date, date);
    assert_eq!(m.flags, vec![Flag::Seen, Flag::Keyword("$MDNSent".into())]);
    assert_eq!(m.size, m.vsize);
    assert_eq!(u.status("Sent").unwrap().unseen, 0);
}

// ---------------------------------------------------------------- mailbox list

#[test]
fn create_list_rename_delete_subscribe() {
    let dir = TempDir::new("list");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    u.create("Sent").unwrap();
    u.create("Work/Projects/Ringmail").unwrap();
    assert!(matches!(
        u.create("Sent"),
        Err(StoreError::MailboxExists(_))
    ));
    assert!(matches!(
        u.create("inbox"),
        Err(StoreError::MailboxExists(_))
    ));
    u.subscribe("Sent", true).unwrap();
    u.subscribe("Work/Projects", true).unwrap();
    u.subscribe("Sent", true).unwrap();
    let subs = fs::read_to_string(u.maildir().join("subscriptions")).unwrap();
    assert_eq!(subs, "V\t2\n\nSent\nWork\tProjects\n");
    let list = u.list().unwrap();
    let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "INBOX",
            "Sent",
            "Work",
            "Work/Projects",
            "Work/Projects/Ringmail"
        ]
    );
    let sent = &list[1];
    assert_eq!(sent.special_use, Some(SpecialUse::Sent));
    assert!(sent.subscribed && sent.selectable && !sent.has_children);
    assert!(list[2].has_children && !list[2].subscribed);
    assert!(list[3].subscribed);

    deliver(&u, Some("Work/Projects"), 1);
    let v = u.status("Work/Projects").unwrap().uidvalidity;
    u.rename("Work", "Old/Work").unwrap();
    let names: Vec<String> = u.list().unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(
        names,
        vec![
            "INBOX",
            "Old",
            "Old/Work",
            "Old/Work/Projects",
            "Old/Work/Projects/Ringmail",
            "Sent"
        ]
    );
    let st = u.status("Old/Work/Projects").unwrap();
    assert_eq!((st.messages, st.uidvalidity), (1, v));
    assert!(matches!(
        u.rename("Sent", "inbox"),
        Err(StoreError::MailboxExists(_))
    ));
    assert!(matches!(
        u.rename("INBOX", "Sent"),
        Err(StoreError::MailboxExists(_))
    ));
    assert!(matches!(
        u.rename("Sent", "Old"),
        Err(StoreError::MailboxExists(_))
    ));
    assert!(matches!(
        u.rename("Nope", "X"),
        Err(StoreError::NoSuchMailbox(_))
    ));
    assert!(u.rename("Old", "Old/Deeper").is_err());

    u.delete("Old/Work/Projects").unwrap();
    assert!(matches!(
        u.status("Old/Work/Projects"),
        Err(StoreError::NoSuchMailbox(_))
    ));
    let list = u.list().unwrap();
    let p = list.iter().find(|m| m.name == "Old/Work/Projects").unwrap();
    assert!(!p.selectable && p.has_children, "kept as a hierarchy level");
    assert!(matches!(u.delete("INBOX"), Err(StoreError::InboxProtected)));
    assert!(matches!(
        u.delete("Nope"),
        Err(StoreError::NoSuchMailbox(_))
    ));
    // Re-created: a new UIDVALIDITY even within the same second.
    u.create("Old/Work/Projects").unwrap();
    deliver(&u, Some("Old/Work/Projects"), 2);
    assert_ne!(u.status("Old/Work/Projects").unwrap().uidvalidity, v);

    u.subscribe("Sent", false).unwrap();
    assert_eq!(
        u.subscriptions().unwrap(),
        vec!["Work/Projects".to_string()]
    );
    // Dovecot's version-1 format is read as well.
    fs::write(u.maildir().join("subscriptions"), "INBOX\nA.B\n").unwrap();
    assert_eq!(u.subscriptions().unwrap(), vec!["INBOX", "A/B"]);
}

#[test]
fn change_signal_wakes_waiters() {
    let dir = TempDir::new("signal");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    let mb = u.open("INBOX").unwrap();
    let sig = mb.signal();
    let g = sig.generation();
    assert_eq!(sig.wait(g, Duration::from_millis(10)), g, "times out");
    let u2 = s.user("bob@example.org").unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        deliver(&u2, None, 1);
    });
    let g2 = sig.wait(g, Duration::from_secs(10));
    assert!(g2 > g);
    t.join().unwrap();
    assert_eq!(u.signal("inbox").unwrap().generation(), sig.generation());
}

#[test]
fn message_read_follows_renames_by_others() {
    let dir = TempDir::new("follow");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    deliver(&u, None, 1);
    let a = u.open("INBOX").unwrap();
    let mut b = u.open("INBOX").unwrap();
    b.store_flags(&[1], FlagOp::Add, &[Flag::Seen], None)
        .unwrap();
    assert_eq!(a.read(1).unwrap(), msg(1));
    let shared = Arc::new(a);
    assert!(
        shared
            .path_of(1)
            .unwrap()
            .to_string_lossy()
            .ends_with(":2,S")
    );
}

#[test]
fn uids_given_by_dovecot_alongside_are_adopted() {
    let dir = TempDir::new("adopt-live");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    let d = deliver(&u, None, 1);
    let mut mb = u.open("INBOX").unwrap();
    let md = u.maildir().to_owned();
    // Dovecot saved a message and gave it UID 10 (it had seen UIDs up to 9 elsewhere).
    fs::write(md.join("new/1700000000.M9P9.dovecot,S=3"), b"hi\n").unwrap();
    let mut ul = fs::read_to_string(md.join("dovecot-uidlist")).unwrap();
    ul = ul.replacen(" N2 ", " N11 ", 1);
    ul.push_str("10 :1700000000.M9P9.dovecot,S=3\n");
    fs::write(md.join("dovecot-uidlist"), ul).unwrap();
    assert_eq!(mb.refresh().unwrap().new, vec![10]);
    assert_eq!(mb.uidnext(), 11);
    // A UID below our UIDNEXT (possibly used before) is never taken over.
    fs::write(md.join("new/1700000001.M9P9.dovecot,S=3"), b"ho\n").unwrap();
    let ul = fs::read_to_string(md.join("dovecot-uidlist")).unwrap();
    let (head, rest) = ul.split_once('\n').unwrap();
    let (first, tail) = rest.split_once('\n').unwrap();
    let ul = format!("{head}\n{first}\n5 :1700000001.M9P9.dovecot,S=3\n{tail}");
    assert!(index::parse_uidlist(ul.as_bytes()).is_some());
    fs::write(md.join("dovecot-uidlist"), ul).unwrap();
    assert_eq!(mb.refresh().unwrap().new, vec![11]);
    assert_eq!(mb.uidvalidity(), d.uidvalidity);
}

#[test]
fn stale_tmp_files_are_removed_at_open() {
    let dir = TempDir::new("tmpclean");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    let tmp = u.maildir().join("tmp");
    fs::write(tmp.join("old"), b"x").unwrap();
    fs::write(tmp.join("fresh"), b"x").unwrap();
    let f = fs::File::options()
        .write(true)
        .open(tmp.join("old"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(37 * 3600))
        .unwrap();
    drop(f);
    u.open("INBOX").unwrap();
    assert!(!tmp.join("old").exists());
    assert!(tmp.join("fresh").exists());
}

#[test]
fn views_share_one_index_and_still_see_other_processes() {
    let dir = TempDir::new("shared");
    let s = store(&dir);
    let u = s.user("bob@example.org").unwrap();
    for n in 1..=3 {
        deliver(&u, None, n);
    }
    let mut a = u.open("INBOX").unwrap();
    let mut b = u.open("INBOX").unwrap();
    // A change by a view of this process: the other view takes the shared version.
    a.store_flags(&[2], FlagOp::Add, &[Flag::Flagged], None)
        .unwrap();
    assert!(
        a.refresh().unwrap().is_empty(),
        "own change not reported again"
    );
    let c = b.refresh().unwrap();
    assert_eq!((c.flags, c.new, c.expunged), (vec![2], vec![], vec![]));
    assert!(Arc::ptr_eq(&a.st, &b.st), "one copy of the index");
    assert_eq!(b.meta(2).unwrap().flags, vec![Flag::Flagged]);
    // A delivery and a change by another process (its own Store: no shared state).
    let other = store(&dir).user("bob@example.org").unwrap();
    deliver(&other, None, 4);
    let mut o = other.open("INBOX").unwrap();
    o.store_flags(&[1], FlagOp::Add, &[Flag::Seen], None)
        .unwrap();
    for v in [&mut a, &mut b] {
        let c = v.refresh().unwrap();
        assert_eq!((c.flags, c.new), (vec![1], vec![4]));
        assert_eq!(v.meta(1).unwrap().flags, vec![Flag::Seen]);
    }
    // An own change while others' changes are pending: both reported, own one not again.
    o.store_flags(&[3], FlagOp::Add, &[Flag::Answered], None)
        .unwrap();
    b.store_flags(&[2], FlagOp::Remove, &[Flag::Flagged], None)
        .unwrap();
    assert_eq!(b.refresh().unwrap().flags, vec![3]);
    assert_eq!(a.refresh().unwrap().flags, vec![2, 3]);
    // Expunge by this process.
    a.store_flags(&[4], FlagOp::Add, &[Flag::Deleted], None)
        .unwrap();
    let gone = a.expunge(None).unwrap();
    assert_eq!(gone, vec![Expunged { seq: 4, uid: 4 }]);
    let c = b.refresh().unwrap();
    assert_eq!(c.expunged, vec![Expunged { seq: 4, uid: 4 }]);
    assert_eq!(b.uids().collect::<Vec<_>>(), [1, 2, 3]);
}
