//! The client against scripted servers and against the real `Server`, in memory.

use std::collections::VecDeque;
use std::sync::Arc;

use ringmail_smtp::client::{Outcome, TransactionResult};
use ringmail_smtp::{
    Body, Client, ClientConfig, ClientError, ClientEvent, DsnNotify, DsnRet, Envelope, Event,
    Orcpt, RcptParams, Reply, ReplyError, Secret, Server, ServerConfig, StartTlsPolicy,
};

fn server_policy(s: &mut Server, e: &Event, lmtp_replies: &[Reply]) {
    match e {
        Event::RcptTo { forward_path, .. } if forward_path.local() == "unknown" => {
            s.reject(Reply::new(550, "5.1.1", "User unknown"))
        }
        Event::RcptTo { forward_path, .. } if forward_path.local() == "later" => {
            s.reject(Reply::new(450, "4.2.1", "Try later"))
        }
        Event::Helo { .. } | Event::MailFrom { .. } | Event::RcptTo { .. } => s.accept(),
        Event::DataEnd if !lmtp_replies.is_empty() => s.data_committed_lmtp(lmtp_replies),
        Event::DataEnd => s.data_committed("Q1"),
        Event::AuthPlain { password, .. } => s.auth_result(password.expose() == b"secret"),
        _ => {}
    }
}

struct Pair {
    client: Client,
    server: Server,
    envelopes: VecDeque<Envelope>,
    body: Vec<u8>,
    body_chunk: usize,
    split_bytes: bool,
    lmtp_replies: Vec<Reply>,
    results: Vec<TransactionResult>,
    client_events: Vec<ClientEvent>,
    server_events: Vec<Event>,
    bodies: Vec<Vec<u8>>,
    wire_from_client: Vec<u8>,
}

impl Pair {
    fn new(ccfg: ClientConfig, scfg: ServerConfig, envs: Vec<Envelope>, body: &[u8]) -> Pair {
        let mut server = Server::new(Arc::new(scfg), false);
        server.greet();
        Pair {
            client: Client::new(Arc::new(ccfg), false),
            server,
            envelopes: envs.into(),
            body: body.to_vec(),
            body_chunk: 7,
            split_bytes: false,
            lmtp_replies: Vec::new(),
            results: Vec::new(),
            client_events: Vec::new(),
            server_events: Vec::new(),
            bodies: Vec::new(),
            wire_from_client: Vec::new(),
        }
    }

    fn feed_client(&mut self, b: &[u8]) {
        if self.split_bytes {
            for x in b.chunks(1) {
                self.client.receive(x);
            }
        } else {
            self.client.receive(b);
        }
    }

    fn feed_server(&mut self, b: &[u8]) {
        self.wire_from_client.extend_from_slice(b);
        if self.split_bytes {
            for x in b.chunks(1) {
                self.server.receive(x);
                self.drive_server();
            }
        } else {
            self.server.receive(b);
        }
    }

    fn drive_server(&mut self) {
        while let Some(e) = self.server.poll_event() {
            server_policy(&mut self.server, &e, &self.lmtp_replies);
            match &e {
                Event::DataStart => self.bodies.push(Vec::new()),
                Event::DataChunk(c) => self.bodies.last_mut().unwrap().extend_from_slice(c),
                _ => {}
            }
            self.server_events.push(e);
        }
    }

    fn next(&mut self) {
        match self.envelopes.pop_front() {
            Some(env) => self.client.start_transaction(env).unwrap(),
            None => self.client.quit(),
        }
    }

    fn run(&mut self) {
        let mut client_tls = false;
        for _ in 0..10_000 {
            let mut progress = false;
            while let Some(b) = self.client.poll_transmit() {
                self.feed_server(&b);
                progress = true;
            }
            self.drive_server();
            while let Some(b) = self.server.poll_transmit() {
                self.feed_client(&b);
                progress = true;
            }
            while let Some(e) = self.client.poll_event() {
                progress = true;
                self.client_events.push(e.clone());
                match e {
                    ClientEvent::Ready => self.next(),
                    ClientEvent::SendBody => {
                        let body = self.body.clone();
                        for c in body.chunks(self.body_chunk) {
                            self.client.send_body_chunk(c).unwrap();
                        }
                        self.client.end_body().unwrap();
                    }
                    ClientEvent::TransactionDone(r) => {
                        self.results.push(r);
                        self.next();
                    }
                    ClientEvent::StartTls => client_tls = true,
                    ClientEvent::Failed(_) | ClientEvent::Closed => {}
                }
            }
            let server_tls = self.server_events.contains(&Event::StartTls) && !self.server.is_tls();
            if client_tls && server_tls {
                self.server.tls_established();
                self.client.tls_established();
                client_tls = false;
                progress = true;
            }
            if !progress {
                return;
            }
        }
        panic!("no end");
    }
}

