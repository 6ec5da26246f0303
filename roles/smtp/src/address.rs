//! Envelope addresses: the RFC 5321 path grammar (section 4.1.2), with RFC 6531 UTF-8 when the
//! transaction declared SMTPUTF8, and the RFC 3461 xtext encoding.
//!
//! ```text
//!   MAIL FROM:<"john..doe"@[IPv6:2001:db8::1]> SIZE=100
//!              \________/ \_________________/
//!              local part  domain (here an address literal)
//!             \____________________________/
//!                 path (at most 256 octets with the brackets)
//! ```
//!
//! Deliberately refused, like a hardened Postfix: source routes (`<@a,@b:u@c>`), addresses
//! without a domain (except `<postmaster>` as a recipient, handled by the server), general
//! address literals (`[tag:...]`), domain labels with `_`, NUL and control characters, 8-bit
//! octets without SMTPUTF8, a local part over 64 octets, a domain over 255, a path over 256.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// Why an address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum AddressError {
    /// Empty where a mailbox is needed.
    #[error("empty address")]
    Empty,
    /// A source route (`@a,@b:user@c`).
    #[error("source routes are not accepted")]
    SourceRoute,
    /// No `@domain`.
    #[error("address has no domain")]
    MissingDomain,
    /// Local part over 64 octets.
    #[error("local part longer than 64 octets")]
    LocalPartTooLong,
    /// Domain over 255 octets.
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    /// Path over 256 octets.
    #[error("path longer than 256 octets")]
    PathTooLong,
    /// A local part that is neither a dot-string nor a quoted string.
    #[error("invalid local part")]
    InvalidLocalPart,
    /// A domain that is neither a host name nor an IPv4/IPv6 address literal.
    #[error("invalid domain")]
    InvalidDomain,
    /// 8-bit octets without SMTPUTF8.
    #[error("non-ASCII address without SMTPUTF8")]
    NonAscii,
    /// A NUL or other control character.
    #[error("control character in address")]
    ControlCharacter,
}

/// The domain of a mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A host name as written (case preserved; compare case-insensitively).
    Name(String),
    /// `[192.0.2.1]`
    Ipv4(Ipv4Addr),
    /// `[IPv6:2001:db8::1]`
    Ipv6(Ipv6Addr),
}

impl Domain {
    /// True for `[...]` address literals: relay checks usually refuse them.
    pub fn is_address_literal(&self) -> bool {
        !matches!(self, Domain::Name(_))
    }

    /// Parses a domain or address literal.
    pub fn parse(s: &str, utf8: bool) -> Result<Domain, AddressError> {
        if s.len() > 255 {
            return Err(AddressError::DomainTooLong);
        }
        if let Some(lit) = s.strip_prefix('[') {
            let lit = lit.strip_suffix(']').ok_or(AddressError::InvalidDomain)?;
            if lit.len() > 5 && lit.as_bytes()[..5].eq_ignore_ascii_case(b"IPv6:") {
                return lit[5..]
                    .parse::<Ipv6Addr>()
                    .map(Domain::Ipv6)
                    .map_err(|_| AddressError::InvalidDomain);
            }
            if !lit.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return Err(AddressError::InvalidDomain);
            }
            return lit
                .parse::<Ipv4Addr>()
                .map(Domain::Ipv4)
                .map_err(|_| AddressError::InvalidDomain);
        }
        if s.is_empty() {
            return Err(AddressError::InvalidDomain);
        }
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(AddressError::InvalidDomain);
            }
            let ok_char = |c: char| c.is_ascii_alphanumeric() || (utf8 && !c.is_ascii());
            let first = label.chars().next().unwrap_or('-');
            let last = label.chars().last().unwrap_or('-');
            if !ok_char(first) || !ok_char(last) || !label.chars().all(|c| ok_char(c) || c == '-') {
                return Err(AddressError::InvalidDomain);
            }
        }
        Ok(Domain::Name(s.to_string()))
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(n) => f.write_str(n),
            Domain::Ipv4(a) => write!(f, "[{a}]"),
            Domain::Ipv6(a) => write!(f, "[IPv6:{a}]"),
        }
    }
}

/// A mailbox (`local@domain`) from a MAIL or RCPT path, validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mailbox {
    local: String,
    domain: Domain,
    raw: String,
    quoted: bool,
}

fn is_atext(c: char, utf8: bool) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (utf8 && !c.is_ascii())
}

