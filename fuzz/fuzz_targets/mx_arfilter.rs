//! Fuzzes the MX's filter of forged `Authentication-Results` fields (RFC 8601 section 5),
//! which sees every inbound message's header section.
//!
//! Invariants: no panic; the output does not depend on how the input was split into chunks;
//! a message without any `Authentication-Results` text passes byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail_mx::arfilter::ArFilter;

fn run(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut f = ArFilter::new("mx.example.test");
    let mut out = Vec::new();
    for c in data.chunks(chunk.max(1)) {
        f.push(c, &mut out);
    }
    f.finish(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, msg)) = data.split_first() else {
        return;
    };
    let whole = run(msg, msg.len());
    assert_eq!(whole, run(msg, split as usize));
    assert!(whole.len() <= msg.len());
    let lower = msg.to_ascii_lowercase();
    if !lower.windows(22).any(|w| w == b"authentication-results") {
        assert_eq!(whole, msg);
    }
});
