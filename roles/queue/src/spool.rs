//! The spool: message files, the in-memory index, claims and delivery bookkeeping.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::committer::{self, Job, Reply};
use crate::envelope::{
    ENVELOPE_VERSION, Envelope, NewEnvelope, RcptStatus, RecipientState, from_unix, one_line,
    to_unix,
};
use crate::segment::{self, SegLoc, Segments};
use crate::{QueueError, QueueId, dsn};

/// Buffer of a message being written (below glibc's 64 KiB free-consolidation threshold, which
/// a buffer allocated and freed per message would otherwise trigger every time).
const WRITE_BUFFER: usize = 32 * 1024;
/// First allocation of an inline message's record (it grows up to `inline_max`).
const RECORD_START: usize = 4096;

/// Spool configuration.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Spool directory (created if missing).
    pub dir: PathBuf,
    /// How long a message is retried before temporary failures become permanent.
    pub max_lifetime: Duration,
    /// First retry interval; doubled per attempt.
    pub retry_min: Duration,
    /// Longest retry interval.
    pub retry_max: Duration,
    /// Send a delay warning DSN (headers only) once a message is this old and still has
    /// recipients whose NOTIFY asks for delays (or was not given). `None`: never.
    pub bounce_after_delay_warning: Option<Duration>,
    /// Route of generated DSNs.
    pub bounce_route: String,
    /// Host name in DSNs (Reporting-MTA, From, Message-ID).
    pub hostname: String,
    /// Messages larger than this are returned with headers only, even with RET=FULL.
    pub bounce_size_limit: u64,
    /// How a group commit is made durable.
    pub sync: SyncMode,
    /// Messages whose content is at most this many bytes are kept in memory until their
    /// commit and stored in a shared segment file instead of files of their own (see the
    /// crate documentation); larger ones stream to their own data file. 0: every message
    /// gets its own files.
    pub inline_max: usize,
}

/// How a group commit round reaches stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// syncfs when the spool is on a file system of its own (not the root file system's),
    /// else per-file fdatasync.
    #[default]
    Auto,
    /// fdatasync every file and fsync the directory: correct anywhere, one flush per file.
    PerFile,
    /// One syncfs(2) per round for all files and renames: one flush per round, but it also
    /// flushes everything else dirty on that file system; use it with a dedicated one.
    Syncfs,
}

impl QueueConfig {
    /// Defaults: 5 days lifetime, retries from 5 minutes to 1 hour, no delay warnings, bounces
    /// routed `"mta"`, the kernel's host name, full content returned up to 512 KiB.
    pub fn new(dir: impl Into<PathBuf>) -> QueueConfig {
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        QueueConfig {
            dir: dir.into(),
            max_lifetime: Duration::from_secs(5 * 86_400),
            retry_min: Duration::from_secs(5 * 60),
            retry_max: Duration::from_secs(3600),
            bounce_after_delay_warning: None,
            bounce_route: "mta".to_owned(),
            hostname,
            bounce_size_limit: 512 * 1024,
            sync: SyncMode::Auto,
            inline_max: WRITE_BUFFER,
        }
    }
}

/// What [`Spool::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// Committed messages recovered.
    pub messages: usize,
    /// Leftover envelopes of uncommitted writes removed from `tmp/`.
    pub tmp_removed: usize,
    /// Files in `msg/` without their partner (a data file without envelope — a message still
    /// being received — or the reverse, or a size mismatch): remains of receptions, commits or
    /// deletions interrupted before their directory fsync, never acknowledged. Removed.
    pub orphans_removed: usize,
    /// Envelopes that could not be parsed, moved with their data to `corrupt/`.
    pub quarantined: usize,
    /// Segments found.
    pub segments: usize,
    /// Segments whose records end before the file does (the unacknowledged remains of a
    /// round a crash interrupted, or damage): logged with the offset.
    pub torn_segments: usize,
}

/// Queue statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Queued messages.
    pub messages: usize,
    /// Recipients still to be delivered.
    pub recipients_pending: usize,
    /// Age of the oldest message.
    pub oldest_age: Option<Duration>,
    /// Total size of queued message content.
    pub bytes: u64,
    /// Commits whose acknowledgement may not have reached the client (see
    /// [`Spool::note_ack_maybe_lost`]).
    pub acks_maybe_lost: u64,
    /// Messages committed since open (including DSNs).
    pub commits: u64,
    /// Directory fsyncs since open: one per group commit batch.
    pub dir_fsyncs: u64,
    /// Files made durable since open (fdatasync, or within a syncfs).
    pub files_synced: u64,
    /// Group commit rounds made durable with one syncfs(2) instead of per-file fdatasyncs.
    pub syncfs: u64,
    /// DSNs (bounces and delay warnings) created since open.
    pub dsns: u64,
    /// Segment files on disk (see the crate documentation).
    pub segments: usize,
}

/// Result of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the next hop.
    Delivered {
        /// The reply.
        reply: String,
    },
    /// Temporary failure: retry later.
    TempFail {
        /// The reply.
        reply: String,
    },
    /// Permanent failure.
    PermFail {
        /// The reply.
        reply: String,
    },
}

/// What [`Spool::record_attempt`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptSummary {
    /// Recipients delivered in this attempt.
    pub delivered: usize,
    /// Recipients temporarily failed in this attempt (still pending).
    pub deferred: usize,
    /// Recipients that failed permanently in this attempt (including expiry).
    pub failed: usize,
    /// Recipients still pending.
    pub pending: usize,
    /// Next attempt, if recipients remain.
    pub next_attempt: Option<SystemTime>,
    /// The message is finished and its files are gone.
    pub removed: bool,
    /// The failure DSN created.
    pub bounce: Option<QueueId>,
    /// The delay warning DSN created.
    pub delay_warning: Option<QueueId>,
    /// Where each recipient of this attempt (and each one expired by it) stands now, in the
    /// order of the results, for the delivery log.
    pub recipients: Vec<RecipientResult>,
}

/// Where one recipient stands after a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    /// The forward path.
    pub address: String,
    /// Delivered, deferred or bounced.
    pub status: DeliveryStatus,
    /// The reply of the next hop, or why the queue gave up.
    pub reply: String,
    /// The RFC 3463 status code (`X.Y.Z`), as a DSN would give it.
    pub dsn: String,
}

/// What became of a recipient in one attempt (Postfix's `status=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Accepted by the next hop.
    Sent,
    /// Temporary failure: still queued.
    Deferred,
    /// Permanent failure (or expiry): reported to the sender as NOTIFY asks.
    Bounced,
}

impl DeliveryStatus {
    /// `sent`, `deferred`, `bounced`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Deferred => "deferred",
            DeliveryStatus::Bounced => "bounced",
        }
    }
}

