//! Thread-per-core serving, as in the load balancer: one worker thread per core, each with a
//! current-thread tokio runtime and its own SO_REUSEPORT listening socket per address, so the
//! kernel spreads connections and no task ever migrates between cores.
//!
//! ```text
//!   worker 0: listeners ─▶ accept ─▶ session tasks (current-thread runtime)
//!   worker 1: listeners ─▶ accept ─▶ session tasks
//!   (pinned to a CPU each with `runtime = "per-core-pinned"`)
//!   shared: config, spool (committer thread), TLS, rate limiters — all behind Arcs/atomics
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tracing::{error, warn};

/// `fut` with a deadline, as `tokio::time::timeout_at`, but on a timer kept for a session's or
/// a connection's life and moved to `deadline`, instead of a new one registered with the
/// runtime's timer wheel (and removed) per call. `fut` is polled first: a result already there
/// wins over an expired timer. `Err(())`: the deadline passed.
pub(crate) async fn before<F: Future>(
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    fut: F,
) -> Result<F::Output, ()> {
    timer.as_mut().reset(deadline);
    tokio::select! {
        biased;
        r = fut => Ok(r),
        () = timer => Err(()),
    }
}

/// A listening socket of one worker, with SO_REUSEPORT so that every worker has its own.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // An anycast or service address may be configured after start (IP_FREEBIND).
    let _ = if addr.is_ipv6() {
        socket.set_freebind_v6(true)
    } else {
        socket.set_freebind_v4(true)
    };
    socket.set_nonblocking(true)?;
    // Replies are small writes that must not wait for an ACK. On Linux accepted sockets
    // inherit TCP_NODELAY from the listener, saving a setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Fails with `AddrInUse` when another socket is bound to `addr` (or overlaps it, e.g. a
/// wildcard bind on the same port): the workers' SO_REUSEPORT sockets would otherwise share
/// a port another process of the same user listens on, each getting part of the connections.
/// A plain bind refuses that, as Postfix and Dovecot do. Port 0 is not checked.
pub fn ensure_unclaimed(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Connections in TIME_WAIT on the port are no conflict.
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    let _ = if addr.is_ipv6() {
        probe.set_freebind_v6(true)
    } else {
        probe.set_freebind_v4(true)
    };
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "address already in use by another socket (another process listens there)",
            )
        } else {
            e
        }
    })
}

/// Binds `addr` for every worker, after checking that no other socket holds it.
fn claim(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let err = |e: io::Error| io::Error::new(e.kind(), format!("{addr}: {e}"));
    ensure_unclaimed(addr).map_err(err)?;
    (0..workers)
        .map(|_| reuseport_listener(addr).map_err(err))
        .collect()
}

/// Running workers; stopping sets a flag every accept loop checks.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    stop_notify: Arc<tokio::sync::Notify>,
}

/// How sessions are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeMode {
    /// One thread per core, each with a current-thread runtime and its own SO_REUSEPORT
    /// listener (the default). The threads are not pinned: a role server also runs its spool
    /// committer, its relay and its resolver, and shares the host with whatever else runs
    /// there; pinned workers then wait for their own core while another is idle (measured on
    /// the acceptance benchmark, where the load generator shares the cores: unpinned workers
    /// took 12-15 % more messages per second at 15 % less CPU per message).
    #[default]
    PerCore,
    /// The same with worker N pinned to the Nth CPU the process may run on: for a host whose
    /// cores belong to this role alone.
    PerCorePinned,
    /// One tokio multi-thread runtime with `n` workers and work stealing, one listener per
    /// address (kept for the comparison in bench/RESULTS.md).
    MultiThread,
}

