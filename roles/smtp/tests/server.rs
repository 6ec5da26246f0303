//! Server sessions against scripted clients, in memory.
//!
//! Every conversation that goes through `check` is also fed whole, byte by byte, split at
//! every single byte boundary and in pseudo-random pieces; all runs must give identical events
//! (consecutive `DataChunk`s merged) and identical reply bytes.

use std::sync::Arc;

use base64::Engine as _;
use bytes::{BufMut, Bytes};
use ringmail_smtp::server::MAX_CHUNK;
use ringmail_smtp::{
    AbortReason, AuthMechanism, Body, Domain, DsnNotify, DsnRet, Event, Reply, Server, ServerConfig,
};

#[derive(Clone, Debug)]
enum Verdict {
    Accept,
    Reject(Reply),
    Commit(&'static str),
    Lmtp(Vec<Reply>),
    Auth(bool),
    Challenge(Vec<u8>),
    Nothing,
}

fn default_policy(e: &Event) -> Verdict {
    match e {
        Event::RcptTo { forward_path, .. } if forward_path.local() == "unknown" => {
            Verdict::Reject(Reply::new(550, "5.1.1", "User unknown"))
        }
        Event::Helo { .. } | Event::MailFrom { .. } | Event::RcptTo { .. } => Verdict::Accept,
        Event::DataEnd => Verdict::Commit("Q1"),
        Event::AuthPlain { password, .. } | Event::AuthLogin { password, .. } => {
            Verdict::Auth(password.expose() == b"secret")
        }
        // A toy multi-step mechanism, stateless: the core does the framing only.
        Event::AuthSasl {
            first, response, ..
        } => match (first, response.expose()) {
            (true, b"client-first") => Verdict::Challenge(b"server-first".to_vec()),
            (false, b"proof-ok") => Verdict::Challenge(b"v=sig".to_vec()),
            (false, b"") => Verdict::Auth(true),
            _ => Verdict::Auth(false),
        },
        _ => Verdict::Nothing,
    }
}

#[derive(Debug, PartialEq)]
struct Run {
    events: Vec<Event>,
    output: String,
    closed: bool,
}

fn drive(
    s: &mut Server,
    out: &mut Vec<u8>,
    events: &mut Vec<Event>,
    policy: &mut dyn FnMut(&Event) -> Verdict,
) {
    loop {
        while let Some(t) = s.poll_transmit() {
            out.extend_from_slice(&t);
        }
        let Some(e) = s.poll_event() else { break };
        if let Event::DataChunk(c) = &e {
            assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
        }
        let v = policy(&e);
        match v {
            Verdict::Accept => s.accept(),
            Verdict::Reject(r) => s.reject(r),
            Verdict::Commit(id) => s.data_committed(id),
            Verdict::Lmtp(r) => s.data_committed_lmtp(&r),
            Verdict::Auth(ok) => s.auth_result(ok),
            Verdict::Challenge(d) => s.auth_challenge(&d),
            Verdict::Nothing => {}
        }
        match events.last_mut() {
            Some(Event::DataChunk(prev)) if matches!(e, Event::DataChunk(_)) => {
                let Event::DataChunk(c) = e else {
                    unreachable!()
                };
                let mut v = prev.to_vec();
                v.extend_from_slice(&c);
                *prev = Bytes::from(v);
            }
            _ => {
                if matches!(e, Event::DataAborted { .. }) {
                    // Content already handed out is dropped by the driver: how much of it there
                    // was depends on the input split.
                    while matches!(events.last(), Some(Event::DataChunk(_))) {
                        events.pop();
                    }
                }
                events.push(e)
            }
        }
    }
}

fn run_chunks(
    cfg: &Arc<ServerConfig>,
    tls: bool,
    phases: &[Vec<&[u8]>],
    policy: &mut dyn FnMut(&Event) -> Verdict,
) -> Run {
    let mut s = Server::new(cfg.clone(), tls);
    s.greet();
    let mut out = Vec::new();
    let mut events = Vec::new();
    drive(&mut s, &mut out, &mut events, policy);
    for phase in phases {
        for (i, chunk) in phase.iter().enumerate() {
            // Both ways of feeding the core, alternately: a copy (`receive`) and a read in
            // place (`input_space` + `received`), as the drivers do.
            if i % 2 == 0 {
                s.receive(chunk);
            } else {
                s.input_space(chunk.len()).put_slice(chunk);
                s.received(chunk.len());
            }
            drive(&mut s, &mut out, &mut events, policy);
            assert!(s.buffered_len() <= cfg.max_pending_input + MAX_CHUNK);
        }
        // A phase is what the client sent before the TLS handshake, if STARTTLS was in it.
        if events.contains(&Event::StartTls) && !s.is_tls() {
            out.extend_from_slice(b"<TLS>");
            s.tls_established();
            drive(&mut s, &mut out, &mut events, policy);
        }
    }
    Run {
        events,
        output: String::from_utf8_lossy(&out).into_owned(),
        closed: s.should_close(),
    }
}

fn split_runs(
    cfg: &Arc<ServerConfig>,
    tls: bool,
    phases: &[&[u8]],
    policy: fn(&Event) -> Verdict,
) -> Run {
    let whole: Vec<Vec<&[u8]>> = phases.iter().map(|p| vec![*p]).collect();
    let reference = run_chunks(cfg, tls, &whole, &mut { policy });
    // Byte by byte.
    let bytes: Vec<Vec<&[u8]>> = phases
        .iter()
        .map(|p| p.chunks(1).collect::<Vec<_>>())
        .collect();
    assert_eq!(
        run_chunks(cfg, tls, &bytes, &mut { policy }),
        reference,
        "byte by byte"
    );
    // Every single split point of every phase.
    for (pi, p) in phases.iter().enumerate() {
        for at in 1..p.len() {
            let mut split = whole.clone();
            split[pi] = vec![&p[..at], &p[at..]];
            assert_eq!(
                run_chunks(cfg, tls, &split, &mut { policy }),
                reference,
                "phase {pi} split at {at}"
            );
        }
    }
    // Pseudo-random pieces.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20 {
        let pieces: Vec<Vec<&[u8]>> = phases
            .iter()
            .map(|p| {
                let mut v = Vec::new();
                let mut rest = *p;
                while !rest.is_empty() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let n = (seed % 37) as usize + 1;
                    let (a, b) = rest.split_at(n.min(rest.len()));
                    v.push(a);
                    rest = b;
                }
                v
            })
            .collect();
        assert_eq!(
            run_chunks(cfg, tls, &pieces, &mut { policy }),
            reference,
            "random pieces"
        );
    }
    reference
}

fn cfg() -> ServerConfig {
    ServerConfig {
        hostname: "mx.example.org".into(),
        max_message_size: 10_000_000,
        ..ServerConfig::default()
    }
}

fn check(c: ServerConfig, input: &[u8]) -> Run {
    split_runs(&Arc::new(c), false, &[input], default_policy)
}

fn check_tls(c: ServerConfig, input: &[u8]) -> Run {
    split_runs(&Arc::new(c), true, &[input], default_policy)
}

/// The reply lines after the greeting.
fn replies(r: &Run) -> Vec<&str> {
    r.output
        .split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .collect()
}

fn codes(r: &Run) -> Vec<String> {
    replies(r)
        .iter()
        .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
        .map(|l| l.chars().take(3).collect())
        .collect()
}

