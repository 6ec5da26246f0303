//! The per-mailbox index (`ringmail-index`) and Dovecot's `dovecot-uidlist` and
//! `dovecot-keywords`.
//!
//! ```text
//! RINGMAIL-INDEX 1
//! uidvalidity 1732761600
//! uidnext 3
//! highestmodseq 1732761600000123
//! firstrecent 3
//! dirs <new/ mtime ns> <cur/ mtime ns> <scan time ns>
//! keywords $Forwarded Junk
//! m <uid> <modseq> <size> <vsize> <internal date, unix secs> <n|c> <file name>
//! ...
//! end <crc32 of all bytes before this line, 8 hex digits>
//! ```
//!
//! The index is a cache of the directory: the file names carry the flags, and everything
//! else can be recovered (UIDs from `dovecot-uidlist`, which is written alongside). A file
//! that does not parse or whose checksum does not match is ignored and rebuilt.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::StoreError;
use crate::maildir::FileName;

pub(crate) const INDEX_FILE: &str = "ringmail-index";
pub(crate) const LOCK_FILE: &str = "ringmail-index.lock";
pub(crate) const UIDLIST_FILE: &str = "dovecot-uidlist";
pub(crate) const KEYWORDS_FILE: &str = "dovecot-keywords";
const MAGIC: &str = "RINGMAIL-INDEX 1";

/// One message in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub uid: u32,
    pub modseq: u64,
    pub size: u64,
    pub vsize: u64,
    pub date: i64,
    pub in_new: bool,
    /// The current full file name (base and info); shared, so that copies of a state (one
    /// per change under the lock, one per cached version) do not copy the names.
    pub file: Arc<str>,
}

impl Record {
    pub fn name(&self) -> FileName {
        FileName::parse(&self.file).unwrap_or(FileName {
            base: self.file.to_string(),
            info: None,
        })
    }

    pub fn base(&self) -> &str {
        self.file.split(':').next().unwrap_or(&self.file)
    }

    pub fn subdir(&self) -> &'static str {
        if self.in_new { "new" } else { "cur" }
    }
}

/// The state of one mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State {
    pub uidvalidity: u32,
    /// The mailbox GUID of `dovecot-uidlist` (32 hex digits).
    pub guid: String,
    pub uidnext: u32,
    pub highestmodseq: u64,
    pub first_recent: u32,
    pub new_mtime: i128,
    pub cur_mtime: i128,
    pub scanned: i128,
    pub keywords: Vec<String>,
    /// Sorted by UID.
    pub records: Vec<Record>,
}

impl State {
    pub fn new(uidvalidity: u32, guid: String, uidnext: u32, modseq_base: u64) -> State {
        State {
            uidvalidity,
            guid,
            uidnext: uidnext.max(1),
            highestmodseq: modseq_base.max(1),
            first_recent: 1,
            new_mtime: 0,
            cur_mtime: 0,
            scanned: 0,
            keywords: Vec::new(),
            records: Vec::new(),
        }
    }

    pub fn find(&self, uid: u32) -> Option<&Record> {
        self.records
            .binary_search_by_key(&uid, |r| r.uid)
            .ok()
            .map(|i| &self.records[i])
    }

    pub fn find_mut(&mut self, uid: u32) -> Option<&mut Record> {
        self.records
            .binary_search_by_key(&uid, |r| r.uid)
            .ok()
            .map(|i| &mut self.records[i])
    }

    pub fn next_modseq(&mut self) -> u64 {
        self.highestmodseq += 1;
        self.highestmodseq
    }

    /// Allocates the next UID (`UidsExhausted` once UIDNEXT reached u32::MAX).
    pub fn take_uid(&mut self) -> Result<u32, crate::StoreError> {
        let uid = self.uidnext;
        if uid == u32::MAX {
            return Err(crate::StoreError::UidsExhausted);
        }
        self.uidnext += 1;
        Ok(uid)
    }

    /// Appends a message copied or moved here from another mailbox: `from`'s sizes and date
    /// under `uid`, a new MODSEQ, and its file name here (in `cur/`).
    pub fn push_copy(&mut self, uid: u32, from: &Record, file: String) {
        let modseq = self.next_modseq();
        self.records.push(Record {
            uid,
            modseq,
            size: from.size,
            vsize: from.vsize,
            date: from.date,
            in_new: false,
            file: file.into(),
        });
    }

