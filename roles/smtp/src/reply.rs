//! SMTP replies: building and encoding them (server side), parsing them strictly (client side).
//!
//! ```text
//!   250-mx.example.org          <- "ddd-" continuation lines
//!   250-PIPELINING
//!   250 SIZE 10240000           <- "ddd " (or bare "ddd") ends the reply
//! ```
//!
//! Every line ends with CRLF. The parser refuses bare CR or LF, a line longer than its limit,
//! more lines than its limit, a code that changes between lines and anything that is not
//! `ddd`, `ddd-...` or `ddd ...`.

use std::fmt::{self, Write as _};

use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// An enhanced status code (RFC 3463), such as `5.7.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// 2, 4 or 5.
    pub class: u8,
    /// Subject, 0..=999.
    pub subject: u16,
    /// Detail, 0..=999.
    pub detail: u16,
}

impl EnhancedCode {
    /// Parses `class.subject.detail`; `None` if it is not one.
    pub fn parse(s: &str) -> Option<EnhancedCode> {
        fn num(s: &str) -> Option<u16> {
            if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        }
        let mut it = s.split('.');
        let class = it.next()?;
        let subject = num(it.next()?)?;
        let detail = num(it.next()?)?;
        if it.next().is_some() || !matches!(class, "2" | "4" | "5") {
            return None;
        }
        Some(EnhancedCode {
            class: class.as_bytes()[0] - b'0',
            subject,
            detail,
        })
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply: a three-digit code, an optional enhanced status code and one or more lines of
/// text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
}

/// Replaces control characters so a reply text can never inject a line break.
fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        // The usual case: one copy, not a push per character.
        return text.to_owned();
    }
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Reply {
    /// A one-line reply. `enhanced` may be empty (no enhanced code) and is dropped if it is not
    /// a valid enhanced code. Control characters in `text` are replaced by spaces.
    ///
    /// # Panics
    /// If `code` is not in 200..=599 (a programming error in the caller).
    pub fn new(code: u16, enhanced: &str, text: &str) -> Reply {
        Reply::multiline(code, enhanced, [text])
    }

    /// A reply of several lines, each carrying the same codes.
    ///
    /// # Panics
    /// If `code` is not in 200..=599.
    pub fn multiline<I, S>(code: u16, enhanced: &str, lines: I) -> Reply
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        assert!(
            (200..=599).contains(&code),
            "reply code {code} out of range"
        );
        let mut lines: Vec<String> = lines.into_iter().map(|l| sanitize(l.as_ref())).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        Reply {
            code,
            enhanced: EnhancedCode::parse(enhanced),
            lines,
        }
    }

    /// The three-digit code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The enhanced status code, if any.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }

    /// The text lines, without codes.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The text lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx.
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form (CRLF line ends) to `out`: `code`, `-` (more lines follow) or a
    /// space (unless nothing follows), the enhanced code and a space (unless the text is
    /// empty), the text, CRLF. Written straight into `out`, without temporary strings.
    pub fn encode(&self, out: &mut BytesMut) {
        let n = self.lines.len();
        for (i, line) in self.lines.iter().enumerate() {
            let last = i + 1 == n;
            // Code, separator, "ddd.ddd.ddd ", text, CRLF. `write!` into the buffer itself
            // (BytesMut is a fmt::Write): no temporary strings.
            out.reserve(3 + 1 + 12 + line.len() + 2);
            let _ = write!(out, "{}", self.code);
            if !last {
                out.put_u8(b'-');
            } else if self.enhanced.is_some() || !line.is_empty() {
                out.put_u8(b' ');
            }
            if let Some(e) = self.enhanced {
                let _ = write!(out, "{e}");
                if !line.is_empty() {
                    out.put_u8(b' ');
                }
            }
            out.put_slice(line.as_bytes());
            out.put_slice(b"\r\n");
        }
    }

    /// The wire form as a vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.to_vec()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        write!(f, " {}", self.lines.join(" / "))
    }
}