const EHLO_REPLY: &str = "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n";

#[test]
fn happy_path_data() {
    let r = check(
        cfg(),
        b"EHLO client.example\r\nMAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: hi\r\n\r\n..leading dot\r\n..\r\n\r\nend\r\n.\r\nQUIT\r\n",
    );
    let expected = format!(
        "220 mx.example.org ESMTP ringmail\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(r.output, expected);
    assert!(r.closed);
    let ev = &r.events;
    assert_eq!(
        ev[0],
        Event::Helo {
            name: "client.example".into(),
            extended: true
        }
    );
    let Event::MailFrom {
        reverse_path,
        params,
    } = &ev[1]
    else {
        panic!("{:?}", ev[1])
    };
    assert_eq!(reverse_path.as_ref().unwrap().raw(), "a@example.com");
    assert_eq!(params.size, Some(100));
    assert_eq!(params.body, Body::EightBitMime);
    assert!(
        matches!(&ev[2], Event::RcptTo { forward_path, .. } if forward_path.raw() == "b@example.org")
    );
    assert_eq!(ev[3], Event::DataStart);
    assert_eq!(
        ev[4],
        Event::DataChunk(Bytes::from_static(
            b"Subject: hi\r\n\r\n.leading dot\r\n.\r\n\r\nend\r\n"
        ))
    );
    assert_eq!(ev[5], Event::DataEnd);
    assert_eq!(ev[6], Event::Quit);
    assert_eq!(ev.len(), 7);
}

#[test]
fn empty_message_and_null_sender() {
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n.\r\n",
    );
    assert_eq!(codes(&r), ["250", "250", "250", "354", "250"]);
    assert!(matches!(
        &r.events[1],
        Event::MailFrom {
            reverse_path: None,
            ..
        }
    ));
    assert_eq!(r.events[3], Event::DataStart);
    assert_eq!(r.events[4], Event::DataEnd);
}

#[test]
fn helo_session_has_no_esmtp_params() {
    let r = check(
        cfg(),
        b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example> NOTIFY=NEVER\r\nRCPT TO:<x@y.example>\r\nBDAT 3 LAST\r\nabcDATA\r\nx\r\n.\r\n",
    );
    assert_eq!(
        replies(&r),
        [
            "250 mx.example.org",
            "555 5.5.4 Error: MAIL parameters require EHLO",
            "250 2.1.0 Ok",
            "555 5.5.4 Error: RCPT parameters require EHLO",
            "250 2.1.5 Ok",
            "503 5.5.1 Error: send EHLO first",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as Q1",
        ]
    );
}

#[test]
fn bdat_happy_path() {
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nBDAT 10\r\nSubject: xBDAT 11 LAST\r\n\r\n.\r\nbody\r\nNOOP\r\n",
    );
    assert_eq!(
        codes(&r),
        ["250", "250", "250", "250", "250", "250"],
        "{}",
        r.output
    );
    assert!(r.output.contains("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(r.events[3], Event::DataStart);
    assert_eq!(
        r.events[4],
        Event::DataChunk(Bytes::from_static(b"Subject: x\r\n.\r\nbody\r\n"))
    );
    assert_eq!(r.events[5], Event::DataEnd);
}

#[test]
fn pipelining_everything_in_one_packet() {
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<unknown@y.example>\r\nRCPT TO:<z@y.example>\r\nDATA\r\nhello\r\n.\r\nMAIL FROM:<c@b.example>\r\nRCPT TO:<unknown@y.example>\r\nDATA\r\nRSET\r\nQUIT\r\n",
    );
    assert_eq!(
        codes(&r),
        [
            "250", "250", "250", "550", "250", "354", "250", "250", "550", "554", "250", "221"
        ]
    );
    assert!(r.events.contains(&Event::Reset));
    assert!(r.closed);
}

