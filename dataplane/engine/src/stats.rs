//! Per-worker counters. Each worker writes only its own cache-line-padded slot with relaxed
//! atomics (no contention, no lock); the admin listener sums the slots when scraped.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimit = 0,
    MaxConn = 1,
    NoBackend = 2,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::RateLimit, Refusal::MaxConn, Refusal::NoBackend];
    pub fn label(self) -> &'static str {
        match self {
            Refusal::RateLimit => "rate_limit",
            Refusal::MaxConn => "maxconn",
            Refusal::NoBackend => "no_backend",
        }
    }
}

/// Upper bounds (seconds) of the connect-time histogram buckets.
pub const CONNECT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// Which engine a worker runs, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring = 1,
    Epoll = 2,
}

impl EngineKind {
    pub fn label(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Epoll => "epoll",
        }
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// 0 until the worker started, then an [`EngineKind`].
    pub engine: AtomicU8,
    pub accepts: AtomicU64,
    pub active: AtomicU64,
    pub refused: [AtomicU64; 3],
    /// Connect-time histogram: one counter per bucket plus +Inf.
    pub connect_buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    pub connect_sum_ns: AtomicU64,
    pub connect_count: AtomicU64,
    /// Connections closed because of the idle timeout.
    pub idle_timeouts: AtomicU64,
    /// Receives that found the provided-buffer ring empty (io_uring engine): a sign the ring
    /// is too small for the load; those directions fall back to a private buffer.
    pub buffer_starved: AtomicU64,
    /// Backend connects that failed for a local reason (no free port, descriptors, memory).
    pub local_connect_errors: AtomicU64,
}

impl WorkerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        // Only the owning worker writes: a load+store would do, fetch_add keeps it simple and
        // is uncontended.
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn observe_connect(&self, ns: u64) {
        let secs = ns as f64 / 1e9;
        let idx = CONNECT_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(CONNECT_BUCKETS.len());
        Self::add(&self.connect_buckets[idx], 1);
        Self::add(&self.connect_sum_ns, ns);
        Self::add(&self.connect_count, 1);
    }

    pub fn refuse(&self, why: Refusal) {
        Self::add(&self.refused[why as usize], 1);
    }

    pub fn engine(&self) -> Option<EngineKind> {
        match self.engine.load(Ordering::Relaxed) {
            1 => Some(EngineKind::Uring),
            2 => Some(EngineKind::Epoll),
            _ => None,
        }
    }
}

/// All workers' counters.
#[derive(Debug)]
pub struct Stats {
    pub workers: Box<[CachePadded<WorkerStats>]>,
}

impl Stats {
    pub fn new(workers: usize) -> Stats {
        Stats {
            workers: (0..workers)
                .map(|_| CachePadded::new(WorkerStats::default()))
                .collect(),
        }
    }

    pub fn total(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers
            .iter()
            .map(|w| f(w).load(Ordering::Relaxed))
            .sum()
    }
}
