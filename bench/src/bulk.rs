//! Bulk throughput over one or more long-lived streams.
//!
//! * `up`   (server: sink)   client writes for the duration, then half-closes
//!   and waits for the server's EOF, so every counted byte really crossed.
//! * `down` (server: source) client reads for the duration.
//! * `both` (server: echo)   client writes and reads concurrently; both
//!   directions are counted.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::Common;
use crate::util::{CpuReport, CpuSampler, Progress, emit_json, parse_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
    Both,
}

#[derive(Debug, Args)]
pub struct BulkArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Number of parallel streams (connections).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    #[arg(long, value_enum, default_value = "up")]
    pub direction: Direction,
    /// Bytes per write/read call.
    #[arg(long, default_value_t = 128 * 1024)]
    pub chunk: usize,
    /// Stop each stream after this many bytes per direction (safety bound).
    #[arg(long, default_value_t = 1 << 40)]
    pub max_bytes: u64,
    /// How long to wait for the far end to drain after the sending stops.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Serialize)]
struct BulkResult {
    test: &'static str,
    label: Option<String>,
    target: SocketAddr,
    direction: Direction,
    streams: usize,
    duration_s: f64,
    bytes: u64,
    gbit_s: f64,
    /// Streams that failed (connect error, reset, drain timeout).
    errors: u64,
    #[serde(flatten)]
    cpu: CpuReport,
    /// Proxy CPU seconds per GiB moved (needs --pid).
    proxy_cpu_s_per_gib: Option<f64>,
}

struct StreamOutcome {
    bytes: u64,
    end: Instant,
    error: Option<String>,
}