impl std::fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    next_attempt: u64,
    received_at: u64,
    size: u64,
    pending: usize,
    frozen: bool,
    claimed: bool,
    /// The envelope's route, so that a dispatcher need not read the envelope to pick one.
    route: Arc<str>,
    /// The envelope as committed, kept from the commit until it first changes (the first
    /// delivery attempt), so that the first delivery does not read it back from the disk.
    /// At most [`MAX_CACHED`] entries hold one.
    cached: Option<Arc<Envelope>>,
    /// Where the message is when it is in a segment; `None`: its own files in `msg/`.
    seg: Option<SegLoc>,
}

/// Envelopes kept in memory at most (about 1 KiB each): a queue that grows while its next
/// hop is down reads the older ones from the disk.
const MAX_CACHED: usize = 4096;

impl Entry {
    fn of(env: &Envelope) -> Entry {
        Entry {
            next_attempt: env.next_attempt,
            received_at: to_unix(env.received_at),
            size: env.size,
            pending: env.pending().count(),
            frozen: env.frozen,
            claimed: false,
            route: Arc::from(env.route.as_str()),
            cached: None,
            seg: None,
        }
    }
}

/// An index change, applied by the committer once the change is durable.
pub(crate) enum IndexOp {
    Upsert(QueueId, Entry),
    Remove(QueueId),
}

impl IndexOp {
    /// Records where the committer put a message's segment record.
    pub(crate) fn place(&mut self, loc: SegLoc) {
        if let IndexOp::Upsert(_, e) = self {
            e.seg = Some(loc);
        }
    }
}

#[derive(Default)]
struct Index {
    entries: HashMap<QueueId, Entry>,
    /// Unfrozen messages by (next attempt, id).
    schedule: BTreeSet<(u64, QueueId)>,
    /// Entries holding their envelope.
    cached: usize,
}

impl Index {
    fn remove(&mut self, id: &QueueId) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        if e.cached.is_some() {
            self.cached -= 1;
        }
        if !e.frozen {
            self.schedule.remove(&(e.next_attempt, id.clone()));
        }
        Some(e)
    }

    fn upsert(&mut self, id: QueueId, mut e: Entry) {
        if let Some(old) = self.remove(&id) {
            e.claimed = old.claimed;
        }
        if e.cached.is_some() {
            if self.cached < MAX_CACHED {
                self.cached += 1;
            } else {
                e.cached = None;
            }
        }
        if !e.frozen {
            self.schedule.insert((e.next_attempt, id.clone()));
        }
        self.entries.insert(id, e);
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub dir_fsyncs: AtomicU64,
    pub files_synced: AtomicU64,
    pub syncfs: AtomicU64,
    pub acks_maybe_lost: AtomicU64,
    pub dsns: AtomicU64,
}

/// State shared with the committer thread.
pub(crate) struct Shared {
    pub msg_dir: PathBuf,
    pub segments: Mutex<Segments>,
    /// Group commit rounds use syncfs (see [`SyncMode`]).
    pub use_syncfs: bool,
    index: Mutex<Index>,
    pub counters: Counters,
    pub poisoned: AtomicBool,
}

/// Whether `dir` is on a file system other than the root file system's: a spool volume of its
/// own, where syncfs flushes little besides the spool's own writes.
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(dir), fs::metadata("/")) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        // The index holds no invariant a panicking holder could break halfway.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn segments(&self) -> MutexGuard<'_, Segments> {
        // Each change to the segments' state is one assignment after its file operation.
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn apply(&self, ops: Vec<IndexOp>) {
        if ops.is_empty() {
            return;
        }
        let mut index = self.index();
        for op in ops {
            match op {
                IndexOp::Upsert(id, e) => index.upsert(id, e),
                IndexOp::Remove(id) => {
                    index.remove(&id);
                }
            }
        }
    }
}

struct Inner {
    cfg: QueueConfig,
    tmp_dir: PathBuf,
    shared: Arc<Shared>,
    tx: Option<Sender<Job>>,
    committer: Option<JoinHandle<()>>,
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the committer after its last batch; wait for it so that the
        // spool lock is only released once nothing writes any more.
        self.tx = None;
        if let Some(handle) = self.committer.take() {
            let _ = handle.join();
        }
    }
}

/// The durable queue. Cheap to clone; all clones share one committer and one index.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.cfg.dir)
            .finish()
    }
}

fn data_name(id: &QueueId) -> String {
    format!("{id}.data")
}

fn env_name(id: &QueueId) -> String {
    format!("{id}.env")
}

/// Reads and checks an envelope file.
pub(crate) fn read_envelope(path: &Path) -> Result<Envelope, QueueError> {
    let text = fs::read(path).map_err(|e| QueueError::io("read", path, e))?;
    parse_envelope(&text, path)
}

/// Parses and checks an envelope read from `path` (a file, or the segment holding it).
fn parse_envelope(text: &[u8], path: &Path) -> Result<Envelope, QueueError> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    match serde_json::from_slice::<Envelope>(text) {
        Ok(env) if env.version > ENVELOPE_VERSION => {
            Err(QueueError::UnsupportedVersion(env.version))
        }
        Ok(env) => Ok(env),
        Err(e) => match serde_json::from_slice::<Version>(text) {
            Ok(v) if v.version > ENVELOPE_VERSION => Err(QueueError::UnsupportedVersion(v.version)),
            _ => Err(QueueError::CorruptEnvelope {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        },
    }
}

fn create_dir(path: &Path) -> Result<(), QueueError> {
    fs::create_dir_all(path).map_err(|e| QueueError::io("create directory", path, e))
}

fn fsync_dir(path: &Path) -> Result<(), QueueError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| QueueError::io("fsync directory", path, e))
}

/// Exponential backoff before the retry after `attempts` earlier attempts:
/// `retry_min * 2^attempts`, at most `retry_max` (jitter is added by the caller).
pub fn backoff(cfg: &QueueConfig, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX);
    cfg.retry_min
        .checked_mul(factor)
        .unwrap_or(cfg.retry_max)
        .min(cfg.retry_max)
}

