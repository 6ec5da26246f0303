//! Modified UTF-7 (RFC 3501 5.1.3), the mailbox-name encoding of IMAP4rev1.
//!
//! ```text
//!  IMAP4rev1 client ──"Entw&APw-rfe"──▶ [check: canonical mUTF-7] ──▶ store (mUTF-7, as Dovecot)
//!  IMAP4rev2 / UTF8=ACCEPT client ──"Entwürfe"──▶ [encode] ──▶ store; replies [decode] back
//! ```
//!
//! Printable US-ASCII except `&` stands for itself, `&` is `&-`, and every other run of
//! characters is `&`, their UTF-16BE in base64 with `,` for `/` and no padding, then `-`.
//! [`decode`] accepts only the canonical form (the one [`encode`] writes), so one name has one
//! spelling and nobody can reach a folder under a second name.

/// The base64 alphabet of modified UTF-7 (`,` instead of `/`).
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

fn is_direct(c: char) -> bool {
    (' '..='~').contains(&c) && c != '&'
}

/// Encodes a UTF-8 name in modified UTF-7.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                let idx = (n >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(ALPHABET[idx as usize]));
            }
        }
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if is_direct(c) {
            flush(&mut pending, &mut out);
            out.push(c);
        } else if c == '&' {
            flush(&mut pending, &mut out);
            out.push_str("&-");
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Why a name is not canonical modified UTF-7.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Utf7Error {
    /// A byte outside printable US-ASCII (8-bit or a control).
    #[error("character outside printable US-ASCII")]
    NotAscii,
    /// A base64 run without `-`, with a byte outside the alphabet, or with bits left over.
    #[error("unterminated or bad base64 run")]
    BadBase64,
    /// A second spelling of a name: encoded printable ASCII, or two runs back to back.
    #[error("a base64 run encodes printable US-ASCII, or two runs touch (not canonical)")]
    NotCanonical,
    /// Unpaired surrogates.
    #[error("bad UTF-16 in a base64 run")]
    BadUtf16,
    /// A control character hidden in a base64 run.
    #[error("a control character (NUL, CR, LF, ...) in a name")]
    Control,
}

/// Decodes a modified UTF-7 name to UTF-8, accepting only the canonical form.
pub fn decode(name: &str) -> Result<String, Utf7Error> {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    // Where the previous base64 run ended: a run right after another is not canonical.
    let mut last_run_end = None;
    while i < bytes.len() {
        let b = bytes[i];
        if !(0x20..=0x7e).contains(&b) {
            return Err(Utf7Error::NotAscii);
        }
        if b != b'&' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let end = bytes[i + 1..]
            .iter()
            .position(|&c| c == b'-')
            .map(|p| i + 1 + p)
            .ok_or(Utf7Error::BadBase64)?;
        let run = &bytes[i + 1..end];
        if run.is_empty() {
            out.push('&');
            i = end + 1;
            continue;
        }
        if last_run_end == Some(i) {
            return Err(Utf7Error::NotCanonical);
        }
        // Base64 to bytes; the leftover bits must be zero and fewer than a byte.
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut raw = Vec::with_capacity(run.len() * 3 / 4);
        for &c in run {
            let v = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or(Utf7Error::BadBase64)?;
            bits = (bits << 6) | v as u32;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                raw.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        if bits != 0 || nbits >= 6 || raw.len() % 2 != 0 || raw.is_empty() {
            return Err(Utf7Error::BadBase64);
        }
        let units: Vec<u16> = raw
            .chunks(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .collect();
        for c in char::decode_utf16(units) {
            let c = c.map_err(|_| Utf7Error::BadUtf16)?;
            if is_direct(c) || c == '&' {
                return Err(Utf7Error::NotCanonical);
            }
            if c.is_control() {
                return Err(Utf7Error::Control);
            }
            out.push(c);
        }
        i = end + 1;
        last_run_end = Some(i);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_3501_examples_and_round_trips() {
        // RFC 3501 5.1.3.
        assert_eq!(
            encode("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(
            decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-").unwrap(),
            "~peter/mail/台北/日本語"
        );
        for name in [
            "INBOX",
            "Entwürfe",
            "Tom & Jerry",
            "&",
            "a&b&",
            "Ünïcödé/ñ",
            "emoji 📬 box",
            "日本語",
            "",
        ] {
            let e = encode(name);
            assert!(e.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{e}");
            assert_eq!(decode(&e).unwrap(), name, "{name} -> {e}");
        }
        assert_eq!(encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(encode("Tom & Jerry"), "Tom &- Jerry");
        assert_eq!(encode("📬"), "&2D3c7A-");
    }

    #[test]
    fn only_the_canonical_form_decodes() {
        for bad in [
            "&",          // unterminated
            "&AGE-",      // "a" encoded: must be direct
            "&ACY-",      // "&" encoded: must be "&-"
            "&APw-&APw-", // two touching runs: must be one
            "&APw",       // no terminator
            "&A/w-",      // '/' is not in the alphabet (',' is)
            "&APx-",      // leftover bits not zero
            "&2D0-",      // lone high surrogate
            "&3Kw-",      // lone low surrogate
            "caf\u{e9}",  // 8-bit
            "tab\there",  // control
            "&AP-",       // half a UTF-16 unit
        ] {
            assert!(decode(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(decode("&APw-&-&APw-").unwrap(), "ü&ü");
    }

    #[test]
    fn no_control_characters_hide_in_base64() {
        // NUL, LF and DEL encoded as base64 runs are refused, not decoded into the name.
        for hidden in ["&AAA-", "a&AAo-b", "&AH8-"] {
            assert_eq!(decode(hidden), Err(Utf7Error::Control), "{hidden}");
        }
        // '/' and ".." stay plain characters, for the store's own checks.
        assert_eq!(decode("../x").unwrap(), "../x");
    }
}
