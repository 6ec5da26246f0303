//! The epoll engine: the fallback when io_uring cannot be set up (seccomp, old kernel,
//! memlock limits). Same worker context, same session core, same splice pump; readiness from
//! edge-triggered epoll (through `mio`), reads into one per-worker scratch buffer, so an idle
//! connection holds no buffer here either: only bytes the peer could not take yet are kept,
//! in a per-direction vector that is freed as soon as it has been flushed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use ringmail_proxy_core::config::RelayMode;
use ringmail_proxy_core::proxy_protocol;
use ringmail_proxy_core::session::{AfterConnectFailure, AfterEof, Phase, Session, Side};
use socket2::SockAddr;
use tracing::{debug, info, warn};

use crate::relay::{Pipes, Pump, pump};
use crate::runtime::PoolRuntime;
use crate::stats::{EngineKind, WorkerStats};
use crate::sys;
use crate::worker::{Control, Ctx};

const WAKE: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX / 2;
const SCRATCH: usize = 64 * 1024;
/// Read/write rounds per readiness event before yielding to other connections.
const ROUNDS: usize = 16;

#[derive(Debug, Default)]
struct Dir {
    /// Bytes read from the source that the destination has not taken yet.
    pending: Vec<u8>,
    off: usize,
    eof: bool,
    eof_done: bool,
}

struct Conn {
    client: RawFd,
    backend: RawFd,
    pool: Arc<PoolRuntime>,
    pool_index: usize,
    backend_idx: usize,
    has_backend: bool,
    session: Session,
    peer: SocketAddr,
    connect_deadline_ms: u64,
    connect_start_ns: u64,
    header: Option<Box<[u8]>>,
    header_off: usize,
    client_registered: bool,
    dirs: [Dir; 2],
    pipes: Option<Box<Pipes>>,
}

impl Conn {
    fn fd(&self, side: usize) -> RawFd {
        if side == 0 { self.client } else { self.backend }
    }
}

struct Lst {
    id: u64,
    fd: OwnedFd,
    pool: usize,
}