    pub fn encode(&self) -> Vec<u8> {
        // Written on every change (a STORE included): numbers are formatted by hand.
        let mut s: Vec<u8> = Vec::with_capacity(192 + self.records.len() * 112);
        s.extend_from_slice(MAGIC.as_bytes());
        s.extend_from_slice(b"\nuidvalidity ");
        push_num(&mut s, self.uidvalidity.into());
        s.extend_from_slice(b"\nguid ");
        s.extend_from_slice(self.guid.as_bytes());
        s.extend_from_slice(b"\nuidnext ");
        push_num(&mut s, self.uidnext.into());
        s.extend_from_slice(b"\nhighestmodseq ");
        push_num(&mut s, self.highestmodseq.into());
        s.extend_from_slice(b"\nfirstrecent ");
        push_num(&mut s, self.first_recent.into());
        s.extend_from_slice(b"\ndirs ");
        push_num(&mut s, self.new_mtime);
        s.push(b' ');
        push_num(&mut s, self.cur_mtime);
        s.push(b' ');
        push_num(&mut s, self.scanned);
        s.extend_from_slice(b"\nkeywords ");
        s.extend_from_slice(self.keywords.join(" ").as_bytes());
        s.push(b'\n');
        for r in &self.records {
            s.extend_from_slice(b"m ");
            push_u64(&mut s, r.uid.into());
            s.push(b' ');
            push_u64(&mut s, r.modseq);
            s.push(b' ');
            push_u64(&mut s, r.size);
            s.push(b' ');
            push_u64(&mut s, r.vsize);
            s.push(b' ');
            push_num(&mut s, r.date.into());
            s.extend_from_slice(if r.in_new { b" n " } else { b" c " });
            s.extend_from_slice(r.file.as_bytes());
            s.push(b'\n');
        }
        let crc = crc32fast::hash(&s);
        let _ = writeln!(s, "end {crc:08x}");
        s
    }

    /// Parses an index file; `None` if it is damaged in any way.
    pub fn decode(bytes: &[u8]) -> Option<State> {
        let text = std::str::from_utf8(bytes).ok()?;
        let body_end = text.strip_suffix('\n')?.rfind('\n')? + 1;
        let (body, trailer) = text.split_at(body_end);
        let crc = u32::from_str_radix(trailer.strip_prefix("end ")?.trim_end(), 16).ok()?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return None;
        }
        let mut lines = body.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut field = |key: &str| -> Option<String> {
            Some(
                lines
                    .next()?
                    .strip_prefix(key)?
                    .strip_prefix(' ')?
                    .to_owned(),
            )
        };
        let uidvalidity = field("uidvalidity")?.parse().ok()?;
        let guid = field("guid")?;
        let uidnext = field("uidnext")?.parse().ok()?;
        let highestmodseq = field("highestmodseq")?.parse().ok()?;
        let first_recent = field("firstrecent")?.parse().ok()?;
        let dirs = field("dirs")?;
        let mut d = dirs.split(' ').map(|x| x.parse::<i128>());
        let (new_mtime, cur_mtime, scanned) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
        let keywords = field("keywords")?
            .split(' ')
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        let mut records: Vec<Record> = Vec::new();
        for line in lines {
            let mut p = line.strip_prefix("m ")?.splitn(7, ' ');
            let r = Record {
                uid: p.next()?.parse().ok()?,
                modseq: p.next()?.parse().ok()?,
                size: p.next()?.parse().ok()?,
                vsize: p.next()?.parse().ok()?,
                date: p.next()?.parse().ok()?,
                in_new: match p.next()? {
                    "n" => true,
                    "c" => false,
                    _ => return None,
                },
                file: p.next()?.into(),
            };
            if r.uid == 0 || r.uid >= uidnext || records.last().is_some_and(|l| l.uid >= r.uid) {
                return None;
            }
            records.push(r);
        }
        Some(State {
            uidvalidity,
            guid,
            uidnext,
            highestmodseq,
            first_recent,
            new_mtime,
            cur_mtime,
            scanned,
            keywords,
            records,
        })
    }

    /// `dovecot-uidlist` version 3: `3 V<uidvalidity> N<uidnext> G<guid>` then
    /// `<uid> :<base name>` per message.
    pub fn encode_uidlist(&self) -> Vec<u8> {
        let mut s =
            format!("3 V{} N{} G{}\n", self.uidvalidity, self.uidnext, self.guid).into_bytes();
        s.reserve(self.records.len() * 72);
        for r in &self.records {
            push_u64(&mut s, r.uid.into());
            s.extend_from_slice(b" :");
            s.extend_from_slice(r.base().as_bytes());
            s.push(b'\n');
        }
        s
    }
}

