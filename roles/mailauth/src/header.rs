//! The `Authentication-Results` header field (RFC 8601).
//!
//! Every value that comes from the SMTP client or from DNS (HELO, MAIL FROM, DKIM `d=`/`s=`,
//! PTR names, error texts) goes through [`pvalue`] or [`quoted`]: control characters (CR, LF,
//! TAB, ...) are dropped, non-ASCII becomes `?`, anything that is not a plain RFC 2045 token
//! or `local@domain` is written as a quoted-string with `"` and `\` escaped, and values are
//! cut at [`MAX_VALUE_CHARS`]. So no value can end the header field, start another one, or
//! add a `;`-separated result of its own.

use crate::{AuthResult, IprevOutcome, MessageOutcome, SpfIdentity, SpfOutcome};
use std::net::IpAddr;

/// Longest value written (characters); longer values are cut and end in "...".
pub const MAX_VALUE_CHARS: usize = 200;

/// Soft line length limit (RFC 5322 §2.1.1).
const LINE: usize = 78;

/// RFC 2045 tspecials.
fn is_tspecial(c: char) -> bool {
    matches!(
        c,
        '(' | ')' | '<' | '>' | '@' | ',' | ';' | ':' | '\\' | '"' | '/' | '[' | ']' | '?' | '='
    )
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_graphic() && !is_tspecial(c)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_token_char)
}

/// Control characters dropped, non-ASCII replaced by `?`, cut at [`MAX_VALUE_CHARS`].
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_VALUE_CHARS + 3));
    for (n, c) in s.chars().filter(|c| !c.is_control()).enumerate() {
        if n == MAX_VALUE_CHARS {
            out.push_str("...");
            break;
        }
        out.push(if c.is_ascii() { c } else { '?' });
    }
    out
}

/// A quoted-string (RFC 5322 §3.2.4) holding `s`, cleaned.
pub fn quoted(s: &str) -> String {
    let s = clean(s);
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// An RFC 8601 `pvalue`: a token, `local-part@domain` with token characters on both sides,
/// or else a quoted-string.
pub fn pvalue(s: &str) -> String {
    let c = clean(s);
    let bare = match c.rsplit_once('@') {
        Some((local, domain)) => (local.is_empty() || is_token(local)) && is_token(domain),
        None => is_token(&c),
    };
    if bare { c } else { quoted(&c) }
}

/// A comment `(text)`: only letters, digits, '.', '-', '_' and '=' are kept (for PTR names
/// and policy notes).
fn comment(s: &str) -> Option<String> {
    let kept: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=' | ' '))
        .take(MAX_VALUE_CHARS)
        .collect();
    let kept = kept.trim();
    (!kept.is_empty()).then(|| format!("({kept})"))
}

fn ip_pvalue(ip: IpAddr) -> String {
    // IPv6 addresses contain ':', a tspecial.
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"{v6}\""),
    }
}

