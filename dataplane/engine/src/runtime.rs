//! Shared runtime state: what the control plane (health checks, admin API, reload) and the
//! workers both see. Workers only read it or bump per-worker counters; every field is an atomic,
//! so the hot path takes no lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use ringmail_proxy_core::config::{Backend, Pool};

/// Administrative state of a backend, set through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes new connections when healthy.
    Ready = 0,
    /// Takes no new connections; established ones go on.
    Drain = 1,
}

/// Counters one worker keeps for one backend. Only that worker writes them.
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub total: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub connect_errors: AtomicU64,
}

/// One backend as the running process sees it.
#[derive(Debug)]
pub struct BackendRuntime {
    pub name: String,
    pub addr: SocketAddr,
    pub maxconn: Option<u32>,
    /// Health as decided by the checker (rise/fall applied).
    pub up: AtomicBool,
    pub admin: AtomicU8,
    pub weight: AtomicU32,
    /// Connections to this backend across all workers (least-connections and maxconn use it).
    pub active: AtomicU32,
    /// Connect failures in a row, across workers (passive health: reaching the pool's `fall`
    /// takes the backend out before the next check).
    pub connect_fail_streak: AtomicU32,
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Reason of the last failed check, for the admin API.
    pub last_check_error: std::sync::Mutex<Option<String>>,
    /// One slot per worker, cache-line padded.
    pub per_worker: Box<[CachePadded<BackendCounters>]>,
}

impl BackendRuntime {
    pub fn new(cfg: &Backend, workers: usize) -> Self {
        BackendRuntime {
            name: cfg.name.clone(),
            addr: cfg.addr,
            maxconn: cfg.maxconn,
            up: AtomicBool::new(true),
            admin: AtomicU8::new(AdminState::Ready as u8),
            weight: AtomicU32::new(cfg.weight),
            active: AtomicU32::new(0),
            connect_fail_streak: AtomicU32::new(0),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            last_check_error: std::sync::Mutex::new(None),
            per_worker: (0..workers)
                .map(|_| CachePadded::new(BackendCounters::default()))
                .collect(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn admin_state(&self) -> AdminState {
        if self.admin.load(Ordering::Relaxed) == AdminState::Drain as u8 {
            AdminState::Drain
        } else {
            AdminState::Ready
        }
    }

    /// Healthy, not draining, under maxconn.
    pub fn eligible(&self) -> bool {
        self.is_up()
            && self.admin_state() == AdminState::Ready
            && self
                .maxconn
                .is_none_or(|m| self.active.load(Ordering::Relaxed) < m)
    }

    /// Sum of a per-worker counter.
    pub fn sum(&self, f: impl Fn(&BackendCounters) -> &AtomicU64) -> u64 {
        self.per_worker
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    }
}

/// One pool as the running process sees it.
#[derive(Debug)]
pub struct PoolRuntime {
    pub config: Pool,
    pub backends: Vec<Arc<BackendRuntime>>,
    /// Bumped whenever a backend's health, admin state or weight changes, so workers rebuild
    /// their balancing tables (Maglev, weighted round-robin) only then.
    pub generation: AtomicU64,
}

impl PoolRuntime {
    /// Builds a pool, reusing the runtime of backends that already existed (same address,
    /// name and maxconn) in `previous` so that health state and counters survive a reload. A
    /// backend whose name or maxconn changed gets a fresh runtime that keeps its health state.
    pub fn new(config: Pool, workers: usize, previous: Option<&PoolRuntime>) -> Self {
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let old = previous.and_then(|p| p.backends.iter().find(|old| old.addr == b.addr));
                match old {
                    Some(old) if old.name == b.name && old.maxconn == b.maxconn => {
                        old.weight.store(b.weight, Ordering::Relaxed);
                        Arc::clone(old)
                    }
                    Some(old) => {
                        let fresh = BackendRuntime::new(b, workers);
                        fresh.up.store(old.is_up(), Ordering::Relaxed);
                        fresh
                            .admin
                            .store(old.admin.load(Ordering::Relaxed), Ordering::Relaxed);
                        Arc::new(fresh)
                    }
                    None => Arc::new(BackendRuntime::new(b, workers)),
                }
            })
            .collect();
        PoolRuntime {
            config,
            backends,
            generation: AtomicU64::new(1),
        }
    }

    /// Records a health decision; returns true when it changed the backend's state.
    pub fn set_up(&self, backend: usize, up: bool) -> bool {
        let b = &self.backends[backend];
        let changed = b.up.swap(up, Ordering::AcqRel) != up;
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    pub fn set_admin(&self, backend: usize, state: AdminState) {
        self.backends[backend]
            .admin
            .store(state as u8, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn set_weight(&self, backend: usize, weight: u32) {
        self.backends[backend]
            .weight
            .store(weight, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn healthy_count(&self) -> usize {
        self.backends.iter().filter(|b| b.is_up()).count()
    }
}
