//! Extension syntax that imap-codec 1.0 does not parse.
//!
//! imap-codec 1.0 knows RFC 3501 plus IDLE, ENABLE, MOVE, UNSELECT, LITERAL+ and a few
//! more, but not NAMESPACE, ID, UID EXPUNGE, the CONDSTORE modifiers, ESEARCH `RETURN`,
//! STATUS `SIZE` or the LIST-EXTENDED options. When imap-codec rejects a command, [`recognise`] tokenises it
//! (atoms, quoted strings, parentheses and literals, no grammar) and either names one of the
//! argument-free commands, or cuts the extension parts out and returns the remaining base
//! command for imap-codec to parse again, with what was cut out as [`Extras`]. Everything that
//! stays is therefore still parsed by imap-codec.

use std::ops::Range;

use imap_codec::imap_types::sequence::SequenceSet;

/// What the extension shim made of a command imap-codec rejected.
#[derive(Debug)]
pub(crate) enum Recognised {
    Namespace,
    Id,
    UidExpunge(SequenceSet),
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

/// Extension parts cut out of a command.
#[derive(Debug, Default)]
pub(crate) struct Extras {
    /// `SELECT/EXAMINE mbox (CONDSTORE)`.
    pub condstore_select: bool,
    /// `MODSEQ` among FETCH items.
    pub fetch_modseq: bool,
    /// FETCH `(CHANGEDSINCE n)`.
    pub changed_since: Option<u64>,
    /// STORE `(UNCHANGEDSINCE n)`.
    pub unchanged_since: Option<u64>,
    /// SEARCH `RETURN (...)`.
    pub search_return: Option<SearchReturn>,
    /// SEARCH used the `MODSEQ` key (rewritten to a [`MODSEQ_HEADER`] HEADER key).
    pub search_modseq: bool,
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Atom,
    Quoted,
    Open,
    Close,
    Literal,
}

fn tokenise(buf: &[u8]) -> Option<Vec<(Tok, Range<usize>)>> {
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
    Some(out)
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

    /// Cuts tokens `from..=to` together with the space before them.
    fn cut(&mut self, from: usize, to: usize, with: &'static [u8]) {
        let mut start = self.toks[from].1.start;
        if start > 0 && self.buf[start - 1] == b' ' {
            start -= 1;
        }
        self.cuts.push((start..self.toks[to].1.end, with));
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
        let mut out = Vec::with_capacity(self.buf.len());
        let mut pos = 0;
        for (r, with) in &self.cuts {
            if r.start < pos {
                continue;
            }
            out.extend_from_slice(&self.buf[pos..r.start]);
            out.extend_from_slice(with);
            pos = r.end;
        }
        out.extend_from_slice(&self.buf[pos..]);
        out
    }
}

/// Recognises extension syntax in a command imap-codec rejected (see the module docs).
pub(crate) fn recognise(buf: &[u8]) -> Option<Recognised> {
    let toks = tokenise(buf)?;
    let mut c = Cmd {
        buf,
        toks,
        cuts: Vec::new(),
    };
    let mut ex = Extras::default();
    let uid = c.is(1, "UID");
    let at = if uid { 2 } else { 1 };
    let name = c.text(at)?.to_ascii_uppercase();
    match name.as_str() {
        "NAMESPACE" if !uid && c.toks.len() == 2 => return Some(Recognised::Namespace),
        "ID" if !uid => return Some(Recognised::Id),
        "EXPUNGE" if uid && c.toks.len() == 4 => {
            let set = SequenceSet::try_from(c.text(3)?).ok()?;
            return Some(Recognised::UidExpunge(set));
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
                        _ => {}
                    }
                    if depth == 0 {
                        kept += 1;
                    }
                }
                if kept == 0 && ex.fetch_modseq {
                    c.cuts.clear();
                    c.cuts
                        .push((c.toks[list].1.start..c.toks[close].1.end, b"(UID)"));
                }
                parse_changedsince(&mut c, close + 1, &mut ex)?;
            } else if c.is(list, "MODSEQ") {
                ex.fetch_modseq = true;
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
            } else {
                return None;
            }
        }
        "SEARCH" => {
            let mut j = at + 1;
            if c.is(j, "RETURN") && c.kind(j + 1) == Some(&Tok::Open) {
                let close = c.group_end(j + 1)?;
                let mut r = SearchReturn::default();
                for opt in c.atoms_in(j + 1, close) {
                    match opt.as_str() {
                        "MIN" => r.min = true,
                        "MAX" => r.max = true,
                        "ALL" => r.all = true,
                        "COUNT" => r.count = true,
                        "SAVE" => return None,
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
            while j < c.toks.len() {
                if c.is(j, "MODSEQ") {
                    // MODSEQ [<entry-name> <entry-type-req>] <mod-sequence-valzer>
                    let mut k = j + 1;
                    if c.kind(k) == Some(&Tok::Quoted) {
                        k += 2;
                    }
                    let n: u64 = c.text(k)?.parse().ok()?;
                    let _ = n;
                    ex.search_modseq = true;
                    let start = c.toks[j].1.start;
                    let num = c.toks[k].1.clone();
                    c.cuts
                        .push((start..num.start, b"HEADER X-Ringmail-Search-Modseq "));
                    j = k + 1;
                } else {
                    j += 1;
                }
            }
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
        let (b, _) = rw("a UID FETCH 1 (MODSEQ)\r\n");
        assert_eq!(b, "a UID FETCH 1 (UID)\r\n");
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
        assert!(recognise(b"a {99999999999}\r\n").is_none());
    }
}
