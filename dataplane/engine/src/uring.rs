//! The io_uring engine: one ring per worker thread, everything on the ring.
//!
//! ```text
//!  listener ──AcceptMulti──▶ admit + pick ──Connect+LinkTimeout──▶ [Send PROXY header]
//!      ──▶ buffered: RecvMulti (provided buffer ring) ──▶ Send ──▶ buffer back to the ring
//!      ──▶ splice:   PollAdd(IN) ──▶ splice src→pipe→dst ──▶ PollAdd(IN|OUT)
//! ```
//!
//! Buffers: one provided-buffer ring per worker. A receive takes a buffer only when data has
//! arrived, so an idle connection holds none. Each direction keeps at most a few buffers
//! queued; past that its multishot receive is cancelled and re-armed once the peer has taken
//! the data (back-pressure without a per-connection buffer).
//!
//! Ownership rule: a connection slot is freed, and its descriptors closed, only when every
//! operation it submitted has completed (`inflight == 0`), so no completion ever refers to a
//! reused slot and no buffer or address handed to the kernel is freed early.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::Receiver;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use ringmail_proxy_core::config::RelayMode;
use ringmail_proxy_core::proxy_protocol;
use ringmail_proxy_core::session::{AfterConnectFailure, AfterEof, Phase, Session, Side};
use socket2::SockAddr;
use tracing::{debug, info, warn};

use crate::relay::{Pipes, Pump, Seg, SegQueue, pump};
use crate::runtime::PoolRuntime;
use crate::stats::{EngineKind, WorkerStats};
use crate::sys;
use crate::worker::{Control, Ctx};

const OP_ACCEPT: u8 = 1;
const OP_CONNECT: u8 = 2;
const OP_LINK_TIMEOUT: u8 = 3;
const OP_RECV: u8 = 4; // + direction
const OP_SEND: u8 = 6; // + direction
const OP_HEADER: u8 = 8;
const OP_CANCEL: u8 = 9;
const OP_TICK: u8 = 10;
const OP_CTRL: u8 = 11;
const OP_POLL_IN: u8 = 12; // + direction
const OP_POLL_OUT: u8 = 14; // + direction
const OP_CANCEL_ACCEPT: u8 = 16;
const OP_RECV_PRIVATE: u8 = 17; // + direction

/// Marks a segment that lives in the direction's private buffer, not in the shared ring.
const PRIVATE_BID: u16 = u16::MAX;
/// Size of a starved direction's private receive buffer.
const PRIVATE_SIZE: usize = 16 * 1024;

/// Buffer group id of the worker's provided buffer ring.
const BGID: u16 = 0;
/// A direction cancels its receive when this many buffers wait to be sent on…
const QUEUE_HIGH: usize = 8;
/// …and re-arms it when fewer than this remain.
const QUEUE_LOW: usize = 4;

fn ud(slot: u32, op: u8) -> u64 {
    (u64::from(slot) << 8) | u64::from(op)
}

/// Sizes of the worker's provided buffer ring.
#[derive(Debug, Clone, Copy)]
pub struct BufferConfig {
    /// Number of buffers (power of two, at most 32768).
    pub count: u16,
    /// Size of each buffer in bytes.
    pub size: u32,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            count: 1024,
            size: 32 * 1024,
        }
    }
}

/// Checks that io_uring can be set up here with everything the engine needs (ring creation,
/// provided buffer rings, the opcodes used). The error says why not, for the fallback log.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Connect::CODE, "connect"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::LinkTimeout::CODE, "link_timeout"),
        (opcode::AsyncCancel2::CODE, "async_cancel"),
        (opcode::PollAdd::CODE, "poll_add"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {name} not supported"),
            ));
        }
    }
    let bufs = BufRing::new(&ring, 8, 4096)?;
    drop(bufs.unregister(&ring));
    Ok(())
}