/// Appends the decimal form of `n`.
fn push_num(out: &mut Vec<u8>, n: i128) {
    if n < 0 {
        out.push(b'-');
    }
    let v = n.unsigned_abs();
    match u64::try_from(v) {
        Ok(v) => push_u64(out, v),
        Err(_) => out.extend_from_slice(v.to_string().as_bytes()),
    }
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// What `dovecot-uidlist` tells: UIDVALIDITY, next UID, mailbox GUID and UID per base name.
#[derive(Debug, Default)]
pub(crate) struct UidList {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub guid: Option<String>,
    pub uids: HashMap<String, u32>,
}

/// Parses `dovecot-uidlist` (versions 1 and 3). `None` if damaged or unknown.
pub(crate) fn parse_uidlist(bytes: &[u8]) -> Option<UidList> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    let header = lines.next()?;
    let mut words = header.split(' ');
    let version = words.next()?;
    let mut out = UidList::default();
    match version {
        "1" => {
            out.uidvalidity = words.next()?.parse().ok()?;
            out.uidnext = words.next()?.parse().ok()?;
        }
        "3" => {
            for w in words {
                let (k, v) = w.split_at_checked(1)?;
                match k {
                    "V" => out.uidvalidity = v.parse().ok()?,
                    "N" => out.uidnext = v.parse().ok()?,
                    "G" => out.guid = Some(v.to_owned()),
                    _ => {}
                }
            }
        }
        _ => return None,
    }
    if out.uidvalidity == 0 {
        return None;
    }
    let mut last = 0;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (uid, rest) = line.split_once(' ')?;
        let uid: u32 = uid.parse().ok()?;
        // v3: optional extension fields, then ":<file name>"; v1: the file name directly.
        let file = if version == "3" {
            let at = rest.find(':')?;
            if at > 0 && !rest[..at].ends_with(' ') {
                return None;
            }
            &rest[at + 1..]
        } else {
            rest
        };
        if uid <= last {
            return None;
        }
        last = uid;
        let base = file.split(':').next()?;
        out.uids.insert(base.to_owned(), uid);
    }
    out.uidnext = out.uidnext.max(last.saturating_add(1));
    Some(out)
}

/// Parses `dovecot-keywords` (`<index> <name>` lines) into a letter-indexed list; gaps are
/// empty strings.
pub(crate) fn parse_keywords(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some((i, name)) = line.split_once(' ') else {
            continue;
        };
        let Ok(i) = i.parse::<usize>() else { continue };
        if i >= 26 || !crate::maildir::valid_keyword(name) {
            continue;
        }
        if out.len() <= i {
            out.resize(i + 1, String::new());
        }
        out[i] = name.to_owned();
    }
    out
}

pub(crate) fn encode_keywords(keywords: &[String]) -> Vec<u8> {
    let mut s = String::new();
    for (i, k) in keywords.iter().enumerate() {
        if !k.is_empty() {
            let _ = writeln!(s, "{i} {k}");
        }
    }
    s.into_bytes()
}

/// Reads a whole file; `Ok(None)` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path, e)),
    }
}

/// Writes `tmp` fully and fsyncs it (the first half of an atomic replace).
pub(crate) fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .mode(0o600)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|e| StoreError::io("create", tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| StoreError::io("write", tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io("fsync", tmp, e))
}

pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(|e| StoreError::io("rename", from, e))
}

/// Atomically replaces `dir/name` with `bytes`: tmp file, fsync, rename, fsync of `dir`.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    write_synced(&tmp, bytes)?;
    rename(&tmp, &dir.join(name))?;
    fsync_dir(dir)
}

pub(crate) fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", path, e))
}

/// An exclusive flock(2) on `path` (created if needed), released on drop. flock locks belong
/// to the open file description, so this excludes other threads of this process as well as
/// other processes.
pub(crate) struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock, StoreError> {
        let f = OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open", path, e))?;
        f.lock().map_err(|e| StoreError::io("lock", path, e))?;
        Ok(FileLock(f))
    }
}

/// Reads an open file to its end.
pub(crate) fn read_all(mut f: &File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(|e| StoreError::io("read", path, e))?;
    Ok(v)
}

/// Creates a directory (mode 0700: mail is private) if it is missing, and fsyncs its parent
/// when it did, so the new entry survives a power loss. Returns whether it was created.
pub(crate) fn ensure_dir(path: &Path) -> Result<bool, StoreError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            if let Some(parent) = path.parent() {
                fsync_dir(parent)?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StoreError::io("create directory", path, e)),
    }
}