#[test]
fn verdicts_pause_parsing() {
    let cfg = Arc::new(cfg());
    let mut s = Server::new(cfg, false);
    s.greet();
    s.receive(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n");
    assert!(matches!(s.poll_event(), Some(Event::Helo { .. })));
    assert_eq!(s.poll_event(), None);
    assert!(!s.wants_input());
    s.accept();
    assert!(matches!(s.poll_event(), Some(Event::MailFrom { .. })));
    assert_eq!(s.poll_event(), None);
    s.reject(Reply::new(550, "5.7.1", "Go away"));
    // RCPT without a transaction: answered by the core, no event.
    assert_eq!(s.poll_event(), None);
    let mut out = Vec::new();
    while let Some(b) = s.poll_transmit() {
        out.extend_from_slice(&b);
    }
    let out = String::from_utf8(out).unwrap();
    assert!(out.ends_with("550 5.7.1 Go away\r\n503 5.5.1 Error: need MAIL command\r\n"));
    assert!(s.wants_input());
}

#[test]
fn pending_input_is_bounded() {
    let c = Arc::new(ServerConfig {
        max_pending_input: 4096,
        ..cfg()
    });
    let mut s = Server::new(c, false);
    s.greet();
    s.receive(b"EHLO c\r\n");
    assert!(matches!(s.poll_event(), Some(Event::Helo { .. })));
    for _ in 0..1000 {
        s.receive(b"NOOP\r\n");
        assert!(s.buffered_len() <= 4096 + 6);
    }
    assert!(s.should_close());
    let out: Vec<u8> = std::iter::from_fn(|| s.poll_transmit())
        .flat_map(|b| b.to_vec())
        .collect();
    assert!(
        String::from_utf8(out)
            .unwrap()
            .ends_with("421 4.7.0 mx.example.org Error: too much pipelined input\r\n")
    );
    s.accept();
    assert!(s.poll_transmit().is_none());
}

// ---- SMTP smuggling ----

const BARE_LF: &str = "521 5.5.2 mx.example.org Error: bare <LF> received";
const BARE_CR: &str = "521 5.5.2 mx.example.org Error: bare <CR> received";

#[test]
fn smuggling_in_data_never_ends_the_message() {
    let variants: &[(&[u8], &str)] = &[
        (b"\n.\n", BARE_LF),
        (b"\r.\r", BARE_CR),
        (b"\n.\r\n", BARE_LF),
        (b"\r\n.\n", BARE_LF),
        (b"\r\n.\r", BARE_CR),
        (b"\r\n.\rX", BARE_CR),
        (b"\n..\n", BARE_LF),
        (b"\r\r\n.\r\n", BARE_CR),
        (b"\r\n\n.\r\n", BARE_LF),
        (b"\n\r\n.\r\n", BARE_LF),
    ];
    for (sep, reply) in variants {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nSubject: x\r\n\r\nhello".to_vec();
        input.extend_from_slice(sep);
        input.extend_from_slice(
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nspoofed\r\n.\r\n",
        );
        let r = check(cfg(), &input);
        assert!(r.closed, "{sep:?}");
        assert_eq!(replies(&r).last().copied(), Some(*reply), "{sep:?}");
        let mail_events = r
            .events
            .iter()
            .filter(|e| matches!(e, Event::MailFrom { .. }))
            .count();
        assert_eq!(mail_events, 1, "{sep:?}: a smuggled MAIL was processed");
        assert!(!r.events.contains(&Event::DataEnd), "{sep:?}");
        let aborted = if reply == &BARE_LF {
            AbortReason::BareLf
        } else {
            AbortReason::BareCr
        };
        assert_eq!(
            r.events.last(),
            Some(&Event::DataAborted { reason: aborted }),
            "{sep:?}"
        );
    }
}

#[test]
fn bare_line_ends_in_commands_close() {
    for (input, reply) in [
        (&b"EHLO c\nMAIL FROM:<a@b.example>\r\n"[..], BARE_LF),
        (b"EHLO c\r\nNOOP\rMAIL FROM:<a@b.example>\r\n", BARE_CR),
        (b"EHLO c\r\n\n", BARE_LF),
        (b"EHLO c\r\nNOOP\r\r\n", BARE_CR),
    ] {
        let r = check(cfg(), input);
        assert!(r.closed);
        assert_eq!(replies(&r).last().copied(), Some(reply), "{input:?}");
        assert!(!r.events.iter().any(|e| matches!(e, Event::MailFrom { .. })));
    }
    // Even inside an overlong line that is being discarded.
    let mut input = b"EHLO c\r\nNOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'x', 3000));
    input.extend_from_slice(b"\nMAIL FROM:<a@b.example>\r\n");
    let r = check(cfg(), &input);
    assert!(r.closed);
    assert_eq!(replies(&r).last().copied(), Some(BARE_LF));
}

// ---- STARTTLS ----

fn tls_cfg() -> ServerConfig {
    ServerConfig {
        offer_starttls: true,
        offer_auth: true,
        ..cfg()
    }
}

#[test]
fn starttls_discards_pipelined_commands() {
    let c = Arc::new(tls_cfg());
    // MAIL pipelined in the same packet as STARTTLS is never processed; after the handshake
    // the session starts over, so MAIL without EHLO is refused.
    let r = split_runs(
        &c,
        false,
        &[
            b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n",
            b"MAIL FROM:<a@b.example>\r\nEHLO c\r\nMAIL FROM:<a@b.example>\r\n",
        ],
        default_policy,
    );
    let out = &r.output;
    let (before, after) = out.split_once("<TLS>").unwrap();
    assert!(before.contains("250 STARTTLS\r\n"));
    assert!(!before.contains("AUTH"));
    assert!(before.ends_with("220 2.0.0 Ready to start TLS\r\n"));
    assert_eq!(
        after,
        "503 5.5.1 Error: send HELO/EHLO first\r\n250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-DSN\r\n250 AUTH PLAIN LOGIN\r\n250 2.1.0 Ok\r\n"
    );
    let mails: Vec<_> = r
        .events
        .iter()
        .filter_map(|e| match e {
            Event::MailFrom { reverse_path, .. } => Some(reverse_path.clone().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].raw(), "a@b.example");
}

#[test]
fn starttls_bytes_before_handshake_are_dropped() {
    let mut s = Server::new(Arc::new(tls_cfg()), false);
    s.greet();
    s.receive(b"EHLO c\r\n");
    assert!(matches!(s.poll_event(), Some(Event::Helo { .. })));
    s.accept();
    s.receive(b"STARTTLS\r\n");
    assert_eq!(s.poll_event(), Some(Event::StartTls));
    s.receive(b"MAIL FROM:<evil@x.example>\r\n");
    assert_eq!(s.buffered_len(), 0);
    s.tls_established();
    assert!(s.is_tls());
    assert_eq!(s.poll_event(), None);
    while s.poll_transmit().is_some() {}
    s.receive(b"NOOP\r\n");
    assert_eq!(&s.poll_transmit().unwrap()[..], b"250 2.0.0 Ok\r\n");
}

#[test]
fn starttls_refusals() {
    let r = check(
        tls_cfg(),
        b"STARTTLS\r\nEHLO c\r\nSTARTTLS now\r\nMAIL FROM:<a@b.example>\r\nSTARTTLS\r\n",
    );
    assert_eq!(replies(&r)[..1], ["503 5.5.1 Error: send EHLO first"]);
    assert!(r.output.contains("501 5.5.4 Syntax: STARTTLS\r\n"));
    assert!(
        r.output
            .ends_with("503 5.5.1 Error: MAIL transaction in progress\r\n")
    );
    let r = check(cfg(), b"EHLO c\r\nSTARTTLS\r\n");
    assert!(!r.output.contains("STARTTLS\r\n"));
    assert!(
        r.output
            .ends_with("502 5.5.1 Error: command not implemented\r\n")
    );
    let r = check_tls(tls_cfg(), b"EHLO c\r\nSTARTTLS\r\n");
    assert!(!r.output.contains("250-STARTTLS"));
    assert!(
        r.output
            .ends_with("554 5.5.1 Error: TLS already active\r\n")
    );
}

// ---- AUTH ----

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn auth_requires_tls() {
    let r = check(
        tls_cfg(),
        format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64(b"\0user\0secret")).as_bytes(),
    );
    assert!(
        r.output
            .ends_with("538 5.7.11 Encryption required for requested authentication mechanism\r\n")
    );
    assert!(!r.output.contains("AUTH PLAIN LOGIN"));
    assert!(
        !r.events
            .iter()
            .any(|e| matches!(e, Event::AuthPlain { .. }))
    );
}

#[test]
fn auth_plain_initial_response() {
    let r = check_tls(
        tls_cfg(),
        format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\n",
            b64(b"admin\0user\0secret"),
            b64(b"\0user\0secret")
        )
        .as_bytes(),
    );
    assert!(r.output.contains("250 AUTH PLAIN LOGIN\r\n"));
    assert!(r.output.ends_with(
        "235 2.7.0 Authentication successful\r\n503 5.5.1 Error: already authenticated\r\n"
    ));
    let Event::AuthPlain {
        authzid,
        authcid,
        password,
    } = &r.events[1]
    else {
        panic!()
    };
    assert_eq!(authzid.as_deref(), Some("admin"));
    assert_eq!(authcid, "user");
    assert_eq!(password.expose(), b"secret");
    let dbg = format!("{:?}", r.events[1]);
    assert!(!dbg.contains("secret"), "{dbg}");
}

#[test]
fn auth_plain_challenge_and_failure() {
    let r = check_tls(
        tls_cfg(),
        format!(
            "EHLO c\r\nAUTH PLAIN\r\n{}\r\nAUTH plain\r\n{}\r\n",
            b64(b"\0user\0wrong"),
            b64(b"\0user\0secret")
        )
        .as_bytes(),
    );
    assert!(r.output.ends_with(
        "334 \r\n535 5.7.8 Error: authentication failed\r\n334 \r\n235 2.7.0 Authentication successful\r\n"
    ));
}

#[test]
fn auth_login() {
    let r = check_tls(
        tls_cfg(),
        format!(
            "EHLO c\r\nAUTH LOGIN\r\n{}\r\n{}\r\n",
            b64(b"user"),
            b64(b"secret")
        )
        .as_bytes(),
    );
    assert!(r.output.ends_with(
        "334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n"
    ));
    assert!(matches!(&r.events[1], Event::AuthLogin { authcid, .. } if authcid == "user"));
    // Initial response carries the user name.
    let r = check_tls(
        tls_cfg(),
        format!(
            "EHLO c\r\nAUTH LOGIN {}\r\n{}\r\n",
            b64(b"user"),
            b64(b"secret")
        )
        .as_bytes(),
    );
    assert!(
        r.output
            .ends_with("334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n")
    );
}

