//! Users and mailbox names: validation and the Maildir++ mapping.
//!
//! A mailbox name is the IMAP (modified UTF-7) form, `/` as hierarchy delimiter. On disk,
//! `INBOX` is the Maildir itself and `A/B` is the directory `.A.B`, exactly as Dovecot's
//! Maildir++ layout with `separator = /`. Names are kept in modified UTF-7 on disk, as Dovecot
//! does without the `UTF-8` layout option.
//!
//! A `.` inside a name component cannot be represented (it is the on-disk separator); like
//! Dovecot without `mailbox_list_storage_escape_char`, such names are refused.

use crate::StoreError;

/// Longest accepted mailbox name in bytes (the directory `.` + name must fit NAME_MAX = 255,
/// with room left for Dovecot's temporary names).
pub const MAX_NAME_LEN: usize = 200;

/// A validated user address: lower-cased `localpart@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserAddress {
    local: String,
    domain: String,
}

impl UserAddress {
    /// Validates and lower-cases an address. Refused: empty parts, more than one `@`,
    /// characters outside the dot-atom set, leading/trailing/double dots, over-long parts.
    /// Nothing accepted here can contain `/`, NUL or start with `.`, so the home directory
    /// `<root>/<domain>/<localpart>` never leaves `<root>`.
    pub fn parse(address: &str) -> Result<UserAddress, StoreError> {
        let bad = |why| StoreError::InvalidUser(address.to_owned(), why);
        let lower = address.to_ascii_lowercase();
        let (local, domain) = lower.split_once('@').ok_or_else(|| bad("no @"))?;
        if local.is_empty() || local.len() > 64 {
            return Err(bad("local part empty or longer than 64 bytes"));
        }
        if !local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-=?^_`{|}~.".contains(&b))
        {
            return Err(bad("character not allowed in the local part"));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(bad("misplaced dot in the local part"));
        }
        if domain.is_empty() || domain.len() > 253 {
            return Err(bad("domain empty or longer than 253 bytes"));
        }
        for label in domain.split('.') {
            if label.is_empty()
                || label.len() > 63
                || label.starts_with('-')
                || label.ends_with('-')
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(bad("invalid domain label"));
            }
        }
        Ok(UserAddress {
            local: local.to_owned(),
            domain: domain.to_owned(),
        })
    }

    /// The local part (lower case).
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The domain (lower case).
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl std::fmt::Display for UserAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// A validated mailbox name. `INBOX` (any case) is normalised to `INBOX`, also as the first
/// component of a hierarchical name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxName(String);

impl MailboxName {
    /// Validates a client-supplied name. Refused: empty names and components (leading,
    /// trailing or doubled `/`), `.` anywhere, bytes outside printable ASCII (NUL, controls,
    /// 8-bit: names are modified UTF-7), the list wildcards `*` and `%`, and names longer
    /// than [`MAX_NAME_LEN`].
    pub fn parse(name: &str) -> Result<MailboxName, StoreError> {
        let bad = |why| StoreError::InvalidName(name.to_owned(), why);
        if name.is_empty() {
            return Err(bad("empty name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("name too long"));
        }
        if let Some(b) = name.bytes().find(|b| !(0x20..0x7f).contains(b)) {
            return Err(if b == 0 {
                bad("NUL in name")
            } else if b < 0x20 || b == 0x7f {
                bad("control character in name")
            } else {
                bad("8-bit character in name (use modified UTF-7)")
            });
        }
        if name.contains(['*', '%']) {
            return Err(bad("wildcard in name"));
        }
        if name.contains('.') {
            return Err(bad(
                "'.' is the Maildir++ separator and cannot be part of a name",
            ));
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty hierarchy level"));
        }
        if parts[0].eq_ignore_ascii_case("INBOX") {
            parts[0] = "INBOX";
        }
        Ok(MailboxName(parts.join("/")))
    }

    /// The INBOX.
    pub fn inbox() -> MailboxName {
        MailboxName("INBOX".into())
    }

    /// True for INBOX itself.
    pub fn is_inbox(&self) -> bool {
        self.0 == "INBOX"
    }

    /// The name as IMAP shows it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory inside `Maildir/` holding this mailbox: empty for INBOX, `.A.B` for `A/B`.
    pub fn dir_name(&self) -> String {
        if self.is_inbox() {
            String::new()
        } else {
            format!(".{}", self.0.replace('/', "."))
        }
    }

    /// The mailbox a directory name inside `Maildir/` stands for, if it is one: `.A.B` ->
    /// `A/B`. Anything that would not be accepted by [`MailboxName::parse`] is not a mailbox
    /// (e.g. `..ringmail-deleted-*`, `.` and `..`).
    pub fn from_dir_name(dir: &str) -> Option<MailboxName> {
        let rest = dir.strip_prefix('.')?;
        if rest.is_empty() || rest.split('.').any(|p| p.is_empty()) {
            return None;
        }
        let name = rest.replace('.', "/");
        let parsed = MailboxName::parse(&name).ok()?;
        // `.inbox` on disk is a folder named "inbox", which we would normalise to INBOX;
        // such a directory cannot be addressed and is not listed.
        // `.INBOX` would duplicate the real INBOX (the Maildir itself).
        (parsed.as_str() == name && !parsed.is_inbox()).then_some(parsed)
    }

    /// The parent in the hierarchy (`A` for `A/B`), if any.
    pub fn parent(&self) -> Option<MailboxName> {
        self.0
            .rsplit_once('/')
            .map(|(p, _)| MailboxName(p.to_owned()))
    }
}

impl std::fmt::Display for MailboxName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 6154 special-use attributes, assigned by conventional name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialUse {
    /// `\Sent`
    Sent,
    /// `\Drafts`
    Drafts,
    /// `\Trash`
    Trash,
    /// `\Junk`
    Junk,
    /// `\Archive`
    Archive,
}

impl SpecialUse {
    /// The attribute for a top-level mailbox name, by the names clients commonly use.
    pub fn by_name(name: &MailboxName) -> Option<SpecialUse> {
        match name.as_str().to_ascii_lowercase().as_str() {
            "sent" | "sent messages" | "sent items" | "sent mail" => Some(SpecialUse::Sent),
            "drafts" => Some(SpecialUse::Drafts),
            "trash" | "deleted messages" | "deleted items" => Some(SpecialUse::Trash),
            "junk" | "spam" | "junk e-mail" => Some(SpecialUse::Junk),
            "archive" | "archives" => Some(SpecialUse::Archive),
            _ => None,
        }
    }

    /// The IMAP attribute (`\Sent`, ...).
    pub fn attribute(self) -> &'static str {
        match self {
            SpecialUse::Sent => "\\Sent",
            SpecialUse::Drafts => "\\Drafts",
            SpecialUse::Trash => "\\Trash",
            SpecialUse::Junk => "\\Junk",
            SpecialUse::Archive => "\\Archive",
        }
    }
}
