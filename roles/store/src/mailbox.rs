//! [`Mailbox`]: one session's view of a mailbox.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::StoreError;
use crate::index::{self, Record, State};
use crate::maildir::{self, Flag};
use crate::names::MailboxName;
use crate::store::{ChangeSignal, UserStore, add_message, assign_keywords, info_for};
use crate::sync::{MboxDir, SyncMode, not_found};

/// A message as a session sees it. The sequence number is its index in
/// [`Mailbox::messages`] plus one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// The UID.
    pub uid: u32,
    /// System flags and keywords, sorted.
    pub flags: Vec<Flag>,
    /// The MODSEQ of the last change (CONDSTORE).
    pub modseq: u64,
    /// Size in bytes as stored (RFC822.SIZE is `vsize`).
    pub size: u64,
    /// Size with CRLF line ends.
    pub vsize: u64,
    /// INTERNALDATE (the file's mtime).
    pub internal_date: SystemTime,
    /// `\Recent` in this session.
    pub recent: bool,
}

/// A message that left the mailbox; `seq` is valid if the EXPUNGE responses are sent in the
/// order given (descending sequence numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expunged {
    /// Sequence number in the view just before this expunge.
    pub seq: u32,
    /// The UID.
    pub uid: u32,
}

/// What [`Mailbox::refresh`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The mailbox was rebuilt with a new UIDVALIDITY: the session must be closed
    /// (`* BYE` / `* NO [UIDVALIDITY]`); the view now shows the new state.
    pub uidvalidity_changed: bool,
    /// Messages gone, in the order to report them.
    pub expunged: Vec<Expunged>,
    /// UIDs of new messages (`* n EXISTS` with the new count).
    pub new: Vec<u32>,
    /// UIDs whose flags changed (`* n FETCH (FLAGS ...)`).
    pub flags: Vec<u32>,
}

impl Changes {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.uidvalidity_changed
            && self.expunged.is_empty()
            && self.new.is_empty()
            && self.flags.is_empty()
    }
}

/// How [`Mailbox::store_flags`] combines the given flags with the current ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    /// `+FLAGS`
    Add,
    /// `-FLAGS`
    Remove,
    /// `FLAGS`
    Replace,
}

/// The outcome of [`Mailbox::store_flags`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagUpdate {
    /// Every message acted on: UID, its flags now, its MODSEQ now.
    pub updated: Vec<(u32, Vec<Flag>, u64)>,
    /// UIDs left alone because their MODSEQ was above `unchanged_since`
    /// (`[MODIFIED ...]`).
    pub modified: Vec<u32>,
}

/// The outcome of [`Mailbox::copy`] and [`Mailbox::move_to`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// UIDVALIDITY of the destination (`[COPYUID v ...]`).
    pub uidvalidity: u32,
    /// (source UID, destination UID) pairs, in source UID order.
    pub uids: Vec<(u32, u32)>,
    /// For a move: the source messages removed, in the order to report them.
    pub expunged: Vec<Expunged>,
}

/// A session's view of one mailbox: a snapshot that changes only through this session's own
/// operations and [`Mailbox::refresh`].
pub struct Mailbox {
    user: UserStore,
    m: MboxDir,
    uidvalidity: u32,
    uidnext: u32,
    highestmodseq: u64,
    messages: Vec<MessageMeta>,
    recent: HashSet<u32>,
    /// The index version this view was built from (held open so its inode is not reused).
    index_file: Option<File>,
    index_state: Option<State>,
    signal: ChangeSignal,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("name", &self.m.name)
            .field("uidvalidity", &self.uidvalidity)
            .field("messages", &self.messages.len())
            .finish()
    }
}

fn meta(r: &Record, keywords: &[String], recent: bool) -> MessageMeta {
    MessageMeta {
        uid: r.uid,
        flags: r.name().flags(keywords),
        modseq: r.modseq,
        size: r.size,
        vsize: r.vsize,
        internal_date: UNIX_EPOCH + Duration::from_secs(r.date.max(0) as u64),
        recent,
    }
}