/// The authserv-id must be written as-is: a host name.
pub fn is_valid_authserv_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Base64 of 6 bytes: the 8 characters of `header.b` (RFC 6008).
pub fn base64_6(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(8);
    for chunk in b.chunks(3).take(2) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn method(name: &str, result: AuthResult, reason: Option<&str>) -> Vec<String> {
    let mut v = vec![format!("{name}={}", result.as_str())];
    if let Some(r) = reason.filter(|r| !r.is_empty()) {
        v.push(format!("reason={}", quoted(r)));
    }
    v
}

pub fn authentication_results(
    authserv_id: &str,
    iprev: &IprevOutcome,
    spf: &SpfOutcome,
    msg: Option<&MessageOutcome>,
) -> String {
    let mut results: Vec<Vec<String>> = Vec::new();

    let mut r = method("iprev", iprev.result, iprev.reason.as_deref());
    r.push(format!("policy.iprev={}", ip_pvalue(iprev.ip)));
    if let Some(c) = iprev.name.as_deref().and_then(comment) {
        r.push(c);
    }
    results.push(r);

    let mut r = method("spf", spf.result, None);
    match spf.identity {
        SpfIdentity::MailFrom => r.push(format!("smtp.mailfrom={}", pvalue(&spf.mail_from))),
        SpfIdentity::Helo => r.push(format!("smtp.helo={}", pvalue(&spf.helo))),
    }
    results.push(r);

    if let Some(m) = msg {
        if m.dkim.is_empty() {
            results.push(method("dkim", AuthResult::None, None));
        }
        for d in &m.dkim {
            let mut r = method("dkim", d.result, d.reason.as_deref());
            if let Some(v) = &d.domain {
                r.push(format!("header.d={}", pvalue(v)));
            }
            if let Some(v) = &d.selector {
                r.push(format!("header.s={}", pvalue(v)));
            }
            if let Some(v) = d.algorithm {
                r.push(format!("header.a={v}"));
            }
            if let Some(v) = &d.b_prefix {
                r.push(format!("header.b={}", pvalue(v)));
            }
            results.push(r);
        }
        let mut r = method("dmarc", m.dmarc.result, m.dmarc.reason.as_deref());
        if m.dmarc.header_from.is_some() && m.dmarc.result != AuthResult::None {
            r.push(format!("(p={})", m.dmarc.policy.as_str()));
        }
        if let Some(v) = &m.dmarc.header_from {
            r.push(format!("header.from={}", pvalue(v)));
        }
        results.push(r);
        if let Some(a) = &m.arc {
            results.push(method("arc", a.result, a.reason.as_deref()));
        }
    }

    let mut out = format!("Authentication-Results: {authserv_id}");
    for tokens in results {
        out.push_str(";\r\n\t");
        let mut line = 8; // a TAB counts as up to 8 columns
        for (j, t) in tokens.iter().enumerate() {
            if j > 0 {
                if line + 1 + t.len() > LINE {
                    out.push_str("\r\n\t ");
                    line = 9;
                } else {
                    out.push(' ');
                    line += 1;
                }
            }
            out.push_str(t);
            line += t.len();
        }
    }
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArcOutcome, DkimOutcome, DmarcOutcome, DmarcPolicy};

    fn iprev() -> IprevOutcome {
        IprevOutcome {
            result: AuthResult::Pass,
            ip: "192.0.2.1".parse().unwrap(),
            name: Some("mail.sender.test".into()),
            reason: None,
        }
    }

    fn spf(mail_from: &str, helo: &str) -> SpfOutcome {
        SpfOutcome {
            result: AuthResult::Pass,
            identity: if mail_from.is_empty() {
                SpfIdentity::Helo
            } else {
                SpfIdentity::MailFrom
            },
            domain: "sender.test".into(),
            mail_from: mail_from.into(),
            helo: helo.into(),
            explanation: None,
        }
    }

    fn msg() -> MessageOutcome {
        MessageOutcome {
            dkim: vec![DkimOutcome {
                result: AuthResult::Pass,
                domain: Some("sender.test".into()),
                selector: Some("sel".into()),
                algorithm: Some("rsa-sha256"),
                b_prefix: Some("abcd+/12".into()),
                reason: None,
            }],
            arc: Some(ArcOutcome {
                result: AuthResult::None,
                instances: 0,
                reason: None,
            }),
            dmarc: DmarcOutcome {
                result: AuthResult::Pass,
                header_from: Some("sender.test".into()),
                policy: DmarcPolicy::Reject,
                spf_aligned: true,
                dkim_aligned: true,
                reason: None,
            },
            too_large: false,
        }
    }

    /// Checks the RFC 5322 shape: CRLF only as fold (followed by WSP) or at the very end,
    /// no bare CR/LF, lines under 998 octets, ASCII only; and the RFC 8601 shape: results
    /// separated by ';' outside quoted-strings and comments, each `method=result`.
    fn check_shape(h: &str) -> Vec<String> {
        assert!(h.starts_with("Authentication-Results: "), "{h:?}");
        assert!(h.ends_with("\r\n"), "{h:?}");
        assert!(h.is_ascii(), "{h:?}");
        let body = &h[..h.len() - 2];
        for (i, _) in body.match_indices("\r\n") {
            let next = body.as_bytes()[i + 2];
            assert!(next == b'\t' || next == b' ', "CRLF not a fold in {h:?}");
        }
        let unfolded = body.replace("\r\n", "");
        assert!(
            !unfolded.contains('\r') && !unfolded.contains('\n'),
            "{h:?}"
        );
        for line in body.split("\r\n") {
            assert!(line.len() < 998);
        }
        // split on ';' outside quotes and comments
        let value = &unfolded["Authentication-Results: ".len()..];
        let (mut parts, mut cur, mut q, mut esc, mut depth) =
            (vec![], String::new(), false, false, 0);
        for c in value.chars() {
            if esc {
                esc = false;
                cur.push(c);
                continue;
            }
            match c {
                '\\' if q || depth > 0 => esc = true,
                '"' if depth == 0 => q = !q,
                '(' if !q => depth += 1,
                ')' if !q => depth -= 1,
                ';' if !q && depth == 0 => {
                    parts.push(cur.trim().to_string());
                    cur.clear();
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        assert!(!q && depth == 0, "unbalanced in {h:?}");
        parts.push(cur.trim().to_string());
        for p in &parts[1..] {
            let (m, _) = p.split_once('=').expect("method=result");
            assert!(
                ["iprev", "spf", "dkim", "dmarc", "arc"].contains(&m),
                "unexpected method {m:?} in {h:?}"
            );
        }
        parts
    }

    #[test]
    fn full_header() {
        let h = authentication_results(
            "mx.ringmail.test",
            &iprev(),
            &spf("alice@sender.test", "mail.sender.test"),
            Some(&msg()),
        );
        assert_eq!(
            h,
            "Authentication-Results: mx.ringmail.test;\r\n\
             \tiprev=pass policy.iprev=192.0.2.1 (mail.sender.test);\r\n\
             \tspf=pass smtp.mailfrom=alice@sender.test;\r\n\
             \tdkim=pass header.d=sender.test header.s=sel header.a=rsa-sha256\r\n\
             \t header.b=\"abcd+/12\";\r\n\
             \tdmarc=pass (p=reject) header.from=sender.test;\r\n\
             \tarc=none\r\n"
        );
        let parts = check_shape(&h);
        assert_eq!(parts[0], "mx.ringmail.test");
        assert_eq!(parts.len(), 6);
    }

    #[test]
    fn without_message_and_null_sender() {
        let h = authentication_results("mx.test", &iprev(), &spf("", "mail.sender.test"), None);
        assert_eq!(
            h,
            "Authentication-Results: mx.test;\r\n\
             \tiprev=pass policy.iprev=192.0.2.1 (mail.sender.test);\r\n\
             \tspf=pass smtp.helo=mail.sender.test\r\n"
        );
        check_shape(&h);
    }

    #[test]
    fn ipv6_is_quoted() {
        let mut i = iprev();
        i.ip = "2001:db8::1".parse().unwrap();
        i.result = AuthResult::PermError;
        i.reason = Some("DNS record not found".into());
        i.name = None;
        let h = authentication_results("mx.test", &i, &spf("a@b.test", "x.test"), None);
        assert!(
            h.replace("\r\n\t ", " ").contains(
                "iprev=permerror reason=\"DNS record not found\" policy.iprev=\"2001:db8::1\""
            ),
            "{h}"
        );
        check_shape(&h);
    }

    #[test]
    fn hostile_values_cannot_break_out() {
        let evil_from = "x@evil.test>;\r\nX-Injected: yes; dkim=pass header.d=bank.test (\"\\";
        let evil_helo = "evil.test\r\n\r\nBody; spf=pass";
        let mut i = iprev();
        i.name = Some("a.test) (dkim=pass;\r\nX: y".into());
        i.reason = Some("oops\"; dmarc=pass\r\n".into());
        i.result = AuthResult::Fail;
        let mut m = msg();
        m.dkim[0].domain = Some("bank.test;\r\n dkim=pass".into());
        m.dkim[0].selector = Some("s\"el\\".into());
        m.dkim[0].reason = Some("\u{e9}t\u{e9}\r\n".into());
        m.dmarc.header_from = Some("b\u{fc}cher.test; arc=pass".into());
        for (from, helo) in [(evil_from, "ok.test"), ("", evil_helo)] {
            let h = authentication_results("mx.test", &i, &spf(from, helo), Some(&m));
            let parts = check_shape(&h);
            // authserv-id + iprev, spf, dkim, dmarc, arc: nothing injected.
            assert_eq!(parts.len(), 6, "{h}");
            assert!(
                !h.contains("X-Injected:") || h.contains("\"x@evil.test>;X-Injected"),
                "{h}"
            );
            assert!(!h.contains("\r\n\r\n"), "{h}");
        }
    }

    #[test]
    fn pvalue_forms() {
        assert_eq!(pvalue("alice@sender.test"), "alice@sender.test");
        assert_eq!(pvalue("sender.test"), "sender.test");
        assert_eq!(pvalue("@sender.test"), "@sender.test");
        assert_eq!(pvalue("a b@c.test"), "\"a b@c.test\"");
        assert_eq!(pvalue("a;b"), "\"a;b\"");
        assert_eq!(pvalue("q\"\\"), "\"q\\\"\\\\\"");
        assert_eq!(pvalue(""), "\"\"");
        assert_eq!(pvalue("a\r\nb"), "ab");
        assert_eq!(pvalue("\u{fc}.test"), "\"?.test\"");
        let long = "a".repeat(1000);
        assert_eq!(pvalue(&long).len(), MAX_VALUE_CHARS + 3);
    }

    #[test]
    fn long_values_fold_and_stay_short() {
        let mut m = msg();
        m.dkim[0].domain = Some("d".repeat(150) + ".test");
        m.dkim[0].reason = Some("r".repeat(5000));
        let h = authentication_results("mx.test", &iprev(), &spf("a@b.test", "x.test"), Some(&m));
        check_shape(&h);
        assert!(h.lines().all(|l| l.len() < 300), "{h}");
    }

    #[test]
    fn base64_prefix() {
        assert_eq!(base64_6(b"\x00\x00\x00\x00\x00\x00"), "AAAAAAAA");
        assert_eq!(base64_6(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn authserv_id_validation() {
        assert!(is_valid_authserv_id("mx1.ringmail.test"));
        assert!(!is_valid_authserv_id("mx; dkim=pass"));
        assert!(!is_valid_authserv_id(""));
        assert!(!is_valid_authserv_id("a\r\nb"));
    }
}