pub fn run(a: BulkArgs) -> Result<()> {
    crate::ensure_loopback(a.common.target)?;
    anyhow::ensure!(
        a.streams >= 1 && a.streams <= 1024,
        "--streams must be 1..=1024"
    );
    anyhow::ensure!(a.chunk >= 1, "--chunk must be > 0");
    let counter = Arc::new(AtomicU64::new(0));
    // Connect every stream before the clock starts.
    let mut conns = Vec::with_capacity(a.streams);
    for _ in 0..a.streams {
        let s = TcpStream::connect_timeout(&a.common.target, a.common.op_timeout)
            .with_context(|| format!("connecting to {}", a.common.target))?;
        s.set_write_timeout(Some(Duration::from_millis(500)))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        conns.push(s);
    }
    let barrier = Arc::new(Barrier::new(a.streams + 1));
    let mut handles = Vec::new();
    for s in conns {
        let barrier = barrier.clone();
        let counter = counter.clone();
        let (dir, chunk, max, drain, dur) = (
            a.direction,
            a.chunk,
            a.max_bytes,
            a.drain_timeout,
            a.duration,
        );
        handles.push(thread::spawn(move || {
            barrier.wait();
            let deadline = Instant::now() + dur;
            match dir {
                Direction::Up => upload(s, chunk, max, deadline, drain, &counter),
                Direction::Down => download(s, chunk, max, deadline, &counter),
                Direction::Both => both(s, chunk, max, deadline, drain, &counter),
            }
        }));
    }
    let cpu = CpuSampler::start(a.common.pid)?;
    let progress =
        (!a.common.quiet).then(|| Progress::start("bulk", "Gbit/s", 8.0 / 1e9, counter.clone()));
    let start = Instant::now();
    barrier.wait();
    let outcomes: Vec<StreamOutcome> = handles
        .into_iter()
        .map(|h| h.join().expect("stream thread panicked"))
        .collect();
    drop(progress);
    let cpu = cpu.finish();
    let end = outcomes.iter().map(|o| o.end).max().unwrap_or(start);
    let secs = end.duration_since(start).as_secs_f64().max(1e-9);
    let bytes: u64 = outcomes.iter().map(|o| o.bytes).sum();
    let mut errors = 0;
    for o in &outcomes {
        if let Some(e) = &o.error {
            errors += 1;
            eprintln!("bulk: stream error: {e}");
        }
    }
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let res = BulkResult {
        test: "bulk",
        label: a.common.label.clone(),
        target: a.common.target,
        direction: a.direction,
        streams: a.streams,
        duration_s: secs,
        bytes,
        gbit_s: bytes as f64 * 8.0 / secs / 1e9,
        errors,
        proxy_cpu_s_per_gib: cpu.proxy_cpu_s.filter(|_| gib > 0.0).map(|c| c / gib),
        cpu,
    };
    emit_json(&res, a.common.json.as_deref())
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn write_loop(
    s: &mut TcpStream,
    chunk: usize,
    max: u64,
    deadline: Instant,
    counter: &AtomicU64,
) -> (u64, Option<String>) {
    let buf = vec![0x5au8; chunk];
    let mut sent = 0u64;
    while sent < max && Instant::now() < deadline {
        let n = ((max - sent) as usize).min(chunk);
        match s.write(&buf[..n]) {
            Ok(0) => return (sent, Some("write returned 0".into())),
            Ok(n) => {
                sent += n as u64;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => return (sent, Some(format!("write: {e}"))),
        }
    }
    (sent, None)
}

/// Reads until EOF, the deadline, or `max` bytes.
fn read_loop(
    s: &mut TcpStream,
    chunk: usize,
    max: u64,
    deadline: Instant,
    counter: &AtomicU64,
) -> (u64, bool, Option<String>) {
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    while got < max && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (got, true, None),
            Ok(n) => {
                got += n as u64;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => return (got, false, Some(format!("read: {e}"))),
        }
    }
    (got, false, None)
}

fn upload(
    mut s: TcpStream,
    chunk: usize,
    max: u64,
    deadline: Instant,
    drain: Duration,
    counter: &AtomicU64,
) -> StreamOutcome {
    let (sent, err) = write_loop(&mut s, chunk, max, deadline, counter);
    if err.is_some() {
        return StreamOutcome {
            bytes: sent,
            end: Instant::now(),
            error: err,
        };
    }
    // Half-close and wait for the sink's EOF: every byte has been consumed.
    let _ = s.shutdown(Shutdown::Write);
    let drain_deadline = Instant::now() + drain;
    let (_, eof, err) = read_loop(&mut s, 4096, u64::MAX, drain_deadline, &AtomicU64::new(0));
    let error = match (eof, err) {
        (_, Some(e)) => Some(e),
        (false, None) => Some("no EOF from server within drain timeout".into()),
        (true, None) => None,
    };
    StreamOutcome {
        bytes: sent,
        end: Instant::now(),
        error,
    }
}

fn download(
    mut s: TcpStream,
    chunk: usize,
    max: u64,
    deadline: Instant,
    counter: &AtomicU64,
) -> StreamOutcome {
    let (got, eof, err) = read_loop(&mut s, chunk, max, deadline, counter);
    let end = Instant::now();
    let error = err.or_else(|| eof.then(|| "unexpected EOF from source".into()));
    StreamOutcome {
        bytes: got,
        end,
        error,
    }
}

fn both(
    s: TcpStream,
    chunk: usize,
    max: u64,
    deadline: Instant,
    drain: Duration,
    counter: &Arc<AtomicU64>,
) -> StreamOutcome {
    let mut reader = match s.try_clone() {
        Ok(r) => r,
        Err(e) => {
            return StreamOutcome {
                bytes: 0,
                end: Instant::now(),
                error: Some(format!("clone: {e}")),
            };
        }
    };
    let rc = counter.clone();
    let rd = thread::spawn(move || read_loop(&mut reader, chunk, u64::MAX, deadline + drain, &rc));
    let mut w = s;
    let (sent, werr) = write_loop(&mut w, chunk, max, deadline, counter);
    let _ = w.shutdown(Shutdown::Write);
    let (got, eof, rerr) = rd.join().expect("reader panicked");
    let end = Instant::now();
    let error = werr
        .or(rerr)
        .or_else(|| (!eof).then(|| "no EOF from echo within drain timeout".into()));
    StreamOutcome {
        bytes: sent + got,
        end,
        error,
    }
}
