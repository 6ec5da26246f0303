//! Connection rate: each iteration connects, writes a short request, reads
//! the echoed response, and closes. `--concurrency` iterations are kept in
//! flight (spread over `--threads` event loops).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
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
pub struct ConnrateArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Connections in flight at any time (total over all threads).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Client event-loop threads (0 = one per CPU).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Request size in bytes (the server echoes it back).
    #[arg(long, default_value_t = 64)]
    pub request_size: usize,
    /// Stop after this many completed connections (safety bound).
    #[arg(long, default_value_t = 10_000_000)]
    pub max_conns: u64,
    /// Spread client connections over this many source addresses. One address runs out of
    /// ephemeral ports within seconds at these rates (every closed connection holds its port
    /// in TIME_WAIT), and then the client's own port search, not the proxy, sets the pace.
    /// IPv4 loopback targets use 127.0.0.2 and up. IPv6 targets use the target's address with
    /// its low 32 bits replaced by 2 and up, which must be local (`bench/lb.sh` with FAMILY=6
    /// runs in a network namespace with a `local` route for the target's /64). 1 = let the
    /// kernel choose.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u32,
}

/// Starts a non-blocking connect to `target`, from source address number `n` of `count`.
fn start_connect(target: SocketAddr, n: u64, count: u32) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if count > 1 {
        let k = (n % u64::from(count)) as u32 + 2;
        let source: Option<std::net::IpAddr> = match target.ip() {
            std::net::IpAddr::V4(v4) if v4.is_loopback() => {
                Some(std::net::Ipv4Addr::new(127, (k >> 16) as u8, (k >> 8) as u8, k as u8).into())
            }
            std::net::IpAddr::V6(v6) if !v6.is_loopback() => {
                let high = u128::from(v6) & !u128::from(u32::MAX);
                Some(std::net::Ipv6Addr::from(high | u128::from(k)).into())
            }
            _ => None,
        };
        if let Some(ip) = source {
            sock.bind(&SocketAddr::new(ip, 0).into())?;
        }
    }
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(sock)))
}

#[derive(Debug, Serialize)]
struct ConnrateResult {
    test: &'static str,
    label: Option<String>,
    target: SocketAddr,
    concurrency: usize,
    threads: usize,
    request_size: usize,
    duration_s: f64,
    completed: u64,
    conns_per_s: f64,
    errors: u64,
    timeouts: u64,
    /// connect() until the echoed response is fully read.
    latency: LatencySummary,
    /// connect() until the socket is writable (handshake done).
    connect_latency: LatencySummary,
    #[serde(flatten)]
    cpu: CpuReport,
}

#[derive(Default)]
struct ThreadOut {
    completed: u64,
    errors: u64,
    timeouts: u64,
    hist: Option<Histogram<u64>>,
    conn_hist: Option<Histogram<u64>>,
    first_error: Option<String>,
}

enum Phase {
    Connecting,
    Writing(usize),
    Reading(usize),
}

struct Slot {
    stream: Option<TcpStream>,
    phase: Phase,
    t0: Instant,
}

enum Step {
    Pending,
    Done,
    Failed(String),
}

