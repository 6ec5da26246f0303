//! Fuzzes the MTA-STS parsers (RFC 8461): the policy file fetched over HTTPS and the
//! `_mta-sts` TXT record, both attacker-controlled.
//!
//! Invariants: no panic; an accepted policy has a mode, at least one MX pattern unless its
//! mode is `none`, and a max_age within the RFC's bound; pattern matching never panics on
//! arbitrary host names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail_mx::sts::{MAX_MAX_AGE, Mode, Policy, parse_txt};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Policy::parse(data) {
        assert!(p.max_age() <= MAX_MAX_AGE);
        if p.mode() != Mode::None {
            assert!(!p.mx_patterns().is_empty());
        }
        let host = String::from_utf8_lossy(&data[..data.len().min(64)]);
        let _ = p.mx_matches(&host);
        let _ = p.mx_matches("mx1.example.com");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let records: Vec<String> = text.split('\n').map(str::to_string).collect();
        if let Ok(id) = parse_txt(&records) {
            assert!(!id.is_empty());
        }
    }
});
