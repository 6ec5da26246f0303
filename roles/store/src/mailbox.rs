//! [`Mailbox`]: one session's view of a mailbox.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::StoreError;
use crate::index::{self, Record, State};
use crate::maildir::{self, Flag};
use crate::names::MailboxName;
use crate::shared::SharedIndex;
use crate::store::{ChangeSignal, UserStore, add_message, assign_keywords, info_for};
use crate::sync::{MboxDir, SyncMode, not_found};
use crate::uids::UidList;

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
    /// The last metadata of the messages in `expunged` (an IMAP session that may not
    /// announce an expunge yet still shows the message).
    pub gone: Vec<MessageMeta>,
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
///
/// The view itself is compact: the UIDs in sequence order, the \Recent UIDs and a few
/// counters. Message metadata comes from an index version shared with every other view of
/// the mailbox in this process (see `shared.rs`); a refresh compares the view with the
/// current version in one pass over both, without reading the index file when the change
/// was made in this process.
pub struct Mailbox {
    user: UserStore,
    m: MboxDir,
    /// Keeps the mailbox's shared index alive while the view is open.
    shared: Arc<SharedIndex>,
    uidvalidity: u32,
    uidnext: u32,
    highestmodseq: u64,
    /// The view: UIDs in ascending order, as runs; sequence number = index + 1.
    uids: UidList,
    /// Metadata for the view: the index version of the last refresh, or a later one taken
    /// in after an own change (shared when possible). Holds a record for every UID of
    /// `uids`, and possibly changes the view has not been told about yet.
    pub(crate) st: Arc<State>,
    /// Flag changes with a MODSEQ above this are reported by the next refresh.
    seen_modseq: u64,
    /// This view's own flag changes since the last refresh (UID, MODSEQ): not reported again.
    own: Vec<(u32, u64)>,
    /// `st` was taken in by an own operation and may hold changes not reported yet.
    unreported: bool,
    /// `\Recent` UIDs of this view, sorted.
    recent: Vec<u32>,
    signal: ChangeSignal,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("name", &self.m.name)
            .field("uidvalidity", &self.uidvalidity)
            .field("messages", &self.uids.len())
            .finish()
    }
}

fn meta(r: &Record, keywords: &[String], recent: bool) -> MessageMeta {
    MessageMeta {
        uid: r.uid,
        flags: maildir::flags_of_letters(maildir::info_letters(&r.file), keywords),
        modseq: r.modseq,
        size: r.size,
        vsize: r.vsize,
        internal_date: UNIX_EPOCH + Duration::from_secs(r.date.max(0) as u64),
        recent,
    }
}

/// True if the records of `st` are exactly the messages `uids`.
fn same_uids(st: &State, uids: &UidList) -> bool {
    st.records.len() == uids.len() && st.records.iter().zip(uids.iter()).all(|(r, u)| r.uid == u)
}

impl Mailbox {
    pub(crate) fn open(user: UserStore, m: MboxDir) -> Result<Mailbox, StoreError> {
        let signal = user.ctx.signals.get(&m.dir);
        let shared = user.ctx.indexes.get(&m.dir);
        m.clean_tmp()?;
        let st = m.snapshot(true)?;
        let mut mb = Mailbox {
            user,
            shared,
            uidvalidity: st.uidvalidity,
            uidnext: st.uidnext,
            highestmodseq: st.highestmodseq,
            uids: UidList::from_sorted(st.records.iter().map(|r| r.uid)),
            seen_modseq: st.highestmodseq,
            own: Vec::new(),
            unreported: false,
            recent: Vec::new(),
            st: st.clone(),
            signal,
            m,
        };
        mb.claim_recent(&st)?;
        Ok(mb)
    }

    /// Claims the messages no session has seen yet as `\Recent` for this view.
    fn claim_recent(&mut self, st: &State) -> Result<(), StoreError> {
        if st.records.last().is_none_or(|r| r.uid < st.first_recent) {
            return Ok(());
        }
        let _lock = self.m.lock()?;
        let mut fresh = self.m.locked_state(SyncMode::LoadOnly)?;
        let first = fresh.first_recent;
        let before = self.recent.len();
        self.recent
            .extend(st.records.iter().map(|r| r.uid).filter(|u| *u >= first));
        if self.recent.len() > before {
            self.recent.sort_unstable();
            self.recent.dedup();
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

    /// The keywords defined in the mailbox (its `dovecot-keywords` table, which keeps a
    /// keyword once it was used), in table order.
    pub fn keywords(&self) -> Vec<String> {
        self.st
            .keywords
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect()
    }

    /// The number of messages in the view.
    pub fn len(&self) -> usize {
        self.uids.len()
    }

    /// True if the view has no messages.
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty()
    }

    /// The UIDs of the view in ascending order; sequence number = index + 1.
    pub fn uids(&self) -> impl Iterator<Item = u32> + '_ {
        self.uids.iter()
    }