const BODY: &[u8] =
    b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\nplain\r\n. space\r\nlast line without dot";

fn env(rcpts: &[&str]) -> Envelope {
    Envelope::new(Some("sender@example.com"), rcpts)
}

fn scfg() -> ServerConfig {
    ServerConfig {
        hostname: "mx.example.org".into(),
        ..ServerConfig::default()
    }
}

fn ccfg() -> ClientConfig {
    ClientConfig {
        helo_name: "relay.example.com".into(),
        ..ClientConfig::default()
    }
}

fn expected_body() -> Vec<u8> {
    let mut b = BODY.to_vec();
    b.extend_from_slice(b"\r\n");
    b
}

#[test]
fn smtp_pair_data_pipelined_with_dot_stuffing() {
    for split in [false, true] {
        let mut p = Pair::new(
            ccfg(),
            scfg(),
            vec![
                env(&["a@example.org", "unknown@example.org", "later@example.org"]),
                env(&["b@example.org"]),
            ],
            BODY,
        );
        p.split_bytes = split;
        p.run();
        assert_eq!(p.bodies, vec![expected_body(), expected_body()]);
        assert_eq!(p.results.len(), 2);
        let r = &p.results[0];
        assert!(
            matches!(&r.recipients[0].outcome, Outcome::Accepted(rep) if rep.text() == "Ok: queued as Q1")
        );
        assert!(matches!(&r.recipients[1].outcome, Outcome::PermFail(rep) if rep.code() == 550));
        assert!(matches!(&r.recipients[2].outcome, Outcome::TempFail(rep) if rep.code() == 450));
        assert!(p.results[1].all_accepted());
        assert_eq!(p.client_events.last(), Some(&ClientEvent::Closed));
        assert!(p.client.should_close() && p.server.should_close());
        // Pipelined: MAIL, RCPTs and DATA went out in one write.
        let wire = String::from_utf8_lossy(&p.wire_from_client).into_owned();
        assert!(wire.contains("MAIL FROM:<sender@example.com>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<unknown@example.org>\r\nRCPT TO:<later@example.org>\r\nDATA\r\n"));
        assert!(wire.contains("\r\n..leading dot\r\n..\r\n...two\r\n"));
        // The second transaction reuses the connection without RSET.
        assert!(!wire.contains("RSET"));
    }
}

#[test]
fn smtp_pair_bdat() {
    let mut c = ccfg();
    c.prefer_chunking = true;
    let mut p = Pair::new(c, scfg(), vec![env(&["a@example.org"])], BODY);
    p.run();
    assert_eq!(p.bodies, vec![BODY.to_vec()]);
    assert!(p.results[0].all_accepted());
    let wire = String::from_utf8_lossy(&p.wire_from_client).into_owned();
    assert!(wire.contains("BDAT 7\r\nSubject"));
    assert!(wire.ends_with("BDAT 0 LAST\r\nQUIT\r\n"));
}

#[test]
fn smtp_pair_all_rejected_sends_rset() {
    let mut p = Pair::new(
        ccfg(),
        scfg(),
        vec![env(&["unknown@example.org"]), env(&["a@example.org"])],
        BODY,
    );
    p.run();
    let wire = String::from_utf8_lossy(&p.wire_from_client).into_owned();
    assert!(wire.contains("DATA\r\nRSET\r\nMAIL"));
    assert!(matches!(&p.results[0].recipients[0].outcome, Outcome::PermFail(r) if r.code() == 550));
    assert_eq!(p.results[0].data_reply.as_ref().unwrap().code(), 554);
    assert!(p.results[1].all_accepted());
}

