//! Content-Transfer-Encodings (RFC 2045) for BINARY (RFC 3516): decoding a section for FETCH
//! BINARY, and base64-encoding `binary` parts of a message APPENDed as literal8.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// A Content-Transfer-Encoding the server can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cte {
    /// `7bit`, `8bit`, `binary` or none: the octets are the content.
    Identity,
    /// `base64`.
    Base64,
    /// `quoted-printable`.
    QuotedPrintable,
}

impl Cte {
    /// The encoding a `Content-Transfer-Encoding` value names; `None` for one the server does
    /// not know (FETCH BINARY then fails with `[UNKNOWN-CTE]`).
    pub fn of(value: Option<&str>) -> Option<Cte> {
        let Some(v) = value else {
            return Some(Cte::Identity);
        };
        let v = v.trim();
        Some(
            if v.is_empty()
                || ["7bit", "8bit", "binary"]
                    .iter()
                    .any(|c| v.eq_ignore_ascii_case(c))
            {
                Cte::Identity
            } else if v.eq_ignore_ascii_case("base64") {
                Cte::Base64
            } else if v.eq_ignore_ascii_case("quoted-printable") {
                Cte::QuotedPrintable
            } else {
                return None;
            },
        )
    }

    /// Decodes `data`. Decoding is lenient, as mail readers are: characters outside the
    /// base64 alphabet are skipped, malformed quoted-printable escapes are kept as they are.
    pub fn decode(self, data: &[u8]) -> Vec<u8> {
        match self {
            Cte::Identity => data.to_vec(),
            Cte::Base64 => base64_decode(data),
            Cte::QuotedPrintable => qp_decode(data),
        }
    }
}

fn base64_decode(data: &[u8]) -> Vec<u8> {
    let mut clean: Vec<u8> = Vec::with_capacity(data.len());
    for &b in data {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => clean.push(b),
            b'=' => break,
            _ => {}
        }
    }
    if clean.len() % 4 == 1 {
        // A lone sextet carries no whole octet.
        clean.pop();
    }
    let engine = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone),
    );
    engine.decode(&clean).unwrap_or_default()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn qp_decode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        let (body, newline) = match line.strip_suffix(b"\n") {
            Some(l) => (l.strip_suffix(b"\r").unwrap_or(l), true),
            None => (line, false),
        };
        // Trailing white space is padding added in transport (RFC 2045 6.7 (3)).
        let body = body.trim_ascii_end();
        let (body, soft) = match body.strip_suffix(b"=") {
            Some(b) => (b, true),
            None => (body, false),
        };
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'='
                && let (Some(h), Some(l)) = (
                    body.get(i + 1).copied().and_then(hex),
                    body.get(i + 2).copied().and_then(hex),
                )
            {
                out.push(h << 4 | l);
                i += 3;
            } else {
                out.push(body[i]);
                i += 1;
            }
        }
        if newline && !soft {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// `data` as base64 in lines of 76 characters, each ending in CRLF.
pub(crate) fn base64_lines(data: &[u8]) -> Vec<u8> {
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(text.len() + text.len() / 38 + 2);
    for chunk in text.as_bytes().chunks(76) {
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A header block with its `Content-Transfer-Encoding` field (and its continuation lines)
/// replaced by one naming `cte`.
pub(crate) fn with_cte(header: &[u8], cte: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + 16);
    let mut skipping = false;
    let mut replaced = false;
    for line in header.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map(|i| line[..i].trim_ascii_end());
            skipping = name.is_some_and(|n| n.eq_ignore_ascii_case(b"Content-Transfer-Encoding"));
            if skipping && !replaced {
                out.extend_from_slice(b"Content-Transfer-Encoding: ");
                out.extend_from_slice(cte.as_bytes());
                out.extend_from_slice(b"\r\n");
                replaced = true;
            }
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(Cte::of(None), Some(Cte::Identity));
        assert_eq!(Cte::of(Some(" BINARY ")), Some(Cte::Identity));
        assert_eq!(Cte::of(Some("Base64")), Some(Cte::Base64));
        assert_eq!(
            Cte::of(Some("quoted-printable")),
            Some(Cte::QuotedPrintable)
        );
        assert_eq!(Cte::of(Some("x-uuencode")), None);
    }

    #[test]
    fn base64() {
        assert_eq!(Cte::Base64.decode(b"AAECAw==\r\n"), [0, 1, 2, 3]);
        assert_eq!(Cte::Base64.decode(b"AA\r\nEC Aw"), [0, 1, 2, 3]);
        assert_eq!(Cte::Base64.decode(b"SGVsbG8*!"), b"Hello");
        assert_eq!(Cte::Base64.decode(b"SGVsbG8=garbage"), b"Hello");
        assert_eq!(Cte::Base64.decode(b"S"), b"");
        assert_eq!(Cte::Base64.decode(b""), b"");
        let data: Vec<u8> = (0..=255).collect();
        let enc = base64_lines(&data);
        assert!(enc.split(|&b| b == b'\n').all(|l| l.len() <= 77));
        assert_eq!(Cte::Base64.decode(&enc), data);
    }

    #[test]
    fn quoted_printable() {
        let qp = Cte::QuotedPrintable;
        assert_eq!(
            qp.decode(b"caf=C3=A9 =\r\nau lait  \r\nfin"),
            "café au lait\r\nfin".as_bytes()
        );
        assert_eq!(qp.decode(b"a=3db=\nc\n"), b"a=bc\r\n");
        assert_eq!(qp.decode(b"bad =ZZ =4"), b"bad =ZZ =4");
        assert_eq!(qp.decode(b"="), b"");
    }

    #[test]
    fn cte_header() {
        let h = b"Content-Type: application/octet-stream\r\ncontent-transfer-encoding:\r\n binary\r\nX: y\r\n\r\n";
        assert_eq!(
            with_cte(h, "base64"),
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nX: y\r\n\r\n"
        );
    }
}