/// Lists the envelopes of a spool without opening it: no lock, no recovery, no writes. For
/// `ringmail queue list` while the server runs. May include a message whose commit is still in
/// flight, and skips files that vanish while it reads.
pub fn inspect(dir: &Path) -> Result<Vec<Envelope>, QueueError> {
    let msg = dir.join("msg");
    let mut out = Vec::new();
    let entries = fs::read_dir(&msg).map_err(|e| QueueError::io("read directory", &msg, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| QueueError::io("read directory", &msg, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".env")) else {
            continue;
        };
        if QueueId::parse(stem).is_err() || !msg.join(format!("{stem}.data")).exists() {
            continue;
        }
        match read_envelope(&entry.path()) {
            Ok(env) => out.push(env),
            Err(QueueError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // Messages in segments, unless their own files took over. A record of a round still
    // being flushed may show up: the same as a commit in flight above.
    let seg_dir = dir.join("seg");
    let in_files: std::collections::HashSet<QueueId> = out.iter().map(|e| e.id.clone()).collect();
    for found in segment::scan(&seg_dir)?.messages {
        if in_files.contains(&found.id) {
            continue;
        }
        if let Ok(env) = parse_envelope(&found.env, &seg_dir) {
            out.push(env);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

impl Spool {
    /// Opens (creating if needed) the spool, takes its lock, removes the remains of uncommitted
    /// writes and builds the index. Fails with [`QueueError::Locked`] if another process has it
    /// open.
    pub fn open(cfg: QueueConfig) -> Result<(Spool, RecoveryReport), QueueError> {
        let tmp_dir = cfg.dir.join("tmp");
        let msg_dir = cfg.dir.join("msg");
        create_dir(&tmp_dir)?;
        create_dir(&msg_dir)?;
        let lock_path = cfg.dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| QueueError::io("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(QueueError::Locked(cfg.dir.clone())),
            Err(fs::TryLockError::Error(e)) => return Err(QueueError::io("lock", &lock_path, e)),
        }

        let mut report = RecoveryReport::default();
        // 1. Everything in tmp/ is an uncommitted write.
        for entry in
            fs::read_dir(&tmp_dir).map_err(|e| QueueError::io("read directory", &tmp_dir, e))?
        {
            let entry = entry.map_err(|e| QueueError::io("read directory", &tmp_dir, e))?;
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| QueueError::io("unlink", &path, e))?;
            report.tmp_removed += 1;
        }

        // 2. In msg/, a message is committed iff its envelope parses and its data file has the
        //    envelope's size.
        let mut envs: HashMap<QueueId, bool> = HashMap::new(); // id -> has data file
        let mut datas: Vec<QueueId> = Vec::new();
        for entry in
            fs::read_dir(&msg_dir).map_err(|e| QueueError::io("read directory", &msg_dir, e))?
        {
            let entry = entry.map_err(|e| QueueError::io("read directory", &msg_dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let parsed = name
                .strip_suffix(".env")
                .map(|s| (s, true))
                .or_else(|| name.strip_suffix(".data").map(|s| (s, false)));
            match parsed.and_then(|(stem, is_env)| QueueId::parse(stem).ok().map(|id| (id, is_env)))
            {
                Some((id, true)) => {
                    envs.entry(id).or_insert(false);
                }
                Some((id, false)) => datas.push(id),
                None => {
                    tracing::warn!("spool: ignoring unexpected file {}", entry.path().display())
                }
            }
        }
        for id in datas {
            match envs.get_mut(&id) {
                Some(has_data) => *has_data = true,
                None => {
                    let path = msg_dir.join(data_name(&id));
                    fs::remove_file(&path).map_err(|e| QueueError::io("unlink", &path, e))?;
                    report.orphans_removed += 1;
                }
            }
        }
        let mut index = Index::default();
        let corrupt_dir = cfg.dir.join("corrupt");
        for (id, has_data) in envs {
            let env_path = msg_dir.join(env_name(&id));
            let data_path = msg_dir.join(data_name(&id));
            if !has_data {
                fs::remove_file(&env_path).map_err(|e| QueueError::io("unlink", &env_path, e))?;
                report.orphans_removed += 1;
                continue;
            }
            let env = match read_envelope(&env_path) {
                Ok(env) if env.id == id => env,
                Ok(_) | Err(QueueError::CorruptEnvelope { .. }) => {
                    // Cannot come from a crash (envelopes are fsynced before their rename), so
                    // this is damage: keep it for a human instead of deleting mail.
                    tracing::error!(
                        "spool: quarantining corrupt envelope {}",
                        env_path.display()
                    );
                    create_dir(&corrupt_dir)?;
                    for p in [&env_path, &data_path] {
                        let to = corrupt_dir.join(p.file_name().unwrap_or_default());
                        fs::rename(p, &to).map_err(|e| QueueError::io("rename", p, e))?;
                    }
                    report.quarantined += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let len = fs::metadata(&data_path)
                .map_err(|e| QueueError::io("stat", &data_path, e))?
                .len();
            if len != env.size {
                tracing::warn!(
                    "spool: {id}: data file has {len} bytes, envelope says {}; removing",
                    env.size
                );
                for p in [&env_path, &data_path] {
                    fs::remove_file(p).map_err(|e| QueueError::io("unlink", p, e))?;
                }
                report.orphans_removed += 1;
                continue;
            }
            index.upsert(id, Entry::of(&env));
            report.messages += 1;
        }
        // 3. Segments: every message record without a done record is queued, unless its own
        //    file pair took over (a move to msg/ whose done record did not make it).
        let seg_dir = cfg.dir.join("seg");
        create_dir(&seg_dir)?;
        let scan = segment::scan(&seg_dir)?;
        report.segments = scan.segments.len();
        report.torn_segments = scan.torn.len();
        for (no, off, why) in &scan.torn {
            tracing::warn!(
                "spool: segment {no:016x}: records end at offset {off} ({why}); what follows \
                 was never acknowledged, or is damaged"
            );
        }
        let mut live: HashMap<u64, usize> = HashMap::new();
        for found in &scan.messages {
            if index.entries.contains_key(&found.id) {
                continue;
            }
            let where_ = seg_dir.join(segment::seg_name(found.loc.seg));
            match parse_envelope(&found.env, &where_) {
                Ok(env) if env.id == found.id && env.size == u64::from(found.data_len) => {
                    let mut e = Entry::of(&env);
                    e.seg = Some(found.loc);
                    index.upsert(found.id.clone(), e);
                    *live.entry(found.loc.seg).or_default() += 1;
                    report.messages += 1;
                }
                Ok(_) | Err(QueueError::CorruptEnvelope { .. }) => {
                    // A record that checks out but whose envelope does not: damage (or a bug),
                    // never a crash. Copied out for a human; the segment may then go.
                    tracing::error!(
                        "spool: quarantining the corrupt envelope of {} in {}",
                        found.id,
                        where_.display()
                    );
                    create_dir(&corrupt_dir)?;
                    let content = File::open(&where_)
                        .and_then(|f| {
                            segment::read_at(&f, found.loc.data_off, found.data_len as usize)
                        })
                        .map_err(|e| QueueError::io("read", &where_, e))?;
                    for (name, bytes) in [
                        (env_name(&found.id), &found.env),
                        (data_name(&found.id), &content),
                    ] {
                        // Flushed here: the segment may be deleted once recovery is done.
                        let to = corrupt_dir.join(name);
                        File::create(&to)
                            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_data()))
                            .map_err(|e| QueueError::io("write", &to, e))?;
                    }
                    report.quarantined += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if report.orphans_removed > 0 || report.quarantined > 0 {
            fsync_dir(&msg_dir)?;
            if report.quarantined > 0 {
                fsync_dir(&corrupt_dir)?;
            }
        }
        // After the quarantined copies are durable: a segment left with nothing is deleted.
        let segments = Segments::open(seg_dir, &scan, &live)?;
        if report.tmp_removed + report.orphans_removed + report.quarantined + report.torn_segments
            > 0
        {
            tracing::info!(?report, "spool: recovered");
        }

        let use_syncfs = match cfg.sync {
            SyncMode::PerFile => false,
            SyncMode::Syncfs => true,
            SyncMode::Auto => is_mount_point(&cfg.dir),
        };
        tracing::info!(
            spool = %cfg.dir.display(),
            sync = if use_syncfs { "syncfs" } else { "per-file fdatasync" },
            "spool: durability"
        );
        let shared = Arc::new(Shared {
            use_syncfs,
            msg_dir,
            segments: Mutex::new(segments),
            index: Mutex::new(index),
            counters: Counters::default(),
            poisoned: AtomicBool::new(false),
        });
        let (tx, handle) = committer::start(Arc::clone(&shared))
            .map_err(|e| QueueError::io("spawn committer for", &cfg.dir, e))?;
        let inner = Inner {
            cfg,
            tmp_dir,
            shared,
            tx: Some(tx),
            committer: Some(handle),
            _lock: lock,
        };
        Ok((
            Spool {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.cfg
    }

    fn msg_dir(&self) -> &Path {
        &self.inner.shared.msg_dir
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.inner.shared.index()
    }

    fn send(&self, job: Job) -> Result<(), QueueError> {
        let tx = self.inner.tx.as_ref().ok_or(QueueError::CommitterGone)?;
        tx.send(job).map_err(|_| QueueError::CommitterGone)
    }

    /// Hands a job to the committer and waits (asynchronously) until it is durable.
    async fn submit(&self, mut job: Job) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        job.reply = Reply::Async(tx);
        self.send(job)?;
        rx.await.map_err(|_| QueueError::CommitterGone)?
    }

    /// Hands a job to the committer and blocks until it is durable.
    fn submit_blocking(&self, mut job: Job) -> Result<(), QueueError> {
        let (tx, rx) = mpsc::sync_channel(1);
        job.reply = Reply::Blocking(tx);
        self.send(job)?;
        rx.recv().map_err(|_| QueueError::CommitterGone)?
    }

    fn empty_job() -> Job {
        // The reply is replaced by submit/submit_blocking.
        let (tx, _) = oneshot::channel();
        Job::new(Reply::Async(tx))
    }

    /// Starts receiving a message.
    pub fn begin(&self) -> Result<Incoming, QueueError> {
        if self.inner.shared.poisoned.load(Ordering::Acquire) {
            return Err(QueueError::Poisoned);
        }
        let id = QueueId::generate();
        let sink = if self.inner.cfg.inline_max > 0 {
            Sink::Record(segment::start_record(RECORD_START))
        } else {
            self.create_data_file(&id, WRITE_BUFFER)?
        };
        Ok(Incoming {
            spool: self.clone(),
            id,
            sink,
            written: 0,
        })
    }

    /// Creates a message's data file, straight under its final name: until its envelope is
    /// renamed in beside it, a data file is an orphan that recovery removes, so it needs no
    /// rename of its own.
    fn create_data_file(&self, id: &QueueId, buffer: usize) -> Result<Sink, QueueError> {
        let path = self.msg_dir().join(data_name(id));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| QueueError::io("create", &path, e))?;
        Ok(Sink::File {
            writer: BufWriter::with_capacity(buffer, file),
            path,
        })
    }

    /// Writes `env` to a new file in `tmp/` (not yet synced) and returns it with its path.
    fn write_tmp_envelope(&self, env: &Envelope) -> Result<(File, PathBuf), QueueError> {
        let path =
            self.inner
                .tmp_dir
                .join(format!("{}.{:016x}.env", env.id, crate::id::random_u64()));
        let json = serde_json::to_vec(env).map_err(|e| QueueError::CorruptEnvelope {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| QueueError::io("create", &path, e))?;
        if let Err(e) = file.write_all(&json) {
            let _ = fs::remove_file(&path);
            return Err(QueueError::io("write", &path, e));
        }
        Ok((file, path))
    }

    /// A job replacing the envelope atomically (tmp, fdatasync, rename, directory fsync). A
    /// message still in a segment moves to its own files with it: its content is copied to
    /// `msg/ID.data` and synced with the envelope; [`Spool::finish_replace`] then releases
    /// the segment's copy.
    fn replace_job(&self, env: &Envelope) -> Result<(Job, Replace), QueueError> {
        let moved_from = self.index().entries.get(&env.id).and_then(|e| e.seg);
        let mut job = Self::empty_job();
        let mut created = Vec::new();
        if moved_from.is_some() {
            let mut body = self.open_body(&env.id)?;
            let Sink::File { mut writer, path } = self.create_data_file(&env.id, WRITE_BUFFER)?
            else {
                unreachable!("create_data_file makes a file sink")
            };
            created.push(path.clone());
            let copied = io::copy(&mut body, &mut writer).and_then(|_| writer.flush());
            if let Err(e) = copied {
                let _ = fs::remove_file(&path);
                return Err(QueueError::io("copy to", path, e));
            }
            let file = writer
                .into_inner()
                .map_err(|e| QueueError::io("write", &path, e.into_error()))?;
            job.syncs.push((file, path));
        }
        let (file, tmp) = match self.write_tmp_envelope(env) {
            Ok(x) => x,
            Err(e) => {
                created.iter().for_each(|p| drop(fs::remove_file(p)));
                return Err(e);
            }
        };
        created.push(tmp.clone());
        job.syncs.push((file, tmp.clone()));
        job.renames
            .push((tmp, self.msg_dir().join(env_name(&env.id))));
        job.index
            .push(IndexOp::Upsert(env.id.clone(), Entry::of(env)));
        Ok((
            job,
            Replace {
                id: env.id.clone(),
                created,
                moved_from,
            },
        ))
    }

    /// After a [`Spool::replace_job`]: releases the segment copy of a moved message, or
    /// removes the files of a failed replacement.
    fn finish_replace(&self, r: Replace, result: Result<(), QueueError>) -> Result<(), QueueError> {
        match (&result, r.moved_from) {
            (Ok(()), Some(loc)) => self.inner.shared.segments().release(loc.seg, &r.id),
            (Ok(()), None) => {}
            (Err(_), _) => r.created.iter().for_each(|p| drop(fs::remove_file(p))),
        }
        result
    }

    fn read_env(&self, id: &QueueId) -> Result<Envelope, QueueError> {
        let not_found = || QueueError::NotFound(id.clone());
        let loc = self.index().entries.get(id).ok_or_else(not_found)?.seg;
        let Some(loc) = loc else {
            return match read_envelope(&self.msg_dir().join(env_name(id))) {
                Err(QueueError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    Err(not_found())
                }
                r => r,
            };
        };
        let file = self.inner.shared.segments().file(loc.seg);
        let file = file.ok_or_else(not_found)?;
        let path = self.seg_path(loc.seg);
        let bytes = segment::read_at(&file, loc.env_off, loc.env_len as usize)
            .map_err(|e| QueueError::io("read", &path, e))?;
        parse_envelope(&bytes, &path)
    }

    fn seg_path(&self, seg: u64) -> PathBuf {
        self.inner.cfg.dir.join("seg").join(segment::seg_name(seg))
    }

    /// Every queued message, ordered by id (arrival). Reads every envelope: for the CLI, not
    /// for the delivery loop (use [`Spool::due`]).
    pub fn list(&self) -> Result<Vec<Envelope>, QueueError> {
        let mut ids: Vec<QueueId> = self.index().entries.keys().cloned().collect();
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read_env(&id) {
                Ok(env) => out.push(env),
                Err(QueueError::NotFound(_)) => {} // deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The envelope of a queued message.
    pub fn get(&self, id: &QueueId) -> Result<Option<Envelope>, QueueError> {
        match self.index().entries.get(id) {
            None => return Ok(None),
            Some(Entry {
                cached: Some(env), ..
            }) => return Ok(Some(Envelope::clone(env))),
            Some(_) => {}
        }
        match self.read_env(id) {
            Ok(env) => Ok(Some(env)),
            Err(QueueError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The message content, for streaming to the next hop. Blocking reads: use a blocking task
    /// or read in chunks.
    pub fn open_body(&self, id: &QueueId) -> Result<Body, QueueError> {
        let not_found = || QueueError::NotFound(id.clone());
        let (loc, size) = match self.index().entries.get(id) {
            Some(e) => (e.seg, e.size),
            None => return Err(not_found()),
        };
        let (file, start) = match loc {
            Some(loc) => {
                let file = self.inner.shared.segments().file(loc.seg);
                (file.ok_or_else(not_found)?, loc.data_off)
            }
            None => {
                let path = self.msg_dir().join(data_name(id));
                let file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => not_found(),
                    _ => QueueError::io("open", &path, e),
                })?;
                (Arc::new(file), 0)
            }
        };
        Ok(Body {
            file,
            start,
            len: size,
            pos: 0,
        })
    }

    /// Takes the delivery lease of a message: `None` if it is not queued or already claimed.
    /// The lease ends when the [`Claim`] is dropped. In memory only: a restart releases every
    /// lease (the delivery workers are gone too).
    pub fn claim(&self, id: &QueueId) -> Option<Claim> {
        let mut index = self.index();
        let entry = index.entries.get_mut(id)?;
        if entry.claimed {
            return None;
        }
        entry.claimed = true;
        Some(Claim {
            spool: self.clone(),
            id: id.clone(),
        })
    }

    /// Removes a message durably. `Ok(false)` if it is not queued; [`QueueError::Busy`] while a
    /// delivery worker holds it. Blocks for a group commit: in async code call it from a
    /// blocking task.
    pub fn delete(&self, id: &QueueId) -> Result<bool, QueueError> {
        let Some(claim) = self.claim(id) else {
            return if self.index().entries.contains_key(id) {
                Err(QueueError::Busy(id.clone()))
            } else {
                Ok(false)
            };
        };
        self.remove_now(id)?;
        drop(claim);
        Ok(true)
    }

    /// Rewrites a message's envelope under a temporary claim. `Ok(false)` if it is not queued
    /// or claimed. Blocking.
    fn modify_blocking(
        &self,
        id: &QueueId,
        f: impl FnOnce(&mut Envelope) -> bool,
    ) -> Result<bool, QueueError> {
        let Some(_claim) = self.claim(id) else {
            return Ok(false);
        };
        let mut env = self.read_env(id)?;
        if !f(&mut env) {
            return Ok(true);
        }
        let (job, replace) = self.replace_job(&env)?;
        let result = self.submit_blocking(job);
        self.finish_replace(replace, result)?;
        Ok(true)
    }

    /// Makes a message due now (durably). `Ok(false)` if it is not queued or is being
    /// delivered right now. Blocking.
    pub fn retry_now(&self, id: &QueueId) -> Result<bool, QueueError> {
        let now = to_unix(SystemTime::now());
        self.modify_blocking(id, |env| {
            let change = env.next_attempt > now;
            env.next_attempt = env.next_attempt.min(now);
            change
        })
    }

    /// Holds (`frozen = true`) or releases a message. A frozen message is never due.
    /// `Ok(false)` if it is not queued or is being delivered. Blocking.
    pub fn set_frozen(&self, id: &QueueId, frozen: bool) -> Result<bool, QueueError> {
        self.modify_blocking(id, |env| {
            let change = env.frozen != frozen;
            env.frozen = frozen;
            change
        })
    }

    /// Makes every queued, unfrozen message not currently being delivered due now; returns how
    /// many were rescheduled (like `postqueue -f`). Only the in-memory schedule changes: the
    /// envelopes keep their stored next attempt, so a flush of a large queue costs no disk
    /// writes and delivery starts at once; after a restart a message not yet attempted waits
    /// for its stored time again, which is never later than before the flush.
    pub fn flush(&self) -> Result<usize, QueueError> {
        let now_secs = to_unix(SystemTime::now());
        let mut index = self.index();
        let later: Vec<(u64, QueueId)> = index
            .schedule
            .range((now_secs + 1, QueueId::parse("0000000000000000000")?)..)
            .cloned()
            .collect();
        let mut done = 0;
        for (at, id) in later {
            let Some(e) = index.entries.get_mut(&id) else {
                continue;
            };
            if e.claimed || e.frozen {
                continue;
            }
            e.next_attempt = now_secs;
            index.schedule.remove(&(at, id.clone()));
            index.schedule.insert((now_secs, id));
            done += 1;
        }
        Ok(done)
    }

    /// Messages due at `now`, earliest first, without frozen or claimed ones. From the
    /// in-memory index: no file-system access.
    pub fn due(&self, now: SystemTime) -> Result<Vec<QueueId>, QueueError> {
        Ok(self.due_limited(now, usize::MAX))
    }

    /// Like [`Spool::due`], at most `limit` ids.
    pub fn due_limited(&self, now: SystemTime, limit: usize) -> Vec<QueueId> {
        let now = to_unix(now);
        let index = self.index();
        index
            .schedule
            .iter()
            .take_while(|(t, _)| *t <= now)
            .filter(|(_, id)| index.entries.get(id).is_some_and(|e| !e.claimed))
            .map(|(_, id)| id.clone())
            .take(limit)
            .collect()
    }

    /// When the earliest unclaimed, unfrozen message is due (for the scheduler's sleep).
    pub fn next_due(&self) -> Option<SystemTime> {
        let index = self.index();
        index
            .schedule
            .iter()
            .find(|(_, id)| index.entries.get(id).is_some_and(|e| !e.claimed))
            .map(|(t, _)| from_unix(*t))
    }

    /// Records the SMTP server's failure to send the reply to a committed message (the client
    /// may retry, and the message may then be delivered twice).
    ///
    /// A commit acknowledged by the spool is durable; if the connection breaks before the
    /// client has read the 250 reply, the client does not know it and will send the message
    /// again. RFC 5321 section 6.1 accepts this duplicate; this counter makes it visible.
    pub fn note_ack_maybe_lost(&self) {
        self.inner
            .shared
            .counters
            .acks_maybe_lost
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Queue statistics (from the index: cheap).
    pub fn stats(&self) -> QueueStats {
        let now = to_unix(SystemTime::now());
        let c = &self.inner.shared.counters;
        let index = self.index();
        let mut s = QueueStats {
            messages: index.entries.len(),
            acks_maybe_lost: c.acks_maybe_lost.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            dir_fsyncs: c.dir_fsyncs.load(Ordering::Relaxed),
            files_synced: c.files_synced.load(Ordering::Relaxed),
            syncfs: c.syncfs.load(Ordering::Relaxed),
            dsns: c.dsns.load(Ordering::Relaxed),
            segments: self.inner.shared.segments().count(),
            ..QueueStats::default()
        };
        let mut oldest = None::<u64>;
        for e in index.entries.values() {
            s.recipients_pending += e.pending;
            s.bytes += e.size;
            oldest = Some(oldest.map_or(e.received_at, |o| o.min(e.received_at)));
        }
        s.oldest_age = oldest.map(|t| Duration::from_secs(now.saturating_sub(t)));
        s
    }

    /// The route of a queued message, from the in-memory index (no file-system access).
    pub fn route(&self, id: &QueueId) -> Option<Arc<str>> {
        self.index().entries.get(id).map(|e| Arc::clone(&e.route))
    }

    /// Records a delivery attempt of a claimed message (hold its [`Claim`] while calling) and
    /// makes the result durable (atomic envelope replacement in a group commit).
    ///
    /// Delivered and permanently failed recipients are final; temporarily failed ones stay
    /// pending, and the message is retried after [`backoff`] plus up to 10 % jitter. Once
    /// `expires_at` has passed, every recipient still pending fails permanently. Newly failed
    /// recipients whose NOTIFY includes FAILURE (the default) are reported to a non-null sender
    /// in one DSN, queued (and durable) before the envelope is updated; a crash in between can
    /// only duplicate the DSN, never lose it. When no recipient is pending any more, the message
    /// is deleted.
    pub async fn record_attempt(
        &self,
        id: &QueueId,
        results: Vec<(String, Outcome)>,
        now: SystemTime,
    ) -> Result<AttemptSummary, QueueError> {
        self.check_claimed(id)?;
        let env = self.read_env(id)?;
        self.record_attempt_inner(env, results, now).await
    }

    /// [`Spool::record_attempt`] with the envelope the caller read (with [`Spool::get`]) while
    /// holding the message's [`Claim`], which is still current then: only a claim holder
    /// changes an envelope. Saves reading the envelope again.
    pub async fn record_attempt_with(
        &self,
        env: Envelope,
        results: Vec<(String, Outcome)>,
        now: SystemTime,
    ) -> Result<AttemptSummary, QueueError> {
        self.check_claimed(&env.id)?;
        self.record_attempt_inner(env, results, now).await
    }

    fn check_claimed(&self, id: &QueueId) -> Result<(), QueueError> {
        match self.index().entries.get(id) {
            None => Err(QueueError::NotFound(id.clone())),
            Some(e) if !e.claimed => Err(QueueError::NotClaimed(id.clone())),
            Some(_) => Ok(()),
        }
    }

    /// Removes a delivered (or bounced) message at once, without the committer: removals need
    /// no fsync (see the committer's `apply_renames`), so they need not wait for, nor delay, a
    /// group commit round. The envelope goes first (the commit record), then the data.
    fn remove_now(&self, id: &QueueId) -> Result<(), QueueError> {
        if self.inner.shared.poisoned.load(Ordering::Acquire) {
            return Err(QueueError::Poisoned);
        }
        let seg = self.index().entries.get(id).and_then(|e| e.seg);
        if let Some(loc) = seg {
            // A done record instead of two unlinks (see crate::segment).
            self.inner.shared.apply(vec![IndexOp::Remove(id.clone())]);
            self.inner.shared.segments().release(loc.seg, id);
            return Ok(());
        }
        for path in [
            self.msg_dir().join(env_name(id)),
            self.msg_dir().join(data_name(id)),
        ] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(QueueError::io("unlink", &path, e)),
            }
        }
        self.inner.shared.apply(vec![IndexOp::Remove(id.clone())]);
        Ok(())
    }

    async fn record_attempt_inner(
        &self,
        mut env: Envelope,
        results: Vec<(String, Outcome)>,
        now: SystemTime,
    ) -> Result<AttemptSummary, QueueError> {
        let id = &env.id.clone();
        let now_secs = to_unix(now);
        let expired = now_secs >= env.expires_at;
        let mut summary = AttemptSummary::default();
        let mut newly_failed: Vec<usize> = Vec::new();
        let mut deferred: Vec<usize> = Vec::new();
        // Recipients of this attempt, in the order of the results, for the delivery log.
        let mut touched: Vec<usize> = Vec::new();

        for (rcpt, outcome) in results {
            let Some(i) = find_recipient(&env.recipients, &rcpt) else {
                tracing::warn!("spool: {id}: attempt result for unknown recipient {rcpt:?}");
                continue;
            };
            touched.push(i);
            let r = &mut env.recipients[i];
            match outcome {
                Outcome::Delivered { reply } => {
                    r.last_reply = Some(reply.clone());
                    r.status = RcptStatus::Delivered {
                        at: now_secs,
                        reply,
                    };
                    summary.delivered += 1;
                }
                Outcome::PermFail { reply } => {
                    r.last_reply = Some(reply.clone());
                    r.status = RcptStatus::Failed {
                        at: now_secs,
                        reply,
                    };
                    newly_failed.push(i);
                }
                Outcome::TempFail { reply } => {
                    r.attempts += 1;
                    r.last_reply = Some(reply);
                    deferred.push(i);
                }
            }
        }
        if expired {
            for (i, r) in env.recipients.iter_mut().enumerate() {
                if r.status.is_pending() {
                    let reply = match &r.last_reply {
                        Some(last) => format!("{last} (gave up: message expired)"),
                        None => "message expired in the queue".to_owned(),
                    };
                    r.status = RcptStatus::Failed {
                        at: now_secs,
                        reply,
                    };
                    newly_failed.push(i);
                    if !touched.contains(&i) {
                        touched.push(i);
                    }
                }
            }
        }
        summary.failed = newly_failed.len();
        summary.deferred = deferred
            .iter()
            .filter(|&&i| env.recipients[i].status.is_pending())
            .count();
        summary.pending = env.pending().count();
        summary.recipients = touched
            .iter()
            .map(|&i| recipient_result(&env.recipients[i]))
            .collect();

        // Failure DSN, before the envelope update.
        if env.sender.is_some() {
            let report: Vec<usize> = newly_failed
                .iter()
                .copied()
                .filter(|&i| env.recipients[i].notify.wants_failure())
                .collect();
            if !report.is_empty() {
                match dsn::queue_dsn(self, &env, &report, dsn::Kind::Failed, now).await {
                    Ok(bounce) => summary.bounce = Some(bounce),
                    Err(e) => {
                        // The attempt is not recorded: it is made again, and the DSN with it.
                        for &i in &report {
                            tracing::warn!(
                                id = %id,
                                from = env.sender.as_deref().unwrap_or(""),
                                to = %env.recipients[i].address,
                                error = %e,
                                "cannot queue the bounce (DSN) to the sender"
                            );
                        }
                        return Err(e);
                    }
                }
            }
            if let Some(warn_after) = self.inner.cfg.bounce_after_delay_warning
                && !env.delay_warned
                && summary.pending > 0
                && now_secs >= to_unix(env.received_at) + warn_after.as_secs()
            {
                let delayed: Vec<usize> = env
                    .recipients
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.status.is_pending() && r.notify.wants_delay())
                    .map(|(i, _)| i)
                    .collect();
                if !delayed.is_empty() {
                    summary.delay_warning =
                        Some(dsn::queue_dsn(self, &env, &delayed, dsn::Kind::Delayed, now).await?);
                }
                env.delay_warned = true;
            }
        } else {
            // A DSN (null sender) that failed is not reported to anyone (RFC 5321 section
            // 4.5.5): a double bounce, discarded. Said loudly: someone's bounce is lost.
            for &i in &newly_failed {
                let r = &env.recipients[i];
                let reason = match &r.status {
                    RcptStatus::Failed { reply, .. } => reply.as_str(),
                    _ => "",
                };
                let (orig_id, orig_rcpts) = match &env.report_of {
                    Some(o) => (o.id.as_str(), o.recipients.join(", ")),
                    None => ("", String::new()),
                };
                tracing::warn!(
                    id = %id,
                    original_sender = %r.address,
                    original_id = %orig_id,
                    original_recipients = %orig_rcpts,
                    reason = %one_line(reason),
                    "undeliverable bounce discarded (double bounce)"
                );
            }
        }

        env.attempts += 1;
        if summary.pending == 0 {
            self.remove_now(id)?;
            summary.removed = true;
            return Ok(summary);
        }
        let delay = backoff(&self.inner.cfg, env.attempts - 1);
        let jitter = (crate::id::random_u64() % (delay.as_secs() / 10 + 1)).min(delay.as_secs());
        let mut next = now_secs + delay.as_secs() + jitter;
        if env.expires_at > now_secs {
            next = next.min(env.expires_at);
        }
        env.next_attempt = next;
        summary.next_attempt = Some(from_unix(next));
        let (job, replace) = self.replace_job(&env)?;
        let result = self.submit(job).await;
        self.finish_replace(replace, result)?;
        Ok(summary)
    }

    pub(crate) fn count_dsn(&self) {
        self.inner
            .shared
            .counters
            .dsns
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// How a recipient stands, for the delivery log.
fn recipient_result(r: &RecipientState) -> RecipientResult {
    let (status, reply, dsn) = match &r.status {
        RcptStatus::Delivered { reply, .. } => (
            DeliveryStatus::Sent,
            reply.as_str(),
            dsn::dsn_status(reply, "2.0.0"),
        ),
        RcptStatus::Failed { reply, .. } => (
            DeliveryStatus::Bounced,
            reply.as_str(),
            dsn::failed_status(r, reply),
        ),
        RcptStatus::Pending => {
            let reply = r.last_reply.as_deref().unwrap_or("");
            (
                DeliveryStatus::Deferred,
                reply,
                dsn::dsn_status(reply, "4.0.0"),
            )
        }
    };
    RecipientResult {
        address: r.address.clone(),
        status,
        reply: one_line(reply),
        dsn,
    }
}

fn find_recipient(rcpts: &[RecipientState], addr: &str) -> Option<usize> {
    rcpts
        .iter()
        .position(|r| r.status.is_pending() && r.address == addr)
        .or_else(|| {
            rcpts
                .iter()
                .position(|r| r.status.is_pending() && r.address.eq_ignore_ascii_case(addr))
        })
}

/// The delivery lease of one message; released on drop.
#[derive(Debug)]
pub struct Claim {
    spool: Spool,
    id: QueueId,
}

impl Claim {
    /// The claimed message.
    pub fn id(&self) -> &QueueId {
        &self.id
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(e) = self.spool.index().entries.get_mut(&self.id) {
            e.claimed = false;
        }
    }
}

/// Where the content of a message being received goes.
#[derive(Debug)]
enum Sink {
    /// Memory: a segment record under construction (see `segment.rs`), while the
    /// content fits in [`QueueConfig::inline_max`].
    Record(Vec<u8>),
    /// Its own data file in `msg/` (not a message until its envelope is committed beside it),
    /// through a 32 KiB buffer.
    File {
        writer: BufWriter<File>,
        path: PathBuf,
    },
    /// Committed, or handed over to the commit.
    Gone,
}

/// A message being received. Its content stays in memory while it fits in
/// [`QueueConfig::inline_max`] and is committed into a segment; past that it streams to a
/// data file of its own. Dropped without [`Incoming::commit`], nothing of it remains.
#[derive(Debug)]
pub struct Incoming {
    spool: Spool,
    id: QueueId,
    sink: Sink,
    written: u64,
}

impl Incoming {
    /// Appends content (trace headers first, then the message as received).
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), QueueError> {
        let inline_max = self.spool.inner.cfg.inline_max;
        if let Sink::Record(buf) = &mut self.sink {
            if buf.len() - segment::HEADER + chunk.len() <= inline_max {
                buf.extend_from_slice(chunk);
                self.written += chunk.len() as u64;
                return Ok(());
            }
            // Too big for a segment: on to a file of its own, with what came so far.
            let sink = self.spool.create_data_file(&self.id, WRITE_BUFFER)?;
            let Sink::Record(buf) = std::mem::replace(&mut self.sink, sink) else {
                unreachable!("matched above")
            };
            self.write_file(&buf[segment::HEADER..])?;
        }
        self.write_file(chunk)?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    fn write_file(&mut self, chunk: &[u8]) -> Result<(), QueueError> {
        match &mut self.sink {
            Sink::File { writer, path } => writer
                .write_all(chunk)
                .map_err(|e| QueueError::io("write", &*path, e)),
            Sink::Record(_) | Sink::Gone => Err(QueueError::CommitterGone),
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The id the message will have.
    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// Makes the message durable and queues it. Resolves `Ok` only once the content and the
    /// envelope are on stable storage under their final names (a segment record flushed in a
    /// group commit round; or both files fdatasynced, the envelope renamed into `msg/` and the
    /// directory fsynced); concurrent commits share those flushes. If the future is dropped
    /// after the first poll, the commit still completes (the message is queued, the caller
    /// just does not learn it).
    pub async fn commit(mut self, envelope: NewEnvelope) -> Result<QueueId, QueueError> {
        if envelope.recipients.is_empty() {
            return Err(QueueError::NoRecipients);
        }
        let sink = std::mem::replace(&mut self.sink, Sink::Gone);
        let spool = self.spool.clone();
        let id = self.id.clone();
        let now_secs = to_unix(SystemTime::now());
        let cfg = spool.config();
        let env = Envelope {
            version: ENVELOPE_VERSION,
            id: id.clone(),
            sender: envelope.sender,
            recipients: envelope
                .recipients
                .into_iter()
                .map(|r| RecipientState {
                    address: r.address,
                    orcpt: r.orcpt,
                    notify: r.notify,
                    status: RcptStatus::Pending,
                    attempts: 0,
                    last_reply: None,
                })
                .collect(),
            ret: envelope.ret,
            envid: envelope.envid,
            body: envelope.body,
            smtputf8: envelope.smtputf8,
            received_at: from_unix(now_secs),
            client: envelope.client,
            size: self.written,
            attempts: 0,
            next_attempt: now_secs,
            expires_at: now_secs + cfg.max_lifetime.as_secs(),
            route: envelope.route,
            frozen: false,
            delay_warned: false,
            headers: envelope.headers,
            report_of: envelope.report_of,
        };
        let mut job = Spool::empty_job();
        job.new_messages = 1;
        let mut entry = Entry::of(&env);
        match sink {
            Sink::Record(mut bytes) => {
                let json = serde_json::to_vec(&env).map_err(|e| QueueError::CorruptEnvelope {
                    path: spool.inner.cfg.dir.join("seg"),
                    reason: e.to_string(),
                })?;
                let data_len = segment::finish_message(&mut bytes, &id, &json);
                job.record = Some(SegRecord {
                    bytes,
                    data_len,
                    env_len: json.len() as u32,
                });
                entry.cached = Some(Arc::new(env));
                job.index.push(IndexOp::Upsert(id.clone(), entry));
                spool.submit(job).await.map(|()| id)
            }
            Sink::File { writer, path } => {
                let data = writer
                    .into_inner()
                    .map_err(|e| QueueError::io("write", &path, e.into_error()));
                let data = match data {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = fs::remove_file(&path);
                        return Err(e);
                    }
                };
                let (env_file, env_tmp) = match spool.write_tmp_envelope(&env) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = fs::remove_file(&path);
                        return Err(e);
                    }
                };
                let env_final = spool.msg_dir().join(env_name(&id));
                // The data file is already in msg/: both files are synced before the
                // envelope's rename (per file: in the tick before; with syncfs: in the same
                // syncfs), so an envelope in msg/ always has its data beside it once durable.
                job.syncs.push((data, path.clone()));
                job.syncs.push((env_file, env_tmp.clone()));
                job.renames.push((env_tmp.clone(), env_final.clone()));
                entry.cached = Some(Arc::new(env));
                job.index.push(IndexOp::Upsert(id.clone(), entry));
                // Ids are unique (time, counter, random); the index check covers a recovered
                // message that would share one, and costs no file-system call.
                job.creates_only = !spool.index().entries.contains_key(&id);
                match spool.submit(job).await {
                    Ok(()) => Ok(id),
                    Err(e) => {
                        // Not acknowledged: remove whatever made it (if the directory fsync
                        // failed the spool is poisoned anyway, and recovery would take it as
                        // committed).
                        for p in [&env_tmp, &env_final, &path] {
                            let _ = fs::remove_file(p);
                        }
                        Err(e)
                    }
                }
            }
            Sink::Gone => Err(QueueError::CommitterGone),
        }
    }

    /// Discards the message (the same as dropping it).
    pub fn abort(self) {}
}

impl Write for Incoming {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Incoming::write(self, buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Sink::File { writer, path } = std::mem::replace(&mut self.sink, Sink::Gone) {
            drop(writer.into_parts());
            let _ = fs::remove_file(&path);
        }
    }
}

/// A message record for the committer to append to the current segment.
pub(crate) struct SegRecord {
    /// The whole record.
    pub bytes: Vec<u8>,
    pub data_len: u32,
    pub env_len: u32,
}

impl SegRecord {
    /// Where this record's parts are once it is written at `off` of segment `seg`.
    pub(crate) fn loc(&self, seg: u64, off: u64) -> SegLoc {
        let data_off = off + segment::HEADER as u64;
        SegLoc {
            seg,
            data_off,
            env_off: data_off + u64::from(self.data_len),
            env_len: self.env_len,
        }
    }
}

/// An envelope replacement in flight (see [`Spool::replace_job`]).
struct Replace {
    id: QueueId,
    /// Files it created, removed if it fails.
    created: Vec<PathBuf>,
    /// The segment copy it supersedes.
    moved_from: Option<SegLoc>,
}

/// The content of a queued message: its data file, or its part of a segment. Reads with
/// `pread`, so readers of one segment do not disturb each other.
#[derive(Debug)]
pub struct Body {
    file: Arc<File>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Body {
    /// The content's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the content is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Body {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(t) => {
                self.pos = t;
                Ok(t)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the message",
            )),
        }
    }
}

/// Streams `r` into a new message (used for DSNs).
pub(crate) fn copy_into(r: &mut impl Read, inc: &mut Incoming) -> Result<(), QueueError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(QueueError::io("read", "message content", e)),
        };
        inc.write(&buf[..n])?;
    }
}
