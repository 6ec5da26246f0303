//! Fuzzes the SMTP client with arbitrary server replies.
//!
//! The first byte picks the configuration (LMTP, STARTTLS policy, AUTH, BDAT, reply limits).
//! The rest is a script: feed the next `n` bytes to `receive`, or complete the TLS handshake.
//! The client reacts to its events like a relay would: it starts transactions, streams a
//! fixed body and quits.
//!
//! Invariants: nothing panics; the client refuses a transaction or body only once it is
//! closing (a Ready can be queued in the same batch as the failure); everything the client writes is CRLF-terminated lines (commands
//! and the dot-stuffed body) or BDAT chunks; credentials are never sent before TLS.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringmail_smtp::{Client, ClientConfig, ClientEvent, Envelope, Secret, StartTlsPolicy};

const BODY: &[u8] = b"Subject: x\r\n\r\n.dot\r\nline\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut script)) = data.split_first() else {
        return;
    };
    let cfg = ClientConfig {
        helo_name: "relay.example.com".into(),
        lmtp: flags & 1 != 0,
        use_starttls: match (flags >> 1) % 3 {
            0 => StartTlsPolicy::Never,
            1 => StartTlsPolicy::Opportunistic,
            _ => StartTlsPolicy::Required,
        },
        auth: (flags & 8 != 0).then(|| ("user".to_string(), Secret::from("pw"))),
        max_reply_line: if flags & 16 != 0 { 64 } else { 2048 },
        max_reply_lines: if flags & 16 != 0 { 4 } else { 100 },
        prefer_chunking: flags & 32 != 0,
    };
    let mut c = Client::new(Arc::new(cfg), flags & 64 != 0);
    let mut sent = Vec::new();
    let mut transactions = 0;
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        if op % 8 == 7 {
            c.tls_established();
        } else {
            let n = usize::from(op >> 3).min(script.len());
            let (chunk, rest) = script.split_at(n);
            script = rest;
            c.receive(chunk);
        }
        while let Some(e) = c.poll_event() {
            match e {
                ClientEvent::Ready | ClientEvent::TransactionDone(_) => {
                    transactions += 1;
                    if transactions < 3 {
                        let env = Envelope::new(
                            Some("a@example.com"),
                            &["b@example.org", "c@example.org"],
                        );
                        // A Ready queued in the same batch as a failure: the client is
                        // closing and says so; on a live session it must accept.
                        if let Err(e) = c.start_transaction(env) {
                            assert!(c.should_close(), "transaction refused on a live session: {e}");
                        }
                    } else {
                        c.quit();
                    }
                }
                ClientEvent::SendBody => {
                    let sent_body = BODY
                        .chunks(5)
                        .try_for_each(|part| c.send_body_chunk(part))
                        .and_then(|()| c.end_body());
                    if let Err(e) = sent_body {
                        assert!(c.should_close(), "body refused on a live session: {e}");
                    }
                }
                ClientEvent::StartTls | ClientEvent::Failed(_) | ClientEvent::Closed => {}
            }
        }
        while let Some(b) = c.poll_transmit() {
            sent.extend_from_slice(&b);
        }
        if !c.is_tls() {
            assert!(
                !sent.windows(4).any(|w| w == b"AUTH"),
                "credentials sent without TLS"
            );
        }
    }
    // Without BDAT every byte written is part of a CRLF line.
    if flags & 32 == 0 {
        let mut prev = 0u8;
        for &b in &sent {
            assert!(b != b'\n' || prev == b'\r', "bare LF written");
            assert!(prev != b'\r' || b == b'\n', "bare CR written");
            prev = b;
        }
        assert!(sent.is_empty() || sent.ends_with(b"\r\n"));
    }
});