    /// The messages, built from the shared index (one allocation per message: prefer
    /// [`Mailbox::uids`] and [`Mailbox::meta`]); sequence number = index + 1.
    pub fn messages(&self) -> Vec<MessageMeta> {
        self.uids.iter().filter_map(|u| self.meta(u)).collect()
    }

    /// One message of the view.
    pub fn meta(&self, uid: u32) -> Option<MessageMeta> {
        self.seq_of(uid)?;
        let r = self.st.find(uid)?;
        Some(meta(
            r,
            &self.st.keywords,
            self.recent.binary_search(&uid).is_ok(),
        ))
    }

    /// The sequence number of a UID in this view.
    pub fn seq_of(&self, uid: u32) -> Option<u32> {
        self.uids.index_of(uid).map(|i| i as u32 + 1)
    }

    /// The change signal for IDLE (see [`ChangeSignal`]).
    pub fn signal(&self) -> ChangeSignal {
        self.signal.clone()
    }

    /// Picks up changes by other sessions and processes. Cheap when nothing changed (three
    /// stats); a change made in this process is taken from the shared index, one made by
    /// another process is read from the index file (rescanning the directories if their
    /// mtimes moved).
    pub fn refresh(&mut self) -> Result<Changes, StoreError> {
        let path = self.m.index_path();
        let cached = match self.shared.current(&path) {
            Ok(c) => c,
            Err(e) if not_found(&e) => None,
            Err(e) => return Err(StoreError::io("stat", path, e)),
        };
        if let Some(c) = &cached
            && Arc::ptr_eq(c, &self.st)
            && !self.unreported
            && self.m.is_fresh(c)?
        {
            return Ok(Changes::default());
        }
        if !self.m.exists() {
            return Err(StoreError::NoSuchMailbox(self.m.name.to_string()));
        }
        let st = self.m.snapshot(false)?;
        let mut changes = Changes::default();
        if st.uidvalidity != self.uidvalidity {
            changes.uidvalidity_changed = true;
            self.uidvalidity = st.uidvalidity;
            self.recent.clear();
            self.uids.clear();
            self.own.clear();
        }
        self.claim_recent(&st)?;
        self.own.sort_unstable();
        // One pass over the view and the new version, both in UID order.
        let mut gone: Vec<Expunged> = Vec::new();
        let mut old = self.uids.iter().peekable();
        let recs = &st.records;
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.peek().copied(), recs.get(j)) {
                (Some(u), Some(r)) if u == r.uid => {
                    if r.modseq > self.seen_modseq
                        && self.own.binary_search(&(u, r.modseq)).is_err()
                    {
                        changes.flags.push(u);
                    }
                    old.next();
                    i += 1;
                    j += 1;
                }
                (Some(u), Some(r)) if u < r.uid => {
                    gone.push(Expunged {
                        seq: i as u32 + 1,
                        uid: u,
                    });
                    old.next();
                    i += 1;
                }
                (Some(u), None) => {
                    gone.push(Expunged {
                        seq: i as u32 + 1,
                        uid: u,
                    });
                    old.next();
                    i += 1;
                }
                (_, Some(r)) => {
                    changes.new.push(r.uid);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        drop(old);
        gone.reverse();
        changes.gone = gone.iter().filter_map(|e| self.meta(e.uid)).collect();
        changes.expunged = gone;
        // Messages the view never saw and that are already gone are simply not reported.
        self.uids = UidList::from_sorted(st.records.iter().map(|r| r.uid));
        if !changes.expunged.is_empty() {
            let uids = &self.uids;
            self.recent.retain(|&u| uids.index_of(u).is_some());
        }
        self.uidnext = st.uidnext;
        self.highestmodseq = st.highestmodseq;
        self.seen_modseq = st.highestmodseq;
        self.own = Vec::new();
        self.unreported = false;
        self.st = st;
        Ok(changes)
    }

    /// Takes in the state an own operation committed: shared if it holds exactly the view's
    /// messages, else the view's version patched with the records of `touched` (a private
    /// copy until the next refresh).
    fn take_in(&mut self, committed: Option<Arc<State>>, local: &State, touched: &[u32]) {
        match committed {
            Some(c) if same_uids(&c, &self.uids) => self.st = c,
            _ => {
                let st = Arc::make_mut(&mut self.st);
                for &uid in touched {
                    match local.find(uid) {
                        Some(r) => {
                            if let Some(x) = st.find_mut(uid) {
                                *x = r.clone();
                            }
                        }
                        None => st.records.retain(|x| x.uid != uid),
                    }
                }
                st.keywords.clone_from(&local.keywords);
            }
        }
        self.unreported = true;
    }

    /// The whole message as stored.
    pub fn read(&self, uid: u32) -> Result<Vec<u8>, StoreError> {
        if self.seq_of(uid).is_none() {
            return Err(StoreError::NoSuchMessage(uid));
        }
        if let Some(r) = self.st.find(uid) {
            let p = self.m.sub(r.subdir()).join(&*r.file);
            match fs::read(&p) {
                Ok(b) => return Ok(b),
                Err(e) if not_found(&e) => {} // renamed by another writer
                Err(e) => return Err(StoreError::io("read", p, e)),
            }
        }
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
        if let Some(r) = self.st.find(uid) {
            let p = self.m.sub(r.subdir()).join(&*r.file);
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
        let mut touched: Vec<u32> = Vec::new();
        let _writing = self.m.begin_write();
        let before = self.m.dir_mtimes()?;
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
            r.file = new_name.into();
            r.in_new = false;
            r.modseq = modseq;
            out.updated.push((uid, next, modseq));
            self.own.push((uid, modseq));
            touched.push(uid);
            changed = true;
        }
        if changed {
            self.m.note_own_change(&mut st, before)?;
        }
        self.highestmodseq = self.highestmodseq.max(st.highestmodseq);
        if kw_changed {
            let committed = self.m.commit(&st, true)?;
            self.take_in(committed, &st, &touched);
        } else if changed {
            let committed = self.m.commit_flags(st)?;
            self.take_in(Some(committed.clone()), &committed, &touched);
        }
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
            let _writing = dm.begin_write();
            let before = dm.dir_mtimes()?;
            for (src_uid, tmp, base, flags, r) in &staged {
                let file = format!("{base}:2,{}", info_for(flags, &st.keywords, ""));
                index::rename(tmp, &dm.sub("cur").join(&file))?;
                let uid = st.take_uid()?;
                st.push_copy(uid, r, file);
                map.push((*src_uid, uid));
            }
            index::fsync_dir(&dm.sub("cur"))?;
            dm.note_own_change(&mut st, before)?;
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
            .uids
            .iter()
            .filter(|u| uids.is_none_or(|l| l.contains(u)))
            .collect();
        self.remove(&candidates, true)
    }

    fn remove(&mut self, uids: &[u32], only_deleted: bool) -> Result<Vec<Expunged>, StoreError> {
        let _lock = self.m.lock()?;
        let mut st = self.m.locked_state(SyncMode::LoadOnly)?;
        let mut gone: HashSet<u32> = HashSet::new();
        let _writing = self.m.begin_write();
        let before = self.m.dir_mtimes()?;
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
        let mut out = Vec::new();
        if gone.is_empty() {
            return Ok(out);
        }
        index::fsync_dir(&self.m.sub("cur"))?;
        st.records.retain(|r| !gone.contains(&r.uid));
        st.next_modseq();
        self.m.note_own_change(&mut st, before)?;
        let committed = self.m.commit(&st, false)?;
        for (i, u) in self.uids.iter().enumerate() {
            if gone.contains(&u) {
                out.push(Expunged {
                    seq: i as u32 + 1,
                    uid: u,
                });
            }
        }
        out.reverse();
        self.uids.retain(|u| !gone.contains(&u));
        self.recent.retain(|u| !gone.contains(u));
        let mut touched: Vec<u32> = gone.into_iter().collect();
        touched.sort_unstable();
        self.take_in(committed, &st, &touched);
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
