//! IMAP sessions against scripted clients, in memory, with fake time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ringmail_imap::{Config, Event, Flag, MailStore, MemoryStore, Session};

const M1: &str = "From: Alice <alice@example.org>\r\n\
To: bob@example.org\r\n\
Subject: Hello\r\n\
Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n\
Message-ID: <1@example.org>\r\n\
\r\n\
Hi Bob, lunch?\r\n";

const M2: &str = "From: Carol <carol@example.net>\r\n\
To: bob@example.org\r\n\
Cc: dave@example.org\r\n\
Subject: Report\r\n\
Date: Tue, 3 Nov 2026 11:00:00 +0000\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"XX\"\r\n\
\r\n\
--XX\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
See attachment.\r\n\
--XX\r\n\
Content-Type: application/octet-stream; name=\"r.bin\"\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment; filename=\"r.bin\"\r\n\
\r\n\
AAECAw==\r\n\
--XX--\r\n";

const M3: &str = "From: Eve <eve@example.com>\r\n\
To: bob@example.org\r\n\
Subject: Fwd: Hello\r\n\
Date: Wed, 4 Nov 2026 12:00:00 +0000\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"YY\"\r\n\
\r\n\
--YY\r\n\
Content-Type: text/plain\r\n\
\r\n\
Forwarding.\r\n\
--YY\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: Alice <alice@example.org>\r\n\
Subject: Inner\r\n\
\r\n\
Inner body\r\n\
--YY--\r\n";

fn date(days: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_000_000 + days * 86_400)
}

fn store_with_mail() -> MemoryStore {
    let store = MemoryStore::new();
    let mut s = store.session();
    for (i, m) in [M1, M2, M3].iter().enumerate() {
        s.append("INBOX", m.as_bytes(), &[], Some(date(i as u64)))
            .unwrap();
    }
    store
}

struct Client {
    s: Session,
    store: MemoryStore,
    now: Instant,
    events: Vec<String>,
}

impl Client {
    fn with(store: &MemoryStore, cfg: Config, tls: bool) -> (Client, String) {
        let now = Instant::now();
        let mut c = Client {
            s: Session::new(Arc::new(cfg), tls, now),
            store: store.clone(),
            now,
            events: vec![],
        };
        let g = c.pump();
        (c, g)
    }

    fn new(store: &MemoryStore) -> Client {
        Client::with(store, Config::default(), true).0
    }

    fn logged_in(store: &MemoryStore) -> Client {
        let mut c = Client::new(store);
        let r = c.send("l LOGIN alice secret\r\n");
        assert!(r.contains("l OK"), "{r}");
        c
    }

