//! Engine tests through the library API (`Lb::start`), for what the command line cannot set:
//! a deliberately tiny provided-buffer ring, so that buffer exhaustion, back-pressure and the
//! re-arming of starved receives are exercised under real traffic on loopback.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use ringmail_dataplane::uring::BufferConfig;
use ringmail_dataplane::{Lb, Options};
use ringmail_proxy_core::config::{EngineChoice, Global, LbConfig, Listener, Pool, RelayMode};

/// An echo server on an ephemeral loopback port; one thread per connection.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn config(
    listen: SocketAddr,
    backend: SocketAddr,
    engine: EngineChoice,
    relay: RelayMode,
) -> LbConfig {
    LbConfig {
        global: Global {
            workers: Some(2),
            engine,
            relay,
            ..Global::default()
        },
        listeners: vec![Listener {
            name: "t".into(),
            bind: listen,
            pool: 0,
        }],
        pools: vec![Pool::quick("t", vec![backend])],
        announce: None,
    }
}

/// Sends `len` pseudo-random bytes through the proxy and checks the echo, with the client
/// reading and writing concurrently (so back-pressure builds up inside the proxy).
fn transfer(listen: SocketAddr, len: usize, seed: u64) {
    let mut s = TcpStream::connect(listen).expect("connect through lb");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let data: Vec<u8> = (0..len)
        .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8)
        .collect();
    let mut w = s.try_clone().expect("clone");
    let expected = data.clone();
    let writer = thread::spawn(move || {
        for chunk in data.chunks(7919) {
            w.write_all(chunk).expect("write");
        }
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut got = Vec::with_capacity(len);
    s.read_to_end(&mut got).expect("read echo");
    writer.join().expect("writer");
    assert_eq!(got.len(), expected.len(), "echo length");
    assert!(got == expected, "echo content differs");
}

#[test]
fn tiny_buffer_ring_never_stalls_a_connection() {
    if let Err(e) = ringmail_dataplane::uring::probe() {
        if std::env::var("RINGMAIL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
            panic!("io_uring unavailable: {e}");
        }
        eprintln!("SKIP: io_uring unavailable here: {e}");
        return;
    }
    let backend = echo_server();
    let listen = free_port();
    // 8 buffers of 4 KiB for the whole worker: 24 concurrent 1 MiB echoes need far more, so
    // receives run out of buffers (ENOBUFS) and must be re-armed as buffers come back.
    let options = Options {
        buffers: BufferConfig {
            count: 8,
            size: 4096,
        },
    };
    let lb = Lb::start(
        config(listen, backend, EngineChoice::Uring, RelayMode::Buffered),
        options,
    )
    .expect("start lb");
    let started = Instant::now();
    let clients: Vec<_> = (0..24)
        .map(|i| thread::spawn(move || transfer(listen, 1 << 20, i + 1)))
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let starved = lb.stats().total(|w| &w.buffer_starved);
    assert!(
        starved > 0,
        "the ring never ran dry: the test did not exercise starvation"
    );
    eprintln!("receives that found the ring empty: {starved}");
    assert!(lb.workers_alive());
    lb.drain_and_wait(Duration::from_secs(2));
}

#[test]
fn every_engine_and_relay_mode_echoes_large_payloads() {
    let backend = echo_server();
    for engine in [EngineChoice::Uring, EngineChoice::Epoll] {
        if engine == EngineChoice::Uring && ringmail_dataplane::uring::probe().is_err() {
            continue;
        }
        for relay in [RelayMode::Buffered, RelayMode::Splice] {
            let listen = free_port();
            let lb = Lb::start(config(listen, backend, engine, relay), Options::default())
                .expect("start lb");
            let clients: Vec<_> = (0..8)
                .map(|i| thread::spawn(move || transfer(listen, 3 << 20, i + 7)))
                .collect();
            for c in clients {
                c.join().expect("client thread");
            }
            lb.drain_and_wait(Duration::from_secs(2));
        }
    }
}

/// Request/response without end of stream: the client sends a large burst and waits for all of
/// it to come back before it closes. Nothing but the proxy's own pumping can move the last
/// bytes (no FIN arrives to wake anything up), so a relay that parks data in its buffers or
/// pipes while waiting for more input hangs here.
#[test]
fn large_burst_is_fully_relayed_without_end_of_stream() {
    let backend = echo_server();
    for engine in [EngineChoice::Uring, EngineChoice::Epoll] {
        if engine == EngineChoice::Uring && ringmail_dataplane::uring::probe().is_err() {
            continue;
        }
        for relay in [RelayMode::Splice, RelayMode::Buffered] {
            let listen = free_port();
            let lb = Lb::start(config(listen, backend, engine, relay), Options::default())
                .expect("start lb");
            let len = 48 << 20;
            let mut s = TcpStream::connect(listen).expect("connect through lb");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut w = s.try_clone().expect("clone");
            let writer = thread::spawn(move || {
                let chunk = vec![0x5au8; 1 << 20];
                for _ in 0..(len >> 20) {
                    w.write_all(&chunk).expect("write");
                }
                w // kept open: no FIN until everything has come back
            });
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 20];
            while got < len {
                match s.read(&mut buf) {
                    Ok(0) => panic!("{engine:?}/{relay:?}: closed after {got} of {len} bytes"),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        panic!("{engine:?}/{relay:?}: stalled after {got} of {len} bytes: {e}")
                    }
                }
            }
            drop(writer.join().expect("writer"));
            lb.drain_and_wait(Duration::from_secs(2));
        }
    }
}
