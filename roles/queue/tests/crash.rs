//! Crash safety: a child process commits messages from many tasks and prints each id once its
//! commit has resolved, while a delivery task takes due messages and records them delivered
//! (removed) or deferred (the envelope rewritten; a message in a segment moves to files of its
//! own) and prints that once recorded. The parent kills the child with SIGKILL at a random
//! moment, reopens the spool and checks that every committed message not delivered is there,
//! intact, that every delivered one stays gone, that every deferred one kept its attempt, and
//! that nothing partial is listed. Messages are 64 B to 150 KB: some in segments, some in
//! files of their own.
//!
//! The child is this test binary, re-invoked with `CRASH_CHILD_DIR` set.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use ringmail_queue::{NewEnvelope, NewRecipient, Outcome, QueueConfig, QueueId, Spool};

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
    let deliverer = spool.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let due = deliverer.due_limited(SystemTime::now(), 16);
            if due.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for id in due {
                let Some(claim) = deliverer.claim(&id) else {
                    continue;
                };
                let env = deliverer.get(&id).unwrap().unwrap();
                // Two in three delivered, the rest deferred (not due again during the test).
                let deliver = id.as_str().as_bytes()[18] % 3 != 0;
                let reply = format!("{} test", if deliver { 250 } else { 451 });
                let outcome = if deliver {
                    Outcome::Delivered { reply }
                } else {
                    Outcome::TempFail { reply }
                };
                let rcpt = env.recipients[0].address.clone();
                if deliver {
                    // Once this is recorded the message may be gone before we say so.
                    println!("DELIVERING {id}");
                }
                deliverer
                    .record_attempt_with(env, vec![(rcpt, outcome)], SystemTime::now())
                    .await
                    .unwrap();
                drop(claim);
                println!("{} {id}", if deliver { "DELIVERED" } else { "DEFERRED" });
            }
        }
    }));
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

/// What the child said it did.
#[derive(Default)]
struct Done {
    committed: Vec<(QueueId, u64)>,
    delivering: HashSet<QueueId>,
    delivered: HashSet<QueueId>,
    deferred: HashSet<QueueId>,
}

fn verify(dir: &Path, done: &Done) -> usize {
    let (spool, report) = Spool::open(QueueConfig::new(dir)).unwrap();
    assert_eq!(report.quarantined, 0, "{report:?}");
    for id in &done.delivered {
        assert_eq!(
            spool.get(id).unwrap(),
            None,
            "delivered message {id} came back"
        );
    }
    for id in &done.deferred {
        let env = spool.get(id).unwrap();
        let env = env.unwrap_or_else(|| panic!("deferred message {id} lost ({report:?})"));
        assert_eq!(env.attempts, 1, "deferred message {id} lost its attempt");
    }
    // Every message not (perhaps) delivered is there, deferred ones included.
    for (id, seed) in done
        .committed
        .iter()
        .filter(|(id, _)| !done.delivering.contains(id))
    {
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
    let mut done = Done::default();
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
            const WORDS: [&str; 4] = ["COMMITTED ", "DELIVERING ", "DELIVERED ", "DEFERRED "];
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The test harness may print "test crash_child ... " in front of the first.
                let Some(at) = WORDS.iter().filter_map(|w| line.find(w)).min() else {
                    continue;
                };
                let Some((what, rest)) = line[at..].split_once(' ') else {
                    continue;
                };
                let mut words = rest.split(' ');
                let id = words.next().map(|w| QueueId::parse(w).unwrap());
                let seed = words.next().map(|w| w.parse::<u64>().unwrap());
                let _ = tx.send((what.to_owned(), id.unwrap(), seed));
            }
        });
        let mut record = |(what, id, seed): (String, QueueId, Option<u64>)| match what.as_str() {
            "COMMITTED" => done.committed.push((id, seed.unwrap())),
            "DELIVERING" => {
                done.delivering.insert(id);
            }
            "DELIVERED" => {
                done.delivered.insert(id);
            }
            "DEFERRED" => {
                done.deferred.insert(id);
            }
            _ => {}
        };
        // Wait for the first commit, then kill at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child commits");
        record(first);
        let wait = Duration::from_millis(5 + delay_rng() % 400);
        let start = Instant::now();
        while start.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        rx.try_iter().for_each(&mut record);
        let listed = verify(&dir.0, &done);
        assert!(listed >= done.committed.len() - done.delivering.len());
        eprintln!(
            "round {round}: killed after {wait:?}; so far {} committed, {} delivered, {} \
             deferred; {listed} in the queue",
            done.committed.len(),
            done.delivered.len(),
            done.deferred.len()
        );
    }
}