#[test]
fn auth_errors() {
    let r = check_tls(
        tls_cfg(),
        b"EHLO c\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN\r\n!!!notbase64\r\nAUTH LOGIN\r\n*\r\nAUTH CRAM-MD5\r\nAUTH PLAIN AGI=\r\nMAIL FROM:<a@b.example>\r\nAUTH PLAIN\r\n",
    );
    assert_eq!(
        replies(&r)[9..],
        [
            "334 ",
            "501 5.0.0 Authentication aborted",
            "334 ",
            "501 5.5.2 Error: cannot decode response",
            "334 VXNlcm5hbWU6",
            "501 5.0.0 Authentication aborted",
            "504 5.5.4 Error: unsupported authentication mechanism",
            "501 5.5.2 Error: invalid authentication data",
            "250 2.1.0 Ok",
            "503 5.5.1 Error: MAIL transaction in progress",
        ]
    );
    let r = check_tls(cfg(), b"EHLO c\r\nAUTH PLAIN\r\n");
    assert!(
        r.output
            .ends_with("503 5.5.1 Error: authentication not enabled\r\n")
    );
    let r = check_tls(tls_cfg(), b"HELO c\r\nAUTH PLAIN\r\n");
    assert!(r.output.ends_with("503 5.5.1 Error: send EHLO first\r\n"));
}

fn scram_cfg(mechs: &[AuthMechanism]) -> ServerConfig {
    ServerConfig {
        auth_mechanisms: mechs.to_vec(),
        ..tls_cfg()
    }
}

#[test]
fn auth_multi_step_mechanism() {
    let cfg = scram_cfg(&[AuthMechanism::Plain, AuthMechanism::ScramSha256]);
    // Initial response, two challenges, the empty final response.
    let input = format!(
        "EHLO c\r\nAUTH SCRAM-SHA-256 {}\r\n{}\r\n\r\nMAIL FROM:<a@b.example>\r\n",
        b64(b"client-first"),
        b64(b"proof-ok")
    );
    let r = check_tls(cfg.clone(), input.as_bytes());
    assert!(
        r.output.contains("250 AUTH PLAIN SCRAM-SHA-256\r\n"),
        "{}",
        r.output
    );
    assert_eq!(
        replies(&r)[9..],
        [
            format!("334 {}", b64(b"server-first")).as_str(),
            format!("334 {}", b64(b"v=sig")).as_str(),
            "235 2.7.0 Authentication successful",
            "250 2.1.0 Ok",
        ]
    );
    let firsts: Vec<bool> = r
        .events
        .iter()
        .filter_map(|e| match e {
            Event::AuthSasl {
                first, mechanism, ..
            } => {
                assert_eq!(*mechanism, AuthMechanism::ScramSha256);
                Some(*first)
            }
            _ => None,
        })
        .collect();
    assert_eq!(firsts, [true, false, false]);
    let dbg = format!("{:?}", r.events);
    assert!(!dbg.contains("proof"), "{dbg}");
    // No initial response: an empty 334 first; lower-case name; wrong proof -> 535.
    let input = format!(
        "EHLO c\r\nAUTH scram-sha-256\r\n{}\r\n{}\r\n",
        b64(b"client-first"),
        b64(b"proof-bad")
    );
    let r = check_tls(cfg.clone(), input.as_bytes());
    assert_eq!(
        replies(&r)[9..],
        [
            "334 ",
            format!("334 {}", b64(b"server-first")).as_str(),
            "535 5.7.8 Error: authentication failed",
        ]
    );
    // "*" cancels at every step; bad base64 too; then a fresh exchange starts with first=true.
    for cancel_at in 0..3 {
        let mut lines = vec![b64(b"client-first"), b64(b"proof-ok"), String::new()];
        lines[cancel_at] = "*".into();
        lines.truncate(cancel_at + 1);
        let input = format!(
            "EHLO c\r\nAUTH SCRAM-SHA-256\r\n{}\r\nAUTH SCRAM-SHA-256 {}\r\n{}\r\n\r\n",
            lines.join("\r\n"),
            b64(b"client-first"),
            b64(b"proof-ok")
        );
        let r = check_tls(cfg.clone(), input.as_bytes());
        let rs = replies(&r);
        assert_eq!(
            rs[10 + cancel_at],
            "501 5.0.0 Authentication aborted",
            "{rs:?}"
        );
        assert_eq!(
            rs.last(),
            Some(&"235 2.7.0 Authentication successful"),
            "{rs:?}"
        );
        let firsts = r
            .events
            .iter()
            .filter(|e| matches!(e, Event::AuthSasl { first: true, .. }))
            .count();
        assert_eq!(firsts, if cancel_at == 0 { 1 } else { 2 }, "{rs:?}");
    }
    let r = check_tls(cfg.clone(), b"EHLO c\r\nAUTH SCRAM-SHA-256 !!!\r\n");
    assert!(
        r.output
            .ends_with("501 5.5.2 Error: cannot decode response\r\n")
    );
    // Not offered: 504; LOGIN too when only PLAIN and SCRAM are offered.
    let r = check_tls(
        scram_cfg(&[AuthMechanism::Plain, AuthMechanism::Login]),
        b"EHLO c\r\nAUTH SCRAM-SHA-256\r\n",
    );
    assert!(r.output.contains("250 AUTH PLAIN LOGIN\r\n"));
    assert!(
        r.output
            .ends_with("504 5.5.4 Error: unsupported authentication mechanism\r\n")
    );
    let r = check_tls(cfg, b"EHLO c\r\nAUTH LOGIN\r\n");
    assert!(
        r.output
            .ends_with("504 5.5.4 Error: unsupported authentication mechanism\r\n")
    );
    // A response line over the AUTH line limit ends the exchange with 500.
    let input = format!(
        "EHLO c\r\nAUTH SCRAM-SHA-256\r\n{}\r\nNOOP\r\n",
        "A".repeat(13000)
    );
    let r = check_tls(scram_cfg(&[AuthMechanism::ScramSha256]), input.as_bytes());
    assert_eq!(
        replies(&r)[9..],
        ["334 ", "500 5.5.2 Error: line too long", "250 2.0.0 Ok"]
    );
    // A challenge is ignored when no multi-step response is pending.
    let mut s = Server::new(Arc::new(scram_cfg(&[AuthMechanism::Plain])), true);
    s.greet();
    s.auth_challenge(b"x");
    let out = s.poll_transmit().unwrap();
    assert!(!String::from_utf8_lossy(&out).contains("334"));
}

#[test]
fn mail_auth_param_only_with_auth() {
    let r = check(tls_cfg(), b"EHLO c\r\nMAIL FROM:<a@b.example> AUTH=<>\r\n");
    assert!(r.output.ends_with("555 5.5.4 Unsupported option: AUTH\r\n"));
    let r = check_tls(
        tls_cfg(),
        b"EHLO c\r\nMAIL FROM:<a@b.example> AUTH=a+40b.example\r\n",
    );
    assert!(
        matches!(&r.events[1], Event::MailFrom { params, .. } if params.auth.as_deref() == Some("a@b.example"))
    );
}

// ---- limits ----