impl Mailbox {
    pub(crate) fn open(user: UserStore, m: MboxDir) -> Result<Mailbox, StoreError> {
        let signal = user.ctx.signals.get(&m.dir);
        m.clean_tmp()?;
        let (st, file) = m.snapshot(true)?;
        let mut mb = Mailbox {
            user,
            uidvalidity: st.uidvalidity,
            uidnext: 1,
            highestmodseq: 0,
            messages: Vec::new(),
            recent: HashSet::new(),
            index_file: None,
            index_state: None,
            signal,
            m,
        };
        mb.claim_recent(&st)?;
        mb.messages = st
            .records
            .iter()
            .map(|r| meta(r, &st.keywords, mb.recent.contains(&r.uid)))
            .collect();
        mb.uidnext = st.uidnext;
        mb.highestmodseq = st.highestmodseq;
        mb.index_file = file;
        mb.index_state = Some(st);
        Ok(mb)
    }

    /// Claims the messages no session has seen yet as `\Recent` for this view.
    fn claim_recent(&mut self, st: &State) -> Result<(), StoreError> {
        if !st.records.iter().any(|r| r.uid >= st.first_recent) {
            return Ok(());
        }
        let _lock = self.m.lock()?;
        let mut fresh = self.m.locked_state(SyncMode::LoadOnly)?;
        let first = fresh.first_recent;
        for r in &st.records {
            if r.uid >= first {
                self.recent.insert(r.uid);
            }
        }
        let upto = st.records.last().map_or(first, |r| r.uid + 1);
        if upto > fresh.first_recent {
            fresh.first_recent = upto;
            self.m.commit(&fresh, false)?;
        }
        Ok(())
    }

    /// The mailbox name.
    pub fn name(&self) -> &MailboxName {
        &self.m.name
    }

    /// UIDVALIDITY.
    pub fn uidvalidity(&self) -> u32 {
        self.uidvalidity
    }

    /// UIDNEXT as of the last snapshot.
    pub fn uidnext(&self) -> u32 {
        self.uidnext
    }

    /// HIGHESTMODSEQ as of the last snapshot.
    pub fn highestmodseq(&self) -> u64 {
        self.highestmodseq
    }

    /// The messages; sequence number = index + 1.
    pub fn messages(&self) -> &[MessageMeta] {
        &self.messages
    }

    /// The sequence number of a UID in this view.
    pub fn seq_of(&self, uid: u32) -> Option<u32> {
        self.messages
            .binary_search_by_key(&uid, |m| m.uid)
            .ok()
            .map(|i| i as u32 + 1)
    }

    /// The change signal for IDLE (see [`ChangeSignal`]).
    pub fn signal(&self) -> ChangeSignal {
        self.signal.clone()
    }

    /// True if neither the index file nor the directories changed since the snapshot.
    fn unchanged(&self) -> Result<bool, StoreError> {
        let (Some(f), Some(st)) = (&self.index_file, &self.index_state) else {
            return Ok(false);
        };
        let held = f
            .metadata()
            .map_err(|e| StoreError::io("stat", self.m.index_path(), e))?;
        let now = match fs::metadata(self.m.index_path()) {
            Ok(m) => m,
            Err(e) if not_found(&e) => return Ok(false),
            Err(e) => return Err(StoreError::io("stat", self.m.index_path(), e)),
        };
        Ok(held.ino() == now.ino() && held.dev() == now.dev() && self.m.is_fresh(st)?)
    }

