//! Request/response ping-pong over kept-alive connections: each connection
//! has exactly one request outstanding; latency is from the first byte of
//! the request written to the last byte of the response read.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::Common;
use crate::util::{
    CpuReport, CpuSampler, LatencySummary, Progress, auto_threads, emit_json, new_histogram,
    parse_duration, split_even,
};

#[derive(Debug, Args)]
pub struct RrArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Kept-alive connections (total over all threads).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Client event-loop threads (0 = one per CPU).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Request size; must match the server's --req-size (or use an echo server).
    #[arg(long, default_value_t = 64)]
    pub req_size: usize,
    /// Response size; must match the server's --resp-size (echo: = req size).
    #[arg(long, default_value_t = 64)]
    pub resp_size: usize,
    /// Stop after this many completed requests (safety bound).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub max_requests: u64,
}

#[derive(Debug, Serialize)]
struct RrResult {
    test: &'static str,
    label: Option<String>,
    target: SocketAddr,
    connections: usize,
    threads: usize,
    req_size: usize,
    resp_size: usize,
    duration_s: f64,
    completed: u64,
    requests_per_s: f64,
    errors: u64,
    latency: LatencySummary,
    #[serde(flatten)]
    cpu: CpuReport,
}

enum Phase {
    Writing(usize),
    Reading(usize),
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    t0: Instant,
    alive: bool,
}

struct ThreadOut {
    completed: u64,
    errors: u64,
    hist: Histogram<u64>,
    first_error: Option<String>,
}

pub fn run(a: RrArgs) -> Result<()> {
    crate::ensure_loopback(a.common.target)?;
    anyhow::ensure!(a.connections >= 1, "--connections must be >= 1");
    anyhow::ensure!(a.req_size >= 1 && a.resp_size >= 1, "sizes must be >= 1");
    let threads = auto_threads(a.threads).min(a.connections);
    // Establish every connection before the clock starts.
    let mut groups: Vec<Vec<TcpStream>> = Vec::new();
    for n in split_even(a.connections, threads) {
        let mut g = Vec::with_capacity(n);
        for _ in 0..n {
            let s = std::net::TcpStream::connect_timeout(&a.common.target, a.common.op_timeout)
                .with_context(|| format!("connecting to {}", a.common.target))?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            g.push(TcpStream::from_std(s));
        }
        groups.push(g);
    }
    let counter = Arc::new(AtomicU64::new(0));
    let cpu = CpuSampler::start(a.common.pid)?;
    let progress = (!a.common.quiet).then(|| Progress::start("rr", "req/s", 1.0, counter.clone()));
    let start = Instant::now();
    let deadline = start + a.duration;
    let per_thread_max = a.max_requests.div_ceil(threads as u64);
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let counter = counter.clone();
            let (req, resp, timeout) = (a.req_size, a.resp_size, a.common.op_timeout);
            thread::spawn(move || worker(g, req, resp, timeout, deadline, per_thread_max, &counter))
        })
        .collect();
    let mut hist = new_histogram();
    let (mut completed, mut errors) = (0, 0);
    for h in handles {
        let o = h.join().expect("rr worker panicked")?;
        completed += o.completed;
        errors += o.errors;
        hist.add(&o.hist)?;
        if let Some(e) = o.first_error {
            eprintln!("rr: first error on a worker: {e}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(progress);
    let cpu = cpu.finish();
    let res = RrResult {
        test: "rr",
        label: a.common.label.clone(),
        target: a.common.target,
        connections: a.connections,
        threads,
        req_size: a.req_size,
        resp_size: a.resp_size,
        duration_s: secs,
        completed,
        requests_per_s: completed as f64 / secs,
        errors,
        latency: LatencySummary::from_histogram(&hist),
        cpu,
    };
    emit_json(&res, a.common.json.as_deref())
}

fn worker(
    streams: Vec<TcpStream>,
    req_size: usize,
    resp_size: usize,
    timeout: Duration,
    deadline: Instant,
    max: u64,
    counter: &AtomicU64,
) -> Result<ThreadOut> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let req = vec![0x52u8; req_size];
    let mut buf = vec![0u8; resp_size.max(4096)];
    let mut out = ThreadOut {
        completed: 0,
        errors: 0,
        hist: new_histogram(),
        first_error: None,
    };
    let mut conns: Vec<Conn> = Vec::with_capacity(streams.len());
    for (i, mut s) in streams.into_iter().enumerate() {
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        conns.push(Conn {
            stream: s,
            phase: Phase::Writing(0),
            t0: Instant::now(),
            alive: true,
        });
    }
    // Kick off the first request on every connection.
    let mut started = 0u64;
    let mut unflushed = 0u64;
    for c in conns.iter_mut() {
        c.t0 = Instant::now();
        started += 1;
        step(
            c,
            &req,
            resp_size,
            &mut buf,
            &mut out,
            &mut started,
            max,
            &mut unflushed,
        );
    }
    let mut last_sweep = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline || (out.completed >= max) || conns.iter().all(|c| !c.alive) {
            break;
        }
        let wait = deadline
            .saturating_duration_since(now)
            .min(Duration::from_millis(50));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            if let Some(c) = conns.get_mut(ev.token().0) {
                step(
                    c,
                    &req,
                    resp_size,
                    &mut buf,
                    &mut out,
                    &mut started,
                    max,
                    &mut unflushed,
                );
            }
        }
        if unflushed > 0 {
            counter.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_millis(100) {
            last_sweep = now;
            for c in conns.iter_mut() {
                if c.alive && now.duration_since(c.t0) > timeout {
                    c.alive = false;
                    out.errors += 1;
                    out.first_error
                        .get_or_insert_with(|| "request timed out".into());
                }
            }
        }
    }
    Ok(out)
}

/// Drives one connection until it would block; completes and restarts
/// requests as responses arrive.
#[allow(clippy::too_many_arguments)]
fn step(
    c: &mut Conn,
    req: &[u8],
    resp_size: usize,
    buf: &mut [u8],
    out: &mut ThreadOut,
    started: &mut u64,
    max: u64,
    unflushed: &mut u64,
) {
    if !c.alive {
        return;
    }
    let fail = |c: &mut Conn, out: &mut ThreadOut, e: String| {
        c.alive = false;
        out.errors += 1;
        out.first_error.get_or_insert(e);
    };
    loop {
        match c.phase {
            Phase::Writing(off) => match c.stream.write(&req[off..]) {
                Ok(n) if off + n >= req.len() => c.phase = Phase::Reading(0),
                Ok(n) => c.phase = Phase::Writing(off + n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return fail(c, out, format!("write: {e}")),
            },
            Phase::Reading(got) => {
                let want = (resp_size - got).min(buf.len());
                match c.stream.read(&mut buf[..want]) {
                    Ok(0) => return fail(c, out, "EOF before full response".into()),
                    Ok(n) if got + n >= resp_size => {
                        let now = Instant::now();
                        let _ = out
                            .hist
                            .record(now.duration_since(c.t0).as_nanos().max(1) as u64);
                        out.completed += 1;
                        *unflushed += 1;
                        if *started >= max {
                            c.alive = false;
                            return;
                        }
                        *started += 1;
                        c.t0 = now;
                        c.phase = Phase::Writing(0);
                    }
                    Ok(n) => c.phase = Phase::Reading(got + n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return fail(c, out, format!("read: {e}")),
                }
            }
        }
    }
}