#[test]
fn lmtp_pair_per_recipient() {
    for bdat in [false, true] {
        let mut c = ccfg();
        c.lmtp = true;
        c.prefer_chunking = bdat;
        let s = ServerConfig {
            lmtp: true,
            ..scfg()
        };
        let mut p = Pair::new(
            c,
            s,
            vec![env(&[
                "a@example.org",
                "unknown@example.org",
                "c@example.org",
            ])],
            BODY,
        );
        p.lmtp_replies = vec![
            Reply::new(250, "2.1.5", "a ok"),
            Reply::new(452, "4.2.2", "c over quota"),
        ];
        p.run();
        let r = &p.results[0];
        assert!(matches!(&r.recipients[0].outcome, Outcome::Accepted(x) if x.text() == "a ok"));
        assert!(matches!(&r.recipients[1].outcome, Outcome::PermFail(x) if x.code() == 550));
        assert!(
            matches!(&r.recipients[2].outcome, Outcome::TempFail(x) if x.text() == "c over quota")
        );
        assert!(
            String::from_utf8_lossy(&p.wire_from_client).starts_with("LHLO relay.example.com\r\n")
        );
    }
}

#[test]
fn pair_starttls_then_auth_and_dsn() {
    let mut c = ccfg();
    c.use_starttls = StartTlsPolicy::Required;
    c.auth = Some(("user".into(), Secret::from("secret")));
    let s = ServerConfig {
        offer_starttls: true,
        offer_auth: true,
        ..scfg()
    };
    let mut e = env(&["a@example.org"]);
    e.body = Body::EightBitMime;
    e.size = Some(100);
    e.ret = Some(DsnRet::Hdrs);
    e.envid = Some("id+1 x".into());
    e.rcpt_params = vec![RcptParams {
        notify: Some(vec![DsnNotify::Success, DsnNotify::Failure]),
        orcpt: Some(Orcpt {
            addr_type: "rfc822".into(),
            addr: "a+b@example.org".into(),
        }),
    }];
    let mut p = Pair::new(c, s, vec![e], BODY);
    p.run();
    assert!(p.client.is_tls());
    assert!(p.results[0].all_accepted(), "{:?}", p.client_events);
    let Some(Event::MailFrom { params, .. }) = p
        .server_events
        .iter()
        .find(|e| matches!(e, Event::MailFrom { .. }))
    else {
        panic!()
    };
    assert_eq!(params.envid.as_deref(), Some("id+1 x"));
    assert_eq!(params.ret, Some(DsnRet::Hdrs));
    assert_eq!(params.size, Some(100));
    let Some(Event::RcptTo { params, .. }) = p
        .server_events
        .iter()
        .find(|e| matches!(e, Event::RcptTo { .. }))
    else {
        panic!()
    };
    assert_eq!(params.orcpt.as_ref().unwrap().addr, "a+b@example.org");
    // Wrong password: the session fails, credentials never appear in the error.
    let mut c = ccfg();
    c.auth = Some(("user".into(), Secret::from("wrong-pass")));
    let s = ServerConfig {
        offer_starttls: true,
        offer_auth: true,
        ..scfg()
    };
    let mut p = Pair::new(c, s, vec![env(&["a@example.org"])], BODY);
    p.run();
    let Some(ClientEvent::Failed(err)) = p.client_events.last() else {
        panic!("{:?}", p.client_events)
    };
    assert!(matches!(err, ClientError::AuthFailed(r) if r.code() == 535));
    assert!(!format!("{err} {err:?}").contains("wrong-pass"));
}

#[test]
fn auth_never_sent_in_plaintext() {
    let mut c = ccfg();
    c.use_starttls = StartTlsPolicy::Never;
    c.auth = Some(("user".into(), Secret::from("secret")));
    let mut p = Pair::new(c, scfg(), vec![], BODY);
    p.run();
    assert_eq!(
        p.client_events,
        [ClientEvent::Failed(ClientError::AuthWithoutTls)]
    );
    assert!(!String::from_utf8_lossy(&p.wire_from_client).contains("AUTH"));
}

// ---- scripted servers ----

struct Scripted {
    client: Client,
    sent: Vec<u8>,
    events: Vec<ClientEvent>,
}