#[test]
fn overlong_command_line() {
    let mut input = b"EHLO c\r\nNOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'x', 2041));
    input.extend_from_slice(b"\r\nNOOP ");
    input.extend(std::iter::repeat_n(b'x', 2042));
    input.extend_from_slice(b"\r\nNOOP ");
    input.extend(std::iter::repeat_n(b'x', 10_000));
    input.extend_from_slice(b"\r\nNOOP\r\n");
    let r = check(cfg(), &input);
    // 2046 + CRLF = 2048 is fine; 2049 and 10 000 are not; the session continues.
    assert_eq!(
        replies(&r)[8..],
        [
            "250 2.0.0 Ok",
            "500 5.5.2 Error: line too long",
            "500 5.5.2 Error: line too long",
            "250 2.0.0 Ok"
        ]
    );
    assert!(!r.closed);
}

#[test]
fn too_many_recipients() {
    let r = check(
        ServerConfig {
            max_recipients: 2,
            ..cfg()
        },
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<unknown@y.example>\r\nRCPT TO:<a@y.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\n",
    );
    assert!(r.output.ends_with(
        "550 5.1.1 User unknown\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n"
    ));
}

#[test]
fn declared_size_too_big() {
    let r = check(cfg(), b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=10000001\r\nMAIL FROM:<a@b.example> SIZE=99999999999999999999999\r\nMAIL FROM:<a@b.example> SIZE=10000000\r\n");
    assert_eq!(codes(&r)[1..], ["552", "501", "250"]);
    assert!(r.output.contains("552 5.3.4 "));
}

fn drain(s: &mut Server, events: &mut Vec<Event>) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = s.poll_transmit() {
        out.extend_from_slice(&b);
    }
    while let Some(e) = s.poll_event() {
        if !matches!(e, Event::DataChunk(_)) {
            events.push(e);
        }
    }
    out
}

#[test]
fn huge_message_memory_stays_bounded() {
    let c = Arc::new(ServerConfig {
        max_message_size: 1_000_000,
        ..cfg()
    });
    let mut s = Server::new(c, false);
    s.greet();
    let mut events = Vec::new();
    for cmd in [
        &b"EHLO c\r\n"[..],
        b"MAIL FROM:<a@b.example>\r\n",
        b"RCPT TO:<x@y.example>\r\n",
    ] {
        s.receive(cmd);
        drain(&mut s, &mut events);
        s.accept();
    }
    s.receive(b"DATA\r\nSubject: big\r\n\r\n");
    let mut line = vec![b'a'; 998];
    line.extend_from_slice(b"\r\n");
    let block: Vec<u8> = line.iter().copied().cycle().take(64 * 1000).collect();
    let mut fed = 0u64;
    let mut max_buffered = 0;
    while fed < 100_000_000 {
        s.receive(&block);
        fed += block.len() as u64;
        max_buffered = max_buffered.max(s.buffered_len());
        drain(&mut s, &mut events);
    }
    s.receive(b".\r\nNOOP\r\n");
    let out = String::from_utf8(drain(&mut s, &mut events)).unwrap();
    assert!(max_buffered <= 2 * MAX_CHUNK, "{max_buffered}");
    assert_eq!(
        out,
        "552 5.3.4 Error: message file too big\r\n250 2.0.0 Ok\r\n"
    );
    assert_eq!(
        events[3..],
        [
            Event::DataStart,
            Event::DataAborted {
                reason: AbortReason::MessageTooBig
            }
        ]
    );
    assert!(!s.should_close());
}

/// A message with `hops` Received fields (plus look-alikes that must not count).
fn looped_message(hops: usize) -> Vec<u8> {
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n".to_vec();
    for i in 0..hops {
        input.extend_from_slice(
            format!("ReCeIvEd: from hop{i}.example by mx.example;\r\n\tFri, 1 Jan 2027 00:00:00 +0000\r\n")
                .as_bytes(),
        );
    }
    input
        .extend_from_slice(b"X-Received: not a hop\r\nReceived-SPF: pass\r\nSubject: loop\r\n\r\n");
    input.extend_from_slice(b"Received: in the body, not a hop\r\n.\r\nNOOP\r\n");
    input
}

#[test]
fn mail_loops_are_refused_by_hop_count() {
    // 49 Received fields pass (ours makes 50, the default limit); the look-alikes and the body
    // do not count.
    let r = check(cfg(), &looped_message(49));
    assert!(r.events.contains(&Event::DataEnd), "{}", r.output);
    // 50 is a loop (the next hop would see 51): 554 5.4.6 at the end of the message; the
    // session goes on.
    let r = check(cfg(), &looped_message(50));
    assert!(
        r.output.ends_with(
            "354 End data with <CR><LF>.<CR><LF>\r\n554 5.4.6 Error: too many hops (mail loop)\r\n250 2.0.0 Ok\r\n"
        ),
        "{}",
        r.output
    );
    assert!(r.events.contains(&Event::DataAborted {
        reason: AbortReason::TooManyHops
    }));
    assert!(!r.events.contains(&Event::DataEnd));
    assert!(!r.closed);
    // The limit is configurable.
    let r = check(
        ServerConfig {
            max_hops: 3,
            ..cfg()
        },
        &looped_message(3),
    );
    assert!(r.output.contains("554 5.4.6"), "{}", r.output);
    let r = check(
        ServerConfig {
            max_hops: 3,
            ..cfg()
        },
        &looped_message(2),
    );
    assert!(r.events.contains(&Event::DataEnd), "{}", r.output);
}

#[test]
fn header_bomb() {
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n".to_vec();
    for i in 0..200 {
        input.extend_from_slice(format!("X-Bomb-{i}: aaaaaaaaaaaaaaaaaaaaaaaa\r\n").as_bytes());
    }
    input.extend_from_slice(b"\r\nbody\r\n.\r\nNOOP\r\n");
    let r = check(
        ServerConfig {
            max_header_bytes: 4096,
            ..cfg()
        },
        &input,
    );
    assert!(r.output.ends_with(
        "354 End data with <CR><LF>.<CR><LF>\r\n552 5.3.4 Error: message header too large\r\n250 2.0.0 Ok\r\n"
    ));
    assert!(r.events.contains(&Event::DataAborted {
        reason: AbortReason::HeaderTooLarge
    }));
    assert!(!r.events.contains(&Event::DataEnd));
    // The same header fits a larger limit; a big body does not count as header.
    let r = check(
        ServerConfig {
            max_header_bytes: 8192,
            ..cfg()
        },
        &input,
    );
    assert!(r.output.contains("250 2.0.0 Ok: queued as Q1\r\n"));
}