/// Why a reply could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ReplyError {
    /// A reply line longer than the limit (including CRLF).
    #[error("reply line longer than {0} bytes")]
    LineTooLong(usize),
    /// More lines than the limit in one reply.
    #[error("reply has more than {0} lines")]
    TooManyLines(usize),
    /// A bare CR or LF: reply lines end with CRLF only.
    #[error("bare CR or LF in a reply")]
    BareLineEnding,
    /// Not `ddd`, `ddd-text` or `ddd text`, or a code outside 200..=599.
    #[error("malformed reply line")]
    Syntax,
    /// The code differs between lines of one reply.
    #[error("reply code changes within a multi-line reply")]
    InconsistentCode,
}

/// Limits for [`parse_reply`].
#[derive(Clone, Copy, Debug)]
pub struct ReplyLimits {
    /// Longest line, CRLF included.
    pub max_line: usize,
    /// Most lines in one reply.
    pub max_lines: usize,
}

/// Parses one complete reply at the start of `buf`.
///
/// Returns `Ok(None)` if more bytes are needed, `Ok(Some((reply, consumed)))` when a reply is
/// complete. Errors are final: the peer is broken or hostile.
pub fn parse_reply(buf: &[u8], limits: ReplyLimits) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    let mut enhanced: Option<EnhancedCode> = None;
    loop {
        let rest = &buf[pos..];
        // Find the CRLF of this line, refusing bare CR/LF on the way.
        let mut end = None;
        for (i, &b) in rest.iter().enumerate() {
            if i + 1 > limits.max_line {
                return Err(ReplyError::LineTooLong(limits.max_line));
            }
            match b {
                b'\n' => return Err(ReplyError::BareLineEnding),
                b'\r' => match rest.get(i + 1) {
                    Some(b'\n') => {
                        if i + 2 > limits.max_line {
                            return Err(ReplyError::LineTooLong(limits.max_line));
                        }
                        end = Some(i);
                        break;
                    }
                    Some(_) => return Err(ReplyError::BareLineEnding),
                    None => break,
                },
                _ => {}
            }
        }
        let Some(end) = end else {
            return Ok(None);
        };
        let line = &rest[..end];
        pos += end + 2;
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Syntax);
        }
        let c = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(200..=599).contains(&c) {
            return Err(ReplyError::Syntax);
        }
        if *code.get_or_insert(c) != c {
            return Err(ReplyError::InconsistentCode);
        }
        let (more, text) = match line.get(3) {
            None => (false, &b""[..]),
            Some(b' ') => (false, &line[4..]),
            Some(b'-') => (true, &line[4..]),
            Some(_) => return Err(ReplyError::Syntax),
        };
        let mut text = String::from_utf8_lossy(text).into_owned();
        if lines.is_empty() {
            let first = text.split(' ').next().unwrap_or("");
            enhanced = EnhancedCode::parse(first).filter(|e| u16::from(e.class) == c / 100);
        }
        if let Some(e) = enhanced {
            let prefix = e.to_string();
            if let Some(t) = text.strip_prefix(&prefix)
                && (t.is_empty() || t.starts_with(' '))
            {
                text = t.strip_prefix(' ').unwrap_or(t).to_string();
            }
        }
        lines.push(text);
        if lines.len() > limits.max_lines {
            return Err(ReplyError::TooManyLines(limits.max_lines));
        }
        if !more {
            return Ok(Some((
                Reply {
                    code: c,
                    enhanced,
                    lines,
                },
                pos,
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: ReplyLimits = ReplyLimits {
        max_line: 64,
        max_lines: 3,
    };

    #[test]
    fn encode_multiline_and_empty() {
        let r = Reply::multiline(250, "", ["a", "b", "c"]);
        assert_eq!(r.to_bytes(), b"250-a\r\n250-b\r\n250 c\r\n");
        let r = Reply::new(550, "5.7.1", "no\r\nway");
        assert_eq!(r.to_bytes(), b"550 5.7.1 no  way\r\n");
        assert_eq!(Reply::new(250, "", "").to_bytes(), b"250\r\n");
    }

    #[test]
    fn encode_matches_the_formatted_form() {
        // The wire form as it was built with format!, for every shape of reply.
        fn formatted(r: &Reply) -> Vec<u8> {
            let mut s = String::new();
            let n = r.lines().len();
            for (i, line) in r.lines().iter().enumerate() {
                let mut rest = String::new();
                if let Some(e) = r.enhanced() {
                    rest = format!("{e}");
                    if !line.is_empty() {
                        rest.push(' ');
                    }
                }
                rest.push_str(line);
                let sep = if i + 1 < n {
                    "-"
                } else if rest.is_empty() {
                    ""
                } else {
                    " "
                };
                s.push_str(&format!("{}{sep}{rest}\r\n", r.code()));
            }
            s.into_bytes()
        }
        let replies = [
            Reply::new(250, "", ""),
            Reply::new(250, "2.0.0", ""),
            Reply::new(221, "2.0.0", "Bye"),
            Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"),
            Reply::new(
                550,
                "5.1.1",
                "<a@b>: Recipient address rejected: \u{85}x\u{7f}y\tz",
            ),
            Reply::new(421, "4.4.2", "mx.example Error: timeout exceeded"),
            Reply::new(452, "4.5.999", "a"),
            Reply::new(599, "x", "not an enhanced code"),
            Reply::multiline(250, "", ["mx.example", "PIPELINING", "", "SIZE 10240000"]),
            Reply::multiline(250, "2.0.0", ["", "b", ""]),
            Reply::multiline(503, "5.5.1", Vec::<String>::new()),
            Reply::new(250, "", "\u{e9}t\u{e9} \u{1F600}"),
        ];
        for r in &replies {
            assert_eq!(r.to_bytes(), formatted(r), "{r}");
        }
        assert_eq!(
            Reply::new(550, "5.1.1", "a\u{85}b").to_bytes(),
            b"550 5.1.1 a b\r\n"
        );
        assert_eq!(
            Reply::multiline(250, "2.0.0", ["", "b"]).to_bytes(),
            b"250-2.0.0\r\n250 2.0.0 b\r\n"
        );
        // Out-of-range parts of a hand-built enhanced code are written as they are.
        let r = Reply {
            code: 250,
            enhanced: Some(EnhancedCode {
                class: 255,
                subject: 65535,
                detail: 0,
            }),
            lines: vec!["x".into()],
        };
        assert_eq!(r.to_bytes(), b"250 255.65535.0 x\r\n");
    }

    #[test]
    fn parse_roundtrip() {
        let r = Reply::multiline(452, "4.5.3", ["x y", "z"]);
        let b = r.to_bytes();
        let (p, n) = parse_reply(&b, L).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(p, r);
        for i in 0..b.len() {
            assert_eq!(parse_reply(&b[..i], L), Ok(None));
        }
    }

    #[test]
    fn parse_strict() {
        assert_eq!(parse_reply(b"250\r\n", L).unwrap().unwrap().1, 5);
        assert_eq!(parse_reply(b"250 ok\n", L), Err(ReplyError::BareLineEnding));
        assert_eq!(
            parse_reply(b"250 o\rk\r\n", L),
            Err(ReplyError::BareLineEnding)
        );
        assert_eq!(parse_reply(b"25 ok\r\n", L), Err(ReplyError::Syntax));
        assert_eq!(parse_reply(b"250_ok\r\n", L), Err(ReplyError::Syntax));
        assert_eq!(parse_reply(b"150 ok\r\n", L), Err(ReplyError::Syntax));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n", L),
            Err(ReplyError::InconsistentCode)
        );
        assert_eq!(
            parse_reply(b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n", L),
            Err(ReplyError::TooManyLines(3))
        );
        let long = [b'2'; 80];
        assert_eq!(parse_reply(&long, L), Err(ReplyError::LineTooLong(64)));
        let (r, _) = parse_reply(b"550 5.1.1 unknown\r\n", L).unwrap().unwrap();
        assert_eq!(r.enhanced().unwrap().to_string(), "5.1.1");
        assert_eq!(r.text(), "unknown");
        // An enhanced code of another class is text.
        let (r, _) = parse_reply(b"550 2.1.1 odd\r\n", L).unwrap().unwrap();
        assert!(r.enhanced().is_none());
        assert_eq!(r.text(), "2.1.1 odd");
    }
}
