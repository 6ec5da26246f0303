//! Crash safety: a child process commits messages from many tasks and prints each id once its
//! commit has resolved; the parent kills it with SIGKILL at a random moment, reopens the spool
//! and checks that every printed message is there, intact, and that nothing partial is listed.
//!
//! The child is this test binary, re-invoked with `CRASH_CHILD_DIR` set.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringmail_queue::{NewEnvelope, NewRecipient, QueueConfig, QueueId, Spool};

const ENV_DIR: &str = "CRASH_CHILD_DIR";

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// The message of a seed: a header naming seed and length, then pseudo-random bytes.
fn message(seed: u64) -> Vec<u8> {
    let mut next = rng(seed);
    let len = 64 + (next() % 150_000) as usize;
    let mut v = format!("X-Seed: {seed} {len}\r\n\r\n").into_bytes();
    while v.len() < len {
        v.extend_from_slice(&next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Checks a stored message against what its header says it should be.
fn check(content: &[u8]) -> Result<u64, String> {
    let text = String::from_utf8_lossy(&content[..content.len().min(64)]);
    let line = text.lines().next().ok_or("empty message")?;
    let mut words = line
        .strip_prefix("X-Seed: ")
        .ok_or("no seed header")?
        .split(' ');
    let seed: u64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or("bad seed")?;
    if message(seed) != content {
        return Err(format!("content of seed {seed} differs"));
    }
    Ok(seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return; // only as a child of `kill_9_loses_no_committed_message`
    };
    let mut cfg = QueueConfig::new(dir);
    if std::env::var("CRASH_SYNC").as_deref() == Ok("syncfs") {
        cfg.sync = ringmail_queue::SyncMode::Syncfs;
    }
    let (spool, _) = Spool::open(cfg).unwrap();
    let base: u64 = std::env::var("CRASH_CHILD_ROUND").unwrap().parse().unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let seed = base * 1_000_000_000 + t * 1_000_000 + n;
                let msg = message(seed);
                let mut inc = spool.begin().unwrap();
                for chunk in msg.chunks(4096) {
                    inc.write(chunk).unwrap();
                }
                let env = NewEnvelope::new(
                    Some("a@example.org".into()),
                    [NewRecipient::new("b@example.net")],
                    "mda",
                );
                let id = inc.commit(env).await.unwrap();
                println!("COMMITTED {id} {seed}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn verify(dir: &Path, committed: &[(QueueId, u64)]) -> usize {
    let (spool, report) = Spool::open(QueueConfig::new(dir)).unwrap();
    assert_eq!(report.quarantined, 0, "{report:?}");
    for (id, seed) in committed {
        let env = spool
            .get(id)
            .unwrap()
            .unwrap_or_else(|| panic!("committed message {id} lost ({report:?})"));
        let mut content = Vec::new();
        spool
            .open_body(id)
            .unwrap()
            .read_to_end(&mut content)
            .unwrap();
        assert_eq!(env.size, content.len() as u64);
        assert_eq!(check(&content), Ok(*seed), "message {id}");
    }
    let listed = spool.list().unwrap();
    for env in &listed {
        let mut content = Vec::new();
        spool
            .open_body(&env.id)
            .unwrap()
            .read_to_end(&mut content)
            .unwrap();
        assert_eq!(env.size, content.len() as u64, "{}", env.id);
        check(&content).unwrap_or_else(|e| panic!("partial message {} listed: {e}", env.id));
    }
    assert!(std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none());
    listed.len()
}

#[test]
fn kill_9_loses_no_committed_message() {
    kill_9_rounds("per-file");
}

/// The same with syncfs group commits (new messages complete in one round).
#[test]
fn kill_9_loses_no_committed_message_with_syncfs() {
    kill_9_rounds("syncfs");
}

fn kill_9_rounds(sync: &str) {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "ringmail-queue-crash-{sync}-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut committed: Vec<(QueueId, u64)> = Vec::new();
    let mut delay_rng = rng(std::process::id() as u64 ^ 0x5eed);
    for round in 0..5u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(ENV_DIR, &dir.0)
            .env("CRASH_CHILD_ROUND", round.to_string())
            .env("CRASH_SYNC", sync)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("COMMITTED ") {
                    let (id, seed) = rest.split_once(' ').unwrap();
                    let _ = tx.send((QueueId::parse(id).unwrap(), seed.parse::<u64>().unwrap()));
                }
            }
        });
        // Wait for the first commit, then kill at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child commits");
        committed.push(first);
        let wait = Duration::from_millis(5 + delay_rng() % 400);
        let start = Instant::now();
        while start.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        committed.extend(rx.try_iter());
        let listed = verify(&dir.0, &committed);
        assert!(listed >= committed.len());
        eprintln!(
            "round {round}: killed after {wait:?}; {} committed so far, {listed} in the queue",
            committed.len()
        );
    }
}
