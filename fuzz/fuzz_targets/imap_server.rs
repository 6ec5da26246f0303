//! Fuzzes the IMAP server session against the in-memory store.
//!
//! The first byte picks the configuration (implicit TLS or not, tiny or normal limits,
//! split-invariance mode). The rest is a script: each step takes an opcode byte and either
//! feeds the next `n` bytes to `receive`, completes a TLS handshake, tells the session the
//! store changed, advances the fake clock, or changes the mailbox from another session
//! (deliver, flag, expunge). LOGIN/AUTHENTICATE succeed for the password `secret`.
//!
//! Invariants: nothing panics; every transmitted chunk is whole responses ending in CRLF;
//! sequence numbers in EXISTS/EXPUNGE/FETCH responses stay within the mailbox size the client
//! was told; the buffered input stays bounded; a closed session sends nothing more.
//!
//! In split-invariance mode the whole script is fed at once and byte by byte; both runs must
//! give the same output.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use ringmail_imap::{Config, Event, Flag, FlagOp, MailStore, MemoryStore, Session};

const MSG: &[u8] = b"From: A <a@example.org>\r\nTo: b@example.org\r\nSubject: hi\r\n\
Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n\
--B\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n--B--\r\n";

fn config(flags: u8) -> Config {
    let small = flags & 2 != 0;
    Config {
        max_line: if small { 200 } else { 64 * 1024 },
        max_literal: if small { 100 } else { 64 * 1024 },
        max_append: if small { 500 } else { 1 << 20 },
        max_literals_per_command: if small { 3 } else { 64 },
        max_bad_commands: if small { 3 } else { 10 },
        commands_per_second: if small { 5 } else { 1000 },
        command_burst: if small { 5 } else { 1000 },
        max_pending_input: if small { 1000 } else { 256 * 1024 },
        ..Config::default()
    }
}

fn new_store() -> MemoryStore {
    let store = MemoryStore::new();
    let mut s = store.session();
    for i in 0..3u64 {
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i * 86_400);
        let _ = s.append("INBOX", MSG, &[], Some(date));
    }
    store
}

/// Tracks what the client was told about the mailbox size.
#[derive(Default)]
struct Tracker {
    exists: Option<u64>,
    out: Vec<u8>,
}

impl Tracker {
    fn chunk(&mut self, b: &[u8]) {
        assert!(b.ends_with(b"\r\n"), "partial response {:?}", String::from_utf8_lossy(b));
        self.out.extend_from_slice(b);
        // Walk the responses, skipping literal octets.
        let mut rest = b;
        while !rest.is_empty() {
            let mut line = Vec::new();
            loop {
                let nl = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF");
                let part = &rest[..nl];
                rest = &rest[nl + 2..];
                line.extend_from_slice(part);
                match literal_len(part) {
                    Some(n) => {
                        assert!(rest.len() >= n, "literal longer than the output");
                        line.extend_from_slice(b"<lit>");
                        rest = &rest[n..];
                    }
                    None => break,
                }
            }
            self.response(&line);
        }
    }

    fn response(&mut self, line: &[u8]) {
        let s = String::from_utf8_lossy(line);
        let mut w = s.split(' ');
        if w.next() != Some("*") {
            return;
        }
        let (Some(n), Some(kind)) = (w.next().and_then(|n| n.parse::<u64>().ok()), w.next())
        else {
            return;
        };
        match kind {
            "EXISTS" => {
                if let Some(e) = self.exists {
                    assert!(n >= e, "EXISTS went down from {e} to {n}");
                }
                self.exists = Some(n);
            }
            "EXPUNGE" => {
                let e = self.exists.expect("EXPUNGE before EXISTS");
                assert!(n >= 1 && n <= e, "EXPUNGE {n} of {e}");
                self.exists = Some(e - 1);
            }
            "FETCH" => {
                let e = self.exists.expect("FETCH before EXISTS");
                assert!(n >= 1 && n <= e, "FETCH {n} of {e}");
            }
            _ => {}
        }
    }
}

fn literal_len(part: &[u8]) -> Option<usize> {
    let inner = part.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    std::str::from_utf8(&inner[open + 1..]).ok()?.parse().ok()
}

fn handle_events(s: &mut Session, store: &MemoryStore, t: &mut Tracker) {
    loop {
        while let Some(b) = s.poll_transmit() {
            t.chunk(&b);
        }
        let Some(e) = s.poll_event() else { break };
        match e {
            Event::Login { password, .. } => {
                let ok = password.expose() == b"secret";
                s.login_result(ok.then(|| Box::new(store.session()) as Box<dyn MailStore>));
            }
            Event::StartTls => {
                while let Some(b) = s.poll_transmit() {
                    t.chunk(&b);
                }
                s.tls_established();
            }
            Event::Idle => {}
        }
    }
}

fn run_split(cfg: &Arc<Config>, tls: bool, input: &[u8], step: usize) -> Vec<u8> {
    let store = new_store();
    let now = Instant::now();
    let mut s = Session::new(cfg.clone(), tls, now);
    let mut t = Tracker::default();
    for chunk in input.chunks(step) {
        s.receive(chunk, now);
        handle_events(&mut s, &store, &mut t);
    }
    t.out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut script)) = data.split_first() else {
        return;
    };
    let cfg = Arc::new(config(flags));
    let tls = flags & 1 != 0;

    if flags & 4 != 0 && script.len() <= 4096 {
        let whole = run_split(&cfg, tls, script, script.len().max(1));
        let bytes = run_split(&cfg, tls, script, 1);
        let dated = |o: &[u8]| o.windows(12).any(|w| w == b"INTERNALDATE");
        if !dated(&whole) && !dated(&bytes) {
            assert_eq!(
                String::from_utf8_lossy(&whole),
                String::from_utf8_lossy(&bytes)
            );
        }
        return;
    }

    let store = new_store();
    let mut other = store.session();
    let _ = other.select("INBOX");
    let mut now = Instant::now();
    let mut s = Session::new(cfg.clone(), tls, now);
    let mut t = Tracker::default();
    let bound = cfg.max_pending_input
        + 2 * cfg.max_line
        + cfg.max_append as usize
        + cfg.max_literal as usize * cfg.max_literals_per_command;
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
                s.receive(chunk, now);
                assert!(s.buffered_len() <= bound, "{} > {bound}", s.buffered_len());
            }
            4 => s.changes_available(),
            5 => s.tls_established(),
            6 => {
                now += Duration::from_millis(u64::from(op >> 3) * 100);
                s.handle_timeout(now);
            }
            _ => match op >> 3 {
                0 => {
                    let _ = store.deliver("INBOX", MSG);
                }
                1 => {
                    let _ = other.refresh();
                    let _ = other.store_flags(&[1, 2, 3, 4, 5], FlagOp::Add, &[Flag::Deleted], None);
                }
                2 => {
                    let _ = other.refresh();
                    let _ = other.expunge(None);
                }
                3 => s.timeout(),
                _ => {}
            },
        }
        handle_events(&mut s, &store, &mut t);
        if s.should_close() {
            s.receive(b"a NOOP\r\nb LOGOUT\r\n", now);
            s.changes_available();
            assert!(s.poll_transmit().is_none());
            assert!(s.poll_event().is_none());
        }
    }
});
