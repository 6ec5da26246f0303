//! The load balancer process: starts the workers (one per core, pinned), hands each its own
//! SO_REUSEPORT listening sockets, runs health checks and the admin listener, and carries out
//! reload (SIGHUP) and drain (SIGTERM) by sending messages to the workers. Listening sockets
//! are never closed on reload unless their address left the configuration, so no connection
//! is refused while the configuration changes.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ringmail_proxy_core::config::{EngineChoice, LbConfig, RelayMode};
use ringmail_proxy_core::ratelimit::SourceRateLimiter;
use tracing::{info, warn};

use crate::admin::{self, AdminServer, View};
use crate::epoll;
use crate::healthcheck::{self, HealthChecker};
use crate::runtime::PoolRuntime;
use crate::stats::{EngineKind, Stats};
use crate::sys;
use crate::uring::{self, BufferConfig};
use crate::worker::{Control, Ctx, ListenerSpec, Shared, Snapshot};

/// Why the load balancer could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("io_uring was requested (--engine uring) but cannot be used here: {0}")]
    UringUnavailable(io::Error),
    #[error("cannot start admin listener on {addr}")]
    Admin { addr: SocketAddr, source: io::Error },
    #[error("cannot start worker threads: {0}")]
    Spawn(io::Error),
    #[error("worker setup failed: {0}")]
    Worker(String),
    #[error("cannot start health checks: {0}")]
    Health(io::Error),
}

/// Knobs that are not part of the configuration file (benchmarks and tests use them).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub buffers: BufferConfig,
}

struct WorkerHandle {
    tx: Sender<Control>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn send(&self, msg: Control) {
        if self.tx.send(msg).is_ok() {
            wake(&self.wake);
        }
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a local to our eventfd.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// A running load balancer.
pub struct Lb {
    config: LbConfig,
    workers: Vec<WorkerHandle>,
    shared: Arc<Shared>,
    view: Arc<RwLock<View>>,
    health: Option<HealthChecker>,
    admin: Option<AdminServer>,
    listener_ids: HashMap<SocketAddr, u64>,
    next_listener_id: u64,
    engine: EngineKind,
    maxconn: u32,
}

/// Descriptors each proxied connection costs.
fn fds_per_connection(relay: RelayMode) -> u64 {
    match relay {
        RelayMode::Buffered => 2,
        RelayMode::Splice => 6,
    }
}

impl Lb {
    /// Starts workers, health checks and the admin listener.
    pub fn start(config: LbConfig, options: Options) -> Result<Lb, LbError> {
        let nofile = sys::raise_nofile_limit();
        let per_conn = fds_per_connection(config.global.relay);
        let cap = (nofile.saturating_sub(256) / per_conn).min(u64::from(u32::MAX)) as u32;
        let maxconn = if config.global.maxconn > cap {
            warn!(
                open_files = nofile,
                configured = config.global.maxconn,
                effective = cap,
                "the open-file limit caps maxconn (each proxied connection needs {per_conn} descriptors)"
            );
            cap
        } else {
            info!(
                open_files = nofile,
                maxconn = config.global.maxconn,
                "open-file limit raised"
            );
            config.global.maxconn
        };

        let cpus = sys::allowed_cpus();
        let nworkers = config.global.workers.unwrap_or(cpus.len()).max(1);
        let engine = match config.global.engine {
            EngineChoice::Epoll => EngineKind::Epoll,
            EngineChoice::Uring => {
                uring::probe().map_err(LbError::UringUnavailable)?;
                EngineKind::Uring
            }
            EngineChoice::Auto => match uring::probe() {
                Ok(()) => EngineKind::Uring,
                Err(e) => {
                    warn!(error = %e, "io_uring cannot be used here; falling back to the epoll engine");
                    EngineKind::Epoll
                }
            },
        };

        let stats = Arc::new(Stats::new(nworkers));
        let shared = Arc::new(Shared {
            stats: Arc::clone(&stats),
            active: Default::default(),
            epoch_ms: sys::now_ms(),
            running: Default::default(),
        });
        let mut lb = Lb {
            config: config.clone(),
            workers: Vec::new(),
            shared: Arc::clone(&shared),
            view: Arc::new(RwLock::new(View {
                extensions: Vec::new(),
                pools: Vec::new(),
                stats,
                maxconn,
                open_files: nofile,
                relay: config.global.relay,
            })),
            health: None,
            admin: None,
            listener_ids: HashMap::new(),
            next_listener_id: 1,
            engine,
            maxconn,
        };
        let snapshot = lb.snapshot(&config, None, nworkers);

        // Every worker gets its own socket per listener (SO_REUSEPORT).
        let mut per_worker: Vec<Vec<(u64, OwnedFd)>> = (0..nworkers).map(|_| Vec::new()).collect();
        for spec in &snapshot.listeners {
            sys::ensure_unclaimed(spec.bind).map_err(|source| LbError::Listen {
                addr: spec.bind,
                source,
            })?;
            for list in per_worker.iter_mut() {
                let fd = sys::listener(spec.bind, 4096).map_err(|source| LbError::Listen {
                    addr: spec.bind,
                    source,
                })?;
                list.push((spec.id, fd));
            }
        }

        let fallback = config.global.engine == EngineChoice::Auto;
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let wake_fd = Arc::new(eventfd().map_err(LbError::Spawn)?);
            let worker_wake = dup(&wake_fd).map_err(LbError::Spawn)?;
            let ctx = Ctx::new(id, Arc::clone(&snapshot), Arc::clone(&shared));
            let cpu = config
                .global
                .pin_workers
                .then(|| cpus.get(id % cpus.len().max(1)).copied())
                .flatten();
            let buffers = options.buffers;
            let ready = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringmail-w{id}"))
                .spawn(move || {
                    worker_main(
                        ctx,
                        rx,
                        worker_wake,
                        listeners,
                        engine,
                        fallback,
                        cpu,
                        buffers,
                        ready,
                    )
                })
                .map_err(LbError::Spawn)?;
            lb.workers.push(WorkerHandle {
                tx,
                wake: wake_fd,
                thread: Some(thread),
            });
        }
        drop(ready_tx);
        // "Started" means every worker is set up and accepting on its sockets.
        for _ in 0..nworkers {
            match ready_rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(LbError::Worker(e)),
                Err(_) => {
                    return Err(LbError::Worker(
                        "a worker thread exited during setup".into(),
                    ));
                }
            }
        }
        info!(
            workers = nworkers,
            engine = engine.label(),
            relay = relay_label(config.global.relay),
            listeners = snapshot.listeners.len(),
            "load balancer started"
        );
        for spec in &snapshot.listeners {
            let pool = &snapshot.pools[spec.pool];
            info!(listen = %spec.bind, pool = %pool.config.name, backends = pool.backends.len(), "listening");
        }

        lb.health = Some(healthcheck::spawn(snapshot.pools.clone()).map_err(LbError::Health)?);
        lb.view.write().unwrap_or_else(|e| e.into_inner()).pools = snapshot.pools.clone();
        if let Some(addr) = config.global.admin {
            lb.admin = Some(
                admin::spawn(addr, Arc::clone(&lb.view))
                    .map_err(|source| LbError::Admin { addr, source })?,
            );
            info!(%addr, "admin listener: /metrics, /api/backends");
        }
        Ok(lb)
    }