#[test]
fn long_data_lines_are_accepted_by_default() {
    // As Postfix: lines over RFC 5322's 998 octets are common in real mail (generated HTML,
    // unwrapped base64); refusing them would bounce it.
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nSubject: x\r\n\r\n"
            .to_vec();
    input.extend(std::iter::repeat_n(b'a', 5_000));
    input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
    let r = check(cfg(), &input);
    assert!(
        r.output.contains("250 2.0.0 Ok: queued as Q1\r\n"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("5.6.0"));
}

#[test]
fn data_line_too_long() {
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nSubject: x\r\n\r\n"
            .to_vec();
    input.extend(std::iter::repeat_n(b'a', 998));
    input.extend_from_slice(b"\r\n");
    input.extend(std::iter::repeat_n(b'b', 999));
    input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    let r = check(
        ServerConfig {
            max_data_line: 1000,
            ..cfg()
        },
        &input,
    );
    assert!(r.output.ends_with(
        "354 End data with <CR><LF>.<CR><LF>\r\n550 5.6.0 Error: message line too long\r\n250 2.0.0 Ok\r\n"
    ));
    assert!(r.events.contains(&Event::DataAborted {
        reason: AbortReason::LineTooLong
    }));
    assert!(!r.closed);
}

#[test]
fn too_many_errors() {
    let r = check(
        ServerConfig {
            max_errors: 3,
            ..cfg()
        },
        b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n",
    );
    assert_eq!(
        replies(&r),
        [
            "500 5.5.2 Error: command not recognized",
            "500 5.5.2 Error: command not recognized",
            "500 5.5.2 Error: command not recognized",
            "421 4.7.0 mx.example.org Error: too many errors",
        ]
    );
    assert!(r.closed);
}

#[test]
fn junk_commands_count_as_errors_past_the_limit() {
    // 3 junk commands are free; each further one (NOOP, RSET, VRFY, HELP, a repeated EHLO)
    // counts as an error, and at max_errors the session ends with 421.
    let r = check(
        ServerConfig {
            max_junk_commands: 3,
            max_errors: 3,
            ..cfg()
        },
        b"EHLO c\r\nNOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nEHLO c\r\nNOOP\r\nNOOP\r\n",
    );
    let rs = replies(&r);
    assert_eq!(
        rs.last(),
        Some(&"421 4.7.0 mx.example.org Error: too many errors"),
        "{}",
        r.output
    );
    // EHLO, NOOP, RSET, VRFY; then HELP, EHLO (errors 1, 2) answered; the next NOOP gets 421.
    assert!(rs.iter().any(|l| l.starts_with("214 ")), "{}", r.output);
    assert_eq!(
        rs.iter().filter(|l| l.starts_with("250 2.0.0 Ok")).count(),
        2
    );
    assert!(r.closed);
    // The first EHLO and real commands are not junk.
    let r = check(
        ServerConfig {
            max_junk_commands: 0,
            max_errors: 1,
            ..cfg()
        },
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nQUIT\r\n",
    );
    assert!(r.output.ends_with("221 2.0.0 Bye\r\n"), "{}", r.output);
    // The default: 100 junk commands plus up to 19 more pass; 300 do not.
    let mut input = b"EHLO c\r\n".to_vec();
    for _ in 0..300 {
        input.extend_from_slice(b"NOOP\r\n");
    }
    let cfg = Arc::new(cfg());
    let r = run_chunks(&cfg, false, &[vec![&input[..]]], &mut { default_policy });
    let oks = r.output.matches("250 2.0.0 Ok\r\n").count();
    assert_eq!(oks, 119, "{}", r.output);
    assert!(
        r.output
            .ends_with("421 4.7.0 mx.example.org Error: too many errors\r\n")
    );
    assert!(r.closed);
}

#[test]
fn timeout_in_data() {
    let mut s = Server::new(Arc::new(cfg()), false);
    s.greet();
    let mut events = Vec::new();
    s.receive(b"EHLO c\r\n");
    drain(&mut s, &mut events);
    s.accept();
    s.receive(b"MAIL FROM:<a@b.example>\r\n");
    drain(&mut s, &mut events);
    s.accept();
    s.receive(b"RCPT TO:<x@y.example>\r\n");
    drain(&mut s, &mut events);
    s.accept();
    s.receive(b"DATA\r\npartial");
    drain(&mut s, &mut events);
    s.timeout();
    let out = String::from_utf8(drain(&mut s, &mut events)).unwrap();
    assert_eq!(out, "421 4.4.2 mx.example.org Error: timeout exceeded\r\n");
    assert_eq!(
        events.last(),
        Some(&Event::DataAborted {
            reason: AbortReason::Timeout
        })
    );
    assert!(s.should_close());
}

// ---- addresses ----

#[test]
fn address_forms_are_exposed() {
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM: <a@b.example>\r\nRCPT TO:<\"evil@x.example\"@y.example>\r\nRCPT TO:<u%x.example@y.example>\r\nRCPT TO:<x!u@y.example>\r\nRCPT TO:<u@[192.0.2.1]>\r\nRCPT TO:<u@[IPv6:2001:db8::1]>\r\nRCPT TO:<Postmaster>\r\n",
    );
    let rcpts: Vec<_> = r
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RcptTo { forward_path, .. } => Some(forward_path.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(rcpts.len(), 6);
    assert!(rcpts[0].local_is_quoted() && rcpts[0].local_has_routing_chars());
    assert_eq!(rcpts[0].local(), "evil@x.example");
    assert!(!rcpts[1].local_is_quoted() && rcpts[1].local_has_routing_chars());
    assert!(rcpts[2].local_has_routing_chars());
    assert_eq!(
        rcpts[3].domain(),
        &Domain::Ipv4("192.0.2.1".parse().unwrap())
    );
    assert!(rcpts[3].domain_is_address_literal());
    assert_eq!(
        rcpts[4].domain(),
        &Domain::Ipv6("2001:db8::1".parse().unwrap())
    );
    assert_eq!(rcpts[5].local(), "Postmaster");
    assert_eq!(rcpts[5].domain(), &Domain::Name("mx.example.org".into()));
    assert!(!rcpts[5].domain_is_address_literal());
}

#[test]
fn bad_addresses() {
    let long_local = "a".repeat(65);
    let long_path = format!("u@{}.example", vec!["a".repeat(60); 5].join("."));
    let cases: Vec<(String, &str)> = vec![
        (
            "MAIL FROM:<@a.example,@b.example:u@c.example>".into(),
            "501 5.1.7 Bad sender address syntax: source routes are not accepted",
        ),
        (
            "MAIL FROM:a@b.example".into(),
            "501 5.5.4 Syntax: MAIL FROM:<address>",
        ),
        (
            "MAIL FROM:<a@b.example".into(),
            "501 5.5.4 Syntax: MAIL FROM:<address>",
        ),
        (
            "MAIL FROM:<user>".into(),
            "501 5.1.7 Bad sender address syntax: address has no domain",
        ),
        (
            "MAIL FROM:<jörg@b.example>".into(),
            "553 5.6.7 Error: must declare SMTPUTF8 to send a non-ASCII address",
        ),
        (
            "MAIL FROM:<a\0b@b.example>".into(),
            "500 5.5.2 Error: NUL character in command",
        ),
        (
            format!("MAIL FROM:<{long_local}@b.example>"),
            "501 5.1.7 Bad sender address syntax: local part longer than 64 octets",
        ),
        (
            format!("MAIL FROM:<{long_path}>"),
            "501 5.1.7 Bad sender address syntax: path longer than 256 octets",
        ),
        (
            "MAIL FROM:<a@b.example> FOO=bar".into(),
            "555 5.5.4 Unsupported option: FOO",
        ),
        (
            "MAIL FROM:<a@b.example> RET=FULL RET=HDRS".into(),
            "501 5.5.4 Duplicate RET parameter",
        ),
        (
            "MAIL FROM:<a@b.example> ENVID=a+zz".into(),
            "501 5.5.4 Bad ENVID parameter value",
        ),
    ];
    for (cmd, reply) in &cases {
        let r = check(cfg(), format!("EHLO c\r\n{cmd}\r\n").as_bytes());
        assert_eq!(replies(&r).last().copied(), Some(*reply), "{cmd}");
    }
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<@a.example:u@c.example>\r\nRCPT TO:<>\r\nRCPT TO:<j\xc3\xb6rg@y.example>\r\nRCPT TO:<u@y.example> NOTIFY=NEVER,DELAY\r\nRCPT TO:<u@y.example> X=1\r\nMAIL FROM:<b@b.example>\r\nDATA\r\n",
    );
    assert_eq!(
        replies(&r)[9..],
        [
            "501 5.1.3 Bad recipient address syntax: source routes are not accepted",
            "501 5.1.3 Bad recipient address syntax: empty address",
            "553 5.6.7 Error: must declare SMTPUTF8 to send a non-ASCII address",
            "501 5.5.4 Bad NOTIFY parameter value",
            "555 5.5.4 Unsupported option: X",
            "503 5.5.1 Error: nested MAIL command",
            "554 5.5.1 Error: no valid recipients",
        ]
    );
}

