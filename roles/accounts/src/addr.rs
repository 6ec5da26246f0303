//! Address normalization shared by every backend.
//!
//! All backends store and compare addresses in the form [`normalize_address`] returns, so a
//! login, a RCPT TO and an admin command that differ only in case or surrounding whitespace
//! name the same account.
//!
//! Choices:
//! - Leading and trailing whitespace is trimmed; whitespace or control characters (NUL, CR, LF,
//!   TAB, DEL, ...) anywhere inside are refused rather than stripped, so a hostile value cannot
//!   smuggle a second line into a log, a query or an LDAP filter.
//! - **Both** the domain and the local part are lowercased (Unicode `to_lowercase`). RFC 5321
//!   lets a server treat local parts case-sensitively, but no real mail system relies on it
//!   and Dovecot/Postfix virtual setups fold case too; folding means `John@` and `john@`
//!   cannot be two different accounts.
//! - Exactly one `@`; quoted local parts (`"a b"@x`), address literals (`x@[192.0.2.1]`) and
//!   the RFC 5322 specials `()<>[]:;,"\` are refused: accounts do not need them.
//! - Length limits: the whole address at most 254 octets, the local part at most 64, every
//!   domain label 1..=63; no leading, trailing or doubled dots in either part.
//! - Internationalized domains are not converted between U-labels and A-labels: store them the
//!   way clients send them (for now, A-labels).

use crate::AccountError;

/// Longest address accepted (RFC 5321 path limit of 256 minus the angle brackets).
pub const MAX_ADDRESS_LEN: usize = 254;
/// Longest local part accepted (RFC 5321 4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;

const SPECIALS: &[char] = &['(', ')', '<', '>', '[', ']', ':', ';', ',', '"', '\\'];

fn invalid(msg: &str) -> AccountError {
    AccountError::Invalid(msg.to_string())
}

fn check_chars(s: &str, what: &str) -> Result<(), AccountError> {
    for c in s.chars() {
        if c.is_control() || c.is_whitespace() {
            return Err(invalid(&format!(
                "{what} contains whitespace or a control character"
            )));
        }
        if SPECIALS.contains(&c) {
            return Err(invalid(&format!("{what} contains a forbidden character")));
        }
    }
    Ok(())
}

fn check_dots(s: &str, what: &str) -> Result<(), AccountError> {
    if s.starts_with('.') || s.ends_with('.') || s.contains("..") {
        return Err(invalid(&format!(
            "{what} has a leading, trailing or doubled dot"
        )));
    }
    Ok(())
}

/// Normalizes a domain name: trims, lowercases and checks it. Used for `domain_*` operations
/// and the `domain` filters of the list operations.
pub fn normalize_domain(domain: &str) -> Result<String, AccountError> {
    let d = domain.trim();
    if d.is_empty() {
        return Err(invalid("empty domain"));
    }
    if d.len() > 253 {
        return Err(invalid("domain too long"));
    }
    check_chars(d, "domain")?;
    if d.contains('@') {
        return Err(invalid("domain contains '@'"));
    }
    check_dots(d, "domain")?;
    if d.split('.').any(|label| label.len() > 63) {
        return Err(invalid("domain label longer than 63 octets"));
    }
    if d.split('.')
        .any(|label| label.starts_with('-') || label.ends_with('-'))
    {
        return Err(invalid("domain label starts or ends with '-'"));
    }
    Ok(d.to_lowercase())
}

/// Normalizes an address to `local@domain`: trimmed, lowercased, checked (see the module
/// documentation for the exact rules). Every backend calls this on every address it is given.
pub fn normalize_address(address: &str) -> Result<String, AccountError> {
    let a = address.trim();
    if a.is_empty() {
        return Err(invalid("empty address"));
    }
    if a.len() > MAX_ADDRESS_LEN {
        return Err(invalid("address too long"));
    }
    let (local, domain) = a
        .split_once('@')
        .ok_or_else(|| invalid("address has no '@'"))?;
    if domain.contains('@') {
        return Err(invalid("address has more than one '@'"));
    }
    if local.is_empty() {
        return Err(invalid("empty local part"));
    }
    if local.len() > MAX_LOCAL_LEN {
        return Err(invalid("local part too long"));
    }
    check_chars(local, "local part")?;
    check_dots(local, "local part")?;
    let domain = normalize_domain(domain)?;
    let out = format!("{}@{}", local.to_lowercase(), domain);
    // Lowercasing can change the length of some non-ASCII characters.
    if out.len() > MAX_ADDRESS_LEN {
        return Err(invalid("address too long"));
    }
    Ok(out)
}

/// The domain part of an already normalized address.
pub fn domain_of(normalized: &str) -> &str {
    normalized.rsplit_once('@').map_or("", |(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_and_whitespace() {
        assert_eq!(
            normalize_address("  John.Doe@Example.ORG \r\n").unwrap(),
            "john.doe@example.org"
        );
        assert_eq!(normalize_address("a+tag@x.y").unwrap(), "a+tag@x.y");
        assert_eq!(
            normalize_address("ÄBC@Example.org").unwrap(),
            "äbc@example.org"
        );
        assert_eq!(normalize_domain(" Example.ORG ").unwrap(), "example.org");
    }

    #[test]
    fn refuses_hostile_input() {
        for bad in [
            "",
            "   ",
            "user",
            "@example.org",
            "user@",
            "a@b@example.org",
            "us er@example.org",
            "user@exa mple.org",
            "user\0@example.org",
            "user@example.org\0x",
            "user\r\nRCPT TO:<x@y>@example.org",
            "user@example.org\r\nx",
            "user@exam\nple.org",
            "user\t@example.org",
            "\"a b\"@example.org",
            "user@[192.0.2.1]",
            "<user@example.org>",
            "user@example..org",
            "user@.example.org",
            "user@example.org.",
            ".user@example.org",
            "us..er@example.org",
            "user@-example.org",
            "a,b@example.org",
            "a)(uid=*@example.org",
        ] {
            assert!(normalize_address(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn length_limits() {
        let local = "a".repeat(64);
        let ok = format!("{local}@{}.org", "b".repeat(63));
        assert!(normalize_address(&ok).is_ok());
        assert!(normalize_address(&format!("{}@x.org", "a".repeat(65))).is_err());
        // 254 accepted, 255 refused.
        let domain = |n: usize| {
            // labels of 50 + dots, total length n
            let mut d = String::new();
            while d.len() < n {
                if !d.is_empty() {
                    d.push('.');
                }
                let take = (n - d.len()).min(50);
                d.push_str(&"d".repeat(take));
            }
            d
        };
        let at254 = format!("{}@{}", "a".repeat(10), domain(243));
        assert_eq!(at254.len(), 254);
        assert!(normalize_address(&at254).is_ok(), "{at254}");
        let at255 = format!("{}@{}", "a".repeat(10), domain(244));
        assert_eq!(at255.len(), 255);
        assert!(normalize_address(&at255).is_err());
        assert!(normalize_address(&"x".repeat(10_000)).is_err());
        assert!(normalize_domain(&"a".repeat(64)).is_err());
    }

    #[test]
    fn domain_of_works() {
        assert_eq!(domain_of("a@b.c"), "b.c");
        assert_eq!(domain_of("nope"), "");
    }
}