impl Scripted {
    fn new(c: ClientConfig) -> Scripted {
        Scripted {
            client: Client::new(Arc::new(c), false),
            sent: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Server bytes in; returns what the client wrote since the last call.
    fn step(&mut self, server: &[u8]) -> String {
        self.client.receive(server);
        self.events
            .extend(std::iter::from_fn(|| self.client.poll_event()));
        let mut out = Vec::new();
        while let Some(b) = self.client.poll_transmit() {
            out.extend_from_slice(&b);
        }
        self.sent.extend_from_slice(&out);
        String::from_utf8(out).unwrap()
    }
}

#[test]
fn client_discards_replies_injected_after_starttls() {
    let mut s = Scripted::new(ccfg());
    assert_eq!(s.step(b"220 mx ESMTP\r\n"), "EHLO relay.example.com\r\n");
    assert_eq!(
        s.step(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
        "STARTTLS\r\n"
    );
    // The 220 and a forged EHLO reply (without STARTTLS, with AUTH) in one packet.
    assert_eq!(s.step(b"220 2.0.0 go\r\n250-mx\r\n250 AUTH PLAIN\r\n"), "");
    assert_eq!(s.events, [ClientEvent::StartTls]);
    // More plaintext before the handshake: also dropped.
    assert_eq!(s.step(b"250 fake\r\n"), "");
    s.client.tls_established();
    assert_eq!(s.step(b""), "EHLO relay.example.com\r\n");
    assert_eq!(s.step(b"250-mx\r\n250 PIPELINING\r\n"), "");
    assert_eq!(s.events.last(), Some(&ClientEvent::Ready));
    assert!(s.client.is_tls());
    assert!(!s.client.extensions().starttls);
}

#[test]
fn client_helo_fallback_and_no_pipelining() {
    let mut s = Scripted::new(ccfg());
    assert_eq!(s.step(b"220 old\r\n"), "EHLO relay.example.com\r\n");
    assert_eq!(
        s.step(b"502 5.5.1 not implemented\r\n"),
        "HELO relay.example.com\r\n"
    );
    assert_eq!(s.step(b"250 old\r\n"), "");
    assert_eq!(s.events, [ClientEvent::Ready]);
    let mut e = env(&["a@example.org", "b@example.org"]);
    e.ret = Some(DsnRet::Full);
    e.size = Some(10);
    s.client.start_transaction(e).unwrap();
    // No ESMTP parameters to a HELO server; one command at a time.
    assert_eq!(s.step(b""), "MAIL FROM:<sender@example.com>\r\n");
    assert_eq!(s.step(b"250 ok\r\n"), "RCPT TO:<a@example.org>\r\n");
    assert_eq!(s.step(b"250 ok\r\n"), "RCPT TO:<b@example.org>\r\n");
    assert_eq!(s.step(b"550 no\r\n"), "DATA\r\n");
    assert_eq!(s.step(b"354 go\r\n"), "");
    assert_eq!(s.events.last(), Some(&ClientEvent::SendBody));
    s.client.send_body_chunk(b"a\r\n.b\r\n").unwrap();
    s.client.end_body().unwrap();
    assert_eq!(s.step(b""), "a\r\n..b\r\n.\r\n");
    s.step(b"250 queued\r\n");
    let Some(ClientEvent::TransactionDone(r)) = s.events.last() else {
        panic!()
    };
    assert!(matches!(r.recipients[0].outcome, Outcome::Accepted(_)));
    assert!(matches!(r.recipients[1].outcome, Outcome::PermFail(_)));
    // An 8BITMIME body is refused locally: the server did not offer it.
    let mut e = env(&["a@example.org"]);
    e.body = Body::EightBitMime;
    assert_eq!(
        s.client.start_transaction(e),
        Err(ClientError::MissingExtension("8BITMIME"))
    );
}

#[test]
fn client_mail_refused_without_pipelining() {
    let mut s = Scripted::new(ccfg());
    s.step(b"220 x\r\n");
    s.step(b"250 x\r\n");
    s.client.start_transaction(env(&["a@example.org"])).unwrap();
    assert_eq!(s.step(b""), "MAIL FROM:<sender@example.com>\r\n");
    assert_eq!(s.step(b"553 5.7.1 sender refused\r\n"), "");
    let Some(ClientEvent::TransactionDone(r)) = s.events.last() else {
        panic!()
    };
    assert!(matches!(&r.recipients[0].outcome, Outcome::PermFail(x) if x.code() == 553));
}

#[test]
fn client_starttls_required_but_missing() {
    let mut c = ccfg();
    c.use_starttls = StartTlsPolicy::Required;
    let mut s = Scripted::new(c);
    s.step(b"220 x\r\n");
    assert_eq!(s.step(b"250-x\r\n250 PIPELINING\r\n"), "QUIT\r\n");
    assert_eq!(s.events, [ClientEvent::Failed(ClientError::TlsNotOffered)]);
    assert!(s.client.should_close());
}

#[test]
fn client_refuses_bare_line_ends_in_body() {
    for bad in [&b"a\nb"[..], b"a\rb", b"a\r\r\n"] {
        let mut s = Scripted::new(ccfg());
        s.step(b"220 x\r\n");
        s.step(b"250-x\r\n250 PIPELINING\r\n");
        s.client.start_transaction(env(&["a@example.org"])).unwrap();
        s.step(b"");
        s.step(b"250 ok\r\n250 ok\r\n354 go\r\n");
        s.client.send_body_chunk(b"ok\r\n").unwrap();
        assert_eq!(
            s.client.send_body_chunk(bad),
            Err(ClientError::BareLineEnding)
        );
        assert!(s.client.should_close());
        assert_eq!(s.step(b""), "ok\r\n", "nothing of the bad chunk is written");
    }
    // A CR at the end of one chunk and LF at the start of the next is fine; a final bare CR
    // is not.
    let mut s = Scripted::new(ccfg());
    s.step(b"220 x\r\n");
    s.step(b"250 x\r\n");
    s.client.start_transaction(env(&["a@example.org"])).unwrap();
    s.step(b"");
    s.step(b"250 ok\r\n");
    s.step(b"250 ok\r\n");
    s.step(b"354 go\r\n");
    s.client.send_body_chunk(b"a\r").unwrap();
    s.client.send_body_chunk(b"\n.\r").unwrap();
    assert_eq!(s.client.end_body(), Err(ClientError::BareLineEnding));
}

#[test]
fn client_strict_reply_parsing() {
    let cases: &[(&[u8], ClientError)] = &[
        (
            b"220 x\n",
            ClientError::BadReply(ReplyError::BareLineEnding),
        ),
        (
            b"220-x\r\n250 y\r\n",
            ClientError::BadReply(ReplyError::InconsistentCode),
        ),
        (b"2200 x\r\n", ClientError::BadReply(ReplyError::Syntax)),
        (
            b"220 x\r\n250 unexpected\r\n",
            ClientError::BadReply(ReplyError::Syntax),
        ),
    ];
    for (input, _) in &cases[..3] {
        let mut s = Scripted::new(ccfg());
        s.step(input);
        assert!(
            matches!(
                s.events[..],
                [ClientEvent::Failed(ClientError::BadReply(_))]
            ),
            "{input:?}"
        );
        assert!(s.client.should_close());
    }
    // A reply nobody asked for.
    let mut s = Scripted::new(ccfg());
    s.step(b"220 x\r\n250 x\r\n250 unexpected\r\n");
    assert!(matches!(
        s.events[..],
        [
            ClientEvent::Ready,
            ClientEvent::Failed(ClientError::UnexpectedReply(_))
        ]
    ));
    // Limits on line length and line count.
    let mut c = ccfg();
    c.max_reply_lines = 3;
    c.max_reply_line = 64;
    let mut s = Scripted::new(c.clone());
    s.step(b"220-a\r\n220-b\r\n220-c\r\n220 d\r\n");
    assert_eq!(
        s.events,
        [ClientEvent::Failed(ClientError::BadReply(
            ReplyError::TooManyLines(3)
        ))]
    );
    let mut s = Scripted::new(c);
    s.step(&[b'2'; 100]);
    assert_eq!(
        s.events,
        [ClientEvent::Failed(ClientError::BadReply(
            ReplyError::LineTooLong(64)
        ))]
    );
}

#[test]
fn client_refuses_injection_in_addresses() {
    let mut s = Scripted::new(ccfg());
    s.step(b"220 x\r\n");
    s.step(b"250 x\r\n");
    for bad in [
        "a@b.example>\r\nRCPT TO:<evil@x.example",
        "a@b.example> SIZE=1",
        "a b@example.org",
        "@route:a@b.example",
    ] {
        assert!(matches!(
            s.client.start_transaction(env(&[bad])),
            Err(ClientError::InvalidAddress(_))
        ));
    }
    assert!(matches!(
        s.client
            .start_transaction(Envelope::new(Some("x\r\n@y"), &["a@b.example"])),
        Err(ClientError::InvalidAddress(_))
    ));
    assert_eq!(s.step(b""), "");
    assert_eq!(
        s.client.start_transaction(Envelope::new(None, &[])),
        Err(ClientError::BadEnvelope("no recipients"))
    );
}

#[test]
fn client_greeting_refused() {
    let mut s = Scripted::new(ccfg());
    assert_eq!(s.step(b"554 5.7.1 go away\r\n"), "QUIT\r\n");
    assert!(
        matches!(&s.events[..], [ClientEvent::Failed(ClientError::Refused(r))] if r.code() == 554)
    );
}
