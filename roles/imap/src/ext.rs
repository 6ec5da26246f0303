//! Extension syntax that imap-codec 1.0 does not parse.
//!
//! imap-codec 1.0 knows RFC 3501 plus IDLE, ENABLE, MOVE, UNSELECT, LITERAL+ and a few
//! more, but not NAMESPACE, ID, UID EXPUNGE, the CONDSTORE modifiers, ESEARCH `RETURN`
//! (with SEARCHRES `SAVE`), the SEARCHRES `$` sequence set, STATUS `SIZE`, the BINARY fetch
//! items and literal8 APPEND, or the LIST-EXTENDED options. When imap-codec rejects a
//! command, [`recognise`] tokenises it (atoms, quoted strings, parentheses and literals, no
//! grammar) and either names one of the argument-free commands, or cuts the extension parts
//! out and returns the remaining base command for imap-codec to parse again, with what was
//! cut out as [`Extras`]. Everything that stays is therefore still parsed by imap-codec.
//!
//! `$` (RFC 5182) is only recognised where a sequence set stands: as the set of FETCH, STORE,
//! COPY, MOVE (and their UID forms) it becomes `1` with [`Extras::saved_set`] set, and the
//! session uses the saved messages instead; as a SEARCH key (alone or after `UID`) it becomes
//! a [`SAVED_HEADER`] HEADER key that the session evaluates against the saved result. Anywhere
//! else `$` is left alone (a mailbox or keyword may be called `$`), and `$` combined with other
//! numbers (`$,1`, `$:3`) stays a syntax error, as RFC 5182 allows `$` only on its own.
//!
//! BINARY (RFC 3516): `BINARY[…]`, `BINARY.PEEK[…]` and `BINARY.SIZE[…]` fetch items are cut
//! out as [`BinaryItem`]s; the literal8 (`~{n}`) of an APPEND is cut out whole (it may hold
//! NUL, which imap-codec refuses in literals) and replaced by an empty literal.
//!
//! A command that imap-codec rejects before a literal it announces is first checked with
//! [`literal_may_follow`], so that extension syntax may precede a literal.
//!
//! UTF-8 in quoted strings (IMAP4rev2): imap-codec 1.0 parses 7-bit quoted strings only. For a
//! session that may use UTF-8, [`utf8_quoted_as_literals`] turns each quoted string holding
//! valid UTF-8 into a literal of the same octets, and the result is parsed again (by
//! imap-codec, then by [`recognise`] if need be) as if the client had sent it so.

use std::num::NonZeroU32;
use std::ops::Range;

use imap_codec::CommandCodec;
use imap_codec::decode::{CommandDecodeError, Decoder};
use imap_codec::imap_types::sequence::SequenceSet;

/// What the extension shim made of a command imap-codec rejected.
#[derive(Debug)]
pub(crate) enum Recognised {
    Namespace,
    Id,
    /// `UID EXPUNGE set`; `None` for `UID EXPUNGE $`.
    UidExpunge(Option<SequenceSet>),
    /// A base command for imap-codec, and the extension parts cut out of it.
    Rewritten(Vec<u8>, Extras),
}

/// ESEARCH (RFC 4731) result options.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SearchReturn {
    pub min: bool,
    pub max: bool,
    pub all: bool,
    pub count: bool,
    /// SEARCHRES (RFC 5182): keep the result as `$`.
    pub save: bool,
}

impl SearchReturn {
    /// Whether anything but SAVE was asked for (SAVE alone sends no ESEARCH response).
    pub fn reports(&self) -> bool {
        self.min || self.max || self.all || self.count
    }
}

/// A STATUS data item (RFC 9051 6.3.11, RFC 7162, RFC 9208).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusItem {
    Messages,
    Recent,
    UidNext,
    UidValidity,
    Unseen,
    Deleted,
    /// RFC 9208 `DELETED-STORAGE`: accepted, never reported (no QUOTA).
    DeletedStorage,
    Size,
    HighestModSeq,
}

impl StatusItem {
    fn from_word(w: &str) -> Option<StatusItem> {
        Some(match w.to_ascii_uppercase().as_str() {
            "MESSAGES" => StatusItem::Messages,
            "RECENT" => StatusItem::Recent,
            "UIDNEXT" => StatusItem::UidNext,
            "UIDVALIDITY" => StatusItem::UidValidity,
            "UNSEEN" => StatusItem::Unseen,
            "DELETED" => StatusItem::Deleted,
            "DELETED-STORAGE" => StatusItem::DeletedStorage,
            "SIZE" => StatusItem::Size,
            "HIGHESTMODSEQ" => StatusItem::HighestModSeq,
            _ => return None,
        })
    }
}

/// A BINARY fetch item (RFC 3516): `BINARY[part]<partial>`, `BINARY.PEEK[...]` or
/// `BINARY.SIZE[part]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BinaryItem {
    /// `BINARY.PEEK`: does not set `\Seen`.
    pub peek: bool,
    /// `BINARY.SIZE`.
    pub size: bool,
    /// The part; empty for the whole message.
    pub part: Vec<NonZeroU32>,
    /// `<origin.length>`.
    pub partial: Option<(u32, NonZeroU32)>,
}

