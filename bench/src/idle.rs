//! Idle-connection memory: open N connections through the target, push a
//! few bytes through each and wait for the echo (so a proxy has really
//! established both legs), hold them idle, and measure the proxy's RSS
//! growth per connection. Finally verify the connections are still alive.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;

use crate::Common;
use crate::util::{
    CpuReport, CpuSampler, emit_json, parse_duration, proc_fd_count, proc_rss_bytes,
};

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 9000)]
    pub connections: usize,
    /// Bytes echoed through each connection to establish it end to end.
    #[arg(long, default_value_t = 16)]
    pub payload: usize,
    /// Wait after all connections are established before sampling RSS.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub settle: Duration,
    /// Give up opening connections after this long (safety bound).
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub max_open_time: Duration,
}

#[derive(Debug, Serialize)]
struct IdleResult {
    test: &'static str,
    label: Option<String>,
    target: SocketAddr,
    requested: usize,
    established: usize,
    errors: u64,
    first_error: Option<String>,
    open_s: f64,
    /// Connections that still echoed after the measurement.
    alive_after: usize,
    rss_before_bytes: Option<u64>,
    rss_after_bytes: Option<u64>,
    rss_delta_bytes: Option<i64>,
    /// (RSS after - RSS before) / established connections.
    bytes_per_conn: Option<f64>,
    fds_before: Option<u64>,
    fds_after: Option<u64>,
    #[serde(flatten)]
    cpu: CpuReport,
}

/// Soft open-file limit of this process, from /proc/self/limits.
fn nofile_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn echo_once(s: &mut TcpStream, payload: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(payload)?;
    s.read_exact(&mut buf[..payload.len()])?;
    if buf[..payload.len()] != *payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

pub fn run(a: IdleArgs) -> Result<()> {
    crate::ensure_loopback(a.common.target)?;
    anyhow::ensure!(a.payload >= 1, "--payload must be >= 1");
    if let Some(limit) = nofile_limit()
        && (a.connections as u64) + 64 > limit
    {
        bail!(
            "--connections {} needs more fds than the open-file limit {limit} allows",
            a.connections
        );
    }
    let pid = a.common.pid;
    let rss_before = pid.map(proc_rss_bytes).transpose()?;
    let fds_before = pid.and_then(proc_fd_count);
    let cpu = CpuSampler::start(pid)?;
    let payload: Vec<u8> = (0..a.payload).map(|i| b'a' + (i % 26) as u8).collect();
    let mut buf = vec![0u8; a.payload];
    let mut conns = Vec::with_capacity(a.connections);
    let mut errors = 0u64;
    let mut first_error = None;
    let start = Instant::now();
    let give_up = start + a.max_open_time;
    let mut last_report = start;
    while conns.len() < a.connections && Instant::now() < give_up {
        // Allow a bounded number of failures before giving up entirely.
        if errors > 100 + a.connections as u64 / 10 {
            break;
        }
        let r =
            TcpStream::connect_timeout(&a.common.target, a.common.op_timeout).and_then(|mut s| {
                s.set_read_timeout(Some(a.common.op_timeout))?;
                s.set_nodelay(true)?;
                echo_once(&mut s, &payload, &mut buf)?;
                Ok(s)
            });
        match r {
            Ok(s) => conns.push(s),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                thread::sleep(Duration::from_millis(5));
            }
        }
        if !a.common.quiet && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "[{:6.1}s] idle: {} established, {errors} errors",
                start.elapsed().as_secs_f64(),
                conns.len()
            );
        }
    }
    let open_s = start.elapsed().as_secs_f64();
    if !a.common.quiet {
        eprintln!(
            "idle: {} established in {open_s:.2}s ({errors} errors); settling {:?}",
            conns.len(),
            a.settle
        );
    }
    thread::sleep(a.settle);
    let rss_after = pid.map(proc_rss_bytes).transpose()?;
    let fds_after = pid.and_then(proc_fd_count);
    let cpu = cpu.finish();
    // Confirm the held connections survived the idle period.
    let mut alive_after = 0;
    for s in conns.iter_mut() {
        if echo_once(s, &payload, &mut buf).is_ok() {
            alive_after += 1;
        }
    }
    let established = conns.len();
    drop(conns);
    let delta = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some(a as i64 - b as i64),
        _ => None,
    };
    let res = IdleResult {
        test: "idle",
        label: a.common.label.clone(),
        target: a.common.target,
        requested: a.connections,
        established,
        errors,
        first_error,
        open_s,
        alive_after,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_delta_bytes: delta,
        bytes_per_conn: delta
            .filter(|_| established > 0)
            .map(|d| d as f64 / established as f64),
        fds_before,
        fds_after,
        cpu,
    };
    emit_json(&res, a.common.json.as_deref())
}