    fn pump(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            while let Some(b) = self.s.poll_transmit() {
                out.extend_from_slice(&b);
            }
            let Some(e) = self.s.poll_event() else { break };
            self.events.push(format!("{e:?}"));
            match e {
                Event::Login { user, password } => {
                    let ok = user == "alice" && password.expose() == b"secret";
                    let store: Option<Box<dyn MailStore>> =
                        ok.then(|| Box::new(self.store.session()) as Box<dyn MailStore>);
                    self.s.login_result(store);
                }
                Event::StartTls => {
                    // The driver flushes the OK, then handshakes.
                    while let Some(b) = self.s.poll_transmit() {
                        out.extend_from_slice(&b);
                    }
                    self.s.tls_established();
                }
                Event::Idle => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn send(&mut self, data: &str) -> String {
        self.send_bytes(data.as_bytes())
    }

    fn send_bytes(&mut self, data: &[u8]) -> String {
        self.s.receive(data, self.now);
        self.pump()
    }
}

/// The text in Latin-1 (characters up to U+00FF; one octet each).
fn latin1(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).expect("Latin-1"))
        .collect()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn full_session_transcript() {
    let store = store_with_mail();
    let (mut c, greeting) = Client::with(&store, Config::default(), true);
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4rev2 IMAP4rev1 AUTH=PLAIN"));
    assert!(!greeting.contains("LOGINDISABLED"));

    let r = c.send("a1 CAPABILITY\r\n");
    assert!(r.contains("* CAPABILITY IMAP4rev2 IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID IDLE"));
    assert!(r.ends_with("a1 OK CAPABILITY completed\r\n"));

    let r = c.send("a2 LOGIN alice wrong\r\n");
    assert_eq!(r, "a2 NO [AUTHENTICATIONFAILED] Authentication failed\r\n");
    let r = c.send("a3 LOGIN alice secret\r\n");
    assert!(r.starts_with("a3 OK [CAPABILITY IMAP4rev2"), "{r}");
    assert!(c.s.is_authenticated());

    let r = c.send("a4 SELECT INBOX\r\n");
    assert!(r.contains("* 3 EXISTS\r\n"), "{r}");
    assert!(r.contains("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"));
    assert!(
        r.contains("* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]")
    );
    assert!(r.contains("* OK [UIDVALIDITY 1]"));
    assert!(r.contains("* OK [UIDNEXT 4]"));
    assert!(r.contains("* OK [HIGHESTMODSEQ "));
    assert!(r.ends_with("a4 OK [READ-WRITE] SELECT completed\r\n"));

    let r = c.send("a5 FETCH 1:* (FLAGS UID RFC822.SIZE)\r\n");
    assert!(
        r.contains(&format!(
            "* 1 FETCH (FLAGS () UID 1 RFC822.SIZE {})\r\n",
            M1.len()
        )),
        "{r}"
    );
    assert!(r.contains("* 3 FETCH (FLAGS () UID 3 "));
    assert!(r.ends_with("a5 OK FETCH completed\r\n"));

    let r = c.send("a6 FETCH 1 ENVELOPE\r\n");
    assert!(
        r.contains("ENVELOPE (\"Mon, 2 Nov 2026 10:00:00 +0000\" \"Hello\" ((\"Alice\" NIL \"alice\" \"example.org\")) ((\"Alice\" NIL \"alice\" \"example.org\")) ((\"Alice\" NIL \"alice\" \"example.org\")) ((NIL NIL \"bob\" \"example.org\")) NIL NIL NIL \"<1@example.org>\")"),
        "{r}"
    );

    let r = c.send("a7 FETCH 2 BODYSTRUCTURE\r\n");
    assert!(
        r.contains("((\"TEXT\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"7bit\" 15 1"),
        "{r}"
    );
    assert!(r.contains("\"application\" \"octet-stream\" (\"name\" \"r.bin\") NIL NIL \"base64\" 8 NIL (\"attachment\" (\"filename\" \"r.bin\")) NIL NIL)"), "{r}");
    assert!(
        r.contains(" \"mixed\" (\"boundary\" \"XX\") NIL NIL NIL))"),
        "{r}"
    );

    let r = c.send("a8 FETCH 3 (BODY BODY[2.HEADER] BODY[2.1] BODY.PEEK[1.MIME])\r\n");
    assert!(
        r.contains("(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7bit\" 61 (NIL \"Inner\""),
        "{r}"
    );
    assert!(
        r.contains(
            "BODY[2.HEADER] {51}\r\nFrom: Alice <alice@example.org>\r\nSubject: Inner\r\n\r\n"
        ),
        "{r}"
    );
    assert!(r.contains("BODY[2.1] {10}\r\nInner body"), "{r}");
    assert!(
        r.contains("BODY[1.MIME] {28}\r\nContent-Type: text/plain\r\n\r\n"),
        "{r}"
    );
    // BODY[...] without PEEK set \Seen, reported with FLAGS.
    assert!(r.contains("FLAGS (\\Seen)"), "{r}");

    let r = c.send("a9 FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject)] BODY.PEEK[TEXT]<0.6>)\r\n");
    assert!(
        r.contains("BODY[HEADER.FIELDS (Subject)] {18}\r\nSubject: Hello\r\n\r\n"),
        "{r}"
    );
    assert!(r.contains("BODY[TEXT]<0> {6}\r\nHi Bob"), "{r}");
    assert!(!r.contains("\\Seen"), "{r}");

    let r = c.send(
        "b1 FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (Subject Date Message-ID)] RFC822.HEADER)\r\n",
    );
    assert!(
        r.contains("{56}\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.org\r\n\r\n"),
        "{r}"
    );
    assert!(r.contains("RFC822.HEADER {"), "{r}");

    let r = c.send("b2 STORE 1 +FLAGS (\\Flagged $Work)\r\n");
    assert!(r.contains("* 1 FETCH (FLAGS (\\Flagged $Work))\r\n"), "{r}");
    let r = c.send("b3 SEARCH FLAGGED\r\n");
    assert!(r.starts_with("* SEARCH 1\r\n"), "{r}");
    let r = c.send("b4 SEARCH OR FROM carol (SUBJECT fwd)\r\n");
    assert!(r.starts_with("* SEARCH 2 3\r\n"), "{r}");
    let r = c.send("b5 UID SEARCH NOT SEEN KEYWORD $work\r\n");
    assert!(r.starts_with("* SEARCH 1\r\n"), "{r}");
    let r = c.send("b6 SEARCH BODY \"attachment\" SENTSINCE 3-Nov-2026\r\n");
    assert!(r.starts_with("* SEARCH 2\r\n"), "{r}");
    let r = c.send("b7 SEARCH LARGER 300 2:3 SENTBEFORE 4-Nov-2026\r\n");
    assert!(r.starts_with("* SEARCH 2\r\n"), "{r}");
    let r = c.send("b8 SEARCH HEADER Message-ID \"<1@\" TEXT lunch UID 1:*\r\n");
    assert!(r.starts_with("* SEARCH 1\r\n"), "{r}");

    let r = c.send("c1 COPY 1 Trash\r\n");
    assert_eq!(r, "c1 OK [COPYUID 4 1 1] COPY completed\r\n");
    let r = c.send("c2 MOVE 2 Sent\r\n");
    assert_eq!(
        r,
        "* OK [COPYUID 3 2 1] Moved\r\n* 2 EXPUNGE\r\nc2 OK MOVE completed\r\n"
    );
    let r = c.send("c3 FETCH 2 UID\r\n");
    assert!(r.starts_with("* 2 FETCH (UID 3)\r\n"), "{r}");

    let r = c.send("c4 STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\n");
    assert_eq!(r, "c4 OK STORE completed\r\n");
    let r = c.send("c5 EXPUNGE\r\n");
    assert_eq!(
        r,
        "* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nc5 OK EXPUNGE completed\r\n"
    );

    let r = c.send("c6 STATUS Sent (MESSAGES UIDNEXT UNSEEN)\r\n");
    assert!(
        r.starts_with("* STATUS Sent (MESSAGES 1 UIDNEXT 2 UNSEEN 1)\r\n"),
        "{r}"
    );

    let r = c.send("z LOGOUT\r\n");
    assert_eq!(r, "* BYE Logging out\r\nz OK LOGOUT completed\r\n");
    assert!(c.s.should_close());
    assert_eq!(c.send("y NOOP\r\n"), "");
}

#[test]
fn mailbox_management_and_list() {
    let store = MemoryStore::new();
    let mut c = Client::logged_in(&store);
    assert_eq!(
        c.send("a CREATE Work/Projects\r\n"),
        "a OK CREATE completed\r\n"
    );
    let r = c.send("b CREATE Work\r\n");
    assert_eq!(r, "b NO [ALREADYEXISTS] Mailbox already exists\r\n");
    let r = c.send("c LIST \"\" \"*\"\r\n");
    assert!(
        r.contains("* LIST (\\HasNoChildren) \"/\" INBOX\r\n"),
        "{r}"
    );
    assert!(r.contains("* LIST (\\HasChildren) \"/\" Work\r\n"), "{r}");
    assert!(
        r.contains("* LIST (\\HasNoChildren \\Sent) \"/\" Sent\r\n"),
        "{r}"
    );
    let r = c.send("d LIST \"\" %/%\r\n");
    assert!(
        r.starts_with("* LIST (\\HasNoChildren) \"/\" Work/Projects\r\nd OK"),
        "{r}"
    );
    let r = c.send("e LIST \"\" \"\"\r\n");
    assert_eq!(
        r,
        "* LIST (\\Noselect) \"/\" \"\"\r\ne OK LIST completed\r\n"
    );
    assert_eq!(c.send("f RENAME Work Job\r\n"), "f OK RENAME completed\r\n");
    let r = c.send("g LIST Job *\r\n");
    assert!(r.contains("Job/Projects"), "{r}");
    assert_eq!(
        c.send("h SUBSCRIBE Job\r\n"),
        "h OK SUBSCRIBE completed\r\n"
    );
    let r = c.send("i LSUB \"\" Jo*\r\n");
    assert_eq!(r, "* LSUB () \"/\" Job\r\ni OK LSUB completed\r\n");
    let r = c.send("i2 LSUB \"\" \"\"\r\n");
    assert_eq!(
        r,
        "* LSUB (\\Noselect) \"/\" \"\"\r\ni2 OK LSUB completed\r\n"
    );
    let r = c.send("j LIST (SUBSCRIBED) \"\" * RETURN (STATUS (MESSAGES))\r\n");
    assert!(
        r.contains(
            "* LIST (\\HasChildren \\Subscribed) \"/\" Job\r\n* STATUS Job (MESSAGES 0)\r\n"
        ),
        "{r}"
    );
    assert!(!r.contains("Job/Projects"), "{r}");
    let r = c.send("k LIST (SPECIAL-USE) \"\" *\r\n");
    assert_eq!(count(&r, "* LIST"), 4, "{r}");
    assert_eq!(
        c.send("l DELETE Job/Projects\r\n"),
        "l OK DELETE completed\r\n"
    );
    let r = c.send("m DELETE INBOX\r\n");
    assert_eq!(r, "m NO [CANNOT] Operation not allowed\r\n");
    let r = c.send("n SELECT Nope\r\n");
    assert_eq!(r, "n NO [NONEXISTENT] No such mailbox or message\r\n");
    let r = c.send("o NAMESPACE\r\n");
    assert_eq!(
        r,
        "* NAMESPACE ((\"\" \"/\")) NIL NIL\r\no OK NAMESPACE completed\r\n"
    );
    let r = c.send("p ID (\"name\" \"test\")\r\n");
    assert_eq!(r, "* ID (\"name\" \"ringmail\")\r\np OK ID completed\r\n");
    let r = c.send("q ENABLE CONDSTORE UTF8=ACCEPT IMAP4rev2 FOO\r\n");
    assert_eq!(
        r,
        "* ENABLED CONDSTORE IMAP4rev2\r\nq OK ENABLE completed\r\n"
    );
}

/// A subscription outlives its mailbox (SUBSCRIBE of a missing name, DELETE keeps it, as
/// Dovecot): LSUB shows it `\Noselect` (RFC 3501 6.3.9), `LIST (SUBSCRIBED)` `\NonExistent`
/// (RFC 5258 3.1); a plain LIST does not show it.
#[test]
fn subscriptions_of_missing_mailboxes_are_listed() {
    let store = MemoryStore::new();
    let mut c = Client::logged_in(&store);
    assert_eq!(
        c.send("a SUBSCRIBE NotThere\r\n"),
        "a OK SUBSCRIBE completed\r\n"
    );
    c.send("b CREATE Temp\r\n");
    c.send("c SUBSCRIBE Temp\r\n");
    assert_eq!(c.send("d DELETE Temp\r\n"), "d OK DELETE completed\r\n");
    let r = c.send("e LSUB \"\" \"*\"\r\n");
    assert!(r.contains("* LSUB () \"/\" INBOX\r\n"), "{r}");
    assert!(r.contains("* LSUB (\\Noselect) \"/\" NotThere\r\n"), "{r}");
    assert!(r.contains("* LSUB (\\Noselect) \"/\" Temp\r\n"), "{r}");
    assert!(r.ends_with("e OK LSUB completed\r\n"), "{r}");
    let r = c.send("f LIST (SUBSCRIBED) \"\" \"*\"\r\n");
    assert!(
        r.contains("* LIST (\\HasNoChildren \\Subscribed) \"/\" INBOX\r\n"),
        "{r}"
    );
    assert!(
        r.contains("* LIST (\\NonExistent \\Subscribed) \"/\" NotThere\r\n"),
        "{r}"
    );
    assert!(
        r.contains("* LIST (\\NonExistent \\Subscribed) \"/\" Temp\r\n"),
        "{r}"
    );
    // In name order among the others.
    assert!(r.find("Junk").unwrap() < r.find("NotThere").unwrap(), "{r}");
    assert!(r.find("NotThere").unwrap() < r.find("Sent").unwrap(), "{r}");
    // Not without the SUBSCRIBED selection; no STATUS for a missing mailbox.
    let r = c.send("g LIST \"\" \"*\" RETURN (SUBSCRIBED)\r\n");
    assert!(!r.contains("NotThere") && !r.contains("Temp"), "{r}");
    let r = c.send("h LIST (SUBSCRIBED) \"\" T* RETURN (STATUS (MESSAGES))\r\n");
    assert_eq!(
        r,
        "* LIST (\\NonExistent \\Subscribed) \"/\" Temp\r\n\
         * LIST (\\HasNoChildren \\Trash \\Subscribed) \"/\" Trash\r\n\
         * STATUS Trash (MESSAGES 0)\r\nh OK LIST completed\r\n"
    );
    // LSUB with `%`: a subscribed child below the level `%` reaches shows its unsubscribed
    // parent as \Noselect (RFC 3501 6.3.9); a subscribed parent is listed as itself.
    c.send("h1 CREATE Lists/rust\r\n");
    c.send("h2 SUBSCRIBE Lists/rust\r\n");
    let r = c.send("h3 LSUB \"\" %\r\n");
    assert!(r.contains("* LSUB (\\Noselect) \"/\" Lists\r\n"), "{r}");
    assert!(!r.contains("Lists/rust"), "{r}");
    let r = c.send("h4 LSUB \"\" Lists/%\r\n");
    assert!(r.contains("* LSUB () \"/\" Lists/rust\r\n"), "{r}");
    assert!(!r.contains("\"/\" Lists\r\n"), "{r}");
    c.send("h5 SUBSCRIBE Lists\r\n");
    let r = c.send("h6 LSUB \"\" %\r\n");
    assert!(r.contains("* LSUB () \"/\" Lists\r\n"), "{r}");
    assert!(!r.contains("\\Noselect) \"/\" Lists\r\n"), "{r}");
    c.send("h7 UNSUBSCRIBE Lists\r\n");
    c.send("h8 UNSUBSCRIBE Lists/rust\r\n");
    // Created again: an ordinary subscribed mailbox.
    c.send("i CREATE Temp\r\n");
    let r = c.send("j LSUB \"\" Temp\r\n");
    assert_eq!(r, "* LSUB () \"/\" Temp\r\nj OK LSUB completed\r\n");
    // Unsubscribed: gone.
    c.send("k UNSUBSCRIBE NotThere\r\n");
    let r = c.send("l LSUB \"\" *\r\n");
    assert!(!r.contains("NotThere"), "{r}");
    // A missing parent with a child that exists.
    c.send("m CREATE P/Q\r\n");
    c.send("n SUBSCRIBE P\r\n");
    c.send("o DELETE P\r\n");
    let r = c.send("p LIST (SUBSCRIBED) \"\" P\r\n");
    assert_eq!(
        r,
        "* LIST (\\NonExistent \\HasChildren \\Subscribed) \"/\" P\r\np OK LIST completed\r\n"
    );
    // A rev2 session sees a missing UTF-8 name decoded.
    c.send("q SUBSCRIBE Gr&APw-n\r\n");
    c.send("r ENABLE IMAP4rev2\r\n");
    let r = c.send("s LSUB \"\" G*\r\n");
    assert!(r.contains("(\\Noselect) \"/\" {5}\r\nGr\u{fc}n\r\n"), "{r}");
}

/// RENAME INBOX moves its messages into a new mailbox and leaves INBOX empty, its folders
/// where they are (RFC 3501 6.3.5, RFC 9051 6.3.6); sessions on INBOX see them expunged.
#[test]
fn rename_inbox_moves_its_messages() {
    let store = store_with_mail();
    store.session().create("INBOX/Sub").unwrap();
    store.deliver("INBOX/Sub", M1.as_bytes()).unwrap();
    let mut other = Client::logged_in(&store);
    other.send("s SELECT INBOX\r\n");
    let mut c = Client::logged_in(&store);
    c.send("s SELECT INBOX\r\n");
    c.send("f STORE 2 +FLAGS.SILENT (\\Flagged $Work)\r\n");
    // The renaming session has INBOX selected: it hears of the expunges at once.
    let r = c.send("a RENAME INBOX Old\r\n");
    assert_eq!(
        r,
        "* 1 EXPUNGE\r\n* 1 EXPUNGE\r\n* 1 EXPUNGE\r\na OK RENAME completed\r\n"
    );
    let r = other.send("n NOOP\r\n");
    assert_eq!(count(&r, " EXPUNGE\r\n"), 3, "{r}");
    let r = c.send("b STATUS INBOX (MESSAGES UIDNEXT)\r\n");
    assert!(
        r.starts_with("* STATUS INBOX (MESSAGES 0 UIDNEXT 4)"),
        "{r}"
    );
    let r = c.send("d STATUS INBOX/Sub (MESSAGES)\r\n");
    assert!(r.starts_with("* STATUS INBOX/Sub (MESSAGES 1)"), "{r}");
    let r = c.send("e SELECT Old\r\n");
    assert!(r.contains("* 3 EXISTS\r\n"), "{r}");
    let r = c.send("g FETCH 2 (FLAGS BODY.PEEK[HEADER.FIELDS (Subject)])\r\n");
    assert!(r.contains("FLAGS (\\Flagged $Work)"), "{r}");
    assert!(r.contains("Subject: Report"), "{r}");
    // Old exists now; nothing is renamed to INBOX.
    let r = c.send("h RENAME INBOX Old\r\n");
    assert_eq!(r, "h NO [ALREADYEXISTS] Mailbox already exists\r\n");
    let r = c.send("i RENAME Old INBOX\r\n");
    assert_eq!(r, "i NO [ALREADYEXISTS] Mailbox already exists\r\n");
    // New mail: fresh UIDs in INBOX.
    let r = c.send("j APPEND INBOX {3+}\r\nx\r\n\r\n");
    assert!(r.contains("j OK [APPENDUID 1 4]"), "{r}");
}

#[test]
fn mailbox_names_are_modified_utf7_for_rev1_and_utf8_after_enable_imap4rev2() {
    let store = MemoryStore::new();
    // An IMAP4rev1 client speaks modified UTF-7, which is also the store's form.
    let mut v1 = Client::logged_in(&store);
    assert_eq!(
        v1.send("a CREATE Entw&APw-rfe\r\n"),
        "a OK CREATE completed\r\n"
    );
    // Only the canonical form: no second spelling, no 8-bit, no hidden controls.
    for (tag, name) in [
        ("b", "Entw&AHU-rfe"), // "u" encoded: not canonical
        ("c", "&AAA-"),        // NUL in base64
        ("d", "Tom&Jerry"),    // '&' must be "&-"
    ] {
        let r = v1.send(&format!("{tag} CREATE {name}\r\n"));
        assert_eq!(
            r,
            format!("{tag} NO [CANNOT] Mailbox name is not valid modified UTF-7\r\n"),
            "{name}"
        );
    }
    let r = v1.send_bytes("e CREATE {4+}\r\nca\u{e9}\r\n".as_bytes());
    assert!(
        r.contains("e NO [CANNOT]"),
        "8-bit name from a rev1 client: {r}"
    );
    // An IMAP4rev2 client (ENABLE IMAP4rev2) speaks UTF-8: its names are encoded for the
    // store and shown decoded.
    let mut v2 = Client::logged_in(&store);
    assert!(
        v2.send("f ENABLE IMAP4rev2\r\n")
            .contains("* ENABLED IMAP4rev2")
    );
    let name = "Gr\u{fc}\u{df}e/\u{65e5}\u{672c}";
    let r = v2.send_bytes(format!("g CREATE {{{}+}}\r\n{name}\r\n", name.len()).as_bytes());
    assert_eq!(r, "g OK CREATE completed\r\n");
    let r = v2.send("h LIST \"\" *\r\n");
    assert!(r.contains("Entw\u{fc}rfe"), "{r}");
    assert!(r.contains(name), "{r}");
    assert!(!r.contains('&'), "{r}");
    let r = v2.send_bytes(format!("i SELECT {{{}+}}\r\n{name}\r\n", name.len()).as_bytes());
    assert!(r.contains("i OK [READ-WRITE]"), "{r}");
    // The rev1 client sees the same mailboxes in modified UTF-7.
    let r = v1.send("j LIST \"\" *\r\n");
    assert!(r.contains("\"/\" Entw&APw-rfe\r\n"), "{r}");
    assert!(r.contains("Gr&APwA3w-e/&ZeVnLA-"), "{r}");
    let r = v1.send("k STATUS Gr&APwA3w-e/&ZeVnLA- (MESSAGES)\r\n");
    assert!(
        r.contains("* STATUS Gr&APwA3w-e/&ZeVnLA- (MESSAGES 0)"),
        "{r}"
    );
}

/// IMAP4rev2 quoted strings may hold UTF-8 (RFC 9051 4.3: `QUOTED-CHAR` includes
/// `UTF8-2`..`UTF8-4`); IMAP4rev1 ones are 7-bit (RFC 3501), so a rev1 session gets BAD.
#[test]
fn utf8_in_quoted_strings_after_enable_imap4rev2() {
    let store = store_with_mail();
    let mut v1 = Client::logged_in(&store);
    let r = v1.send("a CREATE \"\u{dc}n\u{ef}c\u{f6}d\u{e9}\"\r\n");
    assert_eq!(r, "a BAD Syntax error or unknown command\r\n");
    let mut c = Client::logged_in(&store);
    assert!(
        c.send("e ENABLE IMAP4rev2\r\n")
            .contains("* ENABLED IMAP4rev2")
    );
    let r = c.send("b CREATE \"\u{dc}n\u{ef}c\u{f6}d\u{e9}\"\r\n");
    assert_eq!(r, "b OK CREATE completed\r\n");
    // Stored in modified UTF-7, as a rev1 client sees it.
    let r = v1.send("c LIST \"\" *\r\n");
    assert!(r.contains("\"/\" &ANw-n&AO8-c&APY-d&AOk-\r\n"), "{r}");
    // Escapes inside are undone; several strings in one command; a LIST pattern.
    let r = c.send("d RENAME \"\u{dc}n\u{ef}c\u{f6}d\u{e9}\" \"\u{c4}\\\"q\\\\\"\r\n");
    assert_eq!(r, "d OK RENAME completed\r\n");
    let r = c.send("f LIST \"\" \"\u{c4}*\"\r\n");
    assert!(r.contains("\"/\" {5}\r\n\u{c4}\"q\\\r\n"), "{r}");
    assert!(r.ends_with("f OK LIST completed\r\n"), "{r}");
    // APPEND with a synchronising literal after a UTF-8 name: `+`, then the message.
    let msg = "Subject: caf\u{e9} cr\u{e8}me\r\n\r\nbr\u{fb}l\u{e9}e\r\n";
    let r = c.send(&format!(
        "g APPEND \"Entw\u{fc}rfe\" (\\Seen) {{{}}}\r\n",
        msg.len()
    ));
    assert_eq!(r, "+ Ready for literal data\r\n");
    let r = c.send(&format!("{msg}\r\n"));
    assert_eq!(r, "g NO [TRYCREATE] No such mailbox\r\n");
    c.send("h CREATE \"Entw\u{fc}rfe\"\r\n");
    let r = c.send(&format!(
        "i APPEND \"Entw\u{fc}rfe\" (\\Seen) {{{}+}}\r\n{msg}\r\n",
        msg.len()
    ));
    assert_eq!(r, "i OK [APPENDUID 7 1] APPEND completed\r\n");
    let r = c.send("j STATUS \"Entw\u{fc}rfe\" (MESSAGES)\r\n");
    assert!(r.starts_with("* STATUS "), "{r}");
    assert!(r.contains("(MESSAGES 1)"), "{r}");
    // SEARCH strings, also as a second UTF-8 string of the command.
    let r = c.send("k SELECT \"Entw\u{fc}rfe\"\r\n");
    assert!(r.contains("k OK [READ-WRITE]"), "{r}");
    let r = c.send("l SEARCH SUBJECT \"caf\u{e9}\" BODY \"br\u{fb}l\u{e9}e\"\r\n");
    assert!(r.starts_with("* ESEARCH (TAG \"l\") ALL 1\r\n"), "{r}");
    let r = c.send("m SEARCH SUBJECT \"cr\u{e8}mes\"\r\n");
    assert!(r.starts_with("* ESEARCH (TAG \"m\")\r\n"), "{r}");
    // More UTF-8 strings than literals a command may announce: they are not literals the
    // client sent, so that limit does not apply (the line limit does).
    let many = " TEXT \"\u{e9}\"".repeat(100);
    let r = c.send(&format!("n SEARCH{many}\r\n"));
    assert!(r.ends_with("n OK SEARCH completed\r\n"), "{r}");
    // The same bytes, one at a time.
    let script = format!(
        "o APPEND \"Entw\u{fc}rfe\" {{{}}}\r\n{msg}\r\np NOOP\r\n",
        msg.len()
    );
    let mut out = String::new();
    for b in script.as_bytes() {
        out.push_str(&c.send_bytes(&[*b]));
    }
    assert!(out.starts_with("+ Ready for literal data\r\n"), "{out}");
    assert!(
        out.contains("o OK [APPENDUID 7 2] APPEND completed\r\n"),
        "{out}"
    );
    assert!(out.ends_with("p OK NOOP completed\r\n"), "{out}");
}

/// Quoted strings that are not valid UTF-8, or not valid quoted strings, stay BAD after
/// ENABLE IMAP4rev2; the line limit holds for UTF-8 strings too.
#[test]
fn utf8_in_quoted_strings_hostile() {
    let store = MemoryStore::new();
    let cfg = Config {
        max_line: 300,
        max_bad_commands: 100,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    assert!(c.send("l LOGIN alice secret\r\n").contains("l OK"));
    c.send("e ENABLE IMAP4rev2\r\n");
    for (i, bad) in [
        &b"CREATE \"Entw\xfcrfe\""[..],
        b"CREATE \"\xc3\"",
        b"CREATE \"\xed\xa0\x80\"",
        b"CREATE \"\xc0\xaf\"",
        b"CREATE \"\xf4\x90\x80\x80\"",
        b"CREATE \"\xc3\xa9\\x\"",
        b"CREATE \"\xc3\xa9\x00\"",
        b"CREATE \"\xc3\xa9",
        b"CREATE \"\xc3\xa9\\",
        b"CREATE \xc3\xa9",
        b"RENAME \"ok\xc3\xa9\" \"\xff\"",
        b"CREATE \"\xc3\xa9\" extra",
    ]
    .iter()
    .enumerate()
    {
        let mut cmd = format!("t{i} ").into_bytes();
        cmd.extend_from_slice(bad);
        cmd.extend_from_slice(b"\r\n");
        let r = c.send_bytes(&cmd);
        assert!(r.starts_with(&format!("t{i} BAD ")), "{bad:?}: {r}");
    }
    // Over the line limit: BAD [TOOBIG], nothing created; the session goes on.
    let r = c.send(&format!("u CREATE \"{}\"\r\n", "\u{e9}".repeat(200)));
    assert_eq!(r, "u BAD [TOOBIG] Line too long\r\n");
    let r = c.send("v LIST \"\" *\r\n");
    assert!(!r.contains('\u{e9}') && !r.contains("&AOk"), "{r}");
    assert!(r.ends_with("v OK LIST completed\r\n"), "{r}");
    // Just under it: fine.
    let r = c.send(&format!("w CREATE \"{}\"\r\n", "\u{e9}".repeat(130)));
    assert_eq!(r, "w OK CREATE completed\r\n");
}

#[test]
fn literals_sync_and_nonsync() {
    let store = MemoryStore::new();
    let mut c = Client::new(&store);
    let r = c.send("a LOGIN {5}\r\n");
    assert_eq!(r, "+ Ready for literal data\r\n");
    let r = c.send("alice {6}\r\n");
    assert_eq!(r, "+ Ready for literal data\r\n");
    let r = c.send("secret\r\n");
    assert!(r.starts_with("a OK"), "{r}");

    let msg = "Subject: x\r\n\r\nbody\r\n";
    let r = c.send(&format!("b APPEND INBOX (\\Seen) {{{}}}\r\n", msg.len()));
    assert_eq!(r, "+ Ready for literal data\r\n");
    let r = c.send(&format!("{msg}\r\n"));
    assert_eq!(r, "b OK [APPENDUID 1 1] APPEND completed\r\n");

    // LITERAL+: no continuation, everything in one go, and pipelined.
    let r = c.send(&format!(
        "c APPEND INBOX \"05-Nov-2026 10:00:00 +0100\" {{{}+}}\r\n{msg}\r\nd STATUS INBOX (MESSAGES)\r\n",
        msg.len()
    ));
    assert_eq!(
        r,
        "c OK [APPENDUID 1 2] APPEND completed\r\n* STATUS INBOX (MESSAGES 2)\r\nd OK STATUS completed\r\n"
    );
    let r = c.send("e SELECT INBOX\r\nf FETCH 2 (INTERNALDATE FLAGS)\r\n");
    assert!(
        r.contains("* 2 FETCH (INTERNALDATE \"05-Nov-2026 09:00:00 +0000\" FLAGS ())"),
        "{r}"
    );
    let r = c.send("g FETCH 1 FLAGS\r\n");
    assert!(r.contains("* 1 FETCH (FLAGS (\\Seen))"), "{r}");
    // A literal split over many receive calls.
    c.s.receive(b"h SEARCH SUBJECT {1+}\r\n", c.now);
    c.s.receive(b"x", c.now);
    let r = c.send("\r\n");
    assert_eq!(r, "* SEARCH 1 2\r\nh OK SEARCH completed\r\n");
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let store = MemoryStore::new();
    let (mut c, greeting) = Client::with(&store, Config::default(), false);
    assert!(greeting.contains("STARTTLS LOGINDISABLED"), "{greeting}");
    let r = c.send("a STARTTLS\r\nb LOGIN alice secret\r\n");
    assert_eq!(r, "a OK Begin TLS negotiation now\r\n");
    assert_eq!(c.events, ["StartTls"]);
    assert!(c.s.is_tls());
    assert!(!c.s.is_authenticated());
    let r = c.send("c CAPABILITY\r\n");
    assert!(r.contains("AUTH=PLAIN"), "{r}");
    assert!(!r.contains("STARTTLS"), "{r}");
    let r = c.send("d STARTTLS\r\n");
    assert_eq!(r, "d BAD STARTTLS not available\r\n");
}

#[test]
fn plaintext_injection_before_handshake_is_dropped() {
    let store = MemoryStore::new();
    let (mut c, _) = Client::with(&store, Config::default(), false);
    c.s.receive(b"a STARTTLS\r\n", c.now);
    let mut out = Vec::new();
    while let Some(b) = c.s.poll_transmit() {
        out.extend_from_slice(&b);
    }
    assert_eq!(c.s.poll_event(), Some(Event::StartTls));
    // Bytes that arrive before the handshake completes are plaintext: dropped.
    c.s.receive(b"x LOGIN alice secret\r\n", c.now);
    assert!(c.s.poll_event().is_none());
    c.s.tls_established();
    assert_eq!(c.s.buffered_len(), 0);
    assert_eq!(c.send("y NOOP\r\n"), "y OK NOOP completed\r\n");
    assert!(!c.s.is_authenticated());
}

#[test]
fn login_before_tls_is_refused() {
    let store = MemoryStore::new();
    let (mut c, _) = Client::with(&store, Config::default(), false);
    let r = c.send("a LOGIN alice secret\r\n");
    assert_eq!(
        r,
        "a NO [PRIVACYREQUIRED] Authentication requires TLS: use STARTTLS first\r\n"
    );
    let r = c.send("b AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    assert!(r.starts_with("b NO [PRIVACYREQUIRED]"), "{r}");
    assert!(c.events.is_empty());
    let r = c.send("c SELECT INBOX\r\n");
    assert_eq!(r, "c BAD Command not valid in this state\r\n");
}

#[test]
fn authenticate_plain() {
    let store = MemoryStore::new();
    let mut c = Client::new(&store);
    let r = c.send("a AUTHENTICATE PLAIN\r\n");
    assert_eq!(r, "+ \r\n");
    let r = c.send("AGFsaWNlAHdyb25n\r\n");
    assert_eq!(r, "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n");
    let r = c.send("b AUTHENTICATE PLAIN\r\n*\r\n");
    assert_eq!(r, "+ \r\nb BAD Authentication cancelled\r\n");
    let r = c.send("c AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    assert!(r.starts_with("c OK [CAPABILITY"), "{r}");
    let r = c.send("d AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    assert_eq!(r, "d BAD Command not valid in this state\r\n");
}

#[test]
fn too_many_failed_logins() {
    let store = MemoryStore::new();
    let mut c = Client::new(&store);
    c.send("a LOGIN alice x\r\nb LOGIN alice y\r\n");
    let r = c.send("c LOGIN alice z\r\nd LOGIN alice secret\r\n");
    assert!(r.ends_with("* BYE Too many failed logins\r\n"), "{r}");
    assert!(c.s.should_close());
    assert!(!c.s.is_authenticated());
}

#[test]
fn hostile_input() {
    let store = store_with_mail();
    let cfg = Config {
        max_append: 1000,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    c.send("l LOGIN alice secret\r\n");

    // Oversized synchronising literal: refused before the client sends it.
    let r = c.send("a APPEND INBOX {1001}\r\n");
    assert_eq!(r, "a NO [TOOBIG] Literal too large\r\n");
    // Oversized literal outside APPEND.
    let r = c.send("b LOGIN {70000}\r\n");
    assert_eq!(r, "b NO [TOOBIG] Literal too large\r\n");
    // Oversized non-synchronising literal: the octets are skipped, the session goes on.
    let junk = "x".repeat(1500);
    let r = c.send(&format!(
        "c APPEND INBOX {{1500+}}\r\n{junk} more\r\nd NOOP\r\n"
    ));
    assert_eq!(
        r,
        "c NO [TOOBIG] Literal too large\r\nd OK NOOP completed\r\n"
    );

    // Endless line: refused once with its tag, memory stays bounded, next line works.
    let chunk = "1,".repeat(8 * 1024);
    let mut r = c.send("z FETCH ");
    for _ in 0..20 {
        r.push_str(&c.send(&chunk));
        assert!(c.s.buffered_len() <= 64 * 1024 + chunk.len());
    }
    assert_eq!(r, "z BAD [TOOBIG] Line too long\r\n");
    let r = c.send("1 FLAGS\r\ne NOOP\r\n");
    assert_eq!(r, "e OK NOOP completed\r\n");
    // Overlong line that arrives whole.
    let long = format!("z2 FETCH {}1 FLAGS\r\ne2 NOOP\r\n", "1,".repeat(40_000));
    let r = c.send(&long);
    assert_eq!(
        r,
        "z2 BAD [TOOBIG] Line too long\r\ne2 OK NOOP completed\r\n"
    );

    // Deep nesting: imap-codec's recursion limit, then a BAD.
    let deep = format!("f SEARCH {}ALL{}\r\n", "(".repeat(200), ")".repeat(200));
    let r = c.send(&deep);
    assert!(r.starts_with("f BAD"), "{r}");
    let deep = format!("f2 SEARCH {}ALL\r\n", "NOT ".repeat(500));
    let r = c.send(&deep);
    assert!(r.starts_with("f2 BAD"), "{r}");

    // Mailbox names: invalid UTF-8, traversal, control characters.
    let r = c.send_bytes(b"g CREATE {4}\r\n\xff\xfe.x\r\n");
    assert_eq!(
        r,
        "+ Ready for literal data\r\ng BAD Mailbox name is not UTF-8\r\n"
    );
    let r = c.send("h CREATE ../../etc\r\n");
    assert_eq!(r, "h NO [CANNOT] Invalid mailbox name\r\n");
    let r = c.send("i CREATE a/../b\r\n");
    assert_eq!(r, "i NO [CANNOT] Invalid mailbox name\r\n");
    let r = c.send_bytes(b"j CREATE {3}\r\na\x01b\r\n");
    assert!(r.ends_with("j NO [CANNOT] Invalid mailbox name\r\n"), "{r}");
    let r = c.send_bytes(b"k SELECT {3}\r\na\x00b\r\n");
    assert!(r.contains("k BAD") || r.contains("k NO"), "{r}");
    let r = c.send("m SELECT \"\"\r\n");
    assert!(r.starts_with("m NO [CANNOT]"), "{r}");
    // Sequence numbers out of range.
    c.send("n SELECT INBOX\r\n");
    let r = c.send("o FETCH 9 FLAGS\r\n");
    assert_eq!(r, "o BAD Invalid message sequence number\r\n");
    // A hostile LIST pattern does not blow up.
    let r = c.send(&format!("p LIST \"\" \"{}b\"\r\n", "*a".repeat(200)));
    assert_eq!(r, "p OK LIST completed\r\n");

    // Binary garbage: BAD until the limit, then BYE.
    let mut r = String::new();
    for i in 0..20u8 {
        r.push_str(&c.send_bytes(&[0x80 + i, 0, 0xff, b' ', 7, b'\r', b'\n']));
    }
    assert!(r.ends_with("* BYE Too many invalid commands\r\n"), "{r}");
    assert!(c.s.should_close());
}

#[test]
fn bare_lf_is_not_a_line_end() {
    let store = MemoryStore::new();
    let mut c = Client::new(&store);
    let r = c.send("a NOOP\nb NOOP\r\n");
    assert_eq!(r, "* BAD Lines must end in CRLF\r\nb OK NOOP completed\r\n");
}

#[test]
fn idle_sees_other_sessions() {
    let store = store_with_mail();
    let mut a = Client::logged_in(&store);
    let mut b = Client::logged_in(&store);
    a.send("s SELECT INBOX\r\n");
    b.send("s SELECT INBOX\r\n");
    let r = a.send("i IDLE\r\n");
    assert_eq!(r, "+ idling\r\n");
    assert!(a.s.is_idling());
    assert!(a.events.iter().any(|e| e == "Idle"));

    // Another session appends, flags and expunges.
    store.deliver("INBOX", M1.as_bytes()).unwrap();
    a.s.changes_available();
    assert_eq!(a.pump(), "* 4 EXISTS\r\n");
    let r = b.send("f STORE 2 +FLAGS (\\Deleted)\r\n");
    assert!(r.contains("* 2 FETCH (FLAGS (\\Deleted))"), "{r}");
    a.s.changes_available();
    assert_eq!(a.pump(), "* 2 FETCH (FLAGS (\\Deleted) UID 2)\r\n");
    let r = b.send("e EXPUNGE\r\n");
    assert!(r.starts_with("* 2 EXPUNGE\r\n"), "{r}");
    a.s.changes_available();
    assert_eq!(a.pump(), "* 2 EXPUNGE\r\n");
    a.s.changes_available();
    assert_eq!(a.pump(), "");
    let r = a.send("DONE\r\n");
    assert_eq!(r, "i OK IDLE terminated\r\n");
    assert!(!a.s.is_idling());
    let r = a.send("u UID FETCH 1:* UID\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 3)\r\n* 3 FETCH (UID 4)\r\nu OK FETCH completed\r\n"
    );
}

#[test]
fn sequence_numbers_stay_consistent() {
    let store = store_with_mail();
    let mut a = Client::logged_in(&store);
    let mut b = Client::logged_in(&store);
    a.send("s SELECT INBOX\r\n");
    b.send("s SELECT INBOX\r\n");
    b.send("x STORE 2 +FLAGS.SILENT (\\Deleted)\r\ny EXPUNGE\r\n");
    store.deliver("INBOX", M1.as_bytes()).unwrap();

    // FETCH, STORE and SEARCH (without UID) must not announce the expunge.
    let r = a.send("f FETCH 1:* UID\r\n");
    assert!(!r.contains("EXPUNGE"), "{r}");
    assert!(r.contains("* 3 FETCH (UID 3)"), "{r}");
    assert!(r.contains("* 4 EXISTS"), "{r}");
    let r = a.send("g SEARCH ALL\r\n");
    assert!(r.starts_with("* SEARCH 1 2 3 4\r\n"), "{r}");
    let r = a.send("h STORE 3 +FLAGS (\\Flagged)\r\n");
    assert!(!r.contains("EXPUNGE"), "{r}");
    assert!(r.contains("* 3 FETCH (FLAGS (\\Flagged))"), "{r}");
    // Content of the expunged message is gone.
    let r = a.send("i FETCH 2 BODY.PEEK[]\r\n");
    assert_eq!(r, "i NO [EXPUNGEISSUED] Some messages were expunged\r\n");
    // NOOP may announce it; numbers shift afterwards.
    let r = a.send("n NOOP\r\n");
    assert_eq!(r, "* 2 EXPUNGE\r\nn OK NOOP completed\r\n");
    let r = a.send("j FETCH 2:3 UID\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (UID 3)\r\n* 3 FETCH (UID 4)\r\nj OK FETCH completed\r\n"
    );
    // UID commands may announce expunges.
    b.send("k STORE 1 +FLAGS.SILENT (\\Deleted)\r\nl EXPUNGE\r\n");
    let r = a.send("m UID FETCH 4 UID\r\n");
    assert_eq!(
        r,
        "* 3 FETCH (UID 4)\r\n* 1 EXPUNGE\r\nm OK FETCH completed\r\n"
    );
}

#[test]
fn condstore_esearch_uidplus() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    let r = c.send("a SELECT INBOX (CONDSTORE)\r\n");
    assert!(r.contains("* OK [HIGHESTMODSEQ 4] Highest\r\n"), "{r}");
    let r = c.send("b FETCH 1 (FLAGS MODSEQ)\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (FLAGS () MODSEQ (2))\r\nb OK FETCH completed\r\n"
    );
    let r = c.send("b2 FETCH 1 (MODSEQ FLAGS)\r\nb3 FETCH 1 MODSEQ\r\nb4 UID FETCH 1 (MODSEQ)\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (FLAGS () MODSEQ (2))\r\nb2 OK FETCH completed\r\n\
         * 1 FETCH (MODSEQ (2))\r\nb3 OK FETCH completed\r\n\
         * 1 FETCH (UID 1 MODSEQ (2))\r\nb4 OK FETCH completed\r\n"
    );
    let r = c.send("c STORE 1 (UNCHANGEDSINCE 2) +FLAGS (\\Seen)\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (FLAGS (\\Seen) MODSEQ (5))\r\nc OK STORE completed\r\n"
    );
    let r = c.send("d STORE 1,2 (UNCHANGEDSINCE 4) +FLAGS (\\Answered)\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (FLAGS (\\Answered) MODSEQ (6))\r\nd OK [MODIFIED 1] Conditional STORE failed\r\n"
    );
    let r = c.send("e FETCH 1:* (UID) (CHANGEDSINCE 4)\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (UID 1 MODSEQ (5))\r\n* 2 FETCH (UID 2 MODSEQ (6))\r\ne OK FETCH completed\r\n"
    );
    let r = c.send("f SEARCH MODSEQ 6\r\n");
    assert_eq!(r, "* SEARCH 2 (MODSEQ 6)\r\nf OK SEARCH completed\r\n");
    let r = c.send("g SEARCH RETURN (MIN MAX COUNT ALL) NOT ANSWERED\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"g\") MIN 1 MAX 3 ALL 1,3 COUNT 2\r\ng OK SEARCH completed\r\n"
    );
    let r = c.send("h UID SEARCH RETURN () ALL\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"h\") UID ALL 1:3\r\nh OK SEARCH completed\r\n"
    );
    let r = c.send("i STATUS INBOX (HIGHESTMODSEQ MESSAGES)\r\n");
    assert_eq!(
        r,
        "* STATUS INBOX (MESSAGES 3 HIGHESTMODSEQ 6)\r\ni OK STATUS completed\r\n"
    );
    c.send("j STORE 1:3 +FLAGS.SILENT (\\Deleted)\r\n");
    let r = c.send("k UID EXPUNGE 2:3\r\n");
    assert_eq!(
        r,
        "* 2 EXPUNGE\r\n* 2 EXPUNGE\r\nk OK EXPUNGE completed\r\n"
    );
    let r = c.send("l EXAMINE INBOX\r\n");
    assert!(r.starts_with("* OK [CLOSED]"), "{r}");
    assert!(r.contains("* OK [PERMANENTFLAGS ()]"), "{r}");
    assert!(r.ends_with("l OK [READ-ONLY] EXAMINE completed\r\n"), "{r}");
    let r = c.send("m STORE 1 +FLAGS (\\Seen)\r\n");
    assert_eq!(r, "m NO [READ-ONLY] Mailbox is read-only\r\n");
    let r = c.send("n UNSELECT\r\no FETCH 1 UID\r\n");
    assert_eq!(
        r,
        "n OK Mailbox closed\r\no BAD Command not valid in this state\r\n"
    );
}

#[test]
fn rate_limit_with_fake_time() {
    let store = MemoryStore::new();
    let cfg = Config {
        commands_per_second: 2,
        command_burst: 3,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    let r = c.send(&"n NOOP\r\n".repeat(6));
    assert_eq!(count(&r, "n OK"), 3);
    let t = c.s.poll_timeout().expect("throttled");
    assert_eq!(t, c.now + Duration::from_millis(500));
    c.s.handle_timeout(t);
    assert_eq!(count(&c.pump(), "n OK"), 1);
    c.s.handle_timeout(t + Duration::from_secs(5));
    assert_eq!(count(&c.pump(), "n OK"), 2);
    assert!(c.s.poll_timeout().is_none());
}

/// The same conversation fed whole and byte by byte gives the same bytes back.
#[test]
fn split_invariance() {
    let script = "a LOGIN alice secret\r\nb SELECT INBOX\r\nc FETCH 1:* (FLAGS BODY.PEEK[HEADER] BODYSTRUCTURE)\r\n\
d APPEND INBOX {3+}\r\nabc\r\ne SEARCH TEXT bob\r\nf STORE 1 +FLAGS (\\Seen)\r\ng UID FETCH 1:* (UID FLAGS)\r\nh LOGOUT\r\n";
    let run = |step: usize| {
        let store = store_with_mail();
        let cfg = Config::default();
        let (mut c, _) = Client::with(&store, cfg, true);
        let mut out = String::new();
        for chunk in script.as_bytes().chunks(step) {
            out.push_str(&c.send_bytes(chunk));
        }
        out
    };
    let whole = run(script.len());
    assert!(whole.contains("h OK LOGOUT"), "{whole}");
    for step in [1, 2, 3, 7, 64] {
        assert_eq!(run(step), whole, "step {step}");
    }
}

#[test]
fn rev2_and_empty_mailbox() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    let r =
        c.send("a SELECT Trash\r\nb FETCH 1:* FLAGS\r\nc UID FETCH 1:* FLAGS\r\nd SEARCH ALL\r\n");
    assert!(r.contains("* 0 EXISTS\r\n* 0 RECENT\r\n"), "{r}");
    assert!(
        r.contains("b OK FETCH completed\r\nc OK FETCH completed\r\n* SEARCH\r\nd OK"),
        "{r}"
    );
    let r = c.send("e FETCH 1 FLAGS\r\n");
    assert_eq!(r, "e BAD Invalid message sequence number\r\n");
    let r = c.send("f ENABLE IMAP4rev2\r\ng SELECT INBOX\r\nh SEARCH UNSEEN\r\n");
    assert!(!r.contains("RECENT"), "{r}");
    assert!(r.contains("* OK [CLOSED]"), "{r}");
    assert!(r.contains("* ESEARCH (TAG \"h\") ALL 1:3\r\nh OK"), "{r}");
}

#[test]
fn store_on_message_expunged_elsewhere() {
    let store = store_with_mail();
    let mut a = Client::logged_in(&store);
    let mut b = Client::logged_in(&store);
    a.send("s SELECT INBOX\r\n");
    b.send("s SELECT INBOX\r\nx STORE 2 +FLAGS.SILENT (\\Deleted)\r\ny EXPUNGE\r\n");
    let r = a.send("t STORE 1:3 +FLAGS (\\Seen)\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (FLAGS (\\Seen))\r\n* 3 FETCH (FLAGS (\\Seen))\r\nt OK STORE completed\r\n"
    );
}

/// An overlong line without a usable tag: BYE (no reply could be matched to it).
#[test]
fn overlong_line_without_tag_closes() {
    let store = MemoryStore::new();
    let mut c = Client::new(&store);
    let r = c.send(&"A".repeat(70 * 1024));
    assert_eq!(r, "* BYE Line too long\r\n");
    assert!(c.s.should_close());
}

/// `APPEND mbox {0+}` / `{0}`: refused with NO, and the session goes on.
#[test]
fn empty_append_is_refused() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    let r = c.send("a APPEND INBOX {0+}\r\n\r\nb NOOP\r\n");
    assert_eq!(
        r,
        "a NO Can't save a zero byte message\r\nb OK NOOP completed\r\n"
    );
    let r = c.send("c APPEND INBOX (\\Seen) {0}\r\n");
    assert_eq!(r, "c NO Can't save a zero byte message\r\n");
    let r = c.send("d NOOP\r\ne LOGOUT\r\n");
    assert!(r.starts_with("d OK NOOP completed\r\n"), "{r}");
    assert!(r.contains("e OK LOGOUT"), "{r}");
    // An empty literal elsewhere does not stall the session either.
    let mut c = Client::new(&store);
    let r = c.send("f LOGIN {0+}\r\n secret\r\ng NOOP\r\n");
    assert!(r.starts_with("f NO"), "{r}");
    assert!(r.ends_with("g OK NOOP completed\r\n"), "{r}");
}

/// A command that fails to parse before the end of a line announcing a literal: its
/// literal's octets are never read as commands, however the input is split.
#[test]
fn literal_of_bad_command_is_not_executed() {
    let body = "From: a@example.org\r\nSubject: x\r\n\r\nz1 DELETE Victim\r\nz2 CREATE pwned\r\n";
    let n = body.len();
    // a6, a10: not UTF-8 (Latin-1), which IMAP4rev2 quoted strings may not hold.
    let attacks = [
        format!("a6 APPEND \"Entw\u{fc}rfe\" (\\Seen) {{{n}+}}\r\n{body}\r\n"),
        format!("a7 APPEND rt (\\Bogus\x01) ~{{{n}+}}\r\n{body}\r\n"),
        format!("a8 APPEND rt (\\Bogus\x01) {{{n}+}}\r\n{body}\r\n"),
        format!("a9 BOGUS ({{{n}+}}\r\n{body} {{{n}+}}\r\n{body})\r\n"),
        format!("a10 APPEND \"Entw\u{fc}rfe\" {{{n}+}}\n{body}\r\n"),
        format!("a11 SEARCH RETURN (SAVE) FOO {{{n}+}}\r\n{body}\r\n"),
        format!("a12 SEARCH RETURN (ALL) SUBJECT {{{n}+}}\r\n{body} BOGUS\r\n"),
        format!("a13 UID FETCH $ (FLAGS {{{n}+}}\r\n{body})\r\n"),
    ];
    for attack in &attacks {
        let tag = attack.split(' ').next().unwrap_or_default();
        let script = format!("e ENABLE IMAP4rev2\r\n{attack}y NOOP\r\n");
        let script = latin1(&script);
        let run = |step: usize| {
            let store = store_with_mail();
            store.session().create("Victim").expect("create");
            let mut c = Client::logged_in(&store);
            let mut out = String::new();
            for chunk in script.chunks(step) {
                out.push_str(&c.send_bytes(chunk));
            }
            let names = c.send("l LIST \"\" *\r\n");
            (out, names)
        };
        let (whole, names) = run(script.len());
        assert!(!whole.contains("z1") && !whole.contains("z2"), "{whole}");
        assert!(whole.ends_with("y OK NOOP completed\r\n"), "{whole}");
        assert_eq!(count(&whole, " BAD "), 1, "{whole}");
        assert!(
            names.contains("Victim") && !names.contains("pwned"),
            "{names}"
        );
        for step in 1..script.len() {
            let (out, names) = run(step);
            assert_eq!(out, whole, "{tag} split every {step}");
            assert!(names.contains("Victim") && !names.contains("pwned"));
        }
    }
    // Before login, too.
    let store = MemoryStore::new();
    let mut c = Client::new(&store);
    let inner = "z1 LOGIN alice secret\r\nz2 NOOP\r\n";
    let r = c.send(&format!(
        "a ID ({{{}+}}\r\n{inner})\r\nb NOOP\r\n",
        inner.len()
    ));
    assert!(!r.contains("z1") && !r.contains("z2"), "{r}");
    assert!(r.ends_with("b OK NOOP completed\r\n"), "{r}");
    assert!(!c.s.is_authenticated());
    // A synchronising literal of a bad command: BAD instead of `+`, nothing is awaited.
    let mut c = Client::logged_in(&store_with_mail());
    let r = c.send("s APPEND rt (\\Bogus\x01) {5}\r\nt NOOP\r\n");
    assert_eq!(
        r,
        "s BAD Syntax error or unknown command\r\nt OK NOOP completed\r\n"
    );
}

/// The untagged FLAGS and PERMANENTFLAGS list the mailbox's keywords (PERMANENTFLAGS keeps
/// `\*`), and come again when a keyword is new to the session: its own STORE, or another
/// session's STORE or APPEND (RFC 9051 7.3.5, as Dovecot).
#[test]
fn keywords_in_flags_and_permanentflags() {
    const SYS: &str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft";
    let store = MemoryStore::new();
    let mut s = store.session();
    let custom = [Flag::Keyword("$Custom".into())];
    s.append("INBOX", M1.as_bytes(), &custom, None).unwrap();
    s.append("INBOX", M2.as_bytes(), &[Flag::Seen], None)
        .unwrap();
    let mut c = Client::logged_in(&store);
    let r = c.send("a SELECT INBOX\r\n");
    assert!(r.contains(&format!("* FLAGS ({SYS} $Custom)\r\n")), "{r}");
    assert!(
        r.contains(&format!(
            "* OK [PERMANENTFLAGS ({SYS} $Custom \\*)] Flags permitted\r\n"
        )),
        "{r}"
    );
    // Known keywords (in any case) and system flags: no new FLAGS.
    let r = c.send("b STORE 2 +FLAGS ($Custom \\Flagged)\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (FLAGS (\\Seen \\Flagged $Custom))\r\nb OK STORE completed\r\n"
    );
    let r = c.send("b2 STORE 2 -FLAGS ($CUSTOM)\r\n");
    assert!(!r.contains("* FLAGS"), "{r}");
    // A new keyword: FLAGS and PERMANENTFLAGS first, then the FETCH.
    let r = c.send("c STORE 1 +FLAGS (NewOne)\r\n");
    assert_eq!(
        r,
        format!(
            "* FLAGS ({SYS} $Custom NewOne)\r\n\
             * OK [PERMANENTFLAGS ({SYS} $Custom NewOne \\*)] Flags permitted\r\n\
             * 1 FETCH (FLAGS ($Custom NewOne))\r\nc OK STORE completed\r\n"
        )
    );
    // Also for .SILENT, which sends no FETCH.
    let r = c.send("d STORE 2 +FLAGS.SILENT (Other)\r\n");
    assert_eq!(
        r,
        format!(
            "* FLAGS ({SYS} $Custom NewOne Other)\r\n\
             * OK [PERMANENTFLAGS ({SYS} $Custom NewOne Other \\*)] Flags permitted\r\n\
             d OK STORE completed\r\n"
        )
    );
    let r = c.send("e STORE 2 -FLAGS (Other)\r\n");
    assert!(!r.contains("* FLAGS"), "{r}");
    // Another session's keyword: announced before the FETCH that shows it.
    let mut o = Client::logged_in(&store);
    o.send("s SELECT INBOX\r\n");
    o.send("f STORE 1 +FLAGS (FromOther)\r\n");
    let r = c.send("g NOOP\r\n");
    let flags = r.find("* FLAGS (").expect("FLAGS");
    assert!(
        r[flags..].starts_with(&format!(
            "* FLAGS ({SYS} $Custom NewOne Other FromOther)\r\n"
        )),
        "{r}"
    );
    assert!(flags < r.find("* 1 FETCH").expect("FETCH"), "{r}");
    // An APPEND elsewhere with a new keyword: announced with the new message.
    let r = o.send("h APPEND INBOX (Appended) {3+}\r\nx\r\n\r\n");
    assert!(r.contains("h OK [APPENDUID"), "{r}");
    let r = c.send("i NOOP\r\n");
    assert!(r.contains(" FromOther Appended)\r\n"), "{r}");
    assert!(
        r.find("* FLAGS").unwrap() < r.find("* 3 EXISTS").unwrap(),
        "{r}"
    );
    let r = c.send("j NOOP\r\n");
    assert_eq!(r, "j OK NOOP completed\r\n");
    // EXAMINE: the keywords in use, nothing permanent.
    let r = c.send("k EXAMINE INBOX\r\n");
    assert!(
        r.contains(&format!(
            "* FLAGS ({SYS} $Custom FromOther NewOne Appended)\r\n"
        )),
        "{r}"
    );
    assert!(r.contains("* OK [PERMANENTFLAGS ()]"), "{r}");
}

/// STORE and APPEND of \\Recent or an unknown system flag are BAD (they cannot be stored);
/// keywords work.
#[test]
fn store_refuses_invalid_system_flags() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    c.send("s SELECT INBOX\r\n");
    let r = c.send("a STORE 1 +FLAGS (\\Recent)\r\n");
    assert_eq!(r, "a BAD Invalid system flag\r\n");
    let r = c.send("b STORE 1 +FLAGS (\\Seen \\Bogus)\r\n");
    assert_eq!(r, "b BAD Invalid system flag\r\n");
    let r = c.send("c STORE 1 +FLAGS.SILENT (\\Seen $Work)\r\n");
    assert!(r.contains(" \\Draft $Work)\r\n"), "{r}");
    assert!(r.ends_with("c OK STORE completed\r\n"), "{r}");
    let r = c.send("d FETCH 1 FLAGS\r\n");
    assert!(
        r.contains("\\Seen") && r.contains("$Work") && !r.contains("Bogus"),
        "{r}"
    );
    // APPEND: the same flags, the same answer; nothing is stored.
    let msg = "Subject: x\r\n\r\nbody\r\n";
    for (tag, flags) in [
        ("e", "(\\Recent)"),
        ("f", "(\\Seen \\Bogus)"),
        ("g", "(\\recent $Work)"),
    ] {
        let r = c.send(&format!(
            "{tag} APPEND INBOX {flags} {{{}+}}\r\n{msg}\r\n",
            msg.len()
        ));
        assert_eq!(r, format!("{tag} BAD Invalid system flag\r\n"), "{flags}");
    }
    let r = c.send(&format!(
        "h APPEND INBOX (\\Seen $Work \\Draft) {{{}+}}\r\n{msg}\r\n",
        msg.len()
    ));
    assert!(r.contains("h OK [APPENDUID 1 4]"), "{r}");
    let r = c.send("i STATUS INBOX (MESSAGES)\r\n");
    assert!(r.starts_with("* STATUS INBOX (MESSAGES 4)"), "{r}");
}

#[test]
fn status_size_and_deleted() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    let all = M1.len() + M2.len() + M3.len();
    let r = c.send("a STATUS INBOX (MESSAGES SIZE DELETED UNSEEN)\r\n");
    assert_eq!(
        r,
        format!(
            "* STATUS INBOX (MESSAGES 3 DELETED 0 UNSEEN 3 SIZE {all})\r\na OK STATUS completed\r\n"
        )
    );
    let r = c.send("b STATUS Trash (SIZE)\r\n");
    assert_eq!(r, "* STATUS Trash (SIZE 0)\r\nb OK STATUS completed\r\n");
    // Repeats are reported once; SIZE and HIGHESTMODSEQ in the asked order.
    let r = c.send("c status inbox (size Size highestmodseq)\r\n");
    assert_eq!(
        r,
        format!("* STATUS INBOX (SIZE {all} HIGHESTMODSEQ 4)\r\nc OK STATUS completed\r\n")
    );
    // A literal mailbox name.
    let r = c.send("d STATUS {5+}\r\nINBOX (SIZE)\r\n");
    assert_eq!(
        r,
        format!("* STATUS INBOX (SIZE {all})\r\nd OK STATUS completed\r\n")
    );

    // STATUS on the selected mailbox, after changes by this session and another one.
    c.send("e SELECT INBOX\r\nf STORE 1,3 +FLAGS.SILENT (\\Deleted \\Seen)\r\n");
    let r = c.send("g STATUS INBOX (MESSAGES DELETED UNSEEN SIZE)\r\n");
    assert_eq!(
        r,
        format!(
            "* STATUS INBOX (MESSAGES 3 DELETED 2 UNSEEN 1 SIZE {all})\r\ng OK STATUS completed\r\n"
        )
    );
    store.deliver("INBOX", M1.as_bytes()).unwrap();
    let r = c.send("h STATUS INBOX (MESSAGES SIZE UIDNEXT)\r\n");
    let now = all + M1.len();
    assert_eq!(
        r,
        format!(
            "* STATUS INBOX (MESSAGES 4 UIDNEXT 5 SIZE {now})\r\n* 4 EXISTS\r\nh OK STATUS completed\r\n"
        )
    );
    c.send("i EXPUNGE\r\n");
    let r = c.send("j STATUS INBOX (DELETED SIZE MESSAGES)\r\n");
    let now = M2.len() + M1.len();
    assert_eq!(
        r,
        format!("* STATUS INBOX (DELETED 0 MESSAGES 2 SIZE {now})\r\nj OK STATUS completed\r\n")
    );

    // LIST-STATUS with SIZE and DELETED.
    let r = c.send("k LIST \"\" \"*\" RETURN (STATUS (SIZE DELETED MESSAGES))\r\n");
    assert!(
        r.contains(&format!(
            "* LIST (\\HasNoChildren) \"/\" INBOX\r\n* STATUS INBOX (DELETED 0 MESSAGES 2 SIZE {now})\r\n"
        )),
        "{r}"
    );
    assert!(
        r.contains("* STATUS Junk (DELETED 0 MESSAGES 0 SIZE 0)\r\n"),
        "{r}"
    );
    assert_eq!(count(&r, "* STATUS"), 5, "{r}");
    assert!(r.ends_with("k OK LIST completed\r\n"), "{r}");
    let r = c.send("l LIST (SUBSCRIBED) \"\" Tr* RETURN (SUBSCRIBED STATUS (SIZE))\r\n");
    assert_eq!(
        r,
        "* LIST (\\HasNoChildren \\Trash \\Subscribed) \"/\" Trash\r\n\
         * STATUS Trash (SIZE 0)\r\nl OK LIST completed\r\n"
    );
}

#[test]
fn status_hostile_items() {
    let store = store_with_mail();
    let cfg = Config {
        max_bad_commands: 100,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    c.send("l LOGIN alice secret\r\n");
    for bad in [
        "STATUS INBOX ()",
        "STATUS INBOX (SIZE FOO)",
        "STATUS INBOX (SIZE \"MESSAGES\")",
        "STATUS INBOX (SIZE (MESSAGES))",
        "STATUS INBOX SIZE",
        "STATUS INBOX (SIZE) MESSAGES",
        "STATUS INBOX (SIZE",
        "STATUS (SIZE)",
        "UID STATUS INBOX (SIZE)",
        "LIST \"\" * RETURN (STATUS ())",
        "LIST \"\" * RETURN (STATUS (SIZE BOGUS))",
        "LIST \"\" * RETURN (STATUS (SIZE (X)))",
        "LIST \"\" * RETURN (STATUS SIZE)",
    ] {
        let r = c.send(&format!("x {bad}\r\n"));
        assert!(r.starts_with("x BAD"), "{bad}: {r}");
        assert_eq!(count(&r, "\r\n"), 1, "{bad}: {r}");
    }
    let r = c.send("y STATUS Nope (SIZE)\r\n");
    assert_eq!(r, "y NO [NONEXISTENT] No such mailbox or message\r\n");
    // Not before login.
    let mut d = Client::new(&store);
    let r = d.send("z STATUS INBOX (SIZE)\r\n");
    assert_eq!(r, "z BAD Command not valid in this state\r\n");
}

#[test]
fn searchres_saves_and_reuses_results() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    let r = c.send("a CAPABILITY\r\n");
    assert!(
        r.contains(" SEARCHRES ") && r.contains(" STATUS=SIZE "),
        "{r}"
    );
    c.send("b SELECT INBOX\r\n");
    // SAVE alone: no ESEARCH (nor SEARCH) response.
    let r = c.send("c SEARCH RETURN (SAVE) FROM carol\r\n");
    assert_eq!(r, "c OK SEARCH completed\r\n");
    let r = c.send("d FETCH $ (UID FLAGS)\r\n");
    assert_eq!(r, "* 2 FETCH (UID 2 FLAGS ())\r\nd OK FETCH completed\r\n");
    let r = c.send("e UID FETCH $ FLAGS\r\n");
    assert_eq!(r, "* 2 FETCH (UID 2 FLAGS ())\r\ne OK FETCH completed\r\n");
    let r = c.send("f STORE $ +FLAGS (\\Flagged)\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (FLAGS (\\Flagged))\r\nf OK STORE completed\r\n"
    );
    let r = c.send("g SEARCH $\r\nh UID SEARCH UID $\r\ni SEARCH NOT $\r\nj SEARCH OR $ 1\r\n");
    assert_eq!(
        r,
        "* SEARCH 2\r\ng OK SEARCH completed\r\n* SEARCH 2\r\nh OK SEARCH completed\r\n\
         * SEARCH 1 3\r\ni OK SEARCH completed\r\n* SEARCH 1 2\r\nj OK SEARCH completed\r\n"
    );
    // `$` as a string argument is a string.
    let r = c.send("k SEARCH RETURN (SAVE COUNT) SUBJECT $\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"k\") COUNT 0\r\nk OK SEARCH completed\r\n"
    );
    let r = c.send("l FETCH $ UID\r\n");
    assert_eq!(r, "l OK FETCH completed\r\n");
    // With MIN and/or MAX alone, only those are saved; with ALL or COUNT, everything.
    let r = c.send("m SEARCH RETURN (SAVE MIN MAX) ALL\r\nn FETCH $ UID\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"m\") MIN 1 MAX 3\r\nm OK SEARCH completed\r\n\
         * 1 FETCH (UID 1)\r\n* 3 FETCH (UID 3)\r\nn OK FETCH completed\r\n"
    );
    let r = c.send("o UID SEARCH RETURN (MAX SAVE) ALL\r\np SEARCH $\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"o\") UID MAX 3\r\no OK SEARCH completed\r\n\
         * SEARCH 3\r\np OK SEARCH completed\r\n"
    );
    let r = c.send("q SEARCH RETURN (SAVE COUNT MIN) ALL\r\nr SEARCH $\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"q\") MIN 1 COUNT 3\r\nq OK SEARCH completed\r\n\
         * SEARCH 1 2 3\r\nr OK SEARCH completed\r\n"
    );
    // A search that uses `$` and saves: the old `$` is used, the new one kept.
    let r = c.send("s SEARCH RETURN (SAVE) $ FLAGGED\r\nt SEARCH $\r\n");
    assert_eq!(
        r,
        "s OK SEARCH completed\r\n* SEARCH 2\r\nt OK SEARCH completed\r\n"
    );
    // COPY and UID COPY.
    let r = c.send("u UID SEARCH RETURN (SAVE) UID 2:3\r\nv COPY $ Trash\r\n");
    assert!(
        r.ends_with("v OK [COPYUID 4 2,3 1,2] COPY completed\r\n"),
        "{r}"
    );
    // `$` follows expunges: message 2 goes, UID 3 is now message 2.
    let r = c.send("w STORE 2 +FLAGS.SILENT (\\Deleted)\r\nx EXPUNGE\r\ny FETCH $ UID\r\n");
    assert_eq!(
        r,
        "w OK STORE completed\r\n* 2 EXPUNGE\r\nx OK EXPUNGE completed\r\n\
         * 2 FETCH (UID 3)\r\ny OK FETCH completed\r\n"
    );
    // Modifiers after `$`.
    let r = c.send("z FETCH $ (MODSEQ)\r\n");
    assert_eq!(r, "* 2 FETCH (MODSEQ (4))\r\nz OK FETCH completed\r\n");
    let r = c.send("a1 UID FETCH $ (FLAGS) (CHANGEDSINCE 1)\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (UID 3 FLAGS () MODSEQ (4))\r\na1 OK FETCH completed\r\n"
    );
    let r = c.send("a2 UID STORE $ (UNCHANGEDSINCE 4) +FLAGS.SILENT (\\Seen)\r\n");
    assert_eq!(r, "a2 OK STORE completed\r\n");
    // MOVE and UID EXPUNGE.
    let r = c.send("a3 UID MOVE $ Junk\r\n");
    assert_eq!(
        r,
        "* OK [COPYUID 5 3 1] Moved\r\n* 2 EXPUNGE\r\na3 OK MOVE completed\r\n"
    );
    let r = c.send("a4 FETCH $ UID\r\n");
    assert_eq!(r, "a4 OK FETCH completed\r\n");
    let r = c.send(
        "a5 SEARCH RETURN (SAVE) ALL\r\na6 STORE $ +FLAGS.SILENT (\\Deleted)\r\na7 UID EXPUNGE $\r\n",
    );
    assert_eq!(
        r,
        "a5 OK SEARCH completed\r\na6 OK STORE completed\r\n* 1 EXPUNGE\r\na7 OK EXPUNGE completed\r\n"
    );
    // Under IMAP4rev2 too.
    let r = c.send("a8 ENABLE IMAP4rev2\r\na9 SEARCH RETURN (SAVE) ALL\r\nb0 SEARCH ALL\r\n");
    assert!(
        r.ends_with(
            "a9 OK SEARCH completed\r\n* ESEARCH (TAG \"b0\")\r\nb0 OK SEARCH completed\r\n"
        ),
        "{r}"
    );
}

#[test]
fn searchres_is_reset_and_emptied_by_failures() {
    let store = store_with_mail();
    let cfg = Config {
        max_bad_commands: 100,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    c.send("l LOGIN alice secret\r\n");
    // Not outside the selected state.
    let r = c.send("a FETCH $ UID\r\n");
    assert_eq!(r, "a BAD Command not valid in this state\r\n");
    c.send("b SELECT INBOX\r\n");
    // Before any SAVE, `$` is empty.
    let r = c.send("c FETCH $ UID\r\nd SEARCH $\r\ne COPY $ Trash\r\n");
    assert_eq!(
        r,
        "c OK FETCH completed\r\n* SEARCH\r\nd OK SEARCH completed\r\ne OK No messages\r\n"
    );
    let save = |c: &mut Client| {
        let r = c.send("s SEARCH RETURN (SAVE) ALL\r\nt SEARCH $\r\n");
        assert!(
            r.ends_with("* SEARCH 1 2 3\r\nt OK SEARCH completed\r\n"),
            "{r}"
        );
    };
    let empty = |c: &mut Client, why: &str| {
        let r = c.send("u FETCH $ UID\r\n");
        assert_eq!(r, "u OK FETCH completed\r\n", "after {why}");
    };
    // A failed SAVE search (BAD or NO) empties `$`.
    for failing in [
        "SEARCH RETURN (SAVE) BOGUS",
        "SEARCH RETURN (SAVE) CHARSET KOI8-R ALL",
        "SEARCH RETURN (SAVE FOO) ALL",
        "SEARCH RETURN (MIN SAVE (ALL)) ALL",
        "UID SEARCH RETURN (SAVE) UID",
    ] {
        save(&mut c);
        let r = c.send(&format!("v {failing}\r\n"));
        assert!(
            r.starts_with("v BAD") || r.starts_with("v NO"),
            "{failing}: {r}"
        );
        empty(&mut c, failing);
    }
    // A failed search without SAVE leaves it alone.
    save(&mut c);
    c.send("w SEARCH BOGUS\r\n");
    let r = c.send("x SEARCH $\r\n");
    assert_eq!(r, "* SEARCH 1 2 3\r\nx OK SEARCH completed\r\n");
    // SELECT, EXAMINE, UNSELECT, CLOSE and a failed SELECT reset it.
    for reset in [
        "SELECT INBOX",
        "EXAMINE INBOX",
        "UNSELECT\r\ny SELECT INBOX",
        "CLOSE\r\ny SELECT INBOX",
        "SELECT Nope\r\ny SELECT INBOX",
    ] {
        save(&mut c);
        c.send(&format!("y {reset}\r\n"));
        empty(&mut c, reset);
    }
    // `$` only on its own, only where a sequence set stands.
    save(&mut c);
    for bad in [
        "FETCH $,1 UID",
        "FETCH $:2 UID",
        "FETCH 1,$ UID",
        "FETCH \"$\" UID",
        "FETCH ($) UID",
        "SEARCH $,1",
        "SEARCH UID $:*",
        "UID EXPUNGE $,1",
        "STORE $ +FLAGS",
        "COPY $",
        "FETCH $",
        "SEARCH RETURN SAVE ALL",
        "SEARCH RETURN (SAVE)",
        "SEARCH RETURN (\"SAVE\") ALL",
    ] {
        let r = c.send(&format!("z {bad}\r\n"));
        assert!(r.starts_with("z BAD"), "{bad}: {r}");
        assert_eq!(count(&r, "\r\n"), 1, "{bad}: {r}");
    }
    // A mailbox may be called `$`.
    save(&mut c);
    let r = c.send("m CREATE $\r\nn STATUS $ (MESSAGES SIZE)\r\no COPY $ $\r\n");
    assert_eq!(
        r,
        "m OK CREATE completed\r\n* STATUS $ (MESSAGES 0 SIZE 0)\r\nn OK STATUS completed\r\n\
         o OK [COPYUID 6 1,2,3 1,2,3] COPY completed\r\n"
    );
}

#[test]
fn searchres_large_fragmented_result() {
    let store = MemoryStore::new();
    for i in 0..4000 {
        let uid = store.deliver("INBOX", M1.as_bytes()).unwrap();
        assert_eq!(uid, i + 1);
    }
    let mut c = Client::logged_in(&store);
    c.send("a SELECT INBOX\r\n");
    // Every other message: 2000 runs in `$`.
    let set: Vec<String> = (1..=4000).step_by(2).map(|n| n.to_string()).collect();
    let r = c.send(&format!(
        "b STORE {} +FLAGS.SILENT (\\Flagged)\r\n",
        set.join(",")
    ));
    assert_eq!(r, "b OK STORE completed\r\n");
    let r = c.send("c SEARCH RETURN (SAVE COUNT) FLAGGED\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"c\") COUNT 2000\r\nc OK SEARCH completed\r\n"
    );
    let r = c.send("d SEARCH RETURN (COUNT MAX) NOT $\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"d\") MAX 4000 COUNT 2000\r\nd OK SEARCH completed\r\n"
    );
    let r = c.send("e FETCH $ UID\r\n");
    assert_eq!(count(&r, " FETCH (UID "), 2000);
    assert!(r.ends_with("* 3999 FETCH (UID 3999)\r\ne OK FETCH completed\r\n"));
}

#[test]
fn literals_after_extension_syntax() {
    let store = store_with_mail();
    let mut c = Client::logged_in(&store);
    c.send("s SELECT INBOX\r\n");
    let r = c.send("a SEARCH RETURN (COUNT) SUBJECT {5}\r\n");
    assert_eq!(r, "+ Ready for literal data\r\n");
    let r = c.send("Hello\r\n");
    assert_eq!(
        r,
        "* ESEARCH (TAG \"a\") COUNT 2\r\na OK SEARCH completed\r\n"
    );
    let r = c.send(
        "b UID SEARCH RETURN (SAVE) CHARSET UTF-8 OR SUBJECT {6+}\r\nReport FROM {3+}\r\neve\r\nc FETCH $ UID\r\n",
    );
    assert_eq!(
        r,
        "b OK SEARCH completed\r\n* 2 FETCH (UID 2)\r\n* 3 FETCH (UID 3)\r\nc OK FETCH completed\r\n"
    );
    let r = c.send("d LIST (SUBSCRIBED) \"\" {2+}\r\nTr RETURN (STATUS (SIZE))\r\n");
    assert_eq!(r, "d OK LIST completed\r\n");
    let r = c.send("d2 LIST (SUBSCRIBED) \"\" {3+}\r\nTr% RETURN (STATUS (SIZE))\r\n");
    assert!(
        r.ends_with("* STATUS Trash (SIZE 0)\r\nd2 OK LIST completed\r\n"),
        "{r}"
    );
    // Bad before the literal: refused at once, no `+`, the octets of a LITERAL+ are dropped.
    let r = c.send("e SEARCH RETURN (BOGUS) SUBJECT {5}\r\nf NOOP\r\n");
    assert_eq!(
        r,
        "e BAD Syntax error or unknown command\r\nf OK NOOP completed\r\n"
    );
    let r = c.send("g SEARCH RETURN (SAVE) FOO {11+}\r\nz1 LOGOUT\r\n\r\nh FETCH $ UID\r\n");
    assert_eq!(
        r,
        "g BAD Syntax error or unknown command\r\nh OK FETCH completed\r\n"
    );
    // The literal limits hold.
    let r = c.send("i SEARCH RETURN (ALL) SUBJECT {70000}\r\nj NOOP\r\n");
    assert_eq!(
        r,
        "i NO [TOOBIG] Literal too large\r\nj OK NOOP completed\r\n"
    );
    // Bad after the literal: one BAD for the whole command.
    let r = c.send("k SEARCH RETURN (ALL) SUBJECT {3+}\r\nabc BOGUS\r\nl NOOP\r\n");
    assert_eq!(r, "k BAD Syntax error\r\nl OK NOOP completed\r\n");
}

const QP: &str = "From: q@example.org\r\n\
Subject: qp\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
caf=C3=A9 =\r\n\
au lait\r\n";

const UUE: &str = "From: u@example.org\r\n\
Subject: uu\r\n\
Content-Transfer-Encoding: x-uuencode\r\n\
\r\n\
begin 644 x\r\n";

#[test]
fn binary_fetch() {
    let store = store_with_mail();
    store.deliver("INBOX", QP.as_bytes()).unwrap();
    store.deliver("INBOX", UUE.as_bytes()).unwrap();
    let mut c = Client::logged_in(&store);
    let r = c.send("a CAPABILITY\r\n");
    assert!(r.contains(" BINARY "), "{r}");
    c.send("b SELECT INBOX\r\n");
    // A base64 part with NUL octets: literal8.
    let r = c.send("c FETCH 2 BINARY.PEEK[2]\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (BINARY[2] ~{4}\r\n\0\x01\x02\x03)\r\nc OK FETCH completed\r\n"
    );
    let r = c.send("d FETCH 2 (BINARY.SIZE[2] FLAGS BINARY.PEEK[2]<1.2>)\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (FLAGS () BINARY.SIZE[2] 4 BINARY[2]<1> {2}\r\n\x01\x02)\r\nd OK FETCH completed\r\n"
    );
    // Identity parts as they are; BINARY (not PEEK) sets \Seen.
    let r = c.send("e FETCH 2 BINARY[1]\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (FLAGS (\\Seen) BINARY[1] {15}\r\nSee attachment.)\r\ne OK FETCH completed\r\n"
    );
    // A part that does not exist.
    let r = c.send("f UID FETCH 2 (BINARY.PEEK[9] BINARY.SIZE[3.1])\r\n");
    assert_eq!(
        r,
        "* 2 FETCH (UID 2 BINARY[9] NIL BINARY.SIZE[3.1] 0)\r\nf OK FETCH completed\r\n"
    );
    // The whole message: each part decoded and its header naming `binary`.
    let r = c.send("g FETCH 2 (BINARY.SIZE[] BINARY.PEEK[])\r\n");
    let whole = M2.replace(
        "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"r.bin\"\r\n\r\nAAECAw==\r\n",
        "Content-Transfer-Encoding: binary\r\nContent-Disposition: attachment; filename=\"r.bin\"\r\n\r\n\0\x01\x02\x03\r\n",
    );
    assert_ne!(whole, M2);
    assert_eq!(
        r,
        format!(
            "* 2 FETCH (BINARY.SIZE[] {n} BINARY[] ~{{{n}}}\r\n{whole})\r\ng OK FETCH completed\r\n",
            n = whole.len()
        )
    );
    // A message without NUL: a plain literal; the other messages' parts.
    let r = c.send("h FETCH 1 BINARY.PEEK[]\r\n");
    assert_eq!(
        r,
        format!(
            "* 1 FETCH (BINARY[] {{{}}}\r\n{M1})\r\nh OK FETCH completed\r\n",
            M1.len()
        )
    );
    let r = c.send("i FETCH 3 (BINARY.SIZE[2] BINARY.SIZE[2.1])\r\n");
    assert!(r.starts_with("* 3 FETCH (BINARY.SIZE[2] "), "{r}");
    // Quoted-printable.
    let r = c.send("j FETCH 4 BINARY.PEEK[1]\r\n");
    assert_eq!(
        r,
        "* 4 FETCH (BINARY[1] {15}\r\ncafé au lait\r\n)\r\nj OK FETCH completed\r\n"
    );
    // An encoding the server does not know: NO [UNKNOWN-CTE], no data, no \Seen.
    let r = c.send("k FETCH 4:5 (FLAGS BINARY[1])\r\n");
    assert_eq!(
        r,
        "* 4 FETCH (FLAGS (\\Seen) BINARY[1] {15}\r\ncafé au lait\r\n)\r\n\
         k NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding\r\n"
    );
    let r = c.send("l FETCH 5 (FLAGS BODY.PEEK[1])\r\n");
    assert!(r.starts_with("* 5 FETCH (FLAGS () BODY[1] {"), "{r}");
    let r = c.send("m FETCH 5 BINARY.SIZE[]\r\n");
    assert_eq!(
        r,
        "m NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding\r\n"
    );
}

#[test]
fn binary_fetch_hostile_items() {
    let store = store_with_mail();
    let cfg = Config {
        max_bad_commands: 100,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    c.send("l LOGIN alice secret\r\nm SELECT INBOX\r\n");
    for bad in [
        "FETCH 1 BINARY[1.HEADER]",
        "FETCH 1 BINARY[0]",
        "FETCH 1 BINARY[1.0]",
        "FETCH 1 BINARY[1.]",
        "FETCH 1 BINARY[+1]",
        "FETCH 1 BINARY[4294967296]",
        "FETCH 1 BINARY[1]<>",
        "FETCH 1 BINARY[1]<1>",
        "FETCH 1 BINARY[1]<1.0>",
        "FETCH 1 BINARY[1]<-1.2>",
        "FETCH 1 BINARY.SIZE[1]<0.1>",
        "FETCH 1 BINARY.FOO[1]",
        "FETCH 1 BINARY[",
        "FETCH 1 BINARY.PEEK",
        "FETCH 1 (FLAGS BINARY[1)",
        "FETCH 1 (BINARY[1] (X))",
        "FETCH 1 BINARY\u{e9}[1]",
        "FETCH 1 (\u{e9}\u{e9}\u{e9}\u{e9} BINARY[1])",
        "STORE 1 BINARY[1] (\\Seen)",
    ] {
        let r = c.send(&format!("z {bad}\r\n"));
        assert!(r.starts_with("z BAD"), "{bad}: {r}");
        assert_eq!(count(&r, "\r\n"), 1, "{bad}: {r}");
    }
    // A huge partial is cut to the data.
    let r = c.send("y FETCH 1 BINARY.PEEK[1]<4294967295.4294967295>\r\n");
    assert_eq!(
        r,
        "* 1 FETCH (BINARY[1]<4294967295> {0}\r\n)\r\ny OK FETCH completed\r\n"
    );
}

#[test]
fn literal8_append() {
    let store = MemoryStore::new();
    let cfg = Config {
        max_append: 1000,
        ..Config::default()
    };
    let (mut c, _) = Client::with(&store, cfg, true);
    c.send("l LOGIN alice secret\r\n");
    let content = b"\0\x01\r\n\n\r\xff binary";
    let mut msg = b"From: a@example.org\r\nSubject: bin\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n\
--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        .to_vec();
    msg.extend_from_slice(content);
    msg.extend_from_slice(b"\r\n--B--\r\n");
    let mut cmd = format!("a APPEND INBOX (\\Seen) ~{{{}}}\r\n", msg.len()).into_bytes();
    let r = c.send_bytes(&cmd);
    assert_eq!(r, "+ Ready for literal data\r\n");
    let mut rest = msg.clone();
    rest.extend_from_slice(b"\r\n");
    let r = c.send_bytes(&rest);
    assert_eq!(r, "a OK [APPENDUID 1 1] APPEND completed\r\n");
    // Stored with the binary part base64-encoded; BINARY gives the octets back.
    c.send("b SELECT INBOX\r\n");
    let r = c.send("c FETCH 1 (FLAGS BODY.PEEK[2.MIME] BINARY.PEEK[2])\r\n");
    assert!(
        r.contains("BODY[2.MIME] {77}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"),
        "{r}"
    );
    // The octets exactly (the line break before the boundary is the boundary's).
    let mut bin = format!(" BINARY[2] ~{{{}}}\r\n", content.len()).into_bytes();
    bin.extend_from_slice(content);
    bin.extend_from_slice(b")\r\n");
    let raw = {
        c.s.receive(b"d FETCH 1 BINARY.PEEK[2]\r\n", c.now);
        let mut out = Vec::new();
        while let Some(b) = c.s.poll_transmit() {
            out.extend_from_slice(&b);
        }
        out
    };
    let mut expect = b"* 1 FETCH (".to_vec();
    expect.extend_from_slice(&bin[1..]);
    expect.extend_from_slice(b"d OK FETCH completed\r\n");
    assert_eq!(raw, expect, "{}", String::from_utf8_lossy(&raw));
    assert!(r.contains("FLAGS (\\Seen)"), "{r}");
    let r = c.send("e FETCH 1 BODY.PEEK[1]\r\n");
    assert!(r.contains("BODY[1] {2}\r\nhi)"), "{r}");

    // LITERAL+ form, with a date; split into single bytes.
    let simple = b"Subject: plain\r\n\r\nno binary here\r\n";
    cmd = format!(
        "f APPEND INBOX () \"01-Jan-2026 10:00:00 +0000\" ~{{{}+}}\r\n",
        simple.len()
    )
    .into_bytes();
    cmd.extend_from_slice(simple);
    cmd.extend_from_slice(b"\r\n");
    let mut r = String::new();
    for b in &cmd {
        r.push_str(&c.send_bytes(&[*b]));
    }
    assert!(
        r.ends_with("f OK [APPENDUID 1 2] APPEND completed\r\n"),
        "{r}"
    );
    let r = c.send("g FETCH 2 BODY.PEEK[]\r\n");
    assert!(
        r.contains("Subject: plain\r\n\r\nno binary here\r\n)"),
        "{r}"
    );

    // NUL outside a `binary` part cannot be stored.
    let nul = b"Subject: nul\r\n\r\na\0b\r\n";
    cmd = format!("h APPEND INBOX ~{{{}+}}\r\n", nul.len()).into_bytes();
    cmd.extend_from_slice(nul);
    cmd.extend_from_slice(b"\r\n");
    let r = c.send_bytes(&cmd);
    assert!(
        r.starts_with("* 3 EXISTS\r\n") || r.starts_with("h NO"),
        "{r}"
    );
    assert!(
        r.ends_with("h NO [UNKNOWN-CTE] Message contains NUL octets\r\n"),
        "{r}"
    );
    // Limits: empty, too large, missing mailbox.
    let r = c.send("i APPEND INBOX ~{0}\r\nj NOOP\r\n");
    assert_eq!(
        r,
        "i NO Can't save a zero byte message\r\nj OK NOOP completed\r\n"
    );
    let r = c.send("k APPEND INBOX ~{1001}\r\nl NOOP\r\n");
    assert_eq!(
        r,
        "k NO [TOOBIG] Literal too large\r\nl OK NOOP completed\r\n"
    );
    let r = c.send("m APPEND Nope ~{3+}\r\nabc\r\n");
    assert_eq!(r, "m NO [TRYCREATE] No such mailbox\r\n");
    // literal8 only for the message of APPEND.
    let r = c.send("n APPEND INBOX ~ {3+}\r\nabc\r\no NOOP\r\n");
    assert!(
        r.starts_with("n BAD") && r.ends_with("o OK NOOP completed\r\n"),
        "{r}"
    );
    let r = c.send("p SEARCH SUBJECT ~{3+}\r\nabc\r\nq NOOP\r\n");
    assert!(
        r.starts_with("p BAD") && r.ends_with("q OK NOOP completed\r\n"),
        "{r}"
    );
    // A literal whose octets end like an announcement is still just octets.
    let tricky = b"Subject: t\r\n\r\nends in {5}";
    cmd = format!("r APPEND INBOX ~{{{}+}}\r\n", tricky.len()).into_bytes();
    cmd.extend_from_slice(tricky);
    cmd.extend_from_slice(b"\r\ns NOOP\r\n");
    let r = c.send_bytes(&cmd);
    assert!(
        r.contains("r OK [APPENDUID 1 3] APPEND completed\r\ns OK NOOP completed\r\n"),
        "{r}"
    );
}