/// The provided buffer ring: `count` buffers of `size` bytes, registered with the kernel.
struct BufRing {
    entries: *mut types::BufRingEntry,
    ring_layout: std::alloc::Layout,
    data: *mut u8,
    data_layout: std::alloc::Layout,
    mask: u16,
    tail: u16,
    size: u32,
    /// Buffers in the ring, as far as completions tell (the kernel may hold fewer).
    available: u32,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, size: u32) -> io::Result<BufRing> {
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer size must not be zero",
            ));
        }
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two <= 32768",
            ));
        }
        let ring_layout = std::alloc::Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        let data_layout =
            std::alloc::Layout::from_size_align(usize::from(count) * size as usize, 4096)
                .map_err(io::Error::other)?;
        // SAFETY: both layouts have non-zero size; zeroed memory is a valid (empty) ring.
        // Large zeroed allocations come from mmap, so untouched buffers cost no resident memory.
        let (entries, data) = unsafe {
            (
                std::alloc::alloc_zeroed(ring_layout) as *mut types::BufRingEntry,
                std::alloc::alloc_zeroed(data_layout),
            )
        };
        if entries.is_null() || data.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut br = BufRing {
            entries,
            ring_layout,
            data,
            data_layout,
            mask: count - 1,
            tail: 0,
            size,
            available: 0,
        };
        // SAFETY: `entries` points to `count` entries that stay allocated until `Drop`, which
        // runs only after the ring that uses them is gone (see `UringWorker`'s field order).
        if let Err(e) = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, BGID, 0)
        } {
            br.free();
            return Err(e);
        }
        for bid in 0..count {
            br.stage(bid);
        }
        br.publish();
        br.available = u32::from(count);
        Ok(br)
    }

    fn stage(&mut self, bid: u16) {
        // SAFETY: the index is masked into the ring; the entry memory is ours until Drop.
        let entry = unsafe { &mut *self.entries.add(usize::from(self.tail & self.mask)) };
        entry.set_addr(self.ptr(bid) as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives inside the first entry of our ring; the kernel reads it
        // with acquire semantics, so a release store publishes the staged entries.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.entries) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Gives a buffer back to the kernel.
    fn recycle(&mut self, bid: u16) {
        self.stage(bid);
        self.publish();
        self.available += 1;
    }

    /// A completion delivered buffer `bid`: it is ours until recycled.
    fn taken(&mut self) {
        self.available = self.available.saturating_sub(1);
    }

    fn ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < count, so the offset is inside the data allocation.
        unsafe { self.data.add(usize::from(bid) * self.size as usize) }
    }

    fn unregister(&self, ring: &IoUring) -> io::Result<()> {
        ring.submitter().unregister_buf_ring(BGID)
    }

    fn free(&mut self) {
        if !self.entries.is_null() {
            // SAFETY: allocated in `new` with exactly these layouts; nulled after freeing.
            unsafe {
                std::alloc::dealloc(self.entries as *mut u8, self.ring_layout);
                std::alloc::dealloc(self.data, self.data_layout);
            }
            self.entries = std::ptr::null_mut();
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        self.free();
    }
}

/// Scatter list for sending several queued buffers in one operation. Allocated the first
/// time a direction has more than one buffer waiting; an idle connection never has one.
struct SendVec {
    iov: [libc::iovec; SEND_IOVS],
    msg: libc::msghdr,
}

/// Buffers sent together in one SendMsg.
const SEND_IOVS: usize = 8;

impl SendVec {
    fn new() -> Box<SendVec> {
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is a valid value.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

#[derive(Default)]
struct Dir {
    queue: SegQueue,
    sendvec: Option<Box<SendVec>>,
    /// A starved direction's own receive buffer (see `arm_private_recv`); `None` otherwise.
    private: Option<Box<[u8]>>,
    /// The private buffer holds data not yet sent on.
    private_queued: bool,
    recv_armed: bool,
    cancel_sent: bool,
    sending: bool,
    starved: bool,
    /// The source side sent FIN (or, in splice mode, reached end of stream).
    eof: bool,
    /// The FIN has been passed on.
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
    /// Kept alive until the connect completes: the kernel reads it.
    connect_addr: Option<Box<SockAddr>>,
    connect_start_ns: u64,
    header: Option<Box<[u8]>>,
    header_off: usize,
    inflight: u32,
    closing: bool,
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
    fd: RawFd,
    pool: usize,
    armed: bool,
    closing: bool,
}

/// A worker's ring with its provided buffer ring registered. Field order matters: the ring is
/// dropped before the buffer memory.
pub struct Ring {
    ring: IoUring,
    bufs: BufRing,
}

/// Creates the ring and registers the buffer ring. Call it on the thread that will use the ring.
pub fn setup(bufcfg: BufferConfig) -> io::Result<Ring> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .setup_cqsize(16384)
        .build(4096)
        .or_else(|e| {
            debug!(error = %e, "io_uring: optimised setup refused, using defaults");
            IoUring::builder().setup_cqsize(16384).build(4096)
        })?;
    let bufs = BufRing::new(&ring, bufcfg.count, bufcfg.size)?;
    Ok(Ring { ring, bufs })
}

/// One io_uring worker. Field order matters: the ring is dropped before the buffer memory.
pub struct UringWorker {
    ring: IoUring,
    bufs: BufRing,
    ctx: Ctx,
    rx: Receiver<Control>,
    wake_fd: OwnedFd,
    wake_buf: Box<u64>,
    tick_ts: Box<types::Timespec>,
    /// Connect timeouts, kept alive until the next submission. Boxed so their addresses stay
    /// put while the vector grows: the kernel reads them at submission time.
    #[allow(clippy::vec_box)]
    timespecs: Vec<Box<types::Timespec>>,
    listeners: Vec<Option<Lst>>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    live: usize,
    starved: std::collections::VecDeque<(u32, usize)>,
    /// Listeners whose multishot accept ended on EMFILE/ENFILE, re-armed from the tick.
    paused_accepts: Vec<usize>,
    relay: RelayMode,
    last_sweep_ms: u64,
    events: Vec<(u64, i32, u32)>,
}

impl UringWorker {
    /// Builds a worker from a ring made by [`setup`] (in the worker thread: the ring is
    /// single-issuer).
    pub fn new(ring: Ring, ctx: Ctx, rx: Receiver<Control>, wake_fd: OwnedFd) -> UringWorker {
        let Ring { ring, bufs } = ring;
        let relay = ctx.snapshot.relay;
        ctx.stats()
            .engine
            .store(EngineKind::Uring as u8, Ordering::Relaxed);
        UringWorker {
            ring,
            bufs,
            ctx,
            rx,
            wake_fd,
            wake_buf: Box::new(0),
            tick_ts: Box::new(types::Timespec::new().nsec(250_000_000)),
            timespecs: Vec::new(),
            listeners: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            starved: std::collections::VecDeque::new(),
            paused_accepts: Vec::new(),
            relay,
            last_sweep_ms: 0,
            events: Vec::with_capacity(1024),
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entries we build (addresses, buffers, timespecs) stays
            // valid until the operation completes; see the ownership rule in the module docs.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                warn!(error = %e, "io_uring submit failed while the submission queue was full");
            }
        }
    }

    fn push_pair(&mut self, a: squeue::Entry, b: squeue::Entry) {
        loop {
            // SAFETY: as in `push`; both entries go in together so a link is never split.
            if unsafe {
                self.ring
                    .submission()
                    .push_multiple(&[a.clone(), b.clone()])
            }
            .is_ok()
            {
                return;
            }
            if let Err(e) = self.ring.submit() {
                warn!(error = %e, "io_uring submit failed while the submission queue was full");
            }
        }
    }

    /// Runs the worker until it has drained. `listeners` are this worker's sockets.
    pub fn run(mut self, listeners: Vec<(u64, OwnedFd)>) -> io::Result<()> {
        for (id, fd) in listeners {
            self.add_listener(id, fd);
        }
        self.arm_tick();
        self.arm_wake();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    self.abandon();
                    return Err(e);
                }
            }
            // Entries not yet taken by the kernel may still point at these timespecs.
            if self.ring.submission().is_empty() {
                self.timespecs.clear();
            }
            self.ctx.now_ms = sys::now_ms();
            {
                let mut cq = self.ring.completion();
                cq.sync();
                self.events
                    .extend(cq.map(|c| (c.user_data(), c.result(), c.flags())));
            }
            let mut events = std::mem::take(&mut self.events);
            for &(u, res, flags) in &events {
                self.dispatch(u, res, flags);
            }
            events.clear();
            self.events = events;
            if self.ctx.draining() && self.live == 0 && self.listeners.iter().all(Option::is_none) {
                info!(worker = self.ctx.id, "worker drained");
                // Buffers must not be unregistered while a receive could still use them; none
                // is pending now.
                let _ = self.bufs.unregister(&self.ring);
                return Ok(());
            }
        }
    }

    /// After a fatal ring error: closes every listening and connected socket (so the kernel
    /// stops queueing connections on this worker) and releases every count it held.
    fn abandon(&mut self) {
        for l in self.listeners.iter_mut().filter_map(Option::take) {
            sys::close(l.fd);
        }
        for slot in 0..self.conns.len() {
            if let Some(c) = self.conns[slot].take() {
                sys::close(c.client);
                sys::close(c.backend);
                if c.has_backend {
                    self.ctx.release_backend(&c.pool, c.backend_idx);
                }
                self.ctx.release_client();
            }
        }
        self.live = 0;
    }

    fn dispatch(&mut self, u: u64, res: i32, flags: u32) {
        let op = (u & 0xff) as u8;
        let slot = (u >> 8) as u32;
        match op {
            OP_ACCEPT => self.on_accept(slot as usize, res, flags),
            OP_CANCEL_ACCEPT => {}
            OP_TICK => self.on_tick(),
            OP_CTRL => self.on_wake(res),
            OP_CONNECT => self.on_connect(slot, res),
            OP_LINK_TIMEOUT | OP_CANCEL => {
                self.op_done(slot);
            }
            OP_HEADER => self.on_header(slot, res),
            o if o == OP_RECV || o == OP_RECV + 1 => {
                self.on_recv(slot, usize::from(o - OP_RECV), res, flags)
            }
            o if o == OP_RECV_PRIVATE || o == OP_RECV_PRIVATE + 1 => {
                self.on_private_recv(slot, usize::from(o - OP_RECV_PRIVATE), res)
            }
            o if o == OP_SEND || o == OP_SEND + 1 => {
                self.on_send(slot, usize::from(o - OP_SEND), res)
            }
            o if o == OP_POLL_IN || o == OP_POLL_IN + 1 => {
                self.on_poll(slot, usize::from(o - OP_POLL_IN), res)
            }
            o if o == OP_POLL_OUT || o == OP_POLL_OUT + 1 => {
                let d = usize::from(o - OP_POLL_OUT);
                match self.relay {
                    RelayMode::Buffered => self.on_send_ready(slot, d, res),
                    RelayMode::Splice => self.on_poll(slot, d, res),
                }
            }
            _ => warn!(op, "unknown io_uring completion"),
        }
    }

    // ---- control -------------------------------------------------------------------------

    fn arm_tick(&mut self) {
        let e = opcode::Timeout::new(&*self.tick_ts as *const types::Timespec)
            .build()
            .user_data(ud(0, OP_TICK));
        self.push(e);
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.wake_fd.as_raw_fd()),
            &mut *self.wake_buf as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(ud(0, OP_CTRL));
        self.push(e);
    }

    fn on_wake(&mut self, res: i32) {
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            warn!(error = res, "wake-up read failed");
        }
        while let Ok(msg) = self.rx.try_recv() {
            self.control(msg);
        }
        self.arm_wake();
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
            self.add_listener(id, fd);
        }
    }

    fn on_tick(&mut self) {
        // Control messages are also polled here, in case a wake-up was coalesced.
        while let Ok(msg) = self.rx.try_recv() {
            self.control(msg);
        }
        if self.ctx.drain_expired() {
            let n = self.live;
            if n > 0 {
                info!(
                    worker = self.ctx.id,
                    connections = n,
                    "drain deadline reached, closing remaining connections"
                );
            }
            for slot in 0..self.conns.len() as u32 {
                if self.conns[slot as usize].is_some() {
                    self.begin_close(slot);
                }
            }
        }
        if self.ctx.now_ms.saturating_sub(self.last_sweep_ms) >= 1000 {
            self.last_sweep_ms = self.ctx.now_ms;
            self.sweep_idle();
        }
        for idx in std::mem::take(&mut self.paused_accepts) {
            if self
                .listeners
                .get(idx)
                .is_some_and(|l| l.as_ref().is_some_and(|l| !l.armed && !l.closing))
            {
                self.arm_accept(idx);
            }
        }
        // Safety net: receives that ran out of buffers are normally re-armed as buffers come
        // back; retry a few here too so none can wait forever.
        if !self.starved.is_empty() {
            self.unstarve();
        }
        self.arm_tick();
    }

    fn sweep_idle(&mut self) {
        let now = self.ctx.now_ms;
        let mut idle = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            if let Some(c) = c
                && !c.closing
                && c.session.phase() == Phase::Relaying
                && c.session.is_idle(now, c.pool.config.idle_timeout)
            {
                idle.push(slot as u32);
            }
        }
        for slot in idle {
            WorkerStats::add(&self.ctx.stats().idle_timeouts, 1);
            self.begin_close(slot);
        }
    }

    // ---- listeners -----------------------------------------------------------------------

    fn add_listener(&mut self, id: u64, fd: OwnedFd) {
        let pool = self.ctx.listener_pool(id);
        let l = Lst {
            id,
            fd: fd.into_raw_fd(),
            pool,
            armed: false,
            closing: false,
        };
        let idx = match self.listeners.iter().position(Option::is_none) {
            Some(i) => {
                self.listeners[i] = Some(l);
                i
            }
            None => {
                self.listeners.push(Some(l));
                self.listeners.len() - 1
            }
        };
        self.arm_accept(idx);
    }

    fn arm_accept(&mut self, idx: usize) {
        let Some(l) = self.listeners[idx].as_mut() else {
            return;
        };
        l.armed = true;
        let e = opcode::AcceptMulti::new(types::Fd(l.fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(idx as u32, OP_ACCEPT));
        self.push(e);
    }

    fn close_listener_id(&mut self, id: u64) {
        let Some(idx) = self
            .listeners
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.id == id))
        else {
            return;
        };
        let Some(l) = self.listeners[idx].as_mut() else {
            return;
        };
        if l.closing {
            return;
        }
        l.closing = true;
        if l.armed {
            let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(l.fd)).all())
                .build()
                .user_data(ud(idx as u32, OP_CANCEL_ACCEPT));
            self.push(e);
        } else {
            sys::close(l.fd);
            self.listeners[idx] = None;
        }
    }

    fn on_accept(&mut self, idx: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let Some(l) = self.listeners.get_mut(idx).and_then(Option::as_mut) else {
            if res >= 0 {
                sys::close(res);
            }
            return;
        };
        if !more {
            l.armed = false;
        }
        let (closing, pool_index) = (l.closing, l.pool);
        let mut out_of_fds = false;
        if res < 0 {
            match -res {
                libc::ECANCELED => {}
                libc::EMFILE | libc::ENFILE => {
                    warn!("accept: out of file descriptors; pausing this listener briefly");
                    out_of_fds = true;
                }
                e => debug!(errno = e, "accept failed"),
            }
        } else if closing {
            sys::close(res);
        } else {
            self.accepted(res, pool_index);
        }
        if !more {
            if closing {
                if let Some(l) = self.listeners[idx].take() {
                    sys::close(l.fd);
                }
            } else if out_of_fds {
                // Re-armed from the tick, not at once: a full backlog would spin.
                self.paused_accepts.push(idx);
            } else {
                self.arm_accept(idx);
            }
        }
    }

    fn accepted(&mut self, fd: RawFd, pool_index: usize) {
        let Some((peer, pool, session)) = self.ctx.accept_client(fd, pool_index) else {
            return;
        };
        let conn = Conn {
            client: fd,
            backend: -1,
            pool,
            pool_index,
            backend_idx: 0,
            has_backend: false,
            session,
            peer,
            connect_addr: None,
            connect_start_ns: 0,
            header: None,
            header_off: 0,
            inflight: 0,
            closing: false,
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

    // ---- connection lifecycle ------------------------------------------------------------

    fn conn(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut)
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
            self.begin_close(slot);
            return;
        };
        c.backend_idx = pick.backend;
        c.has_backend = true;
        let fd = match sys::backend_socket(pick.addr) {
            Ok(fd) => fd.into_raw_fd(),
            Err(e) => {
                warn!(error = %e, "cannot create backend socket");
                self.connect_failed(slot, e.raw_os_error().unwrap_or(libc::EMFILE));
                return;
            }
        };
        c.backend = fd;
        let addr = Box::new(SockAddr::from(pick.addr));
        let connect = opcode::Connect::new(
            types::Fd(fd),
            addr.as_ptr() as *const libc::sockaddr,
            addr.len(),
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(ud(slot, OP_CONNECT));
        c.connect_addr = Some(addr);
        c.connect_start_ns = sys::now_ns();
        c.inflight += 2;
        let ts = Box::new(types::Timespec::from(pool.config.connect_timeout));
        let timeout = opcode::LinkTimeout::new(&*ts as *const types::Timespec)
            .build()
            .user_data(ud(slot, OP_LINK_TIMEOUT));
        self.timespecs.push(ts);
        self.push_pair(connect, timeout);
    }

    /// Accounts one finished operation of `slot`. Returns whether its handler has work to do:
    /// false when the slot is empty or closing (a closing connection is finalized here once
    /// nothing of it is in flight).
    fn op_done(&mut self, slot: u32) -> bool {
        let Some(c) = self.conn(slot) else {
            return false;
        };
        c.inflight -= 1;
        if c.closing {
            self.maybe_finalize(slot);
            return false;
        }
        true
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
        sys::close(c.backend);
        c.backend = -1;
        c.connect_addr = None;
        match next {
            AfterConnectFailure::Retry => self.start_connect(slot, false),
            AfterConnectFailure::GiveUp => self.begin_close(slot),
        }
    }

    fn on_connect(&mut self, slot: u32, res: i32) {
        if !self.op_done(slot) {
            return;
        }
        if res < 0 {
            self.connect_failed(slot, -res);
            return;
        }
        let now = self.ctx.now_ms;
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let elapsed = sys::now_ns().saturating_sub(c.connect_start_ns);
        c.connect_addr = None;
        c.session.on_connected(now);
        self.ctx.connect_ok(&c.pool, c.backend_idx);
        self.ctx.stats().observe_connect(elapsed);
        let c = self.conns[slot as usize].as_mut().expect("checked above");
        if let Some(version) = c.pool.config.proxy_protocol {
            let local = sys::local_addr(c.client).unwrap_or(c.peer);
            let mut header = Vec::with_capacity(64);
            proxy_protocol::encode(version, c.peer, local, &mut header);
            c.header = Some(header.into_boxed_slice());
            c.header_off = 0;
            self.send_header(slot);
        } else {
            self.start_relay(slot);
        }
    }

    fn send_header(&mut self, slot: u32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let Some(h) = c.header.as_ref() else { return };
        let rest = &h[c.header_off..];
        let e = opcode::Send::new(types::Fd(c.backend), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(slot, OP_HEADER));
        c.inflight += 1;
        self.push(e);
    }

    fn on_header(&mut self, slot: u32, res: i32) {
        if !self.op_done(slot) {
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            // A fresh socket's send buffer is empty: just send again.
            self.send_header(slot);
            return;
        }
        if res <= 0 {
            self.begin_close(slot);
            return;
        }
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        c.header_off += res as usize;
        if c.header.as_ref().is_some_and(|h| c.header_off < h.len()) {
            self.send_header(slot);
        } else {
            c.header = None;
            self.start_relay(slot);
        }
    }

    fn start_relay(&mut self, slot: u32) {
        match self.relay {
            RelayMode::Buffered => {
                self.arm_recv(slot, 0);
                self.arm_recv(slot, 1);
            }
            RelayMode::Splice => {
                let Some(c) = self.conns[slot as usize].as_mut() else {
                    return;
                };
                match Pipes::new() {
                    Ok(p) => c.pipes = Some(Box::new(p)),
                    Err(e) => {
                        warn!(error = %e, "cannot create splice pipes");
                        self.begin_close(slot);
                        return;
                    }
                }
                self.arm_poll(slot, 0, false);
                self.arm_poll(slot, 1, false);
            }
        }
    }

    /// Starts closing: cancels whatever is pending on the two sockets; the slot is freed when
    /// the last completion arrives.
    fn begin_close(&mut self, slot: u32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        c.session.close();
        if c.inflight > 0 {
            let fds = [c.client, c.backend];
            c.inflight += fds.iter().filter(|&&fd| fd >= 0).count() as u32;
            for fd in fds.into_iter().filter(|&fd| fd >= 0) {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                    .build()
                    .user_data(ud(slot, OP_CANCEL));
                self.push(e);
            }
        }
        // A direction with a send in flight keeps its buffers: the kernel may still be reading
        // them. They go back to the ring when that send completes (see `on_send`).
        for d in 0..2 {
            self.release_queue(slot, d);
        }
        self.maybe_finalize(slot);
    }

    /// Returns the buffers queued on direction `d` of a closing connection to the ring, unless
    /// a send still reads from them.
    fn release_queue(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let dir = &mut c.dirs[d];
        if dir.sending {
            return;
        }
        let mut returned = false;
        let bufs = &mut self.bufs;
        dir.queue.drain(|b| {
            if b != PRIVATE_BID {
                bufs.recycle(b);
                returned = true;
            }
        });
        if returned {
            self.unstarve();
        }
    }

    fn maybe_finalize(&mut self, slot: u32) {
        let done =
            matches!(self.conns[slot as usize].as_ref(), Some(c) if c.closing && c.inflight == 0);
        if !done {
            return;
        }
        let c = self.conns[slot as usize].take().expect("checked above");
        sys::close(c.client);
        sys::close(c.backend);
        if c.has_backend {
            self.ctx.release_backend(&c.pool, c.backend_idx);
        }
        self.ctx.release_client();
        self.free.push(slot);
        self.live -= 1;
    }

    // ---- buffered relay ------------------------------------------------------------------

    fn arm_recv(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let dir = &mut c.dirs[d];
        if c.closing || dir.recv_armed || dir.eof {
            return;
        }
        dir.recv_armed = true;
        dir.cancel_sent = false;
        dir.starved = false;
        c.inflight += 1;
        let e = opcode::RecvMulti::new(types::Fd(c.fd(d)), BGID)
            .build()
            .user_data(ud(slot, OP_RECV + d as u8));
        self.push(e);
    }

    fn on_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            self.bufs.taken();
        }
        let more = cqueue::more(flags);
        let Some(c) = self.conns[slot as usize].as_mut() else {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            return;
        };
        if !more {
            c.inflight -= 1;
            c.dirs[d].recv_armed = false;
        }
        if c.closing {
            if let Some(b) = bid {
                self.bufs.recycle(b);
                self.unstarve();
            }
            self.maybe_finalize(slot);
            return;
        }
        if res > 0 {
            let Some(bid) = bid else {
                warn!("receive completion without a buffer");
                self.begin_close(slot);
                return;
            };
            c.session.on_traffic(self.ctx.now_ms);
            let dir = &mut c.dirs[d];
            dir.queue.push(Seg {
                bid,
                off: 0,
                len: res as u32,
            });
            if dir.queue.len() >= QUEUE_HIGH && dir.recv_armed && !dir.cancel_sent {
                dir.cancel_sent = true;
                c.inflight += 1;
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(ud(
                    slot,
                    OP_RECV + d as u8,
                )))
                .build()
                .user_data(ud(slot, OP_CANCEL));
                self.push(e);
            }
            let c = self.conns[slot as usize].as_mut().expect("live");
            if !c.dirs[d].sending {
                self.send_next(slot, d);
            }
        } else if res == 0 {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            let dir = &mut c.dirs[d];
            dir.eof = true;
            if dir.queue.is_empty() && !dir.sending {
                self.pass_eof(slot, d);
            }
            return;
        } else if res == -libc::ENOBUFS {
            c.dirs[d].starved = true;
            self.starved.push_back((slot, d));
            WorkerStats::add(&self.ctx.stats().buffer_starved, 1);
        } else if res == -libc::ECANCELED || res == -libc::EAGAIN || res == -libc::EINTR {
            // Back-pressure cancel, or the kernel gave the receive back without data:
            // re-armed below or once the queue drains.
        } else {
            debug!(errno = -res, "receive failed");
            self.begin_close(slot);
            return;
        }
        self.maybe_rearm(slot, d);
    }

    /// Re-arms the receive of direction `d` if it may take more data: multishot on the shared
    /// ring normally; when the direction starved (ENOBUFS) and the ring is still empty, a
    /// single-shot receive into its own buffer, so that no direction ever waits for buffers
    /// held by others (which could deadlock: uploads holding every buffer while their backends
    /// wait for us to read their replies).
    fn maybe_rearm(&mut self, slot: u32, d: usize) {
        if self.relay != RelayMode::Buffered {
            return;
        }
        let available = self.bufs.available;
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let dir = &mut c.dirs[d];
        if c.closing || dir.recv_armed || dir.eof || dir.queue.len() >= QUEUE_LOW {
            return;
        }
        if !dir.starved || available >= 2 {
            if !dir.private_queued {
                dir.private = None;
            }
            self.arm_recv(slot, d);
        } else if !dir.private_queued {
            self.arm_private_recv(slot, d);
        }
    }

    fn arm_private_recv(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = types::Fd(c.fd(d));
        let dir = &mut c.dirs[d];
        let buf = dir
            .private
            .get_or_insert_with(|| vec![0u8; PRIVATE_SIZE].into_boxed_slice());
        // The boxed buffer stays allocated until the completion: it is only dropped when the
        // direction leaves the starved state with nothing queued, or with the slot.
        let e = opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(ud(slot, OP_RECV_PRIVATE + d as u8));
        dir.recv_armed = true;
        c.inflight += 1;
        self.push(e);
    }

    fn on_private_recv(&mut self, slot: u32, d: usize, res: i32) {
        if !self.op_done(slot) {
            return;
        }
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        c.dirs[d].recv_armed = false;
        if res > 0 {
            c.session.on_traffic(self.ctx.now_ms);
            let dir = &mut c.dirs[d];
            dir.queue.push(Seg {
                bid: PRIVATE_BID,
                off: 0,
                len: res as u32,
            });
            dir.private_queued = true;
            if !dir.sending {
                self.send_next(slot, d);
            }
        } else if res == 0 {
            let dir = &mut c.dirs[d];
            dir.eof = true;
            if dir.queue.is_empty() && !dir.sending {
                self.pass_eof(slot, d);
            }
            return;
        } else if res != -libc::ECANCELED && res != -libc::EAGAIN && res != -libc::EINTR {
            debug!(errno = -res, "receive failed");
            self.begin_close(slot);
            return;
        }
        self.maybe_rearm(slot, d);
    }

    fn send_next(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = types::Fd(c.fd(1 - d));
        let dir = &mut c.dirs[d];
        let n = dir.queue.len().min(SEND_IOVS);
        let e = if n <= 1 {
            let Some(seg) = dir.queue.front_mut().copied() else {
                return;
            };
            let ptr = seg_ptr(&self.bufs, &dir.private, &seg);
            opcode::Send::new(fd, ptr, seg.len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            // Everything queued goes in one operation: fewer round trips, fuller segments.
            let sv = dir.sendvec.get_or_insert_with(SendVec::new);
            for (slot_iov, seg) in sv.iov.iter_mut().zip(dir.queue.iter()) {
                slot_iov.iov_base = seg_ptr(&self.bufs, &dir.private, seg) as *mut libc::c_void;
                slot_iov.iov_len = seg.len as usize;
            }
            sv.msg.msg_iov = sv.iov.as_mut_ptr();
            sv.msg.msg_iovlen = n;
            // The boxed msghdr and iovecs stay put until the completion: the direction sends
            // one operation at a time and the box is only dropped with the connection slot.
            opcode::SendMsg::new(fd, &sv.msg as *const libc::msghdr)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        dir.sending = true;
        c.inflight += 1;
        self.push(e.user_data(ud(slot, OP_SEND + d as u8)));
    }

    fn on_send(&mut self, slot: u32, d: usize, res: i32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        c.inflight -= 1;
        c.dirs[d].sending = false;
        if c.closing {
            // begin_close left this direction's buffers alone while the send ran.
            self.release_queue(slot, d);
            self.maybe_finalize(slot);
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            // The kernel gave the send back unfinished (possible on non-blocking sockets):
            // wait until the destination takes data, then send again. The wait stands in for
            // the send in flight, so the queued buffers stay untouched meanwhile.
            c.dirs[d].sending = true;
            self.arm_poll(slot, d, true);
            return;
        }
        if res < 0 {
            debug!(errno = -res, "send failed");
            self.begin_close(slot);
            return;
        }
        let n = res as u32;
        c.session.on_traffic(self.ctx.now_ms);
        self.ctx
            .count_bytes(&c.pool, c.backend_idx, d == 0, u64::from(n));
        let mut recycled: [u16; SEND_IOVS + 1] = [0; SEND_IOVS + 1];
        let mut nrec = 0;
        c.dirs[d].queue.consume(n, |b| {
            if nrec < recycled.len() {
                recycled[nrec] = b;
                nrec += 1;
            }
        });
        let more_queued = !c.dirs[d].queue.is_empty();
        let eof_pending = c.dirs[d].eof && !more_queued;
        if more_queued {
            self.send_next(slot, d);
        } else if eof_pending {
            self.pass_eof(slot, d);
        }
        let mut returned = false;
        for &b in &recycled[..nrec] {
            if b == PRIVATE_BID {
                if let Some(c) = self.conns[slot as usize].as_mut() {
                    let dir = &mut c.dirs[d];
                    dir.private_queued = false;
                    if !dir.starved {
                        dir.private = None;
                    }
                }
            } else {
                self.bufs.recycle(b);
                returned = true;
            }
        }
        if returned {
            self.unstarve();
        }
        self.maybe_rearm(slot, d);
    }

    /// The destination of direction `d` became writable after a send came back with EAGAIN.
    fn on_send_ready(&mut self, slot: u32, d: usize, res: i32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        c.inflight -= 1;
        c.dirs[d].sending = false;
        if c.closing {
            self.release_queue(slot, d);
            self.maybe_finalize(slot);
            return;
        }
        if res < 0 {
            self.begin_close(slot);
            return;
        }
        self.send_next(slot, d);
    }

    /// Re-arms receives that ran out of buffers, a few per returned buffer.
    fn unstarve(&mut self) {
        for _ in 0..4 {
            let Some((slot, d)) = self.starved.pop_front() else {
                return;
            };
            if self.conns[slot as usize]
                .as_ref()
                .is_some_and(|c| c.dirs[d].starved)
            {
                self.maybe_rearm(slot, d);
            }
        }
    }

    /// Direction `d`'s source finished and everything it sent has been passed on.
    fn pass_eof(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if c.dirs[d].eof_done {
            return;
        }
        c.dirs[d].eof_done = true;
        let side = if d == 0 { Side::Client } else { Side::Backend };
        match c.session.on_eof(side) {
            AfterEof::ShutdownWrite(peer) => sys::shutdown_write(c.fd(peer.index())),
            AfterEof::Close => self.begin_close(slot),
        }
    }

    // ---- splice relay --------------------------------------------------------------------

    fn arm_poll(&mut self, slot: u32, d: usize, out: bool) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if c.closing {
            return;
        }
        let (fd, mask, op) = if out {
            (c.fd(1 - d), libc::POLLOUT as u32, OP_POLL_OUT + d as u8)
        } else {
            (c.fd(d), libc::POLLIN as u32, OP_POLL_IN + d as u8)
        };
        c.inflight += 1;
        let e = opcode::PollAdd::new(types::Fd(fd), mask)
            .build()
            .user_data(ud(slot, op));
        self.push(e);
    }

    fn on_poll(&mut self, slot: u32, d: usize, res: i32) {
        if !self.op_done(slot) {
            return;
        }
        if res < 0 {
            self.begin_close(slot);
            return;
        }
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let (src, dst) = (c.fd(d), c.fd(1 - d));
        let Some(p) = c.pipes.as_mut() else { return };
        let (outcome, moved) = pump(src, dst, p.fds[d], &mut p.pending[d]);
        if moved > 0 {
            c.session.on_traffic(self.ctx.now_ms);
            self.ctx.count_bytes(&c.pool, c.backend_idx, d == 0, moved);
        }
        match outcome {
            Pump::WaitSource => self.arm_poll(slot, d, false),
            // Stopped to let others run: continue from whichever end has work (bytes still in
            // the pipe need the destination; otherwise more may be read from the source).
            Pump::Yield => {
                let pending = self.conns[slot as usize]
                    .as_ref()
                    .and_then(|c| c.pipes.as_ref())
                    .is_some_and(|p| p.pending[d] > 0);
                self.arm_poll(slot, d, pending);
            }
            Pump::WaitDest => self.arm_poll(slot, d, true),
            Pump::Eof => {
                if let Some(c) = self.conn(slot) {
                    c.dirs[d].eof = true;
                }
                self.pass_eof(slot, d);
            }
            Pump::Error(e) => {
                debug!(errno = e, "splice failed");
                self.begin_close(slot);
            }
        }
    }
}

/// Address of the first unsent byte of `seg`: in the shared ring, or in the direction's
/// private buffer.
fn seg_ptr(bufs: &BufRing, private: &Option<Box<[u8]>>, seg: &Seg) -> *mut u8 {
    let base = if seg.bid == PRIVATE_BID {
        private
            .as_ref()
            .map_or(std::ptr::null_mut(), |p| p.as_ptr() as *mut u8)
    } else {
        bufs.ptr(seg.bid)
    };
    // SAFETY: off + len lie inside the buffer the kernel filled (len came from the receive),
    // and a private segment exists only while its buffer does.
    unsafe { base.add(seg.off as usize) }
}