impl Mailbox {
    /// Parses the text between the angle brackets of a path (`user@example.org`).
    /// `utf8` allows RFC 6531 UTF-8 (the transaction declared SMTPUTF8).
    pub fn parse(text: &str, utf8: bool) -> Result<Mailbox, AddressError> {
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if text.chars().any(char::is_control) {
            return Err(AddressError::ControlCharacter);
        }
        if !utf8 && !text.is_ascii() {
            return Err(AddressError::NonAscii);
        }
        if text.starts_with('@') {
            return Err(AddressError::SourceRoute);
        }
        if text.len() + 2 > 256 {
            return Err(AddressError::PathTooLong);
        }
        let (local, quoted, rest) = if let Some(q) = text.strip_prefix('"') {
            let mut local = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, e)) if (' '..='~').contains(&e) => local.push(e),
                        _ => return Err(AddressError::InvalidLocalPart),
                    },
                    c if (' '..='~').contains(&c) || (utf8 && !c.is_ascii()) => local.push(c),
                    _ => return Err(AddressError::InvalidLocalPart),
                }
            }
            let end = end.ok_or(AddressError::InvalidLocalPart)?;
            // Raw local part: the quotes plus the content.
            (local, true, &q[end + 1..])
        } else {
            let end = text.find('@').unwrap_or(text.len());
            let local = &text[..end];
            if local.is_empty()
                || local
                    .split('.')
                    .any(|a| a.is_empty() || !a.chars().all(|c| is_atext(c, utf8)))
            {
                return Err(AddressError::InvalidLocalPart);
            }
            (local.to_string(), false, &text[end..])
        };
        let raw_local_len = text.len() - rest.len();
        if raw_local_len > 64 {
            return Err(AddressError::LocalPartTooLong);
        }
        let domain = match rest.strip_prefix('@') {
            Some(d) => Domain::parse(d, utf8)?,
            None if rest.is_empty() => return Err(AddressError::MissingDomain),
            None => return Err(AddressError::InvalidLocalPart),
        };
        Ok(Mailbox {
            local,
            domain,
            raw: text.to_string(),
            quoted,
        })
    }

    /// A mailbox with a local part but no domain (only `<postmaster>` as a recipient): the
    /// server's host name is used as the domain; `raw()` keeps what the client sent.
    pub(crate) fn postmaster(raw: &str, hostname: &str) -> Mailbox {
        Mailbox {
            local: raw.to_string(),
            domain: Domain::Name(hostname.to_string()),
            raw: raw.to_string(),
            quoted: false,
        }
    }

    /// The local part, with quoting removed (`"a b"@x` gives `a b`).
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Exactly what the client sent between the angle brackets.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The local part was a quoted string.
    pub fn local_is_quoted(&self) -> bool {
        self.quoted
    }

    /// The local part contains `%`, `!` or `@`: the percent hack, bang paths or a quoted `@`,
    /// all ways to smuggle a relay destination past a domain check.
    pub fn local_has_routing_chars(&self) -> bool {
        self.local.contains(['%', '!', '@'])
    }

    /// The domain is an `[address literal]`.
    pub fn domain_is_address_literal(&self) -> bool {
        self.domain.is_address_literal()
    }

    /// Only ASCII (no SMTPUTF8 needed to send it on).
    pub fn is_ascii(&self) -> bool {
        self.raw.is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Invalid xtext (RFC 3461 section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("invalid xtext")]
pub struct XtextError;

/// Decodes xtext: printable ASCII except `+` and `=`, and `+HH` (upper-case hex) escapes.
/// The decoded octets must be UTF-8.
pub fn decode_xtext(s: &str) -> Result<String, XtextError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    while i < b.len() {
        match b[i] {
            b'+' => {
                let h = hex(*b.get(i + 1).ok_or(XtextError)?).ok_or(XtextError)?;
                let l = hex(*b.get(i + 2).ok_or(XtextError)?).ok_or(XtextError)?;
                out.push(h << 4 | l);
                i += 3;
            }
            b'=' => return Err(XtextError),
            c @ 33..=126 => {
                out.push(c);
                i += 1;
            }
            _ => return Err(XtextError),
        }
    }
    String::from_utf8(out).map_err(|_| XtextError)
}