impl BinaryItem {
    fn parse(word: &str) -> Option<BinaryItem> {
        let number = |s: &str| -> Option<u32> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let open = word.find('[')?;
        let (peek, size) = match word[..open].to_ascii_uppercase().as_str() {
            "BINARY" => (false, false),
            "BINARY.PEEK" => (true, false),
            "BINARY.SIZE" => (false, true),
            _ => return None,
        };
        let (inner, tail) = word[open + 1..].split_once(']')?;
        let mut part = Vec::new();
        if !inner.is_empty() {
            for n in inner.split('.') {
                part.push(NonZeroU32::new(number(n)?)?);
            }
        }
        let partial = if tail.is_empty() {
            None
        } else {
            let (origin, len) = tail.strip_prefix('<')?.strip_suffix('>')?.split_once('.')?;
            Some((number(origin)?, NonZeroU32::new(number(len)?)?))
        };
        if size && partial.is_some() {
            return None;
        }
        Some(BinaryItem {
            peek,
            size,
            part,
            partial,
        })
    }

    /// How a FETCH response names the item: `BINARY[1.2]<0>`, `BINARY.SIZE[1]`.
    pub fn response_name(&self) -> String {
        let part: Vec<String> = self.part.iter().map(|n| n.to_string()).collect();
        let mut s = format!(
            "BINARY{}[{}]",
            if self.size { ".SIZE" } else { "" },
            part.join(".")
        );
        if let Some((origin, _)) = self.partial {
            s.push_str(&format!("<{origin}>"));
        }
        s
    }
}

/// Extension parts cut out of a command.
#[derive(Debug, Default)]
pub(crate) struct Extras {
    /// `SELECT/EXAMINE mbox (CONDSTORE)`.
    pub condstore_select: bool,
    /// `MODSEQ` among FETCH items.
    pub fetch_modseq: bool,
    /// BINARY items among FETCH items, in order.
    pub fetch_binary: Vec<BinaryItem>,
    /// The FETCH items were all extension items: the rewritten command asks for `UID` only
    /// as a placeholder.
    pub fetch_ext_only: bool,
    /// APPEND of a literal8 (`~{n}`): the message (the rewritten command has an empty
    /// literal).
    pub literal8: Option<Vec<u8>>,
    /// FETCH `(CHANGEDSINCE n)`.
    pub changed_since: Option<u64>,
    /// STORE `(UNCHANGEDSINCE n)`.
    pub unchanged_since: Option<u64>,
    /// SEARCH `RETURN (...)`.
    pub search_return: Option<SearchReturn>,
    /// SEARCH used the `MODSEQ` key (rewritten to a [`MODSEQ_HEADER`] HEADER key).
    pub search_modseq: bool,
    /// The sequence set of FETCH, STORE, COPY or MOVE was `$` (rewritten to `1`).
    pub saved_set: bool,
    /// STATUS items, when the list named one imap-codec does not parse (`SIZE`); the
    /// rewritten command asks for `(MESSAGES)`.
    pub status_items: Option<Vec<StatusItem>>,
    /// LIST selection options.
    pub list_select: Vec<String>,
    /// LIST return options (upper case), without `STATUS`.
    pub list_return: Vec<String>,
    /// `RETURN (STATUS (...))`: the items.
    pub list_status: Option<Vec<StatusItem>>,
}

/// The HEADER field name that stands for the CONDSTORE `MODSEQ` search key after rewriting.
pub(crate) const MODSEQ_HEADER: &str = "X-Ringmail-Search-Modseq";

/// The HEADER field name that stands for the SEARCHRES `$` search key after rewriting.
pub(crate) const SAVED_HEADER: &str = "X-Ringmail-Search-Saved";
const SAVED_KEY: &[u8] = b"HEADER X-Ringmail-Search-Saved \"\"";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Atom,
    Quoted,
    Open,
    Close,
    Literal,
}

/// The tokens of a command (ending in CRLF). With `open_literal`, the command must end in a
/// literal announcement whose octets have not arrived: it becomes a last [`Tok::Literal`].
fn tokenise(buf: &[u8], open_literal: bool) -> Option<Vec<(Tok, Range<usize>)>> {
    let mut open = false;
    let mut out = Vec::new();
    let mut i = 0;
    let end = buf.len().checked_sub(2)?;
    if &buf[end..] != b"\r\n" {
        return None;
    }
    while i < end {
        match buf[i] {
            b' ' => i += 1,
            b'(' => {
                out.push((Tok::Open, i..i + 1));
                i += 1;
            }
            b')' => {
                out.push((Tok::Close, i..i + 1));
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                loop {
                    match buf.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        b'\r' | b'\n' => return None,
                        _ => i += 1,
                    }
                }
                i += 1;
                out.push((Tok::Quoted, start..i));
            }
            b'{' => {
                let start = i;
                let close = buf[i..].iter().position(|&b| b == b'}')? + i;
                let digits = std::str::from_utf8(&buf[i + 1..close]).ok()?;
                let n: usize = digits.trim_end_matches(['+', '-']).parse().ok()?;
                if buf.get(close + 1..close + 3)? != b"\r\n" {
                    return None;
                }
                if open_literal && close + 3 == buf.len() {
                    out.push((Tok::Literal, start..close + 1));
                    open = true;
                    break;
                }
                i = (close + 3).checked_add(n)?;
                if i > end {
                    return None;
                }
                out.push((Tok::Literal, start..i));
            }
            _ => {
                let start = i;
                while i < end && !matches!(buf[i], b' ' | b'(' | b')' | b'"' | b'{') {
                    // Square brackets keep `BODY[HEADER.FIELDS (A B)]` in fewer pieces;
                    // only depth-one atoms matter here.
                    i += 1;
                }
                out.push((Tok::Atom, start..i));
            }
        }
    }
    (open == open_literal).then_some(out)
}

