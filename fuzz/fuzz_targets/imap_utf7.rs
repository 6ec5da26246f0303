//! Fuzzes the modified UTF-7 mailbox-name codec.
//!
//! Invariants: nothing panics; a name that decodes is canonical (encoding the result gives the
//! input back byte for byte) and holds no control character; every UTF-8 string without
//! control characters encodes to printable ASCII that decodes back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail_imap::utf7::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = decode(text) {
        assert_eq!(encode(&name), text, "a second spelling decoded");
        assert!(!name.chars().any(char::is_control));
    }
    if !text.chars().any(char::is_control) {
        let e = encode(text);
        assert!(e.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{e:?}");
        assert_eq!(decode(&e).as_deref(), Ok(text));
    }
});