/// Encodes as xtext.
pub fn encode_xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_quoted() {
        let m = Mailbox::parse("john.doe@example.org", false).unwrap();
        assert_eq!(m.local(), "john.doe");
        assert_eq!(m.domain(), &Domain::Name("example.org".into()));
        assert!(!m.local_is_quoted() && !m.local_has_routing_chars());

        let m = Mailbox::parse(r#""evil@x.org"@example.org"#, false).unwrap();
        assert!(m.local_is_quoted());
        assert_eq!(m.local(), "evil@x.org");
        assert!(m.local_has_routing_chars());
        assert_eq!(m.raw(), r#""evil@x.org"@example.org"#);

        let m = Mailbox::parse(r#""a\"b c"@example.org"#, false).unwrap();
        assert_eq!(m.local(), "a\"b c");

        assert!(
            Mailbox::parse("user%other.org@example.org", false)
                .unwrap()
                .local_has_routing_chars()
        );
        assert!(
            Mailbox::parse("host!user@example.org", false)
                .unwrap()
                .local_has_routing_chars()
        );
    }

    #[test]
    fn literals() {
        let m = Mailbox::parse("u@[192.0.2.1]", false).unwrap();
        assert_eq!(m.domain(), &Domain::Ipv4("192.0.2.1".parse().unwrap()));
        assert!(m.domain_is_address_literal());
        let m = Mailbox::parse("u@[IPv6:2001:db8::1]", false).unwrap();
        assert_eq!(m.domain(), &Domain::Ipv6("2001:db8::1".parse().unwrap()));
        assert_eq!(m.domain().to_string(), "[IPv6:2001:db8::1]");
        for bad in [
            "u@[300.1.1.1]",
            "u@[1.2.3]",
            "u@[tag:foo]",
            "u@[IPv6:zz]",
            "u@[1.2.3.4",
            "u@[::1]",
        ] {
            assert_eq!(
                Mailbox::parse(bad, false),
                Err(AddressError::InvalidDomain),
                "{bad}"
            );
        }
    }

    #[test]
    fn refused() {
        use AddressError::*;
        let cases: &[(&str, AddressError)] = &[
            ("", Empty),
            ("@a,@b:u@c", SourceRoute),
            ("@a:u@c", SourceRoute),
            ("user", MissingDomain),
            ("a..b@x.org", InvalidLocalPart),
            (".a@x.org", InvalidLocalPart),
            ("a.@x.org", InvalidLocalPart),
            ("a b@x.org", InvalidLocalPart),
            ("\"ab@x.org", InvalidLocalPart),
            ("\"a\"b@x.org", InvalidLocalPart),
            ("a@x..org", InvalidDomain),
            ("a@-x.org", InvalidDomain),
            ("a@x_y.org", InvalidDomain),
            ("a@x.org.", InvalidDomain),
            ("a@", InvalidDomain),
            ("a\0b@x.org", ControlCharacter),
            ("a\tb@x.org", ControlCharacter),
            ("jörg@x.org", NonAscii),
        ];
        for (s, e) in cases {
            assert_eq!(Mailbox::parse(s, false), Err(*e), "{s:?}");
        }
        assert!(Mailbox::parse("jörg@bücher.de", true).is_ok());
        let long_local = format!("{}@x.org", "a".repeat(65));
        assert_eq!(
            Mailbox::parse(&long_local, false),
            Err(AddressError::LocalPartTooLong)
        );
        assert!(Mailbox::parse(&format!("{}@x.org", "a".repeat(64)), false).is_ok());
        let label = "a".repeat(63);
        let dom = [label.as_str(); 4].join("."); // 255
        assert_eq!(
            Mailbox::parse(&format!("u@{dom}"), false),
            Err(AddressError::PathTooLong)
        );
        let dom = format!("{dom}.b");
        assert_eq!(Domain::parse(&dom, false), Err(AddressError::DomainTooLong));
    }

    #[test]
    fn xtext() {
        assert_eq!(decode_xtext("rfc822;a+2Bb@x").unwrap(), "rfc822;a+b@x");
        assert_eq!(decode_xtext("a+2b"), Err(XtextError));
        assert_eq!(decode_xtext("a+2"), Err(XtextError));
        assert_eq!(decode_xtext("a=b"), Err(XtextError));
        assert_eq!(decode_xtext("a b"), Err(XtextError));
        assert_eq!(decode_xtext("+FF"), Err(XtextError));
        let s = "a+b=c d";
        assert_eq!(decode_xtext(&encode_xtext(s)).unwrap(), s);
    }
}