struct Cmd<'a> {
    buf: &'a [u8],
    toks: Vec<(Tok, Range<usize>)>,
    cuts: Vec<(Range<usize>, &'static [u8])>,
}

impl<'a> Cmd<'a> {
    fn text(&self, i: usize) -> Option<&'a str> {
        let (t, r) = self.toks.get(i)?;
        if *t != Tok::Atom && *t != Tok::Quoted {
            return None;
        }
        std::str::from_utf8(&self.buf[r.clone()]).ok()
    }

    fn is(&self, i: usize, word: &str) -> bool {
        self.text(i).is_some_and(|t| t.eq_ignore_ascii_case(word))
    }

    fn kind(&self, i: usize) -> Option<&Tok> {
        self.toks.get(i).map(|(t, _)| t)
    }

    /// Index of the token closing the group opened at `open`.
    fn group_end(&self, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for (j, (t, _)) in self.toks.iter().enumerate().skip(open) {
            match t {
                Tok::Open => depth += 1,
                Tok::Close => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(j);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Cuts tokens `from..=to` together with the space before them (after them at the start
    /// of a list: `(MODSEQ FLAGS)` becomes `(FLAGS)`).
    fn cut(&mut self, from: usize, to: usize, with: &'static [u8]) {
        let mut start = self.toks[from].1.start;
        let mut end = self.toks[to].1.end;
        let taken = |at: usize| self.cuts.iter().any(|(r, _)| r.contains(&at));
        if start > 0 && self.buf[start - 1] == b' ' && !taken(start - 1) {
            start -= 1;
        } else if self.buf.get(end) == Some(&b' ') {
            end += 1;
        }
        self.cuts.push((start..end, with));
    }

    /// Whether token `i` looks like a BINARY fetch item (`BINARY[`, `BINARY.PEEK[`, …).
    fn is_binary(&self, i: usize) -> bool {
        self.text(i).is_some_and(|t| {
            let t = t.as_bytes();
            t.len() >= 7 && t[..6].eq_ignore_ascii_case(b"BINARY") && matches!(t[6], b'[' | b'.')
        })
    }

    /// Whether token `i` is the SEARCHRES `$` (an atom of its own).
    fn is_saved(&self, i: usize) -> bool {
        self.kind(i) == Some(&Tok::Atom) && self.text(i) == Some("$")
    }

    /// The STATUS items of the group `open..=close`: atoms only, at least one, each known.
    /// Repeats are dropped.
    fn status_items(&self, open: usize, close: usize) -> Option<Vec<StatusItem>> {
        let mut out = Vec::new();
        for j in open + 1..close {
            if self.kind(j) != Some(&Tok::Atom) {
                return None;
            }
            let it = StatusItem::from_word(self.text(j)?)?;
            if !out.contains(&it) {
                out.push(it);
            }
        }
        (!out.is_empty()).then_some(out)
    }

    fn atoms_in(&self, open: usize, close: usize) -> Vec<String> {
        (open + 1..close)
            .filter_map(|j| self.text(j).map(|s| s.to_ascii_uppercase()))
            .collect()
    }

    fn finish(mut self) -> Vec<u8> {
        self.cuts.sort_by_key(|(r, _)| r.start);
        // Not the whole buffer: a literal8 APPEND's message (up to the APPEND limit) is cut.
        let cut: usize = self.cuts.iter().map(|(r, _)| r.len()).sum();
        let mut out = Vec::with_capacity(self.buf.len().saturating_sub(cut) + 16);
        let mut pos = 0;
        for (r, with) in &self.cuts {
            // Neighbouring cuts may share the space between them.
            if r.end <= pos {
                continue;
            }
            out.extend_from_slice(&self.buf[pos..r.start.max(pos)]);
            out.extend_from_slice(with);
            pos = r.end;
        }
        out.extend_from_slice(&self.buf[pos..]);
        out
    }
}

/// Recognises extension syntax in a command imap-codec rejected (see the module docs).
pub(crate) fn recognise(buf: &[u8]) -> Option<Recognised> {
    recognise_in(buf, false)
}

fn recognise_in(buf: &[u8], open_literal: bool) -> Option<Recognised> {
    let toks = tokenise(buf, open_literal)?;
    let mut c = Cmd {
        buf,
        toks,
        cuts: Vec::new(),
    };
    let mut ex = Extras::default();
    let uid = c.is(1, "UID");
    let at = if uid { 2 } else { 1 };
    let name = c.text(at)?.to_ascii_uppercase();
    if matches!(name.as_str(), "FETCH" | "STORE" | "COPY" | "MOVE") && c.is_saved(at + 1) {
        ex.saved_set = true;
        c.cuts.push((c.toks[at + 1].1.clone(), b"1"));
    }
    match name.as_str() {
        "NAMESPACE" if !uid && c.toks.len() == 2 => return Some(Recognised::Namespace),
        "ID" if !uid => return Some(Recognised::Id),
        "EXPUNGE" if uid && c.toks.len() == 4 => {
            if c.is_saved(3) {
                return Some(Recognised::UidExpunge(None));
            }
            let set = SequenceSet::try_from(c.text(3)?).ok()?;
            return Some(Recognised::UidExpunge(Some(set)));
        }
        "SELECT" | "EXAMINE" if !uid => {
            let last = c.toks.len() - 1;
            if c.kind(last) == Some(&Tok::Close) && c.kind(last - 2) == Some(&Tok::Open) {
                if !c.is(last - 1, "CONDSTORE") {
                    return None;
                }
                ex.condstore_select = true;
                c.cut(last - 2, last, b"");
            } else {
                return None;
            }
        }
        "FETCH" => {
            let list = at + 2;
            if c.kind(list) == Some(&Tok::Open) {
                let close = c.group_end(list)?;
                let mut depth = 0;
                let mut kept = 0;
                for j in list + 1..close {
                    match c.kind(j)? {
                        Tok::Open => depth += 1,
                        Tok::Close => depth -= 1,
                        _ if depth == 0 && c.is(j, "MODSEQ") => {
                            ex.fetch_modseq = true;
                            c.cut(j, j, b"");
                            continue;
                        }
                        Tok::Atom if depth == 0 && c.is_binary(j) => {
                            ex.fetch_binary.push(BinaryItem::parse(c.text(j)?)?);
                            c.cut(j, j, b"");
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        kept += 1;
                    }
                }
                if kept == 0 && (ex.fetch_modseq || !ex.fetch_binary.is_empty()) {
                    // Extension items alone: the list becomes a placeholder `(UID)`.
                    let start = c.toks[list].1.start;
                    c.cuts.retain(|(r, _)| r.end <= start);
                    c.cuts.push((start..c.toks[close].1.end, b"(UID)"));
                    ex.fetch_ext_only = true;
                }
                parse_changedsince(&mut c, close + 1, &mut ex)?;
            } else if c.is(list, "MODSEQ") {
                ex.fetch_modseq = true;
                ex.fetch_ext_only = true;
                c.cuts.push((c.toks[list].1.clone(), b"UID"));
                parse_changedsince(&mut c, list + 1, &mut ex)?;
            } else if c.kind(list) == Some(&Tok::Atom) && c.is_binary(list) {
                ex.fetch_binary.push(BinaryItem::parse(c.text(list)?)?);
                ex.fetch_ext_only = true;
                c.cuts.push((c.toks[list].1.clone(), b"UID"));
                parse_changedsince(&mut c, list + 1, &mut ex)?;
            } else {
                parse_changedsince(&mut c, list + 1, &mut ex)?;
            }
        }
        "STORE" => {
            let open = at + 2;
            if c.kind(open) == Some(&Tok::Open) && c.is(open + 1, "UNCHANGEDSINCE") {
                let close = c.group_end(open)?;
                if close != open + 3 {
                    return None;
                }
                ex.unchanged_since = Some(c.text(open + 2)?.parse().ok()?);
                c.cut(open, close, b"");
            }
        }
        "COPY" | "MOVE" => {}
        "APPEND" if !uid => {
            // APPEND mailbox [flags] [date] ~{n}: imap-codec 1.0 has no literal8.
            let last = c.toks.len() - 1;
            let (tilde, lit) = (c.toks.get(last - 1)?.1.clone(), c.toks[last].1.clone());
            if c.kind(last) != Some(&Tok::Literal) || !c.is(last - 1, "~") || tilde.end != lit.start
            {
                return None;
            }
            if open_literal {
                // Only the announcement so far: imap-codec judges the rest and asks for it.
                c.cuts.push((tilde, b""));
            } else {
                let close = buf[lit.clone()].iter().position(|&b| b == b'}')?;
                ex.literal8 = Some(buf[lit.start + close + 3..lit.end].to_vec());
                c.cuts.push((tilde.start..lit.end, b"{0}\r\n"));
            }
        }
        "SEARCH" => {
            let mut j = at + 1;
            if c.is(j, "RETURN") && c.kind(j + 1) == Some(&Tok::Open) {
                let close = c.group_end(j + 1)?;
                let mut r = SearchReturn::default();
                for k in j + 2..close {
                    // Options are atoms (as Dovecot: anything else is BAD).
                    if c.kind(k) != Some(&Tok::Atom) {
                        return None;
                    }
                    match c.text(k)?.to_ascii_uppercase().as_str() {
                        "MIN" => r.min = true,
                        "MAX" => r.max = true,
                        "ALL" => r.all = true,
                        "COUNT" => r.count = true,
                        "SAVE" => r.save = true,
                        _ => return None,
                    }
                }
                if r == SearchReturn::default() {
                    r.all = true;
                }
                ex.search_return = Some(r);
                c.cut(j, close, b"");
                j = close + 1;
            }
            if c.is(j, "CHARSET") {
                j += 2;
            }
            search_keys(&mut c, j, &mut ex)?;
        }
        "STATUS" if !uid => {
            // tag STATUS mailbox (items)
            let open = at + 2;
            if c.kind(open) != Some(&Tok::Open) {
                return None;
            }
            let close = c.group_end(open)?;
            if close + 1 != c.toks.len() {
                return None;
            }
            let items = c.status_items(open, close)?;
            if !items.contains(&StatusItem::Size) {
                return None;
            }
            ex.status_items = Some(items);
            let r = c.toks[open].1.start..c.toks[close].1.end;
            c.cuts.push((r, b"(MESSAGES)"));
        }
        "LIST" if !uid => {
            let mut j = at + 1;
            if c.kind(j) == Some(&Tok::Open) {
                let close = c.group_end(j)?;
                ex.list_select = c.atoms_in(j, close);
                c.cut(j, close, b"");
                j = close + 1;
            }
            // reference, pattern
            j += 2;
            if c.is(j, "RETURN") && c.kind(j + 1) == Some(&Tok::Open) {
                let close = c.group_end(j + 1)?;
                let mut k = j + 2;
                while k < close {
                    if c.kind(k) != Some(&Tok::Atom) {
                        return None;
                    }
                    let word = c.text(k)?.to_ascii_uppercase();
                    match word.as_str() {
                        "STATUS" if c.kind(k + 1) == Some(&Tok::Open) => {
                            let end = c.group_end(k + 1)?;
                            ex.list_status = Some(c.status_items(k + 1, end)?);
                            k = end + 1;
                        }
                        // Unknown return options are BAD (RFC 5258 3).
                        "SUBSCRIBED" | "CHILDREN" | "SPECIAL-USE" => {
                            ex.list_return.push(word);
                            k += 1;
                        }
                        _ => return None,
                    }
                }
                c.cut(j, close, b"");
                j = close + 1;
            }
            if j != c.toks.len() {
                return None;
            }
        }
        _ => return None,
    }
    if c.cuts.is_empty() {
        return None;
    }
    Some(Recognised::Rewritten(c.finish(), ex))
}

/// Walks the search keys from token `from`, rewriting `MODSEQ` and `$` keys. Arguments of
/// keys are skipped, so a `$` or `MODSEQ` given as a string (`SUBJECT $`) stays a string.
fn search_keys(c: &mut Cmd<'_>, from: usize, ex: &mut Extras) -> Option<()> {
    let mut j = from;
    while j < c.toks.len() {
        if c.kind(j) != Some(&Tok::Atom) {
            // Parentheses; a stray string is left for imap-codec to refuse.
            j += 1;
            continue;
        }
        let word = c.text(j)?.to_ascii_uppercase();
        match word.as_str() {
            "$" => {
                c.cuts.push((c.toks[j].1.clone(), SAVED_KEY));
                j += 1;
            }
            "UID" if c.is_saved(j + 1) => {
                c.cuts
                    .push((c.toks[j].1.start..c.toks[j + 1].1.end, SAVED_KEY));
                j += 2;
            }
            "MODSEQ" => {
                // MODSEQ [<entry-name> <entry-type-req>] <mod-sequence-valzer>
                let mut k = j + 1;
                if c.kind(k) == Some(&Tok::Quoted) {
                    k += 2;
                }
                let _: u64 = c.text(k)?.parse().ok()?;
                ex.search_modseq = true;
                let start = c.toks[j].1.start;
                let num = c.toks[k].1.clone();
                c.cuts
                    .push((start..num.start, b"HEADER X-Ringmail-Search-Modseq "));
                j = k + 1;
            }
            "BCC" | "BODY" | "CC" | "FROM" | "SUBJECT" | "TEXT" | "TO" | "KEYWORD"
            | "UNKEYWORD" | "BEFORE" | "ON" | "SINCE" | "SENTBEFORE" | "SENTON" | "SENTSINCE"
            | "LARGER" | "SMALLER" | "UID" => j += 2,
            "HEADER" => j += 3,
            _ => j += 1,
        }
    }
    Some(())
}

/// UTF-8 in quoted strings (RFC 9051 4.3: `QUOTED-CHAR` includes `UTF8-2`..`UTF8-4`), which
/// imap-codec 1.0 refuses: every quoted string of the command (so far) that holds non-ASCII
/// octets becomes a non-synchronising literal of its unescaped octets (`"Grüße"` becomes
/// `{6+}\r\nGrüße`), which imap-codec accepts wherever a string stands. `None` if
/// no quoted string holds non-ASCII octets, or if one of them is not valid UTF-8 or holds an
/// escape other than `\"` and `\\` (the command stays a syntax error). Literals the command
/// already has are copied unchanged, their octets unread; a literal announced at the end
/// whose octets have not arrived stays an announcement.
pub(crate) fn utf8_quoted_as_literals(buf: &[u8]) -> Option<Vec<u8>> {
    // The quoted strings to replace: (start, end, unescaped octets). One pass, linear.
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            b'"' => {
                let mut content = Vec::new();
                let mut j = i + 1;
                loop {
                    match *buf.get(j)? {
                        b'\\' => {
                            let c = *buf.get(j + 1)?;
                            if c != b'"' && c != b'\\' {
                                return None;
                            }
                            content.push(c);
                            j += 2;
                        }
                        b'"' => break,
                        b'\r' | b'\n' | 0 => return None,
                        c => {
                            content.push(c);
                            j += 1;
                        }
                    }
                }
                if !content.is_ascii() {
                    std::str::from_utf8(&content).ok()?;
                    edits.push((i, j + 1, content));
                }
                i = j + 1;
            }
            b'{' => {
                // `{n}` / `{n+}` and CRLF: a literal, whose octets are skipped unread.
                let mut k = i + 1;
                while buf.get(k).is_some_and(u8::is_ascii_digit) {
                    k += 1;
                }
                let digits = &buf[i + 1..k];
                if buf.get(k) == Some(&b'+') {
                    k += 1;
                }
                if !digits.is_empty()
                    && buf.get(k) == Some(&b'}')
                    && buf.get(k + 1..k + 3) == Some(b"\r\n")
                {
                    let n: usize = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(usize::MAX);
                    i = (k + 3).saturating_add(n).min(buf.len());
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if edits.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(buf.len() + 16 * edits.len());
    let mut pos = 0;
    for (start, end, content) in edits {
        out.extend_from_slice(&buf[pos..start]);
        out.extend_from_slice(format!("{{{}+}}\r\n", content.len()).as_bytes());
        out.extend_from_slice(&content);
        pos = end;
    }
    out.extend_from_slice(&buf[pos..]);
    Some(out)
}

/// Whether every literal the command announced has its octets (so that a `{n}` at its end
/// is literal data, not an announcement).
pub(crate) fn literals_complete(buf: &[u8]) -> bool {
    tokenise(buf, false).is_some()
}

/// For a command imap-codec rejected whose text so far ends in a literal announcement
/// (`{n}` / `{n+}`): whether the part before the literal is extension syntax that
/// [`recognise`] turns into a command imap-codec accepts so far (it then asks for the
/// literal). If so the literal is read and the whole command is recognised once complete; if
/// not the command is refused at once and its literal never read.
pub(crate) fn literal_may_follow(buf: &[u8]) -> bool {
    match recognise_in(buf, true) {
        Some(Recognised::Rewritten(b, _)) => matches!(
            CommandCodec::default().decode(&b),
            Ok(([], _)) | Err(CommandDecodeError::LiteralFound { .. })
        ),
        _ => false,
    }
}

/// Whether a SEARCH command asks to SAVE its result (`RETURN (... SAVE ...)`), judged from
/// its words alone: for a command that fails to parse, whose `$` must then be emptied.
pub(crate) fn search_saves(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(b"");
    let mut words = line.split(|&b| b == b' ').skip(1).peekable();
    if words.peek().is_some_and(|w| w.eq_ignore_ascii_case(b"UID")) {
        words.next();
    }
    if !words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"SEARCH"))
        || !words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"RETURN"))
    {
        return false;
    }
    for (i, w) in words.enumerate() {
        if i == 0 && !w.starts_with(b"(") {
            return false;
        }
        let close = w.contains(&b')');
        let w = w.trim_ascii();
        let w: Vec<u8> = w
            .iter()
            .copied()
            .filter(|&b| b != b'(' && b != b')')
            .collect();
        if w.eq_ignore_ascii_case(b"SAVE") {
            return true;
        }
        if close {
            return false;
        }
    }
    false
}

fn parse_changedsince(c: &mut Cmd<'_>, open: usize, ex: &mut Extras) -> Option<()> {
    if open >= c.toks.len() {
        return Some(());
    }
    if c.kind(open) != Some(&Tok::Open) || !c.is(open + 1, "CHANGEDSINCE") {
        return None;
    }
    let close = c.group_end(open)?;
    if close != open + 3 || close + 1 != c.toks.len() {
        return None;
    }
    ex.changed_since = Some(c.text(open + 2)?.parse().ok()?);
    c.cut(open, close, b"");
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &str) -> (String, Extras) {
        match recognise(s.as_bytes()) {
            Some(Recognised::Rewritten(b, e)) => (String::from_utf8(b).unwrap(), e),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rewrites() {
        let (b, e) = rw("a FETCH 1:* (FLAGS MODSEQ) (CHANGEDSINCE 12)\r\n");
        assert_eq!(b, "a FETCH 1:* (FLAGS)\r\n");
        assert!(e.fetch_modseq);
        assert_eq!(e.changed_since, Some(12));
        let (b, e) = rw("a UID FETCH 1 (MODSEQ)\r\n");
        assert_eq!(b, "a UID FETCH 1 (UID)\r\n");
        assert!(e.fetch_ext_only);
        let (b, e) = rw("a FETCH 1 (MODSEQ FLAGS MODSEQ)\r\n");
        assert_eq!(b, "a FETCH 1 (FLAGS)\r\n");
        assert!(e.fetch_modseq && !e.fetch_ext_only);
        let (b, e) = rw("a FETCH 1 (MODSEQ BINARY.PEEK[1]<0.5> FLAGS BINARY.SIZE[])\r\n");
        assert_eq!(b, "a FETCH 1 (FLAGS)\r\n");
        assert!(e.fetch_modseq && !e.fetch_ext_only);
        assert_eq!(e.fetch_binary.len(), 2);
        assert_eq!(e.fetch_binary[0].response_name(), "BINARY[1]<0>");
        assert!(e.fetch_binary[0].peek);
        assert_eq!(e.fetch_binary[1].response_name(), "BINARY.SIZE[]");
        let (b, e) = rw("a FETCH 1:2 binary[1.2]\r\n");
        assert_eq!(b, "a FETCH 1:2 UID\r\n");
        assert!(e.fetch_ext_only);
        assert_eq!(e.fetch_binary[0].response_name(), "BINARY[1.2]");
        let (b, e) = rw("a APPEND INBOX (\\Seen) ~{3}\r\na\0b\r\n");
        assert_eq!(b, "a APPEND INBOX (\\Seen) {0}\r\n\r\n");
        assert_eq!(e.literal8.as_deref(), Some(&b"a\0b"[..]));
        assert!(literal_may_follow(b"a APPEND INBOX ~{3}\r\n"));
        assert!(literal_may_follow(
            b"a SEARCH RETURN (ALL) SUBJECT {3+}\r\n"
        ));
        assert!(!literal_may_follow(
            b"a SEARCH RETURN (ALL) SUBJECT ~{3}\r\n"
        ));
        assert!(!literal_may_follow(b"a APPEND INBOX ~ {3}\r\n"));
        assert!(!literal_may_follow(
            b"a SEARCH RETURN (ALL) SUBJECT {3}\r\n{1}\r\n"
        ));
        assert!(literals_complete(b"a SEARCH SUBJECT {3}\r\n{1}\r\n"));
        assert!(!literals_complete(b"a SEARCH SUBJECT {3}\r\n"));
        let (b, e) = rw("a STORE 1 (UNCHANGEDSINCE 5) +FLAGS (\\Seen)\r\n");
        assert_eq!(b, "a STORE 1 +FLAGS (\\Seen)\r\n");
        assert_eq!(e.unchanged_since, Some(5));
        let (b, e) = rw("a SEARCH RETURN (MIN COUNT) OR MODSEQ 5 SEEN\r\n");
        assert_eq!(b, "a SEARCH OR HEADER X-Ringmail-Search-Modseq 5 SEEN\r\n");
        assert!(e.search_return.unwrap().count);
        let (b, e) = rw("a LIST (SUBSCRIBED) \"\" \"*\" RETURN (CHILDREN STATUS (MESSAGES))\r\n");
        assert_eq!(b, "a LIST \"\" \"*\"\r\n");
        assert_eq!(e.list_select, ["SUBSCRIBED"]);
        assert_eq!(e.list_status.as_deref(), Some(&[StatusItem::Messages][..]));
        let (b, e) = rw("a SELECT INBOX (CONDSTORE)\r\n");
        assert_eq!(b, "a SELECT INBOX\r\n");
        assert!(e.condstore_select);
        assert!(matches!(
            recognise(b"a UID EXPUNGE 1:3\r\n"),
            Some(Recognised::UidExpunge(_))
        ));
        assert!(recognise(b"a FROB\r\n").is_none());
        let saved = "HEADER X-Ringmail-Search-Saved \"\"";
        let (b, e) = rw("a FETCH $ (FLAGS MODSEQ)\r\n");
        assert_eq!(b, "a FETCH 1 (FLAGS)\r\n");
        assert!(e.saved_set && e.fetch_modseq);
        let (b, e) = rw("a UID FETCH $ (MODSEQ)\r\n");
        assert_eq!(b, "a UID FETCH 1 (UID)\r\n");
        assert!(e.saved_set);
        let (b, _) = rw("a UID STORE $ +FLAGS (\\Seen)\r\n");
        assert_eq!(b, "a UID STORE 1 +FLAGS (\\Seen)\r\n");
        let (b, _) = rw("a MOVE $ Trash\r\n");
        assert_eq!(b, "a MOVE 1 Trash\r\n");
        let (b, e) = rw("a SEARCH RETURN (SAVE MIN) OR ($) UID $\r\n");
        assert_eq!(b, format!("a SEARCH OR ({saved}) {saved}\r\n"));
        let r = e.search_return.unwrap();
        assert!(r.save && r.min && !r.all && r.reports());
        let (b, e) = rw("a SEARCH RETURN (SAVE) SUBJECT $ HEADER $ $ $ UID 1:3\r\n");
        assert_eq!(
            b,
            format!("a SEARCH SUBJECT $ HEADER $ $ {saved} UID 1:3\r\n")
        );
        assert!(!e.search_return.unwrap().reports());
        assert!(!e.saved_set);
        assert!(matches!(
            recognise(b"a UID EXPUNGE $\r\n"),
            Some(Recognised::UidExpunge(None))
        ));
        for bad in [
            "a SELECT $\r\n",
            "a FETCH $,1 FLAGS\r\n",
            "a SEARCH RETURN (SAVE (MIN)) ALL\r\n",
            "a SEARCH RETURN (\"SAVE\") ALL\r\n",
            "a EXPUNGE $\r\n",
        ] {
            assert!(recognise(bad.as_bytes()).is_none(), "{bad}");
        }
        assert!(search_saves(b"a SEARCH RETURN (SAVE) ALL\r\n"));
        assert!(search_saves(
            b"a uid search return (min save) BOGUS {3}\r\n"
        ));
        assert!(!search_saves(b"a SEARCH RETURN (MIN) SAVE\r\n"));
        assert!(!search_saves(b"a SEARCH SAVE\r\n"));
        assert!(!search_saves(b"a FETCH RETURN (SAVE)\r\n"));
        assert!(recognise(b"a {99999999999}\r\n").is_none());
    }

    fn utf8(s: &[u8]) -> Option<String> {
        utf8_quoted_as_literals(s).map(|b| String::from_utf8(b).unwrap())
    }

    /// Parses a complete command with imap-codec.
    fn parses(b: &[u8]) -> bool {
        matches!(CommandCodec::default().decode(b), Ok(([], _)))
    }

    #[test]
    fn utf8_quoted_strings_become_literals() {
        let b = utf8("a CREATE \"Ünïcödé\"\r\n".as_bytes()).unwrap();
        assert_eq!(b, "a CREATE {11+}\r\nÜnïcödé\r\n");
        assert!(parses(b.as_bytes()));
        // Escapes are undone; ASCII strings and existing literals are left alone, also a
        // literal whose octets hold quotes and 8-bit text.
        let b = utf8("a RENAME \"x\\\"é\\\\\" {4+}\r\n\"é\"\r\n".as_bytes()).unwrap();
        assert_eq!(b, "a RENAME {5+}\r\nx\"é\\ {4+}\r\n\"é\"\r\n");
        assert!(parses(b.as_bytes()));
        let b = utf8("a LIST \"\" \"Entwü*\"\r\n".as_bytes()).unwrap();
        assert_eq!(b, "a LIST \"\" {7+}\r\nEntwü*\r\n");
        assert!(parses(b.as_bytes()));
        let b = utf8("a UID SEARCH SUBJECT \"日本\" FROM \"bob\"\r\n".as_bytes()).unwrap();
        assert!(parses(b.as_bytes()));
        // A literal announced at the end stays an announcement: imap-codec asks for it.
        let b = utf8("a APPEND \"Entwürfe\" (\\Seen) {5}\r\n".as_bytes()).unwrap();
        assert_eq!(b, "a APPEND {9+}\r\nEntwürfe (\\Seen) {5}\r\n");
        assert!(matches!(
            CommandCodec::default().decode(b.as_bytes()),
            Err(CommandDecodeError::LiteralFound { length: 5, .. })
        ));
        // Extension syntax around it is still recognised.
        let b = utf8("a LIST (SUBSCRIBED) \"\" \"é*\" RETURN (CHILDREN)\r\n".as_bytes()).unwrap();
        match recognise(b.as_bytes()) {
            Some(Recognised::Rewritten(r, e)) => {
                assert_eq!(r, "a LIST \"\" {3+}\r\né*\r\n".as_bytes());
                assert!(parses(&r));
                assert_eq!(e.list_select, ["SUBSCRIBED"]);
            }
            other => panic!("{other:?}"),
        }
        // Nothing to do: ASCII only, or 8-bit outside quoted strings.
        assert_eq!(utf8(b"a CREATE \"plain\"\r\n"), None);
        assert_eq!(utf8("a CREATE Ü\r\n".as_bytes()), None);
        assert_eq!(utf8("a CREATE {2+}\r\nÜ\r\n".as_bytes()), None);
    }

    #[test]
    fn utf8_quoted_strings_hostile() {
        for bad in [
            &b"a CREATE \"Entw\xfcrfe\"\r\n"[..],    // Latin-1
            b"a CREATE \"\xc3\"\r\n",                // truncated sequence
            b"a CREATE \"\xed\xa0\x80\"\r\n",        // surrogate
            b"a CREATE \"\xc0\xaf\"\r\n",            // overlong '/'
            b"a CREATE \"\xf4\x90\x80\x80\"\r\n",    // beyond U+10FFFF
            b"a CREATE \"\xc3\xa9\\x\"\r\n",         // unknown escape
            b"a CREATE \"\xc3\xa9\0\"\r\n",          // NUL
            b"a CREATE \"\xc3\xa9\r\n",              // unterminated
            b"a CREATE \"\xc3\xa9\\\r\n",            // escape at the end
            b"a CREATE \"ok\xc3\xa9\" \"\xff\"\r\n", // one good, one bad
        ] {
            assert_eq!(utf8_quoted_as_literals(bad), None, "{bad:?}");
        }
        // A literal whose announcement is broken is copied as text; a count beyond the
        // buffer does not read past it.
        let b = utf8("a X {zz} \"é\" {99999999999999999999}\r\n".as_bytes()).unwrap();
        assert_eq!(b, "a X {zz} {2+}\r\né {99999999999999999999}\r\n");
        let b = utf8("a X \"é\" {999}\r\nshort".as_bytes()).unwrap();
        assert_eq!(b, "a X {2+}\r\né {999}\r\nshort");
        // Many literal-looking openings: each is looked at once (no rescans to a distant `}`).
        let braces = format!(
            "a X {}\"é\" {}}}\r\n",
            "{1".repeat(100_000),
            "{".repeat(100_000)
        );
        let b = utf8_quoted_as_literals(braces.as_bytes()).unwrap();
        assert_eq!(b.len(), braces.len() - 4 + "{2+}\r\né".len());
        // Long strings: linear, and the output grows by the announcements only.
        let long = format!("a CREATE \"{}\"\r\n", "é".repeat(40_000));
        let b = utf8_quoted_as_literals(long.as_bytes()).unwrap();
        assert_eq!(b.len(), long.len() - 2 + "{80000+}\r\n".len());
        let many = format!("a SEARCH{}\r\n", " TEXT \"é\"".repeat(5_000));
        let b = utf8_quoted_as_literals(many.as_bytes()).unwrap();
        assert!(b.len() < 2 * many.len());
        assert!(parses(&b));
    }
}