/// One epoll worker.
pub struct EpollWorker {
    poll: Poll,
    ctx: Ctx,
    rx: Receiver<Control>,
    wake_fd: OwnedFd,
    listeners: Vec<Option<Lst>>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    live: usize,
    scratch: Vec<u8>,
    relay: RelayMode,
    /// Directions that stopped because of the round limit, not because they would block.
    again: Vec<(u32, usize)>,
    /// Slots closed during this turn, reusable from the next.
    closed: Vec<u32>,
    /// Listeners whose accept hit the descriptor limit, retried from housekeeping.
    paused: Vec<usize>,
    last_sweep_ms: u64,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for reads of its length; MSG_NOSIGNAL avoids SIGPIPE.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl EpollWorker {
    pub fn new(ctx: Ctx, rx: Receiver<Control>, wake_fd: OwnedFd) -> io::Result<EpollWorker> {
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&wake_fd.as_raw_fd()),
            WAKE,
            Interest::READABLE,
        )?;
        let relay = ctx.snapshot.relay;
        ctx.stats()
            .engine
            .store(EngineKind::Epoll as u8, Ordering::Relaxed);
        Ok(EpollWorker {
            poll,
            ctx,
            rx,
            wake_fd,
            listeners: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            scratch: vec![0; SCRATCH],
            relay,
            again: Vec::new(),
            closed: Vec::new(),
            paused: Vec::new(),
            last_sweep_ms: 0,
        })
    }

    pub fn run(mut self, listeners: Vec<(u64, OwnedFd)>) -> io::Result<()> {
        for (id, fd) in listeners {
            self.add_listener(id, fd)?;
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.again.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Fatal: close everything so connections stop queueing on this worker.
                    for slot in 0..self.conns.len() as u32 {
                        self.close(slot);
                    }
                    self.listeners.clear();
                    return Err(e);
                }
            }
            self.ctx.now_ms = sys::now_ms();
            for ev in events.iter() {
                let t = ev.token().0;
                if ev.token() == WAKE {
                    self.on_wake();
                } else if t >= LISTENER_BASE {
                    self.on_accept(t - LISTENER_BASE);
                } else {
                    let slot = (t / 2) as u32;
                    let side = t % 2;
                    self.on_ready(slot, side, ev.is_error());
                }
            }
            for (slot, d) in std::mem::take(&mut self.again) {
                if self.conns.get(slot as usize).is_some_and(Option::is_some) {
                    self.pump_dir(slot, d);
                }
            }
            self.housekeeping();
            self.free.append(&mut self.closed);
            if self.ctx.draining() && self.live == 0 {
                info!(worker = self.ctx.id, "worker drained");
                return Ok(());
            }
        }
    }

    fn housekeeping(&mut self) {
        if !self.paused.is_empty() && self.ctx.now_ms.saturating_sub(self.last_sweep_ms) >= 100 {
            for idx in std::mem::take(&mut self.paused) {
                self.on_accept(idx);
            }
        }
        if self.ctx.drain_expired() && self.live > 0 {
            info!(
                worker = self.ctx.id,
                connections = self.live,
                "drain deadline reached, closing remaining connections"
            );
            for slot in 0..self.conns.len() as u32 {
                self.close(slot);
            }
        }
        // Connect timeouts are checked every turn (cheap: a compare per connecting slot only
        // when the sweep runs), idle timeouts once a second.
        if self.ctx.now_ms.saturating_sub(self.last_sweep_ms) < 100 {
            return;
        }
        let full = self.ctx.now_ms / 1000 != self.last_sweep_ms / 1000;
        self.last_sweep_ms = self.ctx.now_ms;
        let now = self.ctx.now_ms;
        let mut expired = Vec::new();
        let mut idle = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            match c.session.phase() {
                Phase::Connecting if now >= c.connect_deadline_ms => expired.push(slot as u32),
                Phase::Relaying if full && c.session.is_idle(now, c.pool.config.idle_timeout) => {
                    idle.push(slot as u32)
                }
                _ => {}
            }
        }
        for slot in expired {
            self.connect_failed(slot, libc::ETIMEDOUT);
        }
        for slot in idle {
            WorkerStats::add(&self.ctx.stats().idle_timeouts, 1);
            self.close(slot);
        }
    }

    fn on_wake(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from our eventfd into a local array.
        unsafe {
            libc::read(
                self.wake_fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                8,
            )
        };
        while let Ok(msg) = self.rx.try_recv() {
            self.control(msg);
        }
    }

    fn control(&mut self, msg: Control) {
        let changes = self.ctx.apply(msg);
        let close: Vec<u64> = if changes.close_all {
            self.listeners.iter().flatten().map(|l| l.id).collect()
        } else {
            changes.close
        };
        for id in close {
            self.close_listener_id(id);
        }
        for l in self.listeners.iter_mut().flatten() {
            l.pool = self.ctx.listener_pool(l.id);
        }
        for (id, fd) in changes.add {
            if let Err(e) = self.add_listener(id, fd) {
                warn!(error = %e, "cannot register new listener");
            }
        }
    }

    fn add_listener(&mut self, id: u64, fd: OwnedFd) -> io::Result<()> {
        let pool = self.ctx.listener_pool(id);
        let idx = self
            .listeners
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.listeners.len());
        self.poll.registry().register(
            &mut SourceFd(&fd.as_raw_fd()),
            Token(LISTENER_BASE + idx),
            Interest::READABLE,
        )?;
        let l = Some(Lst { id, fd, pool });
        if idx == self.listeners.len() {
            self.listeners.push(l);
        } else {
            self.listeners[idx] = l;
        }
        // Connections may already wait in the queue (edge-triggered: drain it now).
        self.on_accept(idx);
        Ok(())
    }

    fn close_listener_id(&mut self, id: u64) {
        if let Some(idx) = self
            .listeners
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.id == id))
            && let Some(l) = self.listeners[idx].take()
        {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&l.fd.as_raw_fd()));
        }
    }

    fn on_accept(&mut self, idx: usize) {
        // Bounded per event so one busy listener cannot starve established connections; a
        // listener with more pending is revisited through a zero-timeout poll (level check).
        for _ in 0..256 {
            let Some(l) = self.listeners.get(idx).and_then(Option::as_ref) else {
                return;
            };
            let pool = l.pool;
            // SAFETY: accept4 on our listening socket with null address pointers.
            let fd = unsafe {
                libc::accept4(
                    l.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        // The queued connections raise no new edge: try again shortly.
                        if !self.paused.contains(&idx) {
                            warn!("accept: out of file descriptors; pausing this listener briefly");
                            self.paused.push(idx);
                        }
                        return;
                    }
                    _ => {
                        debug!(error = %e, "accept failed");
                        return;
                    }
                }
            }
            self.accepted(fd, pool);
        }
        // More may be waiting: the edge will not fire again, so re-register to get a fresh one.
        if let Some(l) = self.listeners.get(idx).and_then(Option::as_ref) {
            let _ = self.poll.registry().reregister(
                &mut SourceFd(&l.fd.as_raw_fd()),
                Token(LISTENER_BASE + idx),
                Interest::READABLE,
            );
        }
    }

    fn accepted(&mut self, fd: RawFd, pool_index: usize) {
        let Some((peer, pool, session)) = self.ctx.accept_client(fd, pool_index) else {
            return;
        };
        let conn = Conn {
            client: fd,
            backend: -1,
            session,
            pool,
            pool_index,
            backend_idx: 0,
            has_backend: false,
            peer,
            connect_deadline_ms: 0,
            connect_start_ns: 0,
            header: None,
            header_off: 0,
            client_registered: false,
            dirs: Default::default(),
            pipes: None,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.live += 1;
        self.start_connect(slot, true);
    }

    fn start_connect(&mut self, slot: u32, first: bool) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let pool = Arc::clone(&c.pool);
        let Some(pick) = self
            .ctx
            .pick_for(&mut c.session, c.pool_index, &pool, c.peer, first)
        else {
            self.close(slot);
            return;
        };
        c.backend_idx = pick.backend;
        c.has_backend = true;
        c.connect_start_ns = sys::now_ns();
        c.connect_deadline_ms = self.ctx.now_ms + pool.config.connect_timeout.as_millis() as u64;
        let fd = match sys::backend_socket(pick.addr) {
            Ok(fd) => fd.into_raw_fd(),
            Err(e) => {
                warn!(error = %e, "cannot create backend socket");
                self.connect_failed(slot, e.raw_os_error().unwrap_or(libc::EMFILE));
                return;
            }
        };
        c.backend = fd;
        if let Err(e) = sys::start_connect(fd, &SockAddr::from(pick.addr)) {
            debug!(error = %e, "connect failed at once");
            self.connect_failed(slot, e.raw_os_error().unwrap_or(libc::ECONNREFUSED));
            return;
        }
        let r = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(slot as usize * 2 + 1),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = r {
            self.connect_failed(slot, e.raw_os_error().unwrap_or(libc::ENOMEM));
        }
    }

    fn connect_failed(&mut self, slot: u32, errno: i32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let next = if c.has_backend {
            c.has_backend = false;
            self.ctx
                .connect_failed(&mut c.session, &c.pool, c.backend_idx, errno)
        } else {
            c.session.on_connect_failed()
        };
        if c.backend >= 0 {
            let _ = self.poll.registry().deregister(&mut SourceFd(&c.backend));
            sys::close(c.backend);
            c.backend = -1;
        }
        match next {
            AfterConnectFailure::Retry => self.start_connect(slot, false),
            AfterConnectFailure::GiveUp => self.close(slot),
        }
    }

    fn on_ready(&mut self, slot: u32, side: usize, error: bool) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        match c.session.phase() {
            Phase::Connecting if side == 1 => {
                let errno = match sys::take_error(c.backend) {
                    Ok(Some(e)) => e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
                    Err(e) => e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
                    Ok(None) if error => libc::ECONNREFUSED,
                    // Writable without error: connected if it has a peer.
                    Ok(None) => match sys::peer_addr(c.backend) {
                        Ok(_) => 0,
                        Err(e) => e.raw_os_error().unwrap_or(libc::ENOTCONN),
                    },
                };
                if errno == 0 {
                    self.connected(slot);
                } else {
                    self.connect_failed(slot, errno);
                }
            }
            Phase::Connecting => {}
            Phase::Relaying => {
                if c.header.is_some() {
                    self.flush_header(slot);
                    return;
                }
                // Readiness on one socket can move both directions (readable: its own data;
                // writable: the data waiting for it).
                self.pump_dir(slot, side);
                self.pump_dir(slot, 1 - side);
            }
            Phase::Closed => self.close(slot),
        }
    }

    fn connected(&mut self, slot: u32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        self.ctx
            .stats()
            .observe_connect(sys::now_ns().saturating_sub(c.connect_start_ns));
        c.session.on_connected(self.ctx.now_ms);
        self.ctx.connect_ok(&c.pool, c.backend_idx);
        if self
            .poll
            .registry()
            .register(
                &mut SourceFd(&c.client),
                Token(slot as usize * 2),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.close(slot);
            return;
        }
        c.client_registered = true;
        if self.relay == RelayMode::Splice {
            match Pipes::new() {
                Ok(p) => c.pipes = Some(Box::new(p)),
                Err(e) => {
                    warn!(error = %e, "cannot create splice pipes");
                    self.close(slot);
                    return;
                }
            }
        }
        if let Some(version) = c.pool.config.proxy_protocol {
            let local = sys::local_addr(c.client).unwrap_or(c.peer);
            let mut header = Vec::with_capacity(64);
            proxy_protocol::encode(version, c.peer, local, &mut header);
            c.header = Some(header.into_boxed_slice());
            self.flush_header(slot);
        } else {
            self.pump_dir(slot, 0);
            self.pump_dir(slot, 1);
        }
    }

    fn flush_header(&mut self, slot: u32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let Some(h) = c.header.as_ref() else { return };
        match send(c.backend, &h[c.header_off..]) {
            Ok(n) => {
                c.header_off += n;
                if c.header_off >= h.len() {
                    c.header = None;
                    self.pump_dir(slot, 0);
                    self.pump_dir(slot, 1);
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => self.close(slot),
        }
    }

    /// Moves bytes for direction `d` (0: client→backend, 1: backend→client) until something
    /// would block, the source ends, or the round limit is reached.
    fn pump_dir(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if c.session.phase() != Phase::Relaying || c.header.is_some() || c.dirs[d].eof_done {
            return;
        }
        let (src, dst) = (c.fd(d), c.fd(1 - d));
        let mut moved = 0u64;
        let mut outcome: Result<bool, ()> = Ok(false); // Ok(eof reached)
        if let Some(p) = c.pipes.as_mut() {
            let (r, n) = pump(src, dst, p.fds[d], &mut p.pending[d]);
            moved = n;
            match r {
                Pump::WaitSource | Pump::WaitDest => {}
                Pump::Yield => self.again.push((slot, d)),
                Pump::Eof => outcome = Ok(true),
                Pump::Error(_) => outcome = Err(()),
            }
        } else {
            let dir = &mut c.dirs[d];
            let mut rounds = 0;
            'pump: loop {
                // Flush what the destination could not take before.
                while dir.off < dir.pending.len() {
                    match send(dst, &dir.pending[dir.off..]) {
                        Ok(n) => {
                            dir.off += n;
                            moved += n as u64;
                        }
                        Err(e) if would_block(&e) => break 'pump,
                        Err(_) => {
                            outcome = Err(());
                            break 'pump;
                        }
                    }
                }
                if !dir.pending.is_empty() {
                    dir.pending = Vec::new();
                    dir.off = 0;
                }
                if dir.eof {
                    outcome = Ok(true);
                    break;
                }
                rounds += 1;
                if rounds > ROUNDS {
                    self.again.push((slot, d));
                    break;
                }
                match recv(src, &mut self.scratch) {
                    Ok(0) => {
                        dir.eof = true;
                        outcome = Ok(true);
                        break;
                    }
                    Ok(n) => match send(dst, &self.scratch[..n]) {
                        Ok(m) => {
                            moved += m as u64;
                            if m < n {
                                dir.pending = self.scratch[m..n].to_vec();
                                dir.off = 0;
                            }
                        }
                        Err(e) if would_block(&e) => {
                            dir.pending = self.scratch[..n].to_vec();
                            dir.off = 0;
                            break;
                        }
                        Err(_) => {
                            outcome = Err(());
                            break;
                        }
                    },
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        outcome = Err(());
                        break;
                    }
                }
            }
        }
        let c = self.conns[slot as usize].as_mut().expect("live");
        if moved > 0 {
            c.session.on_traffic(self.ctx.now_ms);
            self.ctx.count_bytes(&c.pool, c.backend_idx, d == 0, moved);
        }
        match outcome {
            Err(()) => self.close(slot),
            Ok(true) => self.pass_eof(slot, d),
            Ok(false) => {}
        }
    }

    fn pass_eof(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if c.dirs[d].eof_done {
            return;
        }
        c.dirs[d].eof_done = true;
        c.dirs[d].eof = true;
        let side = if d == 0 { Side::Client } else { Side::Backend };
        match c.session.on_eof(side) {
            AfterEof::ShutdownWrite(peer) => sys::shutdown_write(c.fd(peer.index())),
            AfterEof::Close => self.close(slot),
        }
    }

    fn close(&mut self, slot: u32) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        if c.client_registered {
            let _ = self.poll.registry().deregister(&mut SourceFd(&c.client));
        }
        if c.backend >= 0 {
            let _ = self.poll.registry().deregister(&mut SourceFd(&c.backend));
        }
        sys::close(c.client);
        sys::close(c.backend);
        if c.has_backend {
            self.ctx.release_backend(&c.pool, c.backend_idx);
        }
        self.ctx.release_client();
        // Not reusable before this turn's events are all handled: one may still name the
        // old connection's sockets (see `run`).
        self.closed.push(slot);
        self.live -= 1;
    }
}

/// Starts an epoll worker on the current thread.
pub fn run_worker(
    ctx: Ctx,
    rx: Receiver<Control>,
    wake_fd: OwnedFd,
    listeners: Vec<(u64, OwnedFd)>,
) -> io::Result<()> {
    EpollWorker::new(ctx, rx, wake_fd)?.run(listeners)
}
