//! Commit throughput with 1 and with 20 concurrent committers of 2 KiB messages.
//!
//! `cargo run --release -p ringmail-queue --example commit_bench [DIR] [SECONDS]`
//!
//! DIR (default: a directory under the system temp dir) must be on the file system to measure.
//! SYNC=syncfs|per-file overrides the automatic choice (syncfs only on a dedicated file system).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ringmail_queue::{NewEnvelope, NewRecipient, QueueConfig, Spool, SyncMode};

fn main() {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("ringmail-queue-bench-{}", std::process::id()));
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let body = {
        let mut b = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n".to_vec();
        b.resize(2048, b'x');
        b
    };
    for committers in [1usize, 20] {
        let dir = base.join(format!("c{committers}"));
        let mut cfg = QueueConfig::new(&dir);
        cfg.sync = match std::env::var("SYNC").as_deref() {
            Ok("syncfs") => SyncMode::Syncfs,
            Ok("per-file") => SyncMode::PerFile,
            _ => SyncMode::Auto,
        };
        let (spool, _) = Spool::open(cfg).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..committers)
                .map(|_| {
                    let (spool, done, stop, body) =
                        (spool.clone(), done.clone(), stop.clone(), body.clone());
                    tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let mut inc = spool.begin().unwrap();
                            inc.write(&body).unwrap();
                            let env = NewEnvelope::new(
                                Some("a@example.org".into()),
                                [NewRecipient::new("b@example.net")],
                                "mda",
                            );
                            inc.commit(env).await.unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await.unwrap();
            }
        });
        let elapsed = start.elapsed().as_secs_f64();
        let n = done.load(Ordering::Relaxed);
        let stats = spool.stats();
        println!(
            "{committers:>2} committers: {n} messages in {elapsed:.2}s = {:.0} msg/s, \
             {:.2} ms mean commit latency, {:.1} messages per directory fsync",
            n as f64 / elapsed,
            elapsed * 1000.0 * committers as f64 / n as f64,
            n as f64 / stats.dir_fsyncs.max(1) as f64,
        );
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&base);
}
