//! The index versions shared by the sessions of one process.
//!
//! Every open [`crate::Mailbox`] of a mailbox holds the same [`SharedIndex`] (the registry
//! keeps only weak references, so a mailbox nobody has open costs nothing). It caches the
//! last index version this process read or wrote, decoded, with the open file it came from:
//! a stat of `ringmail-index` whose inode is that file's (held open, so the inode cannot be
//! reused) and whose size and mtime are unchanged proves the cached version is the current one, so a session picks up a change made
//! by another session of this process without reading or decoding the file. A change by any
//! other process replaces the file (new inode) and is read as before: the file stays
//! authoritative.
//!
//! It also remembers when this process last rescanned the directories (see
//! [`SharedIndex::scanned_recently`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::index::State;

/// While a directory's mtime is too recent to be trusted (see `DIRTY_NS` in `sync.rs`), a
/// session rescans it only if no session of this process did within this interval: changes
/// that hide in the same timestamp tick as a known one (only writers that do not take the
/// mailbox lock can make those) are found within this delay instead of on the next command.
pub(crate) const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

struct Cached {
    /// The index file this version was read from or written to, held open so that its inode
    /// cannot be reused while `ino` identifies it.
    _file: File,
    dev: u64,
    ino: u64,
    /// Size and mtime too, in case some tool rewrites the file in place.
    size: u64,
    mtime: (i64, i64),
    state: Arc<State>,
}

/// One mailbox's cached index (see the module docs).
#[derive(Default)]
pub(crate) struct SharedIndex {
    cached: Mutex<Option<Cached>>,
    last_scan: Mutex<Option<Instant>>,
    /// Changes of this process in progress under the mailbox lock (see [`Writing`]).
    writing: AtomicUsize,
}

/// Marks a change of this process in progress from before it touches the directories until
/// its index is committed and shared (the guard is dropped after the commit).
pub(crate) struct Writing(Arc<SharedIndex>);

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.writing.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SharedIndex {
    /// The cached version if it is the one at `path` now (one stat). `Ok(None)` if not
    /// cached or replaced since; `Err` for a failed stat (NotFound included).
    pub fn current(&self, path: &Path) -> std::io::Result<Option<Arc<State>>> {
        let meta = std::fs::metadata(path)?;
        let g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.as_ref()
            .filter(|c| {
                c.dev == meta.dev()
                    && c.ino == meta.ino()
                    && c.size == meta.size()
                    && c.mtime == (meta.mtime(), meta.mtime_nsec())
            })
            .map(|c| c.state.clone()))
    }

    /// The cached version without checking the file.
    pub fn peek(&self) -> Option<Arc<State>> {
        let g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|c| c.state.clone())
    }

    /// Records `state` as the content of `file` (open on the index path).
    pub fn put(&self, file: File, state: Arc<State>) {
        let Ok(meta) = file.metadata() else { return };
        let mut g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(Cached {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            _file: file,
            state,
        });
    }

    /// Marks a change in progress until the guard is dropped.
    pub fn begin_write(self: &Arc<Self>) -> Writing {
        self.writing.fetch_add(1, Ordering::AcqRel);
        Writing(self.clone())
    }

    /// True while a change of this process is in progress: directory mtimes that moved are
    /// then (most likely) its doing, and the cached version is still the committed one.
    pub fn writing(&self) -> bool {
        self.writing.load(Ordering::Acquire) > 0
    }

    /// Records that the directories were rescanned now.
    pub fn note_scan(&self) {
        *self.last_scan.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// True if a session of this process rescanned the directories within
    /// [`RESCAN_INTERVAL`].
    pub fn scanned_recently(&self) -> bool {
        self.last_scan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RESCAN_INTERVAL)
    }
}

impl std::fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("SharedIndex")
            .field("cached", &g.as_ref().map(|c| c.state.records.len()))
            .finish()
    }
}

/// The registry: mailbox directory -> its [`SharedIndex`] while some view holds it.
#[derive(Default)]
pub(crate) struct Indexes {
    map: Mutex<HashMap<PathBuf, Weak<SharedIndex>>>,
}

impl Indexes {
    /// The shared index of `dir`, created if no view holds one (for a view to hold).
    pub fn get(&self, dir: &Path) -> Arc<SharedIndex> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(dir).and_then(Weak::upgrade) {
            return s;
        }
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let s = Arc::new(SharedIndex::default());
        map.insert(dir.to_owned(), Arc::downgrade(&s));
        s
    }

    /// The shared index of `dir` if some view holds one.
    pub fn lookup(&self, dir: &Path) -> Option<Arc<SharedIndex>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(dir).and_then(Weak::upgrade)
    }
}