    fn snapshot(
        &mut self,
        config: &LbConfig,
        previous: Option<&[Arc<PoolRuntime>]>,
        nworkers: usize,
    ) -> Arc<Snapshot> {
        let pools: Vec<Arc<PoolRuntime>> = config
            .pools
            .iter()
            .map(|p| {
                let old = previous.and_then(|prev| prev.iter().find(|o| o.config.name == p.name));
                Arc::new(PoolRuntime::new(p.clone(), nworkers, old.map(|o| &**o)))
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let id = *self.listener_ids.entry(l.bind).or_insert_with(|| {
                    self.next_listener_id += 1;
                    self.next_listener_id
                });
                ListenerSpec {
                    id,
                    bind: l.bind,
                    pool: l.pool,
                }
            })
            .collect();
        let ratelimit = config
            .global
            .source_rate
            .map(|r| Arc::new(SourceRateLimiter::new(r.max, r.period)));
        Arc::new(Snapshot {
            pools,
            listeners,
            ratelimit,
            maxconn: self.maxconn,
            relay: config.global.relay,
        })
    }

    /// The per-worker counters (what `/metrics` shows).
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.shared.stats)
    }

    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// Applies a new configuration without closing listening sockets that stay.
    pub fn reload(&mut self, config: LbConfig) -> Result<(), LbError> {
        if config.global.workers != self.config.global.workers
            || config.global.engine != self.config.global.engine
            || config.global.relay != self.config.global.relay
            || config.global.admin != self.config.global.admin
        {
            warn!("workers, engine, relay and admin changes take effect only after a restart");
        }
        let nworkers = self.workers.len();
        let previous = self
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .pools
            .clone();
        let old_binds: Vec<SocketAddr> = self.config.listeners.iter().map(|l| l.bind).collect();
        // Keep maxconn and relay as started (they are tied to the descriptor budget).
        let mut effective = config.clone();
        effective.global.relay = self.config.global.relay;
        let snapshot = self.snapshot(&effective, Some(&previous), nworkers);

        let mut add: Vec<Vec<(u64, OwnedFd)>> = (0..nworkers).map(|_| Vec::new()).collect();
        for spec in snapshot
            .listeners
            .iter()
            .filter(|s| !old_binds.contains(&s.bind))
        {
            sys::ensure_unclaimed(spec.bind).map_err(|source| LbError::Listen {
                addr: spec.bind,
                source,
            })?;
            for list in add.iter_mut() {
                let fd = sys::listener(spec.bind, 4096).map_err(|source| LbError::Listen {
                    addr: spec.bind,
                    source,
                })?;
                list.push((spec.id, fd));
            }
            info!(listen = %spec.bind, "new listener");
        }
        let remove: Vec<u64> = old_binds
            .iter()
            .filter(|b| !snapshot.listeners.iter().any(|s| s.bind == **b))
            .filter_map(|b| self.listener_ids.remove(b))
            .collect();

        // Health checks restart on the new pools; backends that stayed keep their state.
        if let Some(h) = self.health.take() {
            h.stop();
        }
        self.health = Some(healthcheck::spawn(snapshot.pools.clone()).map_err(LbError::Health)?);
        self.view.write().unwrap_or_else(|e| e.into_inner()).pools = snapshot.pools.clone();
        for (w, add) in self.workers.iter().zip(add) {
            w.send(Control::Reload {
                snapshot: Arc::clone(&snapshot),
                add,
                remove: remove.clone(),
            });
        }
        self.config = config;
        info!(
            listeners = snapshot.listeners.len(),
            pools = snapshot.pools.len(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Stops accepting, lets established connections finish for up to `timeout`, and returns
    /// when every worker is done.
    pub fn drain_and_wait(mut self, timeout: Duration) {
        let active = self
            .shared
            .active
            .load(std::sync::atomic::Ordering::Relaxed);
        info!(
            active,
            timeout_ms = timeout.as_millis() as u64,
            "draining: no new connections"
        );
        let deadline = sys::now_ms() + timeout.as_millis() as u64;
        for w in &self.workers {
            w.send(Control::Drain {
                deadline_ms: deadline,
            });
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(h) = self.health.take() {
            h.stop();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        info!("drained, exiting");
    }

    /// A cheap, shareable check that every worker is running its event loop (for the anycast
    /// glue, which must stop announcing when the proxy cannot serve).
    pub fn liveness(&self) -> Liveness {
        Liveness {
            shared: Arc::clone(&self.shared),
            workers: self.workers.len(),
        }
    }

    /// The admin listener's view (pools with their live health, counters).
    pub fn admin_view(&self) -> Arc<RwLock<View>> {
        Arc::clone(&self.view)
    }

    /// Whether every worker thread is still running.
    pub fn workers_alive(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().is_some_and(|t| !t.is_finished()))
    }
}

/// See [`Lb::liveness`].
#[derive(Clone)]
pub struct Liveness {
    shared: Arc<Shared>,
    workers: usize,
}

impl Liveness {
    /// True while every worker runs its event loop.
    pub fn serving(&self) -> bool {
        self.shared
            .running
            .load(std::sync::atomic::Ordering::Acquire)
            == self.workers
    }
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness")
            .field("serving", &self.serving())
            .finish()
    }
}

pub fn relay_label(relay: RelayMode) -> &'static str {
    match relay {
        RelayMode::Buffered => "buffered",
        RelayMode::Splice => "splice",
    }
}

/// What a worker thread reports once it is set up (or could not be).
type Ready = Result<EngineKind, String>;

#[allow(clippy::too_many_arguments)]
fn worker_main(
    ctx: Ctx,
    rx: mpsc::Receiver<Control>,
    wake_fd: OwnedFd,
    listeners: Vec<(u64, OwnedFd)>,
    engine: EngineKind,
    fallback: bool,
    cpu: Option<usize>,
    buffers: BufferConfig,
    ready: mpsc::Sender<Ready>,
) {
    let id = ctx.id;
    /// Counts the worker as running while its event loop runs.
    struct Running(Arc<Shared>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0
                .running
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
    let shared = Arc::clone(&ctx.shared);
    shared
        .running
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let _running = Running(shared);
    if let Some(cpu) = cpu
        && let Err(e) = sys::pin_current_thread(cpu)
    {
        warn!(worker = id, cpu, error = %e, "cannot pin worker to its CPU");
    }
    let result = match engine {
        EngineKind::Uring => match uring::setup(buffers) {
            Ok(ring) => {
                let _ = ready.send(Ok(EngineKind::Uring));
                uring::UringWorker::new(ring, ctx, rx, wake_fd).run(listeners)
            }
            Err(e) if fallback => {
                warn!(worker = id, error = %e, "io_uring setup failed in this worker; it runs the epoll engine");
                match epoll::EpollWorker::new(ctx, rx, wake_fd) {
                    Ok(w) => {
                        let _ = ready.send(Ok(EngineKind::Epoll));
                        w.run(listeners)
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("worker {id}: epoll setup failed: {e}")));
                        Err(e)
                    }
                }
            }
            Err(e) => {
                let _ = ready.send(Err(format!("worker {id}: io_uring setup failed: {e}")));
                Err(e)
            }
        },
        EngineKind::Epoll => match epoll::EpollWorker::new(ctx, rx, wake_fd) {
            Ok(w) => {
                let _ = ready.send(Ok(EngineKind::Epoll));
                w.run(listeners)
            }
            Err(e) => {
                let _ = ready.send(Err(format!("worker {id}: epoll setup failed: {e}")));
                Err(e)
            }
        },
    };
    if let Err(e) = result {
        tracing::error!(worker = id, error = %e, "worker stopped with an error");
    }
}