impl Workers {
    /// Starts the sessions' runtime in `mode` (see [`RuntimeMode`]).
    pub fn start_mode<F, Fut>(
        mode: RuntimeMode,
        n: usize,
        listen: &[SocketAddr],
        pin: Option<fn(usize) -> io::Result<()>>,
        session: F,
    ) -> io::Result<Workers>
    where
        F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        match mode {
            RuntimeMode::PerCore => Workers::start(n, listen, None, session),
            RuntimeMode::PerCorePinned => Workers::start(n, listen, pin, session),
            RuntimeMode::MultiThread => Workers::start_multi(n, listen, session),
        }
    }

    fn start_multi<F, Fut>(n: usize, listen: &[SocketAddr], session: F) -> io::Result<Workers>
    where
        F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_notify = Arc::new(tokio::sync::Notify::new());
        let listeners = listen
            .iter()
            .map(|a| claim(*a, 1))
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .thread_name("ringmail-mx-mt")
            .enable_all()
            .build()?;
        let (s2, n2) = (Arc::clone(&stop), Arc::clone(&stop_notify));
        let t = std::thread::Builder::new()
            .name("ringmail-mx-rt".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for l in listeners {
                        let Ok(l) = TcpListener::from_std(l) else {
                            continue;
                        };
                        let (session, stop, notify) =
                            (session.clone(), Arc::clone(&s2), Arc::clone(&n2));
                        tasks.push(tokio::spawn(async move {
                            accept_loop(l, session, stop, notify).await;
                        }));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })?;
        Ok(Workers {
            threads: vec![t],
            stop,
            stop_notify,
        })
    }

    /// Starts `n` workers. Every worker binds each address in `listen` (all binds are done
    /// before this returns, so an address in use is reported at once) and runs `session` for
    /// every accepted connection.
    ///
    /// `pin`, when given, is called by worker N with N, to pin it to a CPU of its own (the
    /// binary passes the engine's affinity call: role crates forbid the unsafe code it needs).
    pub fn start<F, Fut>(
        n: usize,
        listen: &[SocketAddr],
        pin: Option<fn(usize) -> io::Result<()>>,
        session: F,
    ) -> io::Result<Workers>
    where
        F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_notify = Arc::new(tokio::sync::Notify::new());
        let mut threads = Vec::with_capacity(n);
        // Per address, one socket per worker; transposed below into per-worker lists.
        let mut per_addr = listen
            .iter()
            .map(|a| claim(*a, n).map(Vec::into_iter))
            .collect::<io::Result<Vec<_>>>()?;
        for id in 0..n {
            let listeners: Vec<std::net::TcpListener> =
                per_addr.iter_mut().filter_map(Iterator::next).collect();
            let session = session.clone();
            let stop = Arc::clone(&stop);
            let notify = Arc::clone(&stop_notify);
            let t = std::thread::Builder::new()
                .name(format!("ringmail-mx-{id}"))
                .spawn(move || {
                    if let Some(pin) = pin
                        && let Err(e) = pin(id)
                    {
                        warn!(worker = id, error = %e, "cannot pin the worker to its CPU");
                    }
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            error!(worker = id, error = %e, "cannot build the worker runtime");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let mut tasks = Vec::new();
                        for l in listeners {
                            let Ok(l) = TcpListener::from_std(l) else {
                                continue;
                            };
                            let session = session.clone();
                            let stop = Arc::clone(&stop);
                            let notify = Arc::clone(&notify);
                            tasks.push(tokio::spawn(async move {
                                accept_loop(l, session, stop, notify).await;
                            }));
                        }
                        for t in tasks {
                            let _ = t.await;
                        }
                    });
                })?;
            threads.push(t);
        }
        Ok(Workers {
            threads,
            stop,
            stop_notify,
        })
    }

    /// Stops accepting; sessions in progress are dropped when their worker's runtime ends.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stop_notify.notify_waiters();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    session: F,
    stop: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
) where
    F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    // A specific listen address is every connection's local address; only a wildcard one
    // needs a getsockname per connection to learn it.
    let fixed_local = local.filter(|a| !a.ip().is_unspecified());
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            _ = notify.notified() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Inherited from the listener on Linux (see `reuseport_listener`).
                    #[cfg(not(target_os = "linux"))]
                    let _ = stream.set_nodelay(true);
                    let local = match fixed_local {
                        Some(a) => a,
                        None => stream.local_addr().ok().or(local).unwrap_or(peer),
                    };
                    // Boxed: a session future is large (its whole state machine), and
                    // spawning it by value would copy all of it into the task per connection.
                    sessions.spawn(Box::pin(session(stream, peer, local)));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    // Give sessions in progress a moment to finish their current exchange.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_connections_inherit_nodelay() {
        let listener = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "replies must not wait for Nagle"
        );
    }

    #[test]
    fn a_port_another_socket_listens_on_is_refused_not_shared() {
        // Another process's listener, with SO_REUSEPORT as ours would have: without the check
        // the workers' sockets would join its group and take part of its connections.
        let other = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = other.local_addr().unwrap();
        let err = Workers::start(2, &[addr], None, |_s, _p, _l| async {})
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        let err = Workers::start_multi(1, &[addr], |_s, _p, _l| async {})
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(other);
        // Free again: taken, by every worker.
        let w = Workers::start(2, &[addr], None, |_s, _p, _l| async {}).expect("free port");
        w.stop();
    }
}