    /// Picks up changes by other sessions and processes. Cheap when nothing changed (three
    /// stats); otherwise reads the index, rescanning the directories if their mtimes moved.
    pub fn refresh(&mut self) -> Result<Changes, StoreError> {
        if self.unchanged()? {
            return Ok(Changes::default());
        }
        if !self.m.exists() {
            return Err(StoreError::NoSuchMailbox(self.m.name.to_string()));
        }
        let (st, file) = self.m.snapshot(false)?;
        let mut changes = Changes::default();
        if st.uidvalidity != self.uidvalidity {
            changes.uidvalidity_changed = true;
            self.uidvalidity = st.uidvalidity;
            self.recent.clear();
            self.messages.clear();
        }
        self.claim_recent(&st)?;
        let old: HashMap<u32, (usize, u64)> = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.uid, (i, m.modseq)))
            .collect();
        let present: HashSet<u32> = st.records.iter().map(|r| r.uid).collect();
        for (i, m) in self.messages.iter().enumerate().rev() {
            if !present.contains(&m.uid) {
                changes.expunged.push(Expunged {
                    seq: i as u32 + 1,
                    uid: m.uid,
                });
                self.recent.remove(&m.uid);
            }
        }
        for r in &st.records {
            match old.get(&r.uid) {
                None => changes.new.push(r.uid),
                Some((_, modseq)) if *modseq != r.modseq => changes.flags.push(r.uid),
                Some(_) => {}
            }
        }
        // Messages the view never saw and that are already gone are simply not reported.
        self.messages = st
            .records
            .iter()
            .map(|r| meta(r, &st.keywords, self.recent.contains(&r.uid)))
            .collect();
        self.uidnext = st.uidnext;
        self.highestmodseq = st.highestmodseq;
        self.index_file = file;
        self.index_state = Some(st);
        Ok(changes)
    }

    /// The whole message as stored.
    pub fn read(&self, uid: u32) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(uid)?;
        fs::read(&path).map_err(|e| {
            if not_found(&e) {
                StoreError::NoSuchMessage(uid)
            } else {
                StoreError::io("read", path, e)
            }
        })
    }

    /// The current path of a message of this view, following renames by others.
    pub fn path_of(&self, uid: u32) -> Result<PathBuf, StoreError> {
        if self.seq_of(uid).is_none() {
            return Err(StoreError::NoSuchMessage(uid));
        }
        if let Some(st) = &self.index_state
            && let Some(r) = st.find(uid)
        {
            let p = self.m.sub(r.subdir()).join(&r.file);
            if p.exists() {
                return Ok(p);
            }
        }
        let _lock = self.m.lock()?;
        let mut st = self.m.locked_state(SyncMode::LoadOnly)?;
        self.m
            .resolve(&mut st, uid)?
            .ok_or(StoreError::NoSuchMessage(uid))
    }

    /// STORE: changes flags by renaming the files (`:2,` info); each changed message gets a
    /// new MODSEQ. With `unchanged_since` (CONDSTORE), messages whose MODSEQ is higher are
    /// left alone and listed in [`FlagUpdate::modified`]. UIDs not in the view are ignored.
    pub fn store_flags(
        &mut self,
        uids: &[u32],
        op: FlagOp,
        flags: &[Flag],
        unchanged_since: Option<u64>,
    ) -> Result<FlagUpdate, StoreError> {
        let _lock = self.m.lock()?;
        let mut st = self.m.locked_state(SyncMode::LoadOnly)?;
        let kw_changed = assign_keywords(&mut st.keywords, flags)?;
        let mut out = FlagUpdate::default();
        let mut wanted: Vec<u32> = uids
            .iter()
            .copied()
            .filter(|u| self.seq_of(*u).is_some())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut changed = kw_changed;
        for uid in wanted {
            let Some(path) = self.m.resolve(&mut st, uid)? else {
                continue;
            };
            let r = st.find(uid).expect("resolved");
            if unchanged_since.is_some_and(|us| r.modseq > us) {
                out.modified.push(uid);
                continue;
            }
            let name = r.name();
            let current = name.flags(&st.keywords);
            let mut next: Vec<Flag> = match op {
                FlagOp::Replace => flags.to_vec(),
                FlagOp::Add => current.iter().chain(flags).cloned().collect(),
                FlagOp::Remove => current
                    .iter()
                    .filter(|f| !flags.contains(f))
                    .cloned()
                    .collect(),
            };
            next.sort();
            next.dedup();
            if next == current {
                out.updated.push((uid, current, r.modseq));
                continue;
            }
            let foreign = maildir::foreign_letters(name.info.as_deref().unwrap_or(""));
            let new_name = maildir::FileName {
                base: name.base.clone(),
                info: Some(info_for(&next, &st.keywords, &foreign)),
            }
            .to_name();
            let dest = self.m.sub("cur").join(&new_name);
            match fs::rename(&path, &dest) {
                Ok(()) => {}
                Err(e) if not_found(&e) => continue, // expunged meanwhile
                Err(e) => return Err(StoreError::io("rename", path, e)),
            }
            let modseq = st.next_modseq();
            let r = st.find_mut(uid).expect("resolved");
            r.file = new_name;
            r.in_new = false;
            r.modseq = modseq;
            out.updated.push((uid, next, modseq));
            changed = true;
        }
        if kw_changed {
            self.m.commit(&st, true)?;
        } else if changed {
            self.m.commit_flags(&st)?;
        }
        for (uid, f, modseq) in &out.updated {
            if let Some(i) = self.seq_of(*uid) {
                let m = &mut self.messages[i as usize - 1];
                m.flags = f.clone();
                m.modseq = *modseq;
            }
        }
        self.highestmodseq = self.highestmodseq.max(st.highestmodseq);
        Ok(out)
    }

    /// APPEND into this mailbox (durable before `Ok`, quota checked). The view does not show
    /// the new message until [`Mailbox::refresh`].
    pub fn append(
        &self,
        message: &[u8],
        flags: &[Flag],
        internal_date: Option<SystemTime>,
    ) -> Result<u32, StoreError> {
        self.user.check_quota(message.len() as u64, 1)?;
        let mut r = message;
        add_message(&self.m, &mut r, flags, internal_date, None).map(|(_, uid)| uid)
    }

    /// COPY to `dest` (which must exist: [`StoreError::NoSuchMailbox`] means `[TRYCREATE]`).
    /// Files are hard-linked into the destination's `tmp/` (copied if linking fails), then
    /// renamed into its `cur/` under its lock. UIDs not in the view are skipped.
    pub fn copy(&mut self, uids: &[u32], dest: &str) -> Result<Copied, StoreError> {
        let dest_name = MailboxName::parse(dest)?;
        let dm = self.user.ctx.mbox(dest_name);
        if !dm.exists() {
            return Err(StoreError::NoSuchMailbox(dm.name.to_string()));
        }
        let mut wanted: Vec<u32> = uids
            .iter()
            .copied()
            .filter(|u| self.seq_of(*u).is_some())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        // Source files and flags, under the source lock.
        let mut sources: Vec<(u32, PathBuf, Vec<Flag>, Record)> = Vec::new();
        {
            let _lock = self.m.lock()?;
            let mut st = self.m.locked_state(SyncMode::LoadOnly)?;
            for uid in wanted {
                if let Some(p) = self.m.resolve(&mut st, uid)? {
                    let r = st.find(uid).expect("resolved").clone();
                    sources.push((uid, p, r.name().flags(&st.keywords), r));
                }
            }
        }
        let bytes: u64 = sources.iter().map(|s| s.3.size).sum();
        self.user.check_quota(bytes, sources.len() as u64)?;
        // Stage in dest tmp/ without any lock.
        let mut staged: Vec<(u32, PathBuf, String, Vec<Flag>, Record)> = Vec::new();
        let cleanup = |staged: &[(u32, PathBuf, String, Vec<Flag>, Record)]| {
            for s in staged {
                let _ = fs::remove_file(&s.1);
            }
        };
        for (uid, src, flags, r) in sources {
            let base = maildir::new_base(&dm.user.host, r.size, r.vsize);
            let tmp = dm.sub("tmp").join(&base);
            match self.stage(&src, &tmp, uid) {
                Ok(true) => staged.push((uid, tmp, base, flags, r)),
                Ok(false) => {} // expunged meanwhile
                Err(e) => {
                    cleanup(&staged);
                    return Err(e);
                }
            }
        }
        let result = (|| {
            let _lock = dm.lock()?;
            let mut st = dm.locked_state(SyncMode::LoadOnly)?;
            let all: Vec<Flag> = staged.iter().flat_map(|s| s.3.clone()).collect();
            let kw_changed = assign_keywords(&mut st.keywords, &all)?;
            let mut map = Vec::new();
            for (src_uid, tmp, base, flags, r) in &staged {
                let file = format!("{base}:2,{}", info_for(flags, &st.keywords, ""));
                index::rename(tmp, &dm.sub("cur").join(&file))?;
                let uid = st.uidnext;
                if uid == u32::MAX {
                    return Err(StoreError::UidsExhausted);
                }
                st.uidnext += 1;
                let modseq = st.next_modseq();
                st.records.push(Record {
                    uid,
                    modseq,
                    size: r.size,
                    vsize: r.vsize,
                    date: r.date,
                    in_new: false,
                    file,
                });
                map.push((*src_uid, uid));
            }
            index::fsync_dir(&dm.sub("cur"))?;
            dm.commit(&st, kw_changed)?;
            Ok(Copied {
                uidvalidity: st.uidvalidity,
                uids: map,
                expunged: Vec::new(),
            })
        })();
        if result.is_err() {
            cleanup(&staged);
        }
        result
    }

    /// Links (or copies) `src` to `tmp`; false if the source is gone.
    fn stage(&self, src: &Path, tmp: &Path, uid: u32) -> Result<bool, StoreError> {
        let mut src = src.to_path_buf();
        for attempt in 0..2 {
            match fs::hard_link(&src, tmp) {
                Ok(()) => return Ok(true),
                Err(e) if not_found(&e) && attempt == 0 => {
                    let _lock = self.m.lock()?;
                    let mut st = self.m.locked_state(SyncMode::LoadOnly)?;
                    match self.m.resolve(&mut st, uid)? {
                        Some(p) => src = p,
                        None => return Ok(false),
                    }
                }
                Err(e) if not_found(&e) => return Ok(false),
                Err(_) => return copy_file(&src, tmp).map(|()| true),
            }
        }
        Ok(false)
    }

    /// MOVE: [`Mailbox::copy`], then the source messages are removed (a crash in between
    /// leaves a copy in both, never in neither).
    pub fn move_to(&mut self, uids: &[u32], dest: &str) -> Result<Copied, StoreError> {
        let mut copied = self.copy(uids, dest)?;
        let moved: Vec<u32> = copied.uids.iter().map(|(s, _)| *s).collect();
        copied.expunged = self.remove(&moved, false)?;
        Ok(copied)
    }

    /// EXPUNGE: removes the messages of this view flagged `\Deleted` (only those in `uids`
    /// for UID EXPUNGE). Returns them in the order to report.
    pub fn expunge(&mut self, uids: Option<&[u32]>) -> Result<Vec<Expunged>, StoreError> {
        let candidates: Vec<u32> = self
            .messages
            .iter()
            .map(|m| m.uid)
            .filter(|u| uids.is_none_or(|l| l.contains(u)))
            .collect();
        self.remove(&candidates, true)
    }

    fn remove(&mut self, uids: &[u32], only_deleted: bool) -> Result<Vec<Expunged>, StoreError> {
        let _lock = self.m.lock()?;
        let mut st = self.m.locked_state(SyncMode::LoadOnly)?;
        let mut gone: HashSet<u32> = HashSet::new();
        for &uid in uids {
            let Some(path) = self.m.resolve(&mut st, uid)? else {
                continue;
            };
            let r = st.find(uid).expect("resolved");
            if only_deleted && !r.name().info.unwrap_or_default().contains('T') {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(StoreError::io("unlink", path, e)),
            }
            gone.insert(uid);
        }
        if !gone.is_empty() {
            index::fsync_dir(&self.m.sub("cur"))?;
            st.records.retain(|r| !gone.contains(&r.uid));
            st.next_modseq();
            self.m.commit(&st, false)?;
        }
        let mut out = Vec::new();
        for (i, m) in self.messages.iter().enumerate().rev() {
            if gone.contains(&m.uid) {
                out.push(Expunged {
                    seq: i as u32 + 1,
                    uid: m.uid,
                });
            }
        }
        self.messages.retain(|m| !gone.contains(&m.uid));
        for u in &gone {
            self.recent.remove(u);
        }
        self.highestmodseq = self.highestmodseq.max(st.highestmodseq);
        Ok(out)
    }
}

fn copy_file(src: &Path, dst: &Path) -> Result<(), StoreError> {
    let mut from = File::open(src).map_err(|e| StoreError::io("open", src, e))?;
    let mtime = from
        .metadata()
        .and_then(|m| m.modified())
        .map_err(|e| StoreError::io("stat", src, e))?;
    let mut to = OpenOptions::new()
        .mode(0o600)
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| StoreError::io("create", dst, e))?;
    io::copy(&mut from, &mut to).map_err(|e| StoreError::io("copy", dst, e))?;
    to.set_modified(mtime)
        .map_err(|e| StoreError::io("set mtime", dst, e))?;
    to.sync_all().map_err(|e| StoreError::io("fsync", dst, e))
}
