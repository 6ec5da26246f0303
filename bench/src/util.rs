//! Shared helpers: duration parsing, /proc sampling, progress reporting,
//! latency summaries and result output.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest run any test accepts, so a typo cannot start an unbounded load.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a bare number of seconds, capped
/// at [`MAX_DURATION`] (for load loops).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_capped(s, MAX_DURATION)
}

/// Like [`parse_duration`] but allows up to a day (for server lifetimes).
pub fn parse_long_duration(s: &str) -> Result<Duration, String> {
    parse_duration_capped(s, Duration::from_secs(24 * 3600))
}

fn parse_duration_capped(s: &str, cap: Duration) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration `{s}` (use e.g. 10s, 500ms, 2m, 1h)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration `{s}`"));
    }
    let d = Duration::from_secs_f64(v * mult);
    if d > cap {
        return Err(format!("duration `{s}` exceeds the {}s cap", cap.as_secs()));
    }
    Ok(d)
}

/// Clock ticks per second used by /proc/PID/stat (USER_HZ).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU time (user+system, all threads) consumed so far by a process.
pub fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may contain spaces and parentheses; fields resume
    // after the last ')'. utime and stime are fields 14 and 15 overall.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field N is at index N-3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / clock_ticks())
}

/// Resident set size in bytes (VmRSS from /proc/PID/status).
pub fn proc_rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            let kb: u64 = v
                .split_whitespace()
                .next()
                .context("empty VmRSS")?
                .parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS in {path}")
}

/// Number of open file descriptors of a process.
pub fn proc_fd_count(pid: u32) -> Option<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// CPU sampling of the process under test (`--pid`) and of this client.
pub struct CpuSampler {
    pid: Option<u32>,
    proxy_start: Option<f64>,
    self_start: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CpuReport {
    /// CPU seconds (user+system) the watched process used during the test.
    pub proxy_cpu_s: Option<f64>,
    /// CPU seconds this load generator used during the test.
    pub client_cpu_s: f64,
}

impl CpuSampler {
    pub fn start(pid: Option<u32>) -> Result<Self> {
        let proxy_start = match pid {
            Some(p) => Some(proc_cpu_seconds(p)?),
            None => None,
        };
        Ok(Self {
            pid,
            proxy_start,
            self_start: proc_cpu_seconds(std::process::id()).unwrap_or(0.0),
        })
    }

    pub fn finish(&self) -> CpuReport {
        let proxy_cpu_s = match (self.pid, self.proxy_start) {
            (Some(p), Some(s)) => proc_cpu_seconds(p).ok().map(|e| e - s),
            _ => None,
        };
        let client_cpu_s = proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - self.self_start;
        CpuReport {
            proxy_cpu_s,
            client_cpu_s,
        }
    }
}

/// Prints `label: rate so far` on stderr once a second until stopped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Progress {
    /// `scale` converts counter units per second into the printed unit.
    pub fn start(
        label: &'static str,
        unit: &'static str,
        scale: f64,
        counter: Arc<AtomicU64>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let start = Instant::now();
                let mut last = start;
                let mut last_v = 0u64;
                let mut next = start + Duration::from_secs(1);
                while !stop2.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        thread::sleep((next - now).min(Duration::from_millis(100)));
                        continue;
                    }
                    next += Duration::from_secs(1);
                    let v = counter.load(Ordering::Relaxed);
                    let total = now.duration_since(start).as_secs_f64();
                    let dt = now.duration_since(last).as_secs_f64().max(1e-9);
                    let cur = (v - last_v) as f64 / dt * scale;
                    let avg = v as f64 / total.max(1e-9) * scale;
                    eprintln!("[{total:6.1}s] {label}: {cur:.2} {unit} (avg {avg:.2})");
                    last = now;
                    last_v = v;
                }
            })
            .expect("spawn progress thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// New latency histogram in nanoseconds, 1 ns .. 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Writes the result as pretty JSON to `path`, or to stdout if `None`.
pub fn emit_json<T: Serialize>(value: &T, path: Option<&Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    match path {
        Some(p) => {
            fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
        }
    }
    Ok(())
}

/// Number of worker threads to use when the user asks for `0` (auto).
pub fn auto_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// Splits `total` items over `parts` buckets as evenly as possible.
pub fn split_even(total: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("2h").is_err());
        assert_eq!(
            parse_long_duration("6h").unwrap(),
            Duration::from_secs(6 * 3600)
        );
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("61m").is_err());
    }

    #[test]
    fn split() {
        assert_eq!(split_even(5, 2), vec![3, 2]);
        assert_eq!(split_even(1, 3), vec![1, 0, 0]);
    }

    #[test]
    fn self_proc_readable() {
        let me = std::process::id();
        assert!(proc_rss_bytes(me).unwrap() > 0);
        assert!(proc_cpu_seconds(me).unwrap() >= 0.0);
        assert!(proc_fd_count(me).unwrap() > 0);
    }
}