#[test]
fn smtputf8_and_dsn() {
    let r = check(
        cfg(),
        "EHLO c\r\nMAIL FROM:<jörg@bücher.example> SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\nRCPT TO:<ü@bücher.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40y.example\r\nRCPT TO:<v@y.example> NOTIFY=NEVER\r\n".as_bytes(),
    );
    assert_eq!(codes(&r)[1..], ["250", "250", "250"]);
    let Event::MailFrom { params, .. } = &r.events[1] else {
        panic!()
    };
    assert!(params.smtputf8);
    assert_eq!(params.ret, Some(DsnRet::Hdrs));
    assert_eq!(params.envid.as_deref(), Some("QQ+1"));
    let Event::RcptTo { params, .. } = &r.events[2] else {
        panic!()
    };
    assert_eq!(
        params.notify,
        Some(vec![DsnNotify::Success, DsnNotify::Failure])
    );
    assert_eq!(params.orcpt.as_ref().unwrap().addr, "x@y.example");
    assert!(
        matches!(&r.events[3], Event::RcptTo { params, .. } if params.notify == Some(vec![DsnNotify::Never]))
    );
    // Invalid UTF-8 never reaches the parser.
    let r = check(cfg(), b"EHLO c\r\nMAIL FROM:<\xff@b.example> SMTPUTF8\r\n");
    assert!(r.output.ends_with("500 5.5.2 Error: bad UTF-8 syntax\r\n"));
}

// ---- sequencing and other commands ----

#[test]
fn out_of_sequence() {
    let r = check(
        cfg(),
        b"MAIL FROM:<a@b.example>\r\nEHLO c\r\nRCPT TO:<x@y.example>\r\nDATA\r\nMAIL FROM:<a@b.example>\r\nDATA\r\nRCPT TO:<unknown@y.example>\r\nDATA\r\nEHLO again\r\nRCPT TO:<x@y.example>\r\n",
    );
    assert_eq!(
        replies(&r)
            .iter()
            .filter(|l| !l.starts_with("250"))
            .copied()
            .collect::<Vec<_>>(),
        [
            "503 5.5.1 Error: send HELO/EHLO first",
            "503 5.5.1 Error: need MAIL command",
            "503 5.5.1 Error: need MAIL command",
            "554 5.5.1 Error: no valid recipients",
            "550 5.1.1 User unknown",
            "554 5.5.1 Error: no valid recipients",
            "503 5.5.1 Error: need MAIL command",
        ]
    );
    // EHLO inside a transaction resets it.
    assert!(r.events.contains(&Event::Reset));
}

#[test]
fn misc_commands() {
    let r = check(
        cfg(),
        b"EHLO c\r\nB\xc3\xa9AT 1\r\nNOOP anything\r\nVRFY root\r\nVRFY\r\nEXPN staff\r\nHELP\r\nRSET\r\nRSET x\r\n\r\nFOO\r\nLHLO c\r\nQUIT\r\nNOOP\r\n",
    );
    assert_eq!(
        replies(&r)[8..],
        [
            "500 5.5.2 Error: command not recognized",
            "250 2.0.0 Ok",
            "252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery",
            "501 5.5.4 Syntax: VRFY address",
            "502 5.5.1 Error: command not implemented",
            "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY",
            "250 2.0.0 Ok",
            "501 5.5.4 Syntax: RSET",
            "500 5.5.2 Error: bad syntax",
            "500 5.5.2 Error: command not recognized",
            "500 5.5.2 Error: command not recognized",
            "221 2.0.0 Bye",
        ]
    );
    assert!(r.closed);
    assert_eq!(r.events.last(), Some(&Event::Quit));
}

#[test]
fn help_lists_what_ehlo_offers() {
    let help = |c: ServerConfig, tls: bool| {
        let r = if tls {
            check_tls(c, b"HELP\r\n")
        } else {
            check(c, b"HELP\r\n")
        };
        replies(&r)[0].to_string()
    };
    let offered = || ServerConfig {
        offer_starttls: true,
        offer_auth: true,
        ..cfg()
    };
    let base = "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY";
    assert_eq!(help(cfg(), false), base);
    assert_eq!(help(cfg(), true), base);
    assert_eq!(help(offered(), false), format!("{base} STARTTLS"));
    assert_eq!(help(offered(), true), format!("{base} AUTH"));
    let lmtp = ServerConfig {
        lmtp: true,
        ..cfg()
    };
    assert_eq!(
        help(lmtp, false),
        "214 2.0.0 Commands: LHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY"
    );
}

#[test]
fn helo_can_be_rejected() {
    fn policy(e: &Event) -> Verdict {
        match e {
            Event::Helo { name, .. } if name == "bad" => {
                Verdict::Reject(Reply::new(550, "5.7.1", "Helo command rejected"))
            }
            e => default_policy(e),
        }
    }
    let r = split_runs(
        &Arc::new(cfg()),
        false,
        &[b"EHLO bad\r\nMAIL FROM:<a@b.example>\r\nHELO c\r\nMAIL FROM:<a@b.example>\r\nEHLO a\tb\r\n"],
        policy,
    );
    assert_eq!(
        replies(&r),
        [
            "550 5.7.1 Helo command rejected",
            "503 5.5.1 Error: send HELO/EHLO first",
            "250 mx.example.org",
            "250 2.1.0 Ok",
            "501 5.5.2 Error: invalid hostname"
        ]
    );
}

#[test]
fn refuse_connection() {
    let mut s = Server::new(Arc::new(cfg()), false);
    s.refuse_connection(554, "5.7.1", "Service unavailable; client host blocked");
    assert_eq!(
        &s.poll_transmit().unwrap()[..],
        b"554 5.7.1 Service unavailable; client host blocked\r\n"
    );
    assert!(s.should_close());
    s.receive(b"EHLO c\r\n");
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.poll_transmit(), None);
}

// ---- BDAT ----

#[test]
fn bdat_chunk_bytes_are_consumed_not_parsed() {
    let r = check(
        cfg(),
        b"EHLO c\r\nBDAT 26\r\nMAIL FROM:<evil@x.example>BDAT 6 LAST\r\nQUIT\r\nMAIL FROM:<a@b.example>\r\nBDAT 6\r\nRCPT x",
    );
    assert_eq!(
        replies(&r)[8..],
        [
            "503 5.5.1 Error: need MAIL command",
            "503 5.5.1 Error: need MAIL command",
            "250 2.1.0 Ok",
            "554 5.5.1 Error: no valid recipients",
        ]
    );
    assert!(!r.closed);
    assert_eq!(
        r.events
            .iter()
            .filter(|e| matches!(e, Event::MailFrom { .. }))
            .count(),
        1
    );
}

