//! Backend server for the benchmarks: a few event-loop threads (mio) that
//! share one listener, so thousands of idle connections cost only their
//! socket buffers and a small per-connection struct.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::util::{auto_threads, parse_long_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Read and discard everything; close on EOF.
    Sink,
    /// Echo every byte back; close after EOF once everything is flushed.
    Echo,
    /// Write zeros as fast as the peer reads; close when the peer does.
    Source,
    /// Read fixed-size requests, answer each with a fixed-size response.
    Rr,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on (loopback only), e.g. 127.0.0.1:9000.
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: Mode,
    /// Event-loop threads (0 = one per CPU).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Request size in bytes for `rr` mode.
    #[arg(long, default_value_t = 64)]
    pub req_size: usize,
    /// Response size in bytes for `rr` mode.
    #[arg(long, default_value_t = 64)]
    pub resp_size: usize,
    /// Listen backlog.
    #[arg(long, default_value_t = 4096)]
    pub backlog: i32,
    /// Stop after this long (0 = run until killed).
    #[arg(long, value_parser = parse_long_duration, default_value = "0")]
    pub max_time: Duration,
}

const LISTENER: Token = Token(usize::MAX);
const BUF: usize = 64 * 1024;

struct Conn {
    stream: TcpStream,
    /// Echo: bytes read but not yet written back, buf[start..end]. Only
    /// allocated when a write falls short, so idle connections stay small.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Rr: bytes of the current request read so far, and response bytes owed.
    req_progress: usize,
    owed: usize,
    eof: bool,
}

pub fn bind_listener(addr: SocketAddr, backlog: i32) -> Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

pub fn run(args: ServerArgs) -> Result<()> {
    crate::ensure_loopback(args.listen)?;
    anyhow::ensure!(args.req_size > 0 && args.resp_size > 0, "sizes must be > 0");
    let listener = bind_listener(args.listen, args.backlog)?;
    let local = listener.local_addr()?;
    let threads = auto_threads(args.threads);
    eprintln!(
        "ringmail-bench server listening on {local} mode={:?} threads={threads}",
        args.mode
    );
    let cfg = Arc::new(args);
    let deadline = (cfg.max_time > Duration::ZERO).then(|| Instant::now() + cfg.max_time);
    let mut handles = Vec::new();
    for i in 0..threads {
        let l = listener.try_clone()?;
        let cfg = cfg.clone();
        handles.push(
            thread::Builder::new()
                .name(format!("srv-{i}"))
                .spawn(move || worker(l, &cfg, deadline))?,
        );
    }
    for h in handles {
        h.join().expect("server worker panicked")?;
    }
    Ok(())
}

fn worker(
    listener: std::net::TcpListener,
    cfg: &ServerArgs,
    deadline: Option<Instant>,
) -> Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut listener = TcpListener::from_std(listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut scratch = vec![0u8; BUF];
    let zeros = vec![0u8; BUF];
    let mut warned_accept = false;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        match poll.poll(&mut events, Some(Duration::from_millis(500))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let idx = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(
                                &mut stream,
                                Token(idx),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            let mut c = Conn {
                                stream,
                                buf: Vec::new(),
                                start: 0,
                                end: 0,
                                req_progress: 0,
                                owed: 0,
                                eof: false,
                            };
                            if drive(&mut c, cfg, &mut scratch, &zeros) {
                                conns[idx] = Some(c);
                            } else {
                                free.push(idx);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            if !warned_accept {
                                eprintln!("server: accept error: {e}");
                                warned_accept = true;
                            }
                            break;
                        }
                    }
                }
                continue;
            }
            let idx = ev.token().0;
            let keep = match conns.get_mut(idx).and_then(Option::as_mut) {
                Some(c) => drive(c, cfg, &mut scratch, &zeros),
                None => continue,
            };
            if !keep {
                conns[idx] = None; // dropping closes and deregisters
                free.push(idx);
            }
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Advances one connection as far as the socket allows. Returns false when
/// the connection is finished and should be closed.
fn drive(c: &mut Conn, cfg: &ServerArgs, scratch: &mut [u8], zeros: &[u8]) -> bool {
    loop {
        let r: io::Result<()> = match cfg.mode {
            Mode::Sink => match c.stream.read(scratch) {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) => Err(e),
            },
            Mode::Source => {
                // Notice the peer going away even while our writes block.
                match c.stream.read(scratch) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if would_block(&e) => {}
                    Err(_) => return false,
                }
                match c.stream.write(zeros) {
                    Ok(0) => return false,
                    Ok(_written) => continue,
                    Err(e) => Err(e),
                }
            }
            Mode::Echo => {
                if c.start < c.end {
                    match c.stream.write(&c.buf[c.start..c.end]) {
                        Ok(n) => {
                            c.start += n;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                } else if c.eof {
                    let _ = c.stream.shutdown(Shutdown::Write);
                    return false;
                } else {
                    // Read into the shared scratch buffer and echo straight
                    // back; keep only what the socket would not take.
                    match c.stream.read(scratch) {
                        Ok(0) => {
                            c.eof = true;
                            continue;
                        }
                        Ok(n) => {
                            let written = match c.stream.write(&scratch[..n]) {
                                Ok(w) => w,
                                Err(e) if would_block(&e) => 0,
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                                Err(_) => return false,
                            };
                            if written < n {
                                c.buf.clear();
                                c.buf.extend_from_slice(&scratch[written..n]);
                                c.start = 0;
                                c.end = c.buf.len();
                            }
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            Mode::Rr => {
                if c.owed > 0 {
                    let n = c.owed.min(zeros.len());
                    match c.stream.write(&zeros[..n]) {
                        Ok(w) => {
                            c.owed -= w;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                } else if c.eof {
                    return false;
                } else {
                    // Only read when nothing is owed: natural backpressure.
                    match c.stream.read(scratch) {
                        Ok(0) => {
                            c.eof = true;
                            continue;
                        }
                        Ok(n) => {
                            c.req_progress += n;
                            c.owed += (c.req_progress / cfg.req_size) * cfg.resp_size;
                            c.req_progress %= cfg.req_size;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        match r {
            Err(e) if would_block(&e) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
}
