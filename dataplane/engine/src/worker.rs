//! What every worker does the same way whatever its engine: admission at accept (draining,
//! per-source rate, global maxconn), backend choice through the pool's balancer, and the
//! bookkeeping of active connections. The engines call into [`Ctx`] and do only the I/O.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use ringmail_proxy_core::balance::{Balancer, Candidate};
use ringmail_proxy_core::config::RelayMode;
use ringmail_proxy_core::ratelimit::SourceRateLimiter;
use ringmail_proxy_core::session::{AfterConnectFailure, Session};

use crate::runtime::PoolRuntime;
use crate::stats::{Refusal, Stats, WorkerStats};
use crate::sys;

/// Connect errors caused by this host rather than the backend.
pub fn is_local_connect_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::EADDRNOTAVAIL
            | libc::EADDRINUSE
            | libc::EMFILE
            | libc::ENFILE
            | libc::ENOBUFS
            | libc::ENOMEM
            | libc::EAGAIN
            | libc::EINTR
    )
}

/// One listening address as workers see it. `id` is stable across reloads for the same bind.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub id: u64,
    pub bind: SocketAddr,
    /// Index into [`Snapshot::pools`].
    pub pool: usize,
}

/// The configuration a worker runs with; replaced as a whole on reload.
#[derive(Debug)]
pub struct Snapshot {
    pub pools: Vec<Arc<PoolRuntime>>,
    pub listeners: Vec<ListenerSpec>,
    pub ratelimit: Option<Arc<SourceRateLimiter>>,
    pub maxconn: u32,
    pub relay: RelayMode,
}

/// State shared by all workers: atomics only.
#[derive(Debug)]
pub struct Shared {
    pub stats: Arc<Stats>,
    /// Client connections being proxied, all workers together (global maxconn).
    pub active: AtomicU32,
    /// Process start, for the rate limiter's clock.
    pub epoch_ms: u64,
    /// Worker threads that are running their event loop (the anycast glue withdraws when one
    /// dies: a host that lost a core's worker must not attract that core's share of flows).
    pub running: std::sync::atomic::AtomicUsize,
}

/// Messages from the control thread to a worker.
#[derive(Debug)]
pub enum Control {
    /// New configuration; `add` are this worker's sockets for new listeners, `remove` the ids
    /// of listeners to close.
    Reload {
        snapshot: Arc<Snapshot>,
        add: Vec<(u64, OwnedFd)>,
        remove: Vec<u64>,
    },
    /// Stop accepting; finish established connections; exit when none is left or at `deadline_ms`.
    Drain { deadline_ms: u64 },
}

/// What a control message asks of an engine's listening sockets.
#[derive(Debug, Default)]
pub struct ListenerChanges {
    /// Listeners to close, by id.
    pub close: Vec<u64>,
    /// Close every listener (drain).
    pub close_all: bool,
    /// This worker's sockets for new listeners.
    pub add: Vec<(u64, OwnedFd)>,
}

/// A worker's engine-independent context.
pub struct Ctx {
    pub id: usize,
    pub snapshot: Arc<Snapshot>,
    pub shared: Arc<Shared>,
    balancers: Vec<Balancer>,
    candidates: Vec<Candidate>,
    tried: Vec<usize>,
    /// Coarse monotonic clock, refreshed once per event-loop turn.
    pub now_ms: u64,
    /// Set when draining: the deadline after which remaining connections are closed.
    pub drain_deadline_ms: Option<u64>,
}

/// A backend chosen for a connection; the active count has been taken.
#[derive(Debug, Clone, Copy)]
pub struct Pick {
    pub backend: usize,
    pub addr: SocketAddr,
}

impl Ctx {
    pub fn new(id: usize, snapshot: Arc<Snapshot>, shared: Arc<Shared>) -> Ctx {
        let balancers = Self::balancers_for(id, &snapshot);
        Ctx {
            id,
            snapshot,
            shared,
            balancers,
            candidates: Vec::new(),
            tried: Vec::new(),
            now_ms: sys::now_ms(),
            drain_deadline_ms: None,
        }
    }

    fn balancers_for(id: usize, snapshot: &Snapshot) -> Vec<Balancer> {
        snapshot
            .pools
            .iter()
            .map(|p| Balancer::new(p.config.algorithm, id as u64))
            .collect()
    }

