//! Maildir file names and flags.
//!
//! ```text
//! 1732761600.M123456P4242Q7.mx1,S=2048,W=2101:2,FSa
//! └─ time ─┘ └usec┘└pid┘└n┘└host┘ size  vsize  └ info: system flags, then keyword letters
//! ```
//!
//! The base name (everything before `:`) identifies a message for its whole life; the info
//! part after `:2,` carries the flags: `D` draft, `F` flagged, `R` answered, `S` seen,
//! `T` deleted, then `a`..`z` for the keywords listed in `dovecot-keywords` (index 0 = `a`).
//! Both parts are kept sorted as Dovecot writes them. Unknown upper-case letters (e.g. `P`,
//! passed) are preserved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A message flag. `\Recent` is not stored: it is a property of a session
/// ([`crate::MessageMeta::recent`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    /// `\Answered` (Maildir `R`)
    Answered,
    /// `\Deleted` (Maildir `T`)
    Deleted,
    /// `\Draft` (Maildir `D`)
    Draft,
    /// `\Flagged` (Maildir `F`)
    Flagged,
    /// `\Seen` (Maildir `S`)
    Seen,
    /// A keyword (Maildir `a`..`z` through `dovecot-keywords`).
    Keyword(String),
}

impl Flag {
    /// Parses the IMAP form (`\Seen`, `$Forwarded`, ...), case-insensitive for system flags.
    /// `\Recent` and unknown backslash flags give `None`.
    pub fn parse(s: &str) -> Option<Flag> {
        if let Some(sys) = s.strip_prefix('\\') {
            return match sys.to_ascii_lowercase().as_str() {
                "answered" => Some(Flag::Answered),
                "deleted" => Some(Flag::Deleted),
                "draft" => Some(Flag::Draft),
                "flagged" => Some(Flag::Flagged),
                "seen" => Some(Flag::Seen),
                _ => None,
            };
        }
        valid_keyword(s).then(|| Flag::Keyword(s.to_owned()))
    }

    /// The IMAP form.
    pub fn as_imap(&self) -> &str {
        match self {
            Flag::Answered => "\\Answered",
            Flag::Deleted => "\\Deleted",
            Flag::Draft => "\\Draft",
            Flag::Flagged => "\\Flagged",
            Flag::Seen => "\\Seen",
            Flag::Keyword(k) => k,
        }
    }

    pub(crate) fn letter(&self) -> Option<char> {
        Some(match self {
            Flag::Answered => 'R',
            Flag::Deleted => 'T',
            Flag::Draft => 'D',
            Flag::Flagged => 'F',
            Flag::Seen => 'S',
            Flag::Keyword(_) => return None,
        })
    }

    fn from_letter(c: char) -> Option<Flag> {
        Some(match c {
            'R' => Flag::Answered,
            'T' => Flag::Deleted,
            'D' => Flag::Draft,
            'F' => Flag::Flagged,
            'S' => Flag::Seen,
            _ => return None,
        })
    }
}

/// An IMAP atom usable as a keyword: printable ASCII without atom-specials, not starting with
/// `\`, at most 100 bytes.
pub fn valid_keyword(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('\\')
        && s.bytes()
            .all(|b| (0x21..0x7f).contains(&b) && !b"(){%*\"\\]".contains(&b))
}

/// A parsed Maildir file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileName {
    /// Everything before `:` (the message's identity).
    pub base: String,
    /// The flag letters after `:2,` (sorted on output), `None` for a file without info
    /// (normally only in `new/`).
    pub info: Option<String>,
}

impl FileName {
    /// Splits a directory entry name. Returns `None` for names that are not messages
    /// (starting with `.`, empty, containing control characters).
    pub fn parse(name: &str) -> Option<FileName> {
        if name.is_empty() || name.starts_with('.') || name.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return None;
        }
        match name.split_once(':') {
            None => Some(FileName {
                base: name.to_owned(),
                info: None,
            }),
            Some((base, info)) if !base.is_empty() => Some(FileName {
                base: base.to_owned(),
                // Experimental ":1," info and anything else unknown: keep no flags.
                info: Some(info.strip_prefix("2,").unwrap_or("").to_owned()),
            }),
            Some(_) => None,
        }
    }

    /// The full name: `base:2,<letters>` (letters sorted), or `base` without info.
    pub fn to_name(&self) -> String {
        match &self.info {
            None => self.base.clone(),
            Some(info) => format!("{}:2,{}", self.base, sort_letters(info)),
        }
    }

    /// `S=<size>` from the base name, if present.
    pub fn size(&self) -> Option<u64> {
        self.field('S')
    }

    /// `W=<vsize>` (size with CRLF line ends) from the base name, if present.
    pub fn vsize(&self) -> Option<u64> {
        self.field('W')
    }

    fn field(&self, key: char) -> Option<u64> {
        self.base
            .split(',')
            .skip(1)
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    }

    /// The flags of the info part; keyword letters are looked up in `keywords`
    /// (letters without a name are dropped).
    pub fn flags(&self, keywords: &[String]) -> Vec<Flag> {
        flags_of_letters(self.info.as_deref().unwrap_or(""), keywords)
    }
}

