//! Fuzzes the SMTP server session.
//!
//! The first byte picks the configuration (LMTP, implicit TLS, STARTTLS/AUTH/BINARYMIME
//! offered, tiny or normal limits). The rest is a script: each step takes an opcode byte and
//! either feeds the next `n` bytes to `receive`, gives a verdict chosen from the input
//! (accept, reject, commit, LMTP replies, AUTH result), completes a TLS handshake, or fires
//! the timeout.
//!
//! Invariants: nothing panics; the output is a sequence of well-formed replies (CRLF only);
//! `DataChunk`s are non-empty, at most `MAX_CHUNK` bytes and only appear inside a message;
//! the core's buffer stays bounded; a closed session emits and sends nothing more.
//!
//! A second run feeds the whole input at once with verdicts derived from the events and must
//! give the same replies and (merged) content as a byte-by-byte run.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringmail_smtp::reply::{ReplyLimits, parse_reply};
use ringmail_smtp::server::MAX_CHUNK;
use ringmail_smtp::{AuthMechanism, Event, Reply, Server, ServerConfig};

fn config(flags: u8) -> ServerConfig {
    let small = flags & 32 != 0;
    ServerConfig {
        hostname: "mx.example.org".into(),
        lmtp: flags & 1 != 0,
        offer_starttls: flags & 4 != 0,
        offer_auth: flags & 8 != 0,
        auth_mechanisms: if flags & 24 == 24 {
            AuthMechanism::ALL.to_vec()
        } else {
            vec![AuthMechanism::Plain, AuthMechanism::Login]
        },
        offer_binarymime: flags & 16 != 0,
        max_command_line: if small { 64 } else { 2048 },
        max_data_line: if small { 40 } else { 1000 },
        max_recipients: if small { 2 } else { 1000 },
        max_message_size: if small { 300 } else { 1_000_000 },
        max_header_bytes: if small { 100 } else { 100_000 },
        max_hops: if small { 2 } else { 50 },
        max_errors: if small { 5 } else { 20 },
        max_junk_commands: if small { 3 } else { 100 },
        max_pending_input: if small { 512 } else { 64 * 1024 },
    }
}

fn check_output(out: &[u8]) {
    let limits = ReplyLimits {
        max_line: 4096,
        max_lines: 100,
    };
    let mut rest = out;
    while !rest.is_empty() {
        match parse_reply(rest, limits) {
            Ok(Some((_, n))) => rest = &rest[n..],
            other => panic!(
                "server sent a bad reply {other:?}: {:?}",
                String::from_utf8_lossy(rest)
            ),
        }
    }
}

#[derive(Default)]
struct Tracker {
    in_data: bool,
    content: Vec<u8>,
    replies: Vec<u8>,
}

impl Tracker {
    fn event(&mut self, e: &Event) {
        match e {
            Event::DataStart => {
                assert!(!self.in_data);
                self.in_data = true;
            }
            Event::DataChunk(c) => {
                assert!(self.in_data, "content outside a message");
                assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
                self.content.extend_from_slice(c);
            }
            Event::DataEnd => {
                assert!(self.in_data);
                self.in_data = false;
                self.content.extend_from_slice(b"<END>");
            }
            Event::DataAborted { .. } => {
                assert!(self.in_data);
                self.in_data = false;
                self.content.extend_from_slice(b"<ABORT>");
            }
            _ => {}
        }
    }
}

/// Verdicts derived from the event only, so two runs with different splits agree.
fn auto_verdict(s: &mut Server, e: &Event) {
    match e {
        Event::Helo { .. } => s.accept(),
        Event::MailFrom { reverse_path, .. } => {
            if reverse_path
                .as_ref()
                .is_some_and(|m| m.local().starts_with('x'))
            {
                s.reject(Reply::new(550, "5.7.1", "no"));
            } else {
                s.accept();
            }
        }
        Event::RcptTo { forward_path, .. } => {
            if forward_path.local_has_routing_chars() {
                s.reject(Reply::new(550, "5.7.1", "Relaying denied"));
            } else {
                s.accept();
            }
        }
        Event::DataEnd => s.data_committed("Q1"),
        Event::AuthPlain { password, .. } | Event::AuthLogin { password, .. } => {
            s.auth_result(password.expose() == b"secret")
        }
        // A toy multi-step mechanism: continue while the response starts with 'c'.
        Event::AuthSasl { response, .. } => match response.expose() {
            [b'c', ..] => s.auth_challenge(b"continue"),
            b"" => s.auth_result(true),
            _ => s.auth_result(false),
        },
        _ => {}
    }
}

fn run_auto(cfg: &Arc<ServerConfig>, tls: bool, input: &[u8], step: usize) -> Tracker {
    let mut s = Server::new(cfg.clone(), tls);
    s.greet();
    let mut t = Tracker::default();
    for chunk in input.chunks(step) {
        s.receive(chunk);
        while let Some(e) = s.poll_event() {
            t.event(&e);
            auto_verdict(&mut s, &e);
        }
    }
    while let Some(b) = s.poll_transmit() {
        t.replies.extend_from_slice(&b);
    }
    t
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut script)) = data.split_first() else {
        return;
    };
    let cfg = Arc::new(config(flags));
    let tls = flags & 2 != 0;

    // Split invariance, when the whole input fits the pending-input bound.
    if flags & 64 != 0 && script.len() <= cfg.max_pending_input {
        let whole = run_auto(&cfg, tls, script, script.len().max(1));
        let bytes = run_auto(&cfg, tls, script, 1);
        assert_eq!(whole.replies, bytes.replies);
        assert_eq!(whole.content, bytes.content);
        check_output(&whole.replies);
        return;
    }

    let mut s = Server::new(cfg.clone(), tls);
    if flags & 128 != 0 {
        s.refuse_connection(554, "5.7.1", "go away");
    } else {
        s.greet();
    }
    let mut t = Tracker::default();
    let mut out = Vec::new();
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        match op % 8 {
            0..=3 => {
                let n = if op >> 3 == 31 {
                    script.len()
                } else {
                    usize::from(op >> 2).min(script.len())
                };
                let (chunk, rest) = script.split_at(n);
                script = rest;
                s.receive(chunk);
                assert!(s.buffered_len() <= cfg.max_pending_input + MAX_CHUNK);
            }
            4 => s.accept(),
            5 => match op >> 3 {
                0 => s.reject(Reply::new(550, "5.7.1", "rejected")),
                1 => s.reject(Reply::new(250, "2.0.0", "driver bug")),
                2 => s.data_committed("Q1"),
                3 => s.data_committed_lmtp(&[Reply::new(250, "2.1.5", "ok")]),
                4 => s.auth_result(true),
                5 => s.auth_result(false),
                _ => s.reject(Reply::new(451, "4.3.0", "later")),
            },
            6 => s.tls_established(),
            _ => {
                if op >> 3 == 0 {
                    s.timeout();
                }
            }
        }
        while let Some(e) = s.poll_event() {
            t.event(&e);
        }
        while let Some(b) = s.poll_transmit() {
            out.extend_from_slice(&b);
        }
        if s.should_close() {
            assert!(
                !t.in_data,
                "session closed inside a message without DataAborted"
            );
            s.receive(b"NOOP\r\nQUIT\r\n");
            s.accept();
            assert!(s.poll_event().is_none());
            assert!(s.poll_transmit().is_none());
        }
    }
    check_output(&out);
});
