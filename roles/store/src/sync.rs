//! One mailbox directory: loading, scanning and committing its index under the lock.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::StoreError;
use crate::index::{self, FileLock, Record, State};
use crate::maildir::FileName;
use crate::names::MailboxName;
use crate::shared::{SharedIndex, Writing};
use crate::store::UserCtx;

/// A directory mtime younger than this (relative to the scan) may hide a later change made in
/// the same timestamp tick, so the next check rescans.
const DIRTY_NS: i128 = 2_000_000_000;

/// How much work [`MboxDir::locked_state`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncMode {
    /// Use the index as it is (rebuild only if missing or damaged): enough to add messages.
    LoadOnly,
    /// Rescan the directories only if their mtimes say something changed.
    IfStale,
    /// Always rescan.
    Scan,
}

pub(crate) fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// A mailbox directory of one user.
#[derive(Clone)]
pub(crate) struct MboxDir {
    pub name: MailboxName,
    pub dir: PathBuf,
    pub user: Arc<UserCtx>,
}

impl MboxDir {
    pub fn new(user: Arc<UserCtx>, name: MailboxName) -> MboxDir {
        let dir = if name.is_inbox() {
            user.maildir.clone()
        } else {
            user.maildir.join(name.dir_name())
        };
        MboxDir { name, dir, user }
    }

    pub fn exists(&self) -> bool {
        self.dir.join("cur").is_dir()
    }

    pub fn sub(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join(index::INDEX_FILE)
    }

    pub fn lock(&self) -> Result<FileLock, StoreError> {
        if !self.exists() {
            return Err(StoreError::NoSuchMailbox(self.name.to_string()));
        }
        FileLock::acquire(&self.dir.join(index::LOCK_FILE))
    }

    /// The shared index of this mailbox, if a view of this process holds one.
    pub fn shared(&self) -> Option<Arc<SharedIndex>> {
        self.user.indexes.lookup(&self.dir)
    }

    /// Reads the index without the lock (it is only ever replaced by rename, so a reader sees
    /// one whole version). When a view of this process holds the mailbox, the version it
    /// cached is used if the file is still that one (one stat), and a version read is cached.
    pub fn load_index(&self) -> Result<Option<Arc<State>>, StoreError> {
        self.load_index_with(true)
    }