#[test]
fn bdat_size_limit() {
    let r = check(
        ServerConfig {
            max_message_size: 20,
            ..cfg()
        },
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nBDAT 15\r\n0123456789abcdeBDAT 10 LAST\r\n0123456789NOOP\r\nBDAT 1 LAST\r\nx",
    );
    assert_eq!(
        replies(&r)[10..],
        [
            "250 2.0.0 Ok: chunk received",
            "552 5.3.4 Error: message file too big",
            "250 2.0.0 Ok",
            "503 5.5.1 Error: need MAIL command",
        ]
    );
    assert!(r.events.contains(&Event::DataAborted {
        reason: AbortReason::MessageTooBig
    }));
}

#[test]
fn bdat_and_data_do_not_mix() {
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nBDAT 3\r\nabcDATA\r\nRCPT TO:<z@y.example>\r\nBDAT 0 LAST\r\n",
    );
    assert_eq!(
        replies(&r)[10..],
        [
            "250 2.0.0 Ok: chunk received",
            "503 5.5.1 Error: DATA cannot be mixed with BDAT",
            "503 5.5.1 Error: RCPT after BDAT",
            "250 2.0.0 Ok: queued as Q1",
        ]
    );
}

#[test]
fn bdat_bare_line_ends_need_binarymime() {
    for body in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"ab\r\n\r", b"ab\r\r\n"] {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n".to_vec();
        input.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
        input.extend_from_slice(body);
        input.extend_from_slice(b"NOOP\r\n");
        let r = check(cfg(), &input);
        assert!(
            r.output.ends_with(
                "550 5.6.0 Error: bare <CR> or <LF> in message content requires BODY=BINARYMIME\r\n250 2.0.0 Ok\r\n"
            ),
            "{body:?}: {}",
            r.output
        );
        assert!(r.events.contains(&Event::DataAborted {
            reason: AbortReason::BareLineEnding
        }));
        assert!(!r.closed);
    }
    // Declared BINARYMIME: the same bytes pass untouched.
    let c = ServerConfig {
        offer_binarymime: true,
        ..cfg()
    };
    let r = check(
        c.clone(),
        b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<x@y.example>\r\nDATA\r\nBDAT 6 LAST\r\na\nb\r\r\n",
    );
    assert!(r.output.contains("250 BINARYMIME\r\n"));
    assert!(r.output.ends_with(
        "503 5.5.1 Error: BODY=BINARYMIME requires BDAT\r\n250 2.0.0 Ok: queued as Q1\r\n"
    ));
    assert!(
        r.events
            .contains(&Event::DataChunk(Bytes::from_static(b"a\nb\r\r\n")))
    );
    // Without offering it, BODY=BINARYMIME is refused.
    let r = check(
        cfg(),
        b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
    );
    assert!(
        r.output
            .ends_with("555 5.5.4 Unsupported option: BODY=BINARYMIME\r\n")
    );
}

#[test]
fn bdat_malformed_closes() {
    let r = check(cfg(), b"EHLO c\r\nBDAT x\r\nQUIT\r\n");
    assert!(
        r.output
            .ends_with("501 5.5.4 Syntax: BDAT count [LAST]\r\n")
    );
    assert!(r.closed);
}

#[test]
fn large_data_is_chunked() {
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n".to_vec();
    let mut body = Vec::new();
    for i in 0..3000 {
        body.extend_from_slice(
            format!(".line {i} with some text to make it longer\r\n").as_bytes(),
        );
    }
    for l in body.split_inclusive(|&b| b == b'\n') {
        input.push(b'.');
        input.extend_from_slice(l);
    }
    input.extend_from_slice(b".\r\n");
    let c = Arc::new(cfg());
    let mut s = Server::new(c, false);
    s.greet();
    let mut got = Vec::new();
    let mut n_chunks = 0;
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + 30_000).min(input.len());
        s.receive(&input[pos..end]);
        pos = end;
        while let Some(e) = s.poll_event() {
            match e {
                Event::DataChunk(c) => {
                    assert!(c.len() <= MAX_CHUNK);
                    n_chunks += 1;
                    got.extend_from_slice(&c);
                }
                Event::DataEnd => s.data_committed("Q"),
                Event::DataStart => {}
                _ => s.accept(),
            }
        }
    }
    assert!(n_chunks >= 3, "{n_chunks}");
    assert_eq!(got, body);
}

// ---- LMTP ----

#[test]
fn lmtp_per_recipient_replies() {
    fn policy(e: &Event) -> Verdict {
        match e {
            Event::DataEnd => Verdict::Lmtp(vec![
                Reply::new(250, "2.1.5", "a delivered"),
                Reply::new(452, "4.2.2", "c over quota"),
            ]),
            e => default_policy(e),
        }
    }
    let c = Arc::new(ServerConfig {
        lmtp: true,
        ..cfg()
    });
    let r = split_runs(
        &c,
        false,
        &[b"EHLO c\r\nLHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@y.example>\r\nRCPT TO:<unknown@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\nhi\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<a@y.example>\r\nRCPT TO:<b@y.example>\r\nBDAT 2 LAST\r\nhi"],
        policy,
    );
    assert!(r.output.starts_with("220 mx.example.org LMTP ringmail\r\n500 5.5.1 Error: LMTP requires LHLO\r\n250-mx.example.org\r\n"));
    assert!(r.output.ends_with(
        "354 End data with <CR><LF>.<CR><LF>\r\n250 2.1.5 a delivered\r\n452 4.2.2 c over quota\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 a delivered\r\n452 4.2.2 c over quota\r\n"
    ));
    // data_committed gives each recipient the same reply; reject too.
    let r = check(
        ServerConfig {
            lmtp: true,
            ..cfg()
        },
        b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@y.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nhi\r\n.\r\n",
    );
    assert!(
        r.output
            .ends_with("250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok: queued as Q1\r\n")
    );
    let r = check(cfg(), b"LHLO c\r\n");
    assert!(
        r.output
            .ends_with("500 5.5.2 Error: command not recognized\r\n")
    );
}

/// Exactly one reply to a `BDAT n LAST` whose content has a bare CR or LF anywhere.
#[test]
fn bdat_bare_line_end_gets_one_reply() {
    let mut bodies: Vec<Vec<u8>> = vec![b"Subject: x\n\nhi\r\n".to_vec()];
    for at in 0..16 {
        for bad in [&b"\n"[..], b"\r", b"\r\r", b"\n\n"] {
            let mut b = b"Subject: abc\r\n\r\nbody\r\n".to_vec();
            b.truncate(16);
            b.splice(at..(at + bad.len()).min(16), bad.iter().copied());
            b.truncate(16);
            bodies.push(b);
        }
    }
    for body in bodies {
        let mut input = format!(
            "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT {} LAST\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"NOOP\r\n");
        let r = check(cfg(), &input);
        let rs = replies(&r);
        let after_rcpt: Vec<&&str> = rs
            .iter()
            .skip_while(|l| !l.starts_with("250 2.1.5"))
            .skip(1)
            .collect();
        assert_eq!(after_rcpt.len(), 2, "{body:?}: {}", r.output);
        assert_eq!(*after_rcpt[1], "250 2.0.0 Ok", "{body:?}: {}", r.output);
    }
}