    /// Installs a new configuration (reload). Established connections keep their pool.
    pub fn install(&mut self, snapshot: Arc<Snapshot>) {
        self.balancers = Self::balancers_for(self.id, &snapshot);
        self.snapshot = snapshot;
    }

    /// Applies a control message to the worker's state and says what the engine must do with
    /// its listening sockets; afterwards [`Ctx::listener_pool`] gives each listener's pool.
    pub fn apply(&mut self, msg: Control) -> ListenerChanges {
        match msg {
            Control::Reload {
                snapshot,
                add,
                remove,
            } => {
                self.install(snapshot);
                ListenerChanges {
                    close: remove,
                    close_all: false,
                    add,
                }
            }
            Control::Drain { deadline_ms } => {
                self.drain_deadline_ms = Some(deadline_ms);
                ListenerChanges {
                    close_all: true,
                    ..ListenerChanges::default()
                }
            }
        }
    }

    /// The pool (index in the current snapshot) behind listener `id`.
    pub fn listener_pool(&self, id: u64) -> usize {
        self.snapshot
            .listeners
            .iter()
            .find(|s| s.id == id)
            .map_or(0, |s| s.pool)
    }

    /// Takes in a freshly accepted client on a listener of pool `pool_index`: its address,
    /// admission (rate, maxconn) and pool. When it is refused the descriptor is closed and
    /// `None` returned; otherwise the connection counts as active and starts a [`Session`].
    pub fn accept_client(
        &mut self,
        fd: RawFd,
        pool_index: usize,
    ) -> Option<(SocketAddr, Arc<PoolRuntime>, Session)> {
        let admitted = match sys::peer_addr(fd) {
            Ok(peer) => self.admit(peer).is_ok().then_some(peer),
            Err(_) => None,
        };
        let Some(peer) = admitted else {
            sys::close(fd);
            return None;
        };
        let Some(pool) = self.snapshot.pools.get(pool_index).cloned() else {
            self.release_client();
            sys::close(fd);
            return None;
        };
        let session = Session::new(self.now_ms, pool.config.connect_retries);
        Some((peer, pool, session))
    }

    /// Picks the backend for a connect attempt of `session` and records it there. `None`
    /// means no backend is available: the session is closed, and on the first attempt the
    /// refusal is counted.
    pub fn pick_for(
        &mut self,
        session: &mut Session,
        pool_index: usize,
        pool: &PoolRuntime,
        peer: SocketAddr,
        first: bool,
    ) -> Option<Pick> {
        let Some(pick) = self.pick(pool_index, pool, peer.ip(), session) else {
            if first {
                self.stats().refuse(Refusal::NoBackend);
            }
            session.on_no_backend();
            tracing::debug!(client = %peer, pool = %pool.config.name, "no backend available");
            return None;
        };
        session.connecting_to(pick.backend);
        Some(pick)
    }

    /// A connect of `session` to `backend` failed with `errno`: counts it, releases the
    /// backend slot, and decides whether to retry (another backend after a backend fault, the
    /// same one allowed again after a local error) or give up.
    pub fn connect_failed(
        &self,
        session: &mut Session,
        pool: &PoolRuntime,
        backend: usize,
        errno: i32,
    ) -> AfterConnectFailure {
        let backend_fault = self.connect_error(pool, backend, errno);
        self.release_backend(pool, backend);
        tracing::debug!(
            errno,
            attempt = session.attempts(),
            "backend connect failed"
        );
        if backend_fault {
            session.on_connect_failed()
        } else {
            session.on_local_connect_failure()
        }
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats.workers[self.id]
    }

    pub fn draining(&self) -> bool {
        self.drain_deadline_ms.is_some()
    }

    /// Admission of a freshly accepted connection from `peer`. On success the connection
    /// counts as active until [`Ctx::release_client`].
    pub fn admit(&mut self, peer: SocketAddr) -> Result<(), Refusal> {
        WorkerStats::add(&self.stats().accepts, 1);
        if let Some(rl) = &self.snapshot.ratelimit {
            let now =
                std::time::Duration::from_millis(self.now_ms.saturating_sub(self.shared.epoch_ms));
            if !rl.allow(peer.ip(), now) {
                self.stats().refuse(Refusal::RateLimit);
                return Err(Refusal::RateLimit);
            }
        }
        let before = self.shared.active.fetch_add(1, Ordering::AcqRel);
        if before >= self.snapshot.maxconn {
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
            self.stats().refuse(Refusal::MaxConn);
            return Err(Refusal::MaxConn);
        }
        WorkerStats::add(&self.stats().active, 1);
        Ok(())
    }

