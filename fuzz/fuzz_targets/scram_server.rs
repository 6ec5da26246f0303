//! Fuzzes the SCRAM-SHA-256 server exchange and the `{SCRAM-SHA-256}` stored-secret parser.
//!
//! The input is split at the first NUL into client-first and client-final. Neither message may
//! panic the server; a client-first that fails leaves nothing to continue; client-final never
//! succeeds against a fake secret; a parsed stored secret encodes back to a value that parses
//! to the same secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail_accounts::scram::{ScramSecret, ScramServer, from_stored};

fuzz_target!(|data: &[u8]| {
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let mut s = ScramServer::new(b"fixed-server-nonce");
    match s.client_first(first) {
        Ok(cf) => {
            assert!(!cf.username.is_empty());
            let sf = s.server_first(ScramSecret::fake(b"key", &cf.username), false);
            assert!(sf.starts_with(b"r="));
            assert!(s.client_final(last).is_err());
        }
        Err(_) => assert!(s.client_final(last).is_err()),
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(secret) = from_stored(text)
    {
        let again = from_stored(&secret.encode()).expect("re-encoded secret parses");
        assert!(again == secret);
    }
});