pub fn run(a: ConnrateArgs) -> Result<()> {
    crate::ensure_loopback(a.common.target)?;
    anyhow::ensure!(a.concurrency >= 1, "--concurrency must be >= 1");
    anyhow::ensure!(a.request_size >= 1, "--request-size must be >= 1");
    let threads = auto_threads(a.threads).min(a.concurrency);
    let counter = Arc::new(AtomicU64::new(0));
    let cpu = CpuSampler::start(a.common.pid)?;
    let progress =
        (!a.common.quiet).then(|| Progress::start("connrate", "conn/s", 1.0, counter.clone()));
    let start = Instant::now();
    let deadline = start + a.duration;
    let per_thread_max = a.max_conns.div_ceil(threads as u64);
    let handles: Vec<_> = split_even(a.concurrency, threads)
        .into_iter()
        .map(|conc| {
            let counter = counter.clone();
            let (target, req, timeout) = (a.common.target, a.request_size, a.common.op_timeout);
            let source_ips = a.source_ips.max(1);
            thread::spawn(move || {
                worker(
                    target,
                    source_ips,
                    conc,
                    req,
                    timeout,
                    deadline,
                    per_thread_max,
                    &counter,
                )
            })
        })
        .collect();
    let mut hist = new_histogram();
    let mut conn_hist = new_histogram();
    let (mut completed, mut errors, mut timeouts) = (0, 0, 0);
    for h in handles {
        let o = h.join().expect("connrate worker panicked")?;
        completed += o.completed;
        errors += o.errors;
        timeouts += o.timeouts;
        if let Some(h) = &o.hist {
            hist.add(h)?;
        }
        if let Some(h) = &o.conn_hist {
            conn_hist.add(h)?;
        }
        if let Some(e) = o.first_error {
            eprintln!("connrate: first error on a worker: {e}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(progress);
    let cpu = cpu.finish();
    let res = ConnrateResult {
        test: "connrate",
        label: a.common.label.clone(),
        target: a.common.target,
        concurrency: a.concurrency,
        threads,
        request_size: a.request_size,
        duration_s: secs,
        completed,
        conns_per_s: completed as f64 / secs,
        errors,
        timeouts,
        latency: LatencySummary::from_histogram(&hist),
        connect_latency: LatencySummary::from_histogram(&conn_hist),
        cpu,
    };
    emit_json(&res, a.common.json.as_deref())
}

#[allow(clippy::too_many_arguments)]
fn worker(
    target: SocketAddr,
    source_ips: u32,
    conc: usize,
    req_size: usize,
    timeout: Duration,
    deadline: Instant,
    max: u64,
    counter: &AtomicU64,
) -> Result<ThreadOut> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let req = vec![0x42u8; req_size];
    let mut buf = vec![0u8; req_size.max(4096)];
    let mut hist = new_histogram();
    let mut conn_hist = new_histogram();
    let mut out = ThreadOut::default();
    let mut started = 0u64;
    let mut unflushed = 0u64;
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..conc)
        .map(|_| Slot {
            stream: None,
            phase: Phase::Connecting,
            t0: now,
        })
        .collect();
    // Slots that need a new connection started.
    let mut idle: Vec<usize> = (0..conc).collect();
    let mut last_sweep = now;
    loop {
        let now = Instant::now();
        let running = now < deadline;
        // (Re)start connections in idle slots.
        if running {
            while let Some(i) = idle.pop() {
                if started >= max {
                    break;
                }
                started += 1;
                let t0 = Instant::now();
                match start_connect(target, started, source_ips) {
                    Ok(mut s) => {
                        let _ = s.set_nodelay(true);
                        poll.registry().register(
                            &mut s,
                            Token(i),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        slots[i] = Slot {
                            stream: Some(s),
                            phase: Phase::Connecting,
                            t0,
                        };
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error
                            .get_or_insert_with(|| format!("connect: {e}"));
                        // Back off briefly, e.g. on ephemeral port exhaustion.
                        idle.push(i);
                        thread::sleep(Duration::from_millis(1));
                        break;
                    }
                }
            }
        }
        let in_flight = slots.iter().filter(|s| s.stream.is_some()).count();
        if in_flight == 0 && (!running || started >= max) {
            break;
        }
        if !running {
            // Drop whatever is still in flight at the deadline.
            for s in &mut slots {
                s.stream = None;
            }
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
            let i = ev.token().0;
            let Some(slot) = slots.get_mut(i) else {
                continue;
            };
            if slot.stream.is_none() {
                continue;
            }
            let conn_done_before = !matches!(slot.phase, Phase::Connecting);
            let step = drive(slot, &req, &mut buf);
            if !conn_done_before && !matches!(slot.phase, Phase::Connecting) {
                let _ = conn_hist.record(slot.t0.elapsed().as_nanos().max(1) as u64);
            }
            match step {
                Step::Pending => {}
                Step::Done => {
                    let _ = hist.record(slot.t0.elapsed().as_nanos().max(1) as u64);
                    slot.stream = None;
                    out.completed += 1;
                    unflushed += 1;
                    idle.push(i);
                }
                Step::Failed(e) => {
                    slot.stream = None;
                    out.errors += 1;
                    out.first_error.get_or_insert(e);
                    idle.push(i);
                }
            }
        }
        if unflushed > 0 {
            counter.fetch_add(unflushed, Ordering::Relaxed);
            unflushed = 0;
        }
        // Expire stuck connections.
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_millis(100) {
            last_sweep = now;
            for (i, s) in slots.iter_mut().enumerate() {
                if s.stream.is_some() && now.duration_since(s.t0) > timeout {
                    s.stream = None;
                    out.timeouts += 1;
                    idle.push(i);
                }
            }
        }
    }
    out.hist = Some(hist);
    out.conn_hist = Some(conn_hist);
    Ok(out)
}

fn drive(slot: &mut Slot, req: &[u8], buf: &mut [u8]) -> Step {
    let Some(s) = slot.stream.as_mut() else {
        return Step::Pending;
    };
    loop {
        match slot.phase {
            Phase::Connecting => {
                match s.take_error() {
                    Ok(Some(e)) | Err(e) => return Step::Failed(format!("connect: {e}")),
                    Ok(None) => {}
                }
                match s.peer_addr() {
                    Ok(_) => slot.phase = Phase::Writing(0),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return Step::Pending,
                    Err(e) => return Step::Failed(format!("connect: {e}")),
                }
            }
            Phase::Writing(off) => match s.write(&req[off..]) {
                Ok(n) if off + n >= req.len() => slot.phase = Phase::Reading(0),
                Ok(n) => slot.phase = Phase::Writing(off + n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Step::Failed(format!("write: {e}")),
            },
            Phase::Reading(got) => {
                let want = req.len() - got;
                match s.read(&mut buf[..want]) {
                    Ok(0) => return Step::Failed("EOF before full response".into()),
                    Ok(n) if got + n >= req.len() => return Step::Done,
                    Ok(n) => slot.phase = Phase::Reading(got + n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Step::Failed(format!("read: {e}")),
                }
            }
        }
    }
}