    /// The client connection is gone.
    pub fn release_client(&self) {
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        self.stats().active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Picks a backend of `pool` (index in the current snapshot) for a client at `source`,
    /// excluding those the session already tried, and takes an active slot on it.
    pub fn pick(
        &mut self,
        pool_index: usize,
        pool: &PoolRuntime,
        source: IpAddr,
        session: &Session,
    ) -> Option<Pick> {
        session.tried_into(&mut self.tried);
        let generation = pool.generation.load(Ordering::Acquire);
        for _ in 0..pool.backends.len().max(1) {
            self.candidates.clear();
            self.candidates
                .extend(pool.backends.iter().map(|b| Candidate {
                    weight: b.weight.load(Ordering::Relaxed),
                    active: b.active.load(Ordering::Relaxed),
                    eligible: b.eligible(),
                }));
            // A pool from an older snapshot (connection accepted before a reload, now retrying)
            // has no balancer of its own any more: use a throwaway least-connections one.
            let chosen = match self.balancers.get_mut(pool_index) {
                Some(b) if std::ptr::eq(&*self.snapshot.pools[pool_index], pool) => {
                    b.pick(&self.candidates, generation, source, &self.tried)
                }
                _ => Balancer::new(Default::default(), self.id as u64).pick(
                    &self.candidates,
                    generation,
                    source,
                    &self.tried,
                ),
            }?;
            let backend = &pool.backends[chosen];
            // Take the slot; respect maxconn against concurrent workers.
            let taken = match backend.maxconn {
                None => {
                    backend.active.fetch_add(1, Ordering::AcqRel);
                    true
                }
                Some(max) => backend
                    .active
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                        (a < max).then_some(a + 1)
                    })
                    .is_ok(),
            };
            if taken {
                WorkerStats::add(&backend.per_worker[self.id].total, 1);
                return Some(Pick {
                    backend: chosen,
                    addr: backend.addr,
                });
            }
            self.tried.push(chosen);
        }
        None
    }

    /// The backend connection is gone (closed or failed to connect).
    pub fn release_backend(&self, pool: &PoolRuntime, backend: usize) {
        pool.backends[backend].active.fetch_sub(1, Ordering::AcqRel);
    }

    /// A connect to `backend` failed with `errno`. Returns whether the backend is to blame.
    /// `fall` backend failures in a row take it out of rotation at once (passive health, like
    /// HAProxy's `observe layer4`); the health checker brings it back after `rise` passing
    /// checks. Local failures (no free port, descriptors, memory) say nothing about the
    /// backend: they are counted apart and never mark it down.
    pub fn connect_error(&self, pool: &PoolRuntime, backend: usize, errno: i32) -> bool {
        if is_local_connect_error(errno) {
            WorkerStats::add(&self.stats().local_connect_errors, 1);
            tracing::debug!(errno, "backend connect failed for a local reason");
            return false;
        }
        let b = &pool.backends[backend];
        WorkerStats::add(&b.per_worker[self.id].connect_errors, 1);
        let streak = b.connect_fail_streak.fetch_add(1, Ordering::AcqRel) + 1;
        if streak == pool.config.health.fall.max(1) && pool.set_up(backend, false) {
            tracing::warn!(
                pool = %pool.config.name,
                backend = %b.name,
                failures = streak,
                "backend down: consecutive connect failures"
            );
        }
        true
    }

    /// A connect to `backend` succeeded.
    pub fn connect_ok(&self, pool: &PoolRuntime, backend: usize) {
        let streak = &pool.backends[backend].connect_fail_streak;
        // Read first: the common case writes nothing, so the line is not bounced between workers.
        if streak.load(Ordering::Relaxed) != 0 {
            streak.store(0, Ordering::Relaxed);
        }
    }

    pub fn count_bytes(&self, pool: &PoolRuntime, backend: usize, to_backend: bool, n: u64) {
        let c = &pool.backends[backend].per_worker[self.id];
        WorkerStats::add(
            if to_backend {
                &c.bytes_to_backend
            } else {
                &c.bytes_to_client
            },
            n,
        );
    }

    /// True when a draining worker may close what is left.
    pub fn drain_expired(&self) -> bool {
        self.drain_deadline_ms.is_some_and(|d| self.now_ms >= d)
    }
}
