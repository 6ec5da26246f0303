//! The group committer: one std thread that turns many pending writes into one directory fsync.
//!
//! A [`Job`] is a unit of durable change: files to fdatasync, then renames and unlinks in the
//! message directory, then index updates. The committer takes every job waiting on its channel,
//! fdatasyncs all their files at once (on a small pool of threads, so the file system can put
//! them into one journal commit instead of one per file), performs the renames and unlinks, fsyncs
//! the message directory once for the whole batch, applies the index updates and only then
//! completes each job's waiter. While one batch is on the disk, the next one accumulates.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::oneshot;

use crate::QueueError;
use crate::spool::{IndexOp, Shared};

/// Jobs taken into one batch at most (bounds the open files of a batch).
const MAX_BATCH: usize = 256;
/// Threads of the fsync pool.
const SYNC_THREADS: usize = 16;

/// Who waits for a job.
pub(crate) enum Reply {
    /// An async caller (commit, record_attempt).
    Async(oneshot::Sender<Result<(), QueueError>>),
    /// A blocking caller (delete, retry_now, flush).
    Blocking(mpsc::SyncSender<Result<(), QueueError>>),
}

impl Reply {
    fn send(self, r: Result<(), QueueError>) {
        // The waiter may have gone away (future dropped); the change is durable regardless.
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// One durable change.
pub(crate) struct Job {
    /// Written files (in `tmp/`) to fdatasync before anything is renamed.
    pub syncs: Vec<(File, PathBuf)>,
    /// Renames into `msg/`, in order.
    pub renames: Vec<(PathBuf, PathBuf)>,
    /// Files in `msg/` to remove, in order.
    pub unlinks: Vec<PathBuf>,
    /// Index changes once durable.
    pub index: Vec<IndexOp>,
    /// Messages newly committed by this job (for the statistics).
    pub new_messages: u64,
    pub reply: Reply,
}

impl Job {
    pub(crate) fn new(reply: Reply) -> Job {
        Job {
            syncs: Vec::new(),
            renames: Vec::new(),
            unlinks: Vec::new(),
            index: Vec::new(),
            new_messages: 0,
            reply,
        }
    }
}

struct SyncTask {
    job: usize,
    file: File,
    path: PathBuf,
    done: Sender<(usize, Result<(), QueueError>)>,
}

/// Starts the committer thread; it ends when every sender is dropped.
pub(crate) fn start(shared: Arc<Shared>) -> std::io::Result<(Sender<Job>, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Job>();
    let handle = thread::Builder::new()
        .name("queue-commit".into())
        .spawn(move || run(rx, shared))?;
    Ok((tx, handle))
}

fn start_pool() -> Sender<SyncTask> {
    let (tx, rx) = mpsc::channel::<SyncTask>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..SYNC_THREADS {
        let rx = Arc::clone(&rx);
        let spawned = thread::Builder::new()
            .name(format!("queue-fsync-{i}"))
            .spawn(move || {
                loop {
                    let task = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok(task) = task else { return };
                    let r = task
                        .file
                        .sync_data()
                        .map_err(|e| QueueError::io("fdatasync", &task.path, e));
                    drop(task.file);
                    let _ = task.done.send((task.job, r));
                }
            });
        if let Err(e) = spawned {
            // Fewer threads only means less parallelism; the committer syncs inline if none.
            tracing::warn!("spool: cannot start fsync thread: {e}");
            break;
        }
    }
    tx
}

fn run(rx: Receiver<Job>, shared: Arc<Shared>) {
    let pool = start_pool();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        process(&shared, &pool, batch);
    }
}

fn process(shared: &Shared, pool: &Sender<SyncTask>, batch: Vec<Job>) {
    let mut results: Vec<Result<(), QueueError>> = Vec::with_capacity(batch.len());
    let mut jobs = Vec::with_capacity(batch.len());
    let (done_tx, done_rx) = mpsc::channel();
    let mut outstanding = 0usize;
    let mut files = 0u64;
    for (i, mut job) in batch.into_iter().enumerate() {
        results.push(if shared.poisoned.load(Ordering::Acquire) {
            Err(QueueError::Poisoned)
        } else {
            Ok(())
        });
        if results[i].is_ok() {
            for (file, path) in job.syncs.drain(..) {
                files += 1;
                let task = SyncTask {
                    job: i,
                    file,
                    path,
                    done: done_tx.clone(),
                };
                match pool.send(task) {
                    Ok(()) => outstanding += 1,
                    Err(mpsc::SendError(task)) => {
                        let r = task
                            .file
                            .sync_data()
                            .map_err(|e| QueueError::io("fdatasync", &task.path, e));
                        if let Err(e) = r {
                            results[i] = Err(e);
                        }
                    }
                }
            }
        }
        jobs.push(job);
    }
    drop(done_tx);
    for _ in 0..outstanding {
        let Ok((i, r)) = done_rx.recv() else { break };
        if let Err(e) = r
            && results[i].is_ok()
        {
            results[i] = Err(e);
        }
    }
    if results
        .iter()
        .any(|r| matches!(r, Err(QueueError::Io { .. })))
    {
        tracing::error!("spool: fdatasync failed; refusing further writes");
        shared.poisoned.store(true, Ordering::Release);
    }

    // Renames and unlinks of every job whose files are on the disk.
    let mut changed = false;
    for (job, result) in jobs.iter().zip(results.iter_mut()) {
        if result.is_err() {
            continue;
        }
        for (from, to) in &job.renames {
            if let Err(e) = std::fs::rename(from, to) {
                *result = Err(QueueError::io("rename", from, e));
                break;
            }
            changed = true;
        }
        if result.is_err() {
            continue;
        }
        for path in &job.unlinks {
            match std::fs::remove_file(path) {
                Ok(()) => changed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    *result = Err(QueueError::io("unlink", path, e));
                    break;
                }
            }
        }
    }

    // One directory fsync makes every rename and unlink of the batch durable.
    if changed {
        let r = File::open(&shared.msg_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| QueueError::io("fsync directory", &shared.msg_dir, e));
        shared.counters.dir_fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            tracing::error!("spool: {e}; refusing further writes");
            shared.poisoned.store(true, Ordering::Release);
            for result in results.iter_mut() {
                if result.is_ok() {
                    *result = Err(e.duplicate());
                }
            }
        }
    }
    shared
        .counters
        .files_synced
        .fetch_add(files, Ordering::Relaxed);

    let mut ops = Vec::new();
    let mut committed = 0;
    for (job, result) in jobs.iter_mut().zip(results.iter()) {
        if result.is_ok() {
            ops.append(&mut job.index);
            committed += job.new_messages;
        }
    }
    shared.apply(ops);
    shared
        .counters
        .commits
        .fetch_add(committed, Ordering::Relaxed);
    for (job, result) in jobs.into_iter().zip(results) {
        job.reply.send(result);
    }
}