    /// [`Self::load_index`]; `use_cache: false` always reads the file (a full sync).
    fn load_index_with(&self, use_cache: bool) -> Result<Option<Arc<State>>, StoreError> {
        let path = self.index_path();
        let shared = self.shared();
        if let Some(sh) = shared.as_ref().filter(|_| use_cache) {
            match sh.current(&path) {
                Ok(Some(st)) => return Ok(Some(st)),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(StoreError::io("stat", &path, e)),
            }
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let bytes = index::read_all(&f, &path)?;
        match State::decode(&bytes) {
            Some(st) => {
                let st = Arc::new(st);
                if let Some(sh) = shared {
                    sh.put(f, st.clone());
                }
                Ok(Some(st))
            }
            None => {
                tracing::warn!(path = %path.display(), "mailbox index damaged; rebuilding");
                Ok(None)
            }
        }
    }

    /// Publishes `st` as the current content of the index file to this process's views
    /// (after a commit, or a rescan that found nothing to commit). The caller holds the lock,
    /// so the file at the path is the one `st` was committed to.
    fn publish(&self, st: &State) -> Option<Arc<State>> {
        let sh = self.shared()?;
        let f = File::open(self.index_path()).ok()?;
        let st = Arc::new(st.clone());
        sh.put(f, st.clone());
        Some(st)
    }

    pub fn dir_mtimes(&self) -> Result<(i128, i128), StoreError> {
        let stat = |sub: &str| {
            let p = self.sub(sub);
            fs::metadata(&p)
                .map(|m| mtime_ns(&m))
                .map_err(|e| StoreError::io("stat", p, e))
        };
        Ok((stat("new")?, stat("cur")?))
    }

    /// True if `st` describes the directories as they are and their mtimes are old enough
    /// to be trusted (two stats).
    fn is_clean(&self, st: &State) -> Result<bool, StoreError> {
        let (n, c) = self.dir_mtimes()?;
        Ok(n == st.new_mtime && c == st.cur_mtime && st.scanned - n.max(c) >= DIRTY_NS)
    }

    /// True if `st` need not be rescanned (two stats): the directories' mtimes are those it
    /// records, and either they are old enough to be trusted or a session of this process
    /// rescanned within [`crate::shared::RESCAN_INTERVAL`]. Mtimes that moved while a change
    /// of this process is in progress (under the lock, not committed yet) are taken as that
    /// change's: `st` is then the last committed state, as it would have been a moment
    /// earlier. (The change adopts the new mtimes only if they were `st`'s before it, see
    /// [`Self::note_own_change`]; a change by another writer at the same moment is found by
    /// the rescans a dirty state gets.)
    pub fn is_fresh(&self, st: &State) -> Result<bool, StoreError> {
        let (n, c) = self.dir_mtimes()?;
        let shared = self.shared();
        if n != st.new_mtime || c != st.cur_mtime {
            return Ok(shared.is_some_and(|sh| sh.writing()));
        }
        Ok(st.scanned - n.max(c) >= DIRTY_NS || shared.is_some_and(|sh| sh.scanned_recently()))
    }

    /// Marks a change of this process in progress (see [`Self::is_fresh`]) until the guard
    /// is dropped, which must be after the commit. The caller holds the lock.
    pub fn begin_write(&self) -> Option<Writing> {
        self.shared().map(|sh| sh.begin_write())
    }

    /// After this process changed the directories itself, under the lock: the directory
    /// mtimes `st` records are moved to the ones now, for each directory whose mtime
    /// `before` the change was the recorded one (so the change is the only one since). The
    /// state stays as dirty as the new mtimes make it (see [`Self::is_fresh`]), so a change
    /// by a writer that does not take the lock in the same tick is still found by a rescan.
    pub fn note_own_change(&self, st: &mut State, before: (i128, i128)) -> Result<(), StoreError> {
        let (n, c) = self.dir_mtimes()?;
        if before.0 == st.new_mtime {
            st.new_mtime = n;
        }
        if before.1 == st.cur_mtime {
            st.cur_mtime = c;
        }
        Ok(())
    }

    /// The current state, taking the lock only if the index is missing or stale. With
    /// `force_scan` (SELECT), the index file is read and the directories rescanned unless a
    /// session of this process did so within [`crate::shared::RESCAN_INTERVAL`] (many
    /// sessions opening the mailbox at once share one scan and one decoded copy).
    pub fn snapshot(&self, force_scan: bool) -> Result<Arc<State>, StoreError> {
        let force_scan = force_scan && !self.shared().is_some_and(|sh| sh.scanned_recently());
        if !force_scan
            && let Some(st) = self.load_index()?
            && self.is_fresh(&st)?
        {
            return Ok(st);
        }
        let _lock = self.lock()?;
        // Sessions opened together all queue here: a rescan done by another of them while
        // this one waited counts (one rescan and one decoded version for the burst, instead
        // of one each, whose transient copies the allocator then keeps).
        let force_scan = force_scan && !self.shared().is_some_and(|sh| sh.scanned_recently());
        // Without `force_scan`, the state may have looked stale only because a change was in
        // progress under the lock: check again now that it is over.
        if !force_scan
            && let Some(st) = self.load_index()?
            && self.is_fresh(&st)?
        {
            return Ok(st);
        }
        let st = self.locked_state(SyncMode::Scan)?;
        Ok(match self.shared().and_then(|sh| sh.peek()) {
            Some(p) if *p == st => p,
            _ => self.publish(&st).unwrap_or_else(|| Arc::new(st)),
        })
    }

    /// The state, brought up to date according to `mode`. The caller holds the lock.
    /// [`SyncMode::Scan`] reads the index file even if this process has it cached.
    pub fn locked_state(&self, mode: SyncMode) -> Result<State, StoreError> {
        let (mut st, recovered, rebuilt) = match self.load_index_with(mode != SyncMode::Scan)? {
            Some(st) => {
                if mode == SyncMode::LoadOnly
                    || (mode == SyncMode::IfStale && self.is_fresh(&st)?)
                {
                    return Ok(Arc::unwrap_or_clone(st));
                }
                (Arc::unwrap_or_clone(st), None, false)
            }
            None => {
                let (st, rec) = self.fresh_state()?;
                (st, rec, true)
            }
        };
        let was_dirty = !self.is_clean(&st)?;
        let changed = self.scan(&mut st, recovered.as_ref())?;
        if changed || rebuilt || (was_dirty && self.is_clean(&st)?) {
            self.commit(&st, rebuilt)?;
        } else {
            // Nothing to write, but the scan time and mtimes are newer than the file's:
            // share them, so other sessions do not rescan.
            self.publish(&st);
        }
        Ok(st)
    }

    /// A state to rebuild from: UIDVALIDITY and UIDs from `dovecot-uidlist` if it is there,
    /// else a new UIDVALIDITY. MODSEQs cannot be recovered: they restart above the current
    /// time in microseconds, which is above any MODSEQ handed out before as long as fewer
    /// than a million changes per second were made.
    fn fresh_state(&self) -> Result<(State, Option<HashMap<String, u32>>), StoreError> {
        let modseq_base = (now_ns() / 1000) as u64;
        let uidlist = index::read_optional(&self.sub(index::UIDLIST_FILE))?
            .and_then(|b| index::parse_uidlist(&b));
        let keywords = index::read_optional(&self.sub(index::KEYWORDS_FILE))?
            .map(|b| index::parse_keywords(&String::from_utf8_lossy(&b)))
            .unwrap_or_default();
        let (mut st, rec) = match uidlist {
            Some(u) => {
                tracing::info!(mailbox = %self.dir.display(), uidvalidity = u.uidvalidity,
                    "index rebuilt from dovecot-uidlist");
                let guid = u.guid.unwrap_or_else(random_guid);
                (
                    State::new(u.uidvalidity, guid, u.uidnext, modseq_base),
                    Some(u.uids),
                )
            }
            None => {
                let v = self.user.next_uidvalidity()?;
                tracing::info!(mailbox = %self.dir.display(), uidvalidity = v,
                    "index rebuilt with a new UIDVALIDITY");
                (State::new(v, random_guid(), 1, modseq_base), None)
            }
        };
        st.keywords = keywords;
        Ok((st, rec))
    }

    /// Reconciles `st` with new/ and cur/: vanished files are expunged, renamed files update
    /// flags, unknown files get UIDs (the recovered ones if known), files in new/ move to cur/.
    fn scan(
        &self,
        st: &mut State,
        recovered: Option<&HashMap<String, u32>>,
    ) -> Result<bool, StoreError> {
        let scanned = now_ns();
        tracing::debug!(mailbox = %self.dir.display(), "rescanning");
        if let Some(sh) = self.shared() {
            sh.note_scan();
        }
        // Keywords another Maildir writer (Dovecot) defined since: adopt letters we do not use.
        let mut keywords_changed = false;
        if let Some(b) = index::read_optional(&self.sub(index::KEYWORDS_FILE))? {
            let theirs = index::parse_keywords(&String::from_utf8_lossy(&b));
            for (i, k) in theirs.into_iter().enumerate() {
                if k.is_empty() || st.keywords.contains(&k) {
                    continue;
                }
                if st.keywords.len() <= i {
                    st.keywords.resize(i + 1, String::new());
                }
                if st.keywords[i].is_empty() {
                    st.keywords[i] = k;
                    keywords_changed = true;
                }
            }
        }
        let mut listing: HashMap<String, (bool, String)> = HashMap::new();
        for (sub, in_new) in [("new", true), ("cur", false)] {
            let path = self.sub(sub);
            let rd = fs::read_dir(&path).map_err(|e| StoreError::io("read directory", &path, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| StoreError::io("read directory", &path, e))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let Some(parsed) = FileName::parse(&name) else {
                    continue;
                };
                match listing.get(&parsed.base) {
                    Some((false, _)) => {} // cur/ wins over new/
                    _ => {
                        listing.insert(parsed.base, (in_new, name));
                    }
                }
            }
        }
        let mut changed = keywords_changed;
        let mut kept = Vec::with_capacity(st.records.len());
        let records = std::mem::take(&mut st.records);
        for mut r in records {
            match listing.remove(r.base()) {
                Some((in_new, file)) => {
                    if *file != *r.file || in_new != r.in_new {
                        let old_info = r.name().info.unwrap_or_default();
                        r.file = file.into();
                        r.in_new = in_new;
                        if r.name().info.unwrap_or_default() != old_info {
                            r.modseq = st.next_modseq();
                        }
                        changed = true;
                    }
                    kept.push(r);
                }
                None => {
                    changed = true;
                    st.next_modseq();
                }
            }
        }
        st.records = kept;
        // Files we do not know may have been given UIDs by Dovecot (running on this Maildir
        // before or alongside): take those from its dovecot-uidlist if it belongs to the same
        // UIDVALIDITY and the UID was never handed out here (>= our UIDNEXT).
        let live_uidlist;
        let (recovered, min_uid) = match recovered {
            Some(r) => (Some(r), 1),
            None if !listing.is_empty() => {
                live_uidlist = index::read_optional(&self.sub(index::UIDLIST_FILE))?
                    .and_then(|b| index::parse_uidlist(&b))
                    .filter(|u| u.uidvalidity == st.uidvalidity);
                (live_uidlist.as_ref().map(|u| &u.uids), st.uidnext)
            }
            None => (None, 1),
        };
        // New files, in a deterministic order: recovered UIDs first, then by name (which
        // starts with the delivery time).
        let mut fresh: Vec<(Option<u32>, String, bool, String)> = listing
            .into_iter()
            .map(|(base, (in_new, file))| {
                let uid = recovered
                    .and_then(|m| m.get(&base).copied())
                    .filter(|u| *u >= min_uid);
                (uid, base, in_new, file)
            })
            .collect();
        fresh.sort_by(|a, b| (a.0.is_none(), a.0, &a.1).cmp(&(b.0.is_none(), b.0, &b.1)));
        let used: std::collections::HashSet<u32> = st.records.iter().map(|r| r.uid).collect();
        let mut taken = used;
        for (uid, _base, in_new, file) in fresh {
            let path = self.sub(if in_new { "new" } else { "cur" }).join(&file);
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("stat", path, e)),
            };
            let parsed = FileName::parse(&file).expect("listed names parse");
            let uid = match uid {
                Some(u) if u > 0 && !taken.contains(&u) => {
                    st.uidnext = st.uidnext.max(u.saturating_add(1));
                    u
                }
                _ => st.take_uid()?,
            };
            taken.insert(uid);
            let size = parsed.size().unwrap_or(meta.len());
            let modseq = st.next_modseq();
            st.records.push(Record {
                uid,
                modseq,
                size,
                vsize: parsed.vsize().unwrap_or(size),
                date: meta.mtime(),
                in_new,
                file: file.into(),
            });
            changed = true;
        }
        st.records.sort_by_key(|r| r.uid);
        // Move new/ to cur/ (Dovecot does the same when a mailbox is synced).
        let mut moved = false;
        for r in st.records.iter_mut().filter(|r| r.in_new) {
            let mut name = r.name();
            if name.info.is_none() {
                name.info = Some(String::new());
            }
            let target = name.to_name();
            match fs::rename(
                self.sub("new").join(&*r.file),
                self.sub("cur").join(&target),
            ) {
                Ok(()) => {
                    r.file = target.into();
                    r.in_new = false;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("rename", self.sub("new").join(&*r.file), e)),
            }
        }
        if moved {
            index::fsync_dir(&self.sub("cur"))?;
            index::fsync_dir(&self.sub("new"))?;
            changed = true;
        }
        let (n, c) = self.dir_mtimes()?;
        st.new_mtime = n;
        st.cur_mtime = c;
        st.scanned = scanned;
        Ok(changed)
    }

    /// Writes the index and `dovecot-uidlist` atomically (both tmp files fsynced, renamed,
    /// then one directory fsync), and `dovecot-keywords` if asked; wakes waiters of this
    /// process. Returns the version as shared with this process's views (if any holds it).
    pub fn commit(&self, st: &State, keywords: bool) -> Result<Option<Arc<State>>, StoreError> {
        if keywords {
            index::replace_file(
                &self.dir,
                index::KEYWORDS_FILE,
                &index::encode_keywords(&st.keywords),
            )?;
        }
        let idx_tmp = self.dir.join(format!("{}.tmp", index::INDEX_FILE));
        let ul_tmp = self.dir.join(format!("{}.tmp", index::UIDLIST_FILE));
        index::write_synced(&idx_tmp, &st.encode())?;
        index::write_synced(&ul_tmp, &st.encode_uidlist())?;
        index::rename(&ul_tmp, &self.sub(index::UIDLIST_FILE))?;
        index::rename(&idx_tmp, &self.index_path())?;
        index::fsync_dir(&self.dir)?;
        let shared = self.publish(st);
        self.user.signals.get(&self.dir).bump();
        Ok(shared)
    }

    /// Like [`commit`](Self::commit) without the fsyncs, for flag changes only (the way
    /// Dovecot's `fsync_mode = optimized` treats them): the message files already carry their
    /// flags in their names (renamed before this), the replace is still atomic for every
    /// process, and after a power loss an index that lost its last writes is either the older
    /// one or fails its checksum and is rebuilt from the file names (flags recovered, MODSEQs
    /// restarted above the old ones). `dovecot-uidlist` is left alone: flag changes alter
    /// neither UIDs nor base names. Returns the state as shared with this process's views.
    pub fn commit_flags(&self, st: State) -> Result<Arc<State>, StoreError> {
        let idx_tmp = self.dir.join(format!("{}.tmp", index::INDEX_FILE));
        fs::write(&idx_tmp, st.encode()).map_err(|e| StoreError::io("write", &idx_tmp, e))?;
        index::rename(&idx_tmp, &self.index_path())?;
        let st = Arc::new(st);
        if let Some(sh) = self.shared()
            && let Ok(f) = File::open(self.index_path())
        {
            sh.put(f, st.clone());
        }
        self.user.signals.get(&self.dir).bump();
        Ok(st)
    }

    /// Removes files in `tmp/` older than 36 hours: writes that a crash interrupted (Dovecot
    /// applies the same rule). Returns how many were removed.
    pub fn clean_tmp(&self) -> Result<usize, StoreError> {
        const STALE: std::time::Duration = std::time::Duration::from_secs(36 * 3600);
        let tmp = self.sub("tmp");
        let rd = match fs::read_dir(&tmp) {
            Ok(rd) => rd,
            Err(e) if not_found(&e) => return Ok(0),
            Err(e) => return Err(StoreError::io("read directory", tmp, e)),
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in rd.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > STALE);
            if meta.is_file() && old && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(mailbox = %self.dir.display(), removed, "stale tmp files removed");
        }
        Ok(removed)
    }

    /// Finds the current file of `uid`, rescanning once if the name in `st` is stale
    /// (renamed by another writer). `None` if the message is gone.
    pub fn resolve(&self, st: &mut State, uid: u32) -> Result<Option<PathBuf>, StoreError> {
        if let Some(r) = st.find(uid) {
            let p = self.sub(r.subdir()).join(&*r.file);
            if p.exists() {
                return Ok(Some(p));
            }
        } else {
            return Ok(None);
        }
        if self.scan(st, None)? {
            self.commit(st, false)?;
        }
        Ok(st.find(uid).map(|r| self.sub(r.subdir()).join(&*r.file)))
    }
}

pub(crate) fn random_guid() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let t = now_ns() as u128 ^ ((std::process::id() as u128) << 64);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}
