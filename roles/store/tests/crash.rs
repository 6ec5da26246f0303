//! Crash safety: two child processes deliver into one mailbox from several threads (and
//! change flags at the same time) and print each delivery once `deliver` returned `Ok`; the
//! parent kills both with SIGKILL at random moments, then reopens the mailbox and checks that
//! every acknowledged message is there exactly once under the UID that was reported, intact,
//! and that the index is consistent.
//!
//! The children are this test binary, re-invoked with `CRASH_CHILD_DIR` set.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringmail_store::{Flag, FlagOp, Store, StoreOptions};

const ENV_DIR: &str = "CRASH_CHILD_DIR";
const USER: &str = "crash@example.org";

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// The message of a seed: a header naming seed and length, then pseudo-random text.
fn message(seed: u64) -> Vec<u8> {
    let mut next = rng(seed);
    let len = 64 + (next() % 40_000) as usize;
    let mut v = format!("X-Seed: {seed} {len}\r\n\r\n").into_bytes();
    while v.len() < len {
        let n = next();
        v.push(b'a' + (n % 26) as u8);
        if n.is_multiple_of(61) {
            v.extend_from_slice(b"\r\n");
        }
    }
    v.truncate(len);
    v
}

fn check(content: &[u8]) -> Result<u64, String> {
    let text = String::from_utf8_lossy(&content[..content.len().min(64)]);
    let line = text.lines().next().ok_or("empty message")?;
    let seed: u64 = line
        .strip_prefix("X-Seed: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|w| w.parse().ok())
        .ok_or("no seed header")?;
    if message(seed) != content {
        return Err(format!("content of seed {seed} differs"));
    }
    Ok(seed)
}

fn open_store(dir: &Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            hostname: "crash.example.net".into(),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return; // only as a child of `kill_9_loses_no_acknowledged_delivery`
    };
    let base: u64 = std::env::var("CRASH_CHILD_BASE").unwrap().parse().unwrap();
    let store = open_store(Path::new(&dir));
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let store = store.clone();
        threads.push(std::thread::spawn(move || {
            let user = store.user(USER).unwrap();
            for n in 0.. {
                let seed = base + t * 1_000_000 + n;
                let msg = message(seed);
                let d = user.deliver(None, &mut &msg[..], None).unwrap();
                println!("DELIVERED {} {} {seed}", d.uidvalidity, d.uid);
            }
        }));
    }
    // A session flipping flags concurrently (index rewrites and file renames).
    let user = store.user(USER).unwrap();
    let mut mb = user.open("INBOX").unwrap();
    let mut next = rng(base);
    loop {
        mb.refresh().unwrap();
        let n = mb.messages().len();
        if n > 0 {
            let uid = mb.messages()[(next() % n as u64) as usize].uid;
            let op = if next().is_multiple_of(2) {
                FlagOp::Add
            } else {
                FlagOp::Remove
            };
            mb.store_flags(&[uid], op, &[Flag::Seen, Flag::Keyword("K".into())], None)
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (uidvalidity, uid) -> seed of every acknowledged delivery.
fn verify(dir: &Path, acked: &HashMap<(u32, u32), u64>) -> usize {
    let user = open_store(dir).user(USER).unwrap();
    let mut mb = user.open("INBOX").unwrap();
    assert!(mb.refresh().unwrap().is_empty());
    let msgs = mb.messages().to_vec();
    let mut uids = HashSet::new();
    let mut seeds: HashMap<u64, u32> = HashMap::new();
    for m in &msgs {
        assert!(uids.insert(m.uid), "uid {} twice", m.uid);
        assert!(m.uid < mb.uidnext());
        let content = mb.read(m.uid).unwrap();
        assert_eq!(content.len() as u64, m.size, "uid {}", m.uid);
        let seed = check(&content).unwrap_or_else(|e| panic!("uid {}: {e}", m.uid));
        if let Some(other) = seeds.insert(seed, m.uid) {
            panic!("seed {seed} stored twice (uids {other} and {})", m.uid);
        }
    }
    for (&(v, uid), seed) in acked {
        assert_eq!(v, mb.uidvalidity(), "UIDVALIDITY changed");
        assert_eq!(
            seeds.get(seed),
            Some(&uid),
            "acknowledged delivery of seed {seed} as uid {uid} lost or renumbered"
        );
    }
    let st = user.status("INBOX").unwrap();
    assert_eq!(st.messages as usize, msgs.len());
    msgs.len()
}

fn spawn(exe: &Path, dir: &Path, base: u64, tx: mpsc::Sender<((u32, u32), u64)>) -> Child {
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(ENV_DIR, dir)
        .env("CRASH_CHILD_BASE", base.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("DELIVERED ") {
                let w: Vec<&str> = rest.split(' ').collect();
                let _ = tx.send((
                    (w[0].parse().unwrap(), w[1].parse().unwrap()),
                    w[2].parse().unwrap(),
                ));
            }
        }
    });
    child
}

#[test]
fn kill_9_loses_no_acknowledged_delivery() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("ringmail-store-crash-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: HashMap<(u32, u32), u64> = HashMap::new();
    let mut delay = rng(std::process::id() as u64 ^ 0x5eed);
    for round in 0..6u64 {
        let (tx, rx) = mpsc::channel();
        let mut children = [
            spawn(&exe, &dir.0, (round * 2 + 1) * 1_000_000_000, tx.clone()),
            spawn(&exe, &dir.0, (round * 2 + 2) * 1_000_000_000, tx),
        ];
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the children deliver");
        assert!(acked.insert(first.0, first.1).is_none());
        let wait = Duration::from_millis(20 + delay() % 400);
        let start = Instant::now();
        for c in children.iter_mut() {
            while start.elapsed() < wait {
                std::thread::sleep(Duration::from_millis(1));
            }
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(delay() % 50) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Readers end when the pipes close.
        for (k, seed) in rx.iter() {
            assert!(
                acked.insert(k, seed).is_none(),
                "uid {k:?} acknowledged twice"
            );
        }
        let stored = verify(&dir.0, &acked);
        assert!(stored >= acked.len());
        eprintln!(
            "round {round}: killed after {wait:?}; {} acknowledged, {stored} stored",
            acked.len()
        );
    }
}