/// The flag letters of a file name, as [`FileName::parse`] would find them, without
/// allocating: empty for a name it refuses, one without info, or an info other than `2,`.
pub fn info_letters(name: &str) -> &str {
    if name.is_empty() || name.starts_with('.') || name.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return "";
    }
    match name.split_once(':') {
        Some((base, info)) if !base.is_empty() => info.strip_prefix("2,").unwrap_or(""),
        _ => "",
    }
}

/// The flags of info letters; keyword letters are looked up in `keywords` (letters without a
/// name are dropped).
pub fn flags_of_letters(letters: &str, keywords: &[String]) -> Vec<Flag> {
    let mut out = Vec::with_capacity(letters.len());
    for c in letters.chars() {
        if let Some(f) = Flag::from_letter(c) {
            out.push(f);
        } else if c.is_ascii_lowercase()
            && let Some(k) = keywords.get((c as u8 - b'a') as usize)
        {
            out.push(Flag::Keyword(k.clone()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Sorts and de-duplicates flag letters the way Dovecot writes them (ASCII order: system
/// flags, then keyword letters).
pub fn sort_letters(info: &str) -> String {
    let mut v: Vec<char> = info.chars().collect();
    v.sort_unstable();
    v.dedup();
    v.into_iter().collect()
}

/// The upper-case letters of `info` this crate does not model (e.g. `P`): preserved when the
/// flags are rewritten.
pub fn foreign_letters(info: &str) -> String {
    info.chars()
        .filter(|c| c.is_ascii_uppercase() && Flag::from_letter(*c).is_none())
        .collect()
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Escapes a host name as Dovecot does in file names (`/` -> `\057`, `:` -> `\072`).
pub fn escape_host(host: &str) -> String {
    let mut s = String::with_capacity(host.len());
    for c in host.chars() {
        match c {
            '/' => s.push_str("\\057"),
            ':' => s.push_str("\\072"),
            c if c.is_ascii_graphic() && c != ',' => s.push(c),
            _ => s.push('_'),
        }
    }
    if s.is_empty() { "localhost".into() } else { s }
}

/// A new unique base name `<secs>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>`. `Q<n>` is a
/// process-wide counter, so names are unique per host even within one microsecond.
pub fn new_base(host: &str, size: u64, vsize: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.M{}P{}Q{}.{},S={},W={}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed) + 1,
        host,
        size,
        vsize
    )
}

/// Counts the size with CRLF line ends (`W=`): every LF not preceded by CR adds one byte.
#[derive(Debug, Default, Clone, Copy)]
pub struct VsizeCounter {
    /// Bytes seen.
    pub size: u64,
    /// Bytes with CRLF line ends.
    pub vsize: u64,
    last_cr: bool,
}

impl VsizeCounter {
    /// Accounts for a chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' && !self.last_cr {
                self.vsize += 1;
            }
            self.last_cr = b == b'\r';
        }
        self.size += chunk.len() as u64;
        self.vsize += chunk.len() as u64;
    }
}

#[cfg(test)]
mod letters_tests {
    use super::*;

    #[test]
    fn info_letters_agree_with_the_parser() {
        let kw = vec!["$Label1".to_string(), "Work".to_string()];
        for name in [
            "1700000000.M1P2.host,S=10:2,FRSab",
            "1700000000.M1P2.host,S=10:2,",
            "1700000000.M1P2.host",
            "1700000000.M1P2.host:1,xyz",
            ":2,S",
            ".hidden:2,S",
            "bad\u{1}name:2,S",
            "x:2,SSRRz",
            "",
        ] {
            let parsed = FileName::parse(name)
                .map(|f| f.flags(&kw))
                .unwrap_or_default();
            assert_eq!(
                flags_of_letters(info_letters(name), &kw),
                parsed,
                "{name:?}"
            );
        }
    }
}
