//! End-to-end tests of `ringmail lb` against real loopback TCP backends.
//!
//! Every scenario runs once per engine (`uring::*` and `epoll::*`); an engine the kernel does not
//! offer is skipped with a message (a failure under `RINGMAIL_REQUIRE_ALL=1`).

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Quick mode's pool name.
const POOL: &str = "default";
/// How long a backend may take to be reported up after start (rise 2 × 200 ms, plus slack).
const UP: Duration = Duration::from_secs(5);

per_engine!(
    relay_buffered,
    relay_splice,
    half_close,
    roundrobin,
    leastconn,
    weighted,
    source_hash,
    health_down_and_up,
    connect_retry,
    drain_exits_after_client_closes,
    drain_exits_at_deadline,
    reload_under_load,
    reload_rejects_invalid_config,
    admin_api,
    ipv6,
    rate_limit,
);

fn greeters(n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend::any(Mode::Greet(format!("b{i}"))))
        .collect()
}

fn quick_with(engine: &str, backends: &[&Backend], balance: &str) -> Lb {
    let mut q = Quick::new(engine).opt("--balance", balance);
    for b in backends {
        q = q.backend(b.addr);
    }
    let lb = q.start();
    for b in backends {
        lb.wait_backend_up(POOL, b.addr, true, UP);
    }
    lb
}

/// A config-mode file with one listener feeding pool `mail`; `backends` is the TOML array body.
fn config(
    engine: &str,
    admin: SocketAddr,
    listen: SocketAddr,
    algorithm: &str,
    backends: &str,
    global: &str,
) -> String {
    format!(
        r#"[global]
workers = 2
engine = "{engine}"
admin = "{admin}"
{global}

[[listener]]
name = "main"
bind = "{listen}"
pool = "mail"

[pool.mail]
algorithm = "{algorithm}"
health = {{ check = "tcp", interval = "200ms", timeout = "150ms", rise = 2, fall = 2 }}
backends = [{backends}]
"#
    )
}

fn weighted_backends(list: &[(SocketAddr, u32)]) -> String {
    list.iter()
        .map(|(a, w)| format!("{{ addr = \"{a}\", weight = {w} }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// 1. Relay correctness

fn relay_buffered(engine: &str) {
    relay(engine, "buffered");
}

fn relay_splice(engine: &str) {
    relay(engine, "splice");
}

/// Many concurrent clients push random payloads (1 B to 4 MiB) through the proxy to an echo
/// backend, half-close, and must read back exactly the same bytes followed by EOF.
fn relay(engine: &str, relay: &str) {
    let backend = Backend::any(Mode::Echo);
    let lb = Quick::new(engine)
        .backend(backend.addr)
        .opt("--relay", relay)
        .start();
    for w in lb
        .metrics()
        .iter()
        .filter(|s| s.name == "ringmail_lb_worker_info")
    {
        assert_eq!(
            w.label("relay"),
            Some(relay),
            "worker uses the wrong relay: {w:?}"
        );
    }
    lb.wait_backend_up(POOL, backend.addr, true, UP);

    let mut rng = Rng::from_time();
    let payloads: Vec<Vec<u8>> = (0..24)
        .map(|i| {
            let len = match i {
                0 => 1,
                1 => 4 << 20,
                2 => 64 << 10,
                _ => {
                    // Log-uniform, so small and large sizes are both common.
                    let bits = rng.range(0, 21);
                    rng.range(1 << bits, (1 << (bits + 1)).min(4 << 20)) as usize
                }
            };
            rng.bytes(len)
        })
        .collect();

    let addr = lb.addr();
    let errors: Vec<String> = thread::scope(|sc| {
        let handles: Vec<_> = payloads
            .iter()
            .map(|p| sc.spawn(move || echo_through(addr, p)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .filter_map(|(i, h)| {
                h.join()
                    .unwrap()
                    .err()
                    .map(|e| format!("client {i} ({} B): {e}", payloads[i].len()))
            })
            .collect()
    });
    assert!(
        errors.is_empty(),
        "relay errors ({relay}):\n{}",
        errors.join("\n")
    );

    let total: usize = payloads.iter().map(Vec::len).sum();
    let to_backend = lb.wait_metric(
        "ringmail_lb_backend_bytes_total",
        &[("pool", POOL), ("direction", "to_backend")],
        Duration::from_secs(3),
        |v| v >= total as f64,
    );
    assert!(to_backend >= total as f64);
}

/// Sends `payload` (writer thread), half-closes, and reads everything back until EOF.
fn echo_through(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let mut s = connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let (wrote, got) = thread::scope(|sc| {
        let writer = sc.spawn(move || {
            w.write_all(payload)
                .and_then(|_| w.shutdown(Shutdown::Write))
        });
        let got = read_all(&mut s, payload.len() + 1);
        (writer.join().unwrap(), got)
    });
    wrote.map_err(|e| format!("write: {e}"))?;
    let got = got.map_err(|e| format!("read: {e}"))?;
    if got.len() != payload.len() {
        return Err(format!(
            "got {} bytes back, sent {}",
            got.len(),
            payload.len()
        ));
    }
    if let Some(i) = got.iter().zip(payload).position(|(a, b)| a != b) {
        return Err(format!("byte {i} differs"));
    }
    Ok(())
}

/// The client shuts down its write side; the backend must see EOF while its own direction stays
/// open, so its reply (sent after the EOF) still reaches the client.
fn half_close(engine: &str) {
    let backend = Backend::any(Mode::SinkThenReply);
    let lb = quick_with(engine, &[&backend], "roundrobin");
    for size in [0usize, 1, 100_000, 1 << 20] {
        let mut s = connect(lb.addr()).unwrap();
        s.write_all(&vec![b'x'; size]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let reply = read_all(&mut s, 1024)
            .unwrap_or_else(|e| panic!("reading reply after half-close ({size} B): {e}"));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("got {size}\n"),
            "half-close with {size} bytes"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Balancing

fn count(counts: &BTreeMap<String, usize>, id: &str) -> usize {
    counts.get(id).copied().unwrap_or(0)
}

/// Sequential connections are spread evenly. Each of the 2 workers round-robins on its own, so a
/// backend's share may differ from n/3 by at most one per worker.
fn roundrobin(engine: &str) {
    let b = greeters(3);
    let lb = quick_with(engine, &[&b[0], &b[1], &b[2]], "roundrobin");
    let counts = tally(lb.addr(), 60);
    for i in 0..3 {
        let c = count(&counts, &format!("b{i}"));
        assert!((18..=22).contains(&c), "roundrobin is uneven: {counts:?}");
    }
}

/// With connections held open, a new connection goes to a backend with none.
fn leastconn(engine: &str) {
    let b = greeters(3);
    let lb = quick_with(engine, &[&b[0], &b[1], &b[2]], "leastconn");
    for round in 0..3 {
        let mut held = Vec::new();
        for _ in 0..3 {
            let (id, s) = open_greeted(lb.addr()).unwrap();
            held.push((id, s));
        }
        let ids: BTreeSet<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids.len(),
            3,
            "round {round}: 3 held connections not spread over 3 backends: {ids:?}"
        );

        // Free exactly one backend: the next connection must go there.
        let (freed, s) = held.remove(1);
        drop(s);
        lb.wait_metric(
            "ringmail_lb_backend_active_connections",
            &[("pool", POOL)],
            Duration::from_secs(5),
            |v| v == 2.0,
        );
        let (id, s) = open_greeted(lb.addr()).unwrap();
        assert_eq!(
            id, freed,
            "round {round}: new connection did not go to the idle backend"
        );
        drop(s);
        drop(held);
        lb.wait_metric(
            "ringmail_lb_backend_active_connections",
            &[("pool", POOL)],
            Duration::from_secs(5),
            |v| v == 0.0,
        );
    }
}

/// Config weights 3:1 under `weighted` give a 3:1 split (± 2 per worker).
fn weighted(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let b = Backend::any(Mode::Greet("b".into()));
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        engine,
        admin,
        listen,
        "weighted",
        &weighted_backends(&[(a.addr, 3), (b.addr, 1)]),
        "",
    );
    let lb = Lb::from_config(&cfg, vec![listen], admin);
    lb.expect_engine(engine);
    lb.wait_backend_up("mail", a.addr, true, UP);
    lb.wait_backend_up("mail", b.addr, true, UP);
    let counts = tally(lb.addr(), 80);
    let (ca, cb) = (count(&counts, "a"), count(&counts, "b"));
    assert!(
        (56..=64).contains(&ca) && (16..=24).contains(&cb),
        "weights 3:1 gave {counts:?}"
    );
}

fn served_from(src: IpAddr, addr: SocketAddr) -> String {
    let mut s = connect_from(src, addr).unwrap_or_else(|e| panic!("connect from {src}: {e}"));
    let id = read_line(&mut s).unwrap_or_else(|e| panic!("greeting for {src}: {e}"));
    round_trip(&mut s, b"ping\n").unwrap();
    id
}

/// Source hashing: every connection from one client address lands on one backend, whichever
/// worker accepts it; different addresses spread over more than one backend.
fn source_hash(engine: &str) {
    let b = greeters(3);
    let lb = quick_with(engine, &[&b[0], &b[1], &b[2]], "source");
    let counts = tally(lb.addr(), 30);
    assert_eq!(
        counts.len(),
        1,
        "connections from 127.0.0.1 went to several backends: {counts:?}"
    );

    let mut seen: BTreeSet<String> = counts.into_keys().collect();
    for x in 2..=9u8 {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, x));
        let ids: BTreeSet<String> = (0..5).map(|_| served_from(src, lb.addr())).collect();
        assert_eq!(
            ids.len(),
            1,
            "connections from {src} went to several backends: {ids:?}"
        );
        seen.extend(ids);
    }
    assert!(
        seen.len() >= 2,
        "9 source addresses all hashed to one backend: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Health checks

/// A backend that dies is marked down within fall × interval (+ slack) and gets no new
/// connections; restarted on the same port, it is back after rise successes.
fn health_down_and_up(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    // Outside the ephemeral range, so the port is still free when the backend comes back.
    let mut b = Backend::start(free_addr(), Mode::Greet("b".into()));
    let b_addr = b.addr;
    let lb = quick_with(engine, &[&a, &b], "roundrobin");

    b.kill();
    // fall 2 × 200 ms = 400 ms; allow generous slack for a loaded CI machine.
    let took = lb.wait_backend_up(POOL, b_addr, false, Duration::from_secs(3));
    eprintln!("dead backend marked down after {took:?}");

    let counts = tally(lb.addr(), 50);
    assert_eq!(
        count(&counts, "a"),
        50,
        "connections went elsewhere than the live backend: {counts:?}"
    );

    let b = Backend::start(b_addr, Mode::Greet("b".into()));
    let took = lb.wait_backend_up(POOL, b.addr, true, Duration::from_secs(3));
    eprintln!("restarted backend marked up after {took:?}");
    let counts = tally(lb.addr(), 20);
    assert!(
        count(&counts, "b") >= 5,
        "restarted backend not back in rotation: {counts:?}"
    );

    let b_label = b_addr.to_string();
    let checks = |result| {
        lb.metric(
            "ringmail_lb_backend_health_checks_total",
            &[("pool", POOL), ("backend", &b_label), ("result", result)],
        )
    };
    assert!(checks("failed") >= 2.0, "failed checks not counted");
    assert!(checks("ok") >= 2.0, "successful checks not counted");
}

// ---------------------------------------------------------------------------------------------
// 4. Connect retry

/// A backend that dies between two health checks (interval 60 s, so the checker cannot
/// notice): every client is still served by the other backend through connect retries, and the
/// failed connects are counted against the dead one.
fn connect_retry(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let mut b = Backend::any(Mode::Greet("b".into()));
    let b_addr = b.addr;
    let lb = Quick::new(engine)
        .backend(a.addr)
        .backend(b_addr)
        .opt("--balance", "roundrobin")
        .opt("--health-interval", "60s")
        .opt("--fall", "3")
        .start();
    lb.wait_backend_up(POOL, a.addr, true, UP);
    lb.wait_backend_up(POOL, b_addr, true, UP);
    b.kill();

    let counts = tally(lb.addr(), 30);
    assert_eq!(count(&counts, "a"), 30, "{counts:?}");
    let dead_label = b_addr.to_string();
    let errors = lb.metric(
        "ringmail_lb_backend_connect_errors_total",
        &[("pool", POOL), ("backend", &dead_label)],
    );
    assert!(
        errors > 0.0,
        "no connect errors counted for the dead backend {b_addr}"
    );
    // The checker has not run again (60 s interval): it is the workers' passive health that
    // took the dead backend out, after `fall` (3) connect failures in a row.
    assert_eq!(
        errors, 3.0,
        "expected exactly `fall` connect errors before the mark-down"
    );
    assert_eq!(
        lb.metric(
            "ringmail_lb_backend_up",
            &[("pool", POOL), ("backend", &dead_label)]
        ),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Graceful drain on SIGTERM

/// After SIGTERM, polls until a new connection is refused (the listener is closed).
fn wait_refused(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let refused = wait_for(Duration::from_secs(3), || match connect(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(()),
        _ => None,
    });
    assert!(
        refused.is_some(),
        "new connections still accepted 3 s after SIGTERM"
    );
    start.elapsed()
}

/// SIGTERM: new connections are refused, the open one keeps working, and the process exits 0 as
/// soon as it closes (well before the 5 s drain deadline).
fn drain_exits_after_client_closes(engine: &str) {
    let backend = Backend::any(Mode::Echo);
    let mut lb = Quick::new(engine)
        .backend(backend.addr)
        .opt("--drain-timeout", "5s")
        .start();
    lb.wait_backend_up(POOL, backend.addr, true, UP);
    let mut c = connect(lb.addr()).unwrap();
    round_trip(&mut c, b"before\n").unwrap();

    let t0 = Instant::now();
    lb.sigterm();
    eprintln!("refused {:?} after SIGTERM", wait_refused(lb.addr()));
    for i in 0..3 {
        round_trip(&mut c, format!("after {i}\n").as_bytes())
            .expect("open connection broken by SIGTERM");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lb.child.try_wait().is_none(),
        "lb exited with a connection still open"
    );

    drop(c);
    let closed = Instant::now();
    let status = lb
        .child
        .wait_timeout(Duration::from_secs(8))
        .expect("lb did not exit after drain");
    eprintln!("exited {:?} after the client closed", closed.elapsed());
    assert!(status.success(), "lb exit status after SIGTERM: {status}");
    assert!(
        t0.elapsed() < Duration::from_millis(4500),
        "lb waited for the drain deadline instead of exiting when the last connection closed"
    );
}

/// SIGTERM with a connection left open: the process keeps serving it until the 2 s drain
/// deadline, then closes it and exits 0.
fn drain_exits_at_deadline(engine: &str) {
    let backend = Backend::any(Mode::Echo);
    let mut lb = Quick::new(engine)
        .backend(backend.addr)
        .opt("--drain-timeout", "2s")
        .start();
    lb.wait_backend_up(POOL, backend.addr, true, UP);
    let mut c = connect(lb.addr()).unwrap();
    round_trip(&mut c, b"before\n").unwrap();

    let t0 = Instant::now();
    lb.sigterm();
    wait_refused(lb.addr());
    thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    round_trip(&mut c, b"one second in\n")
        .expect("open connection broken before the drain deadline");
    assert!(
        lb.child.try_wait().is_none(),
        "lb exited before the drain deadline"
    );

    let status = lb
        .child
        .wait_timeout(Duration::from_secs(5))
        .expect("lb did not exit after the drain deadline");
    let took = t0.elapsed();
    assert!(
        status.success(),
        "lb exit status after drain deadline: {status}"
    );
    assert!(
        took >= Duration::from_millis(1800),
        "lb exited after {took:?}, before the 2 s deadline"
    );
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("connection still delivered {n} bytes after the lb exited"),
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Reload under load

/// Client threads connect continuously while the config is reloaded five times (weights change,
/// a backend is added): no connection fails, and the added backend gets traffic.
fn reload_under_load(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let b = Backend::any(Mode::Greet("b".into()));
    let c = Backend::any(Mode::Greet("c".into()));
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = |list: &[(SocketAddr, u32)]| {
        config(
            engine,
            admin,
            listen,
            "weighted",
            &weighted_backends(list),
            "",
        )
    };
    let lb = Lb::from_config(&cfg(&[(a.addr, 1), (b.addr, 1)]), vec![listen], admin);
    lb.expect_engine(engine);
    lb.wait_backend_up("mail", a.addr, true, UP);
    lb.wait_backend_up("mail", b.addr, true, UP);

    let steps = [
        cfg(&[(a.addr, 2), (b.addr, 1)]),
        cfg(&[(a.addr, 1), (b.addr, 3), (c.addr, 1)]),
        cfg(&[(a.addr, 1), (b.addr, 3), (c.addr, 2)]),
        cfg(&[(a.addr, 1), (b.addr, 1), (c.addr, 2)]),
        cfg(&[(a.addr, 1), (b.addr, 3), (c.addr, 2)]),
    ];

    let ok = AtomicUsize::new(0);
    let served_c = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let deadline = Instant::now() + Duration::from_millis(3500);
    thread::scope(|sc| {
        for t in 0..3 {
            let (ok, served_c, failures) = (&ok, &served_c, &failures);
            sc.spawn(move || {
                for i in 0..10_000 {
                    if Instant::now() >= deadline {
                        break;
                    }
                    match served_by(listen) {
                        Ok(id) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if id == "c" {
                                served_c.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("client {t} connection {i}: {e}")),
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            });
        }
        for step in &steps {
            thread::sleep(Duration::from_millis(400));
            lb.rewrite_config(step);
            lb.sighup();
        }
    });

    let failures = failures.into_inner().unwrap();
    let ok = ok.into_inner();
    eprintln!(
        "{ok} connections during reloads, {} to the added backend",
        served_c.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} failed connections during reloads:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(ok >= 30, "only {ok} connections completed under load");

    // The added backend is in rotation (it may have come up only near the end of the load phase).
    lb.wait_backend_up("mail", c.addr, true, UP);
    let counts = tally(listen, 30);
    assert!(
        count(&counts, "c") > 0,
        "added backend got no traffic after reload: {counts:?}"
    );

    let (status, body) = lb.get("/api/backends");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).expect("/api/backends is JSON");
    let weight_of = |addr: SocketAddr| {
        list.as_array()
            .expect("/api/backends is an array")
            .iter()
            .find(|e| e["addr"] == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} missing from /api/backends: {body}"))["weight"]
            .as_u64()
    };
    assert_eq!(weight_of(b.addr), Some(3), "reloaded weight not applied");
    assert_eq!(weight_of(c.addr), Some(2), "reloaded weight not applied");
}

/// A configuration file broken on SIGHUP is refused with its errors; the running
/// configuration stays in force and traffic goes on.
fn reload_rejects_invalid_config(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let b = Backend::any(Mode::Greet("b".into()));
    let (listen, admin) = (free_addr(), free_addr());
    let good = config(
        engine,
        admin,
        listen,
        "weighted",
        &weighted_backends(&[(a.addr, 1), (b.addr, 1)]),
        "",
    );
    let lb = Lb::from_config(&good, vec![listen], admin);
    lb.wait_backend_up("mail", a.addr, true, UP);
    lb.wait_backend_up("mail", b.addr, true, UP);

    // An unknown key and a bad address: both must be reported, nothing applied.
    let broken = format!("{good}\n[pool.extra]\nbackends = [\"not-an-address\"]\nbogus_key = 1\n");
    lb.rewrite_config(&broken);
    lb.sighup();
    let log = wait_for(Duration::from_secs(5), || {
        let log = lb.child.log_text();
        log.contains("reload refused").then_some(log)
    })
    .expect("no 'reload refused' in the log after SIGHUP with a broken file");
    assert!(
        log.contains("bogus_key"),
        "unknown key not reported:\n{log}"
    );
    assert!(
        log.contains("not-an-address"),
        "bad address not reported:\n{log}"
    );

    // Still serving, with both backends, as before.
    let counts = tally(listen, 20);
    assert_eq!(count(&counts, "a") + count(&counts, "b"), 20, "{counts:?}");
    assert!(
        count(&counts, "a") > 0 && count(&counts, "b") > 0,
        "{counts:?}"
    );
    let (status, _) = lb.get("/healthz");
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// 8. Admin API and metrics

fn backend_json(lb: &Lb, method: &str, path: &str) -> serde_json::Value {
    let (status, body) = if method == "POST" {
        lb.post(path)
    } else {
        lb.get(path)
    };
    assert_eq!(status, 200, "{method} {path}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"))
}

fn admin_api(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let b = Backend::any(Mode::Greet("b".into()));
    let lb = quick_with(engine, &[&a, &b], "roundrobin");

    let (status, body) = lb.get("/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));

    let base = format!("/api/pools/{POOL}/backends/{}", b.addr);
    let j = backend_json(&lb, "POST", &format!("{base}/drain"));
    assert_eq!(j["admin"], "drain", "{j}");
    assert_eq!(j["addr"], b.addr.to_string(), "{j}");
    let counts = tally(lb.addr(), 20);
    assert_eq!(
        count(&counts, "a"),
        20,
        "drained backend still gets new connections: {counts:?}"
    );

    let list = backend_json(&lb, "GET", "/api/backends");
    let entry = list
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["addr"] == b.addr.to_string())
        .unwrap_or_else(|| panic!("{} missing from {list}", b.addr))
        .clone();
    assert_eq!(entry["pool"], POOL, "{entry}");
    assert_eq!(entry["admin"], "drain", "{entry}");
    assert_eq!(entry["up"], true, "{entry}");
    for key in ["name", "weight", "active", "total", "connect_errors"] {
        assert!(
            entry.get(key).is_some(),
            "/api/backends entry lacks {key}: {entry}"
        );
    }

    let j = backend_json(&lb, "POST", &format!("{base}/ready"));
    assert_eq!(j["admin"], "ready", "{j}");
    let counts = tally(lb.addr(), 20);
    assert!(
        count(&counts, "b") >= 5,
        "backend set ready gets no traffic: {counts:?}"
    );

    let j = backend_json(&lb, "POST", &format!("{base}/weight/5"));
    assert_eq!(j["weight"], 5, "{j}");

    let (status, _) = lb.post(&format!("/api/pools/{POOL}/backends/127.0.0.1:1/drain"));
    assert_eq!(status, 404, "draining an unknown backend");
    let (status, _) = lb.post(&format!("/api/pools/nosuchpool/backends/{}/drain", b.addr));
    assert_eq!(status, 404, "draining in an unknown pool");
    // A known path with the wrong method: 405 (with Allow), not 404.
    let (status, body) = lb.post("/metrics");
    assert_eq!(status, 405, "POST /metrics: {body}");
    let (status, body) = lb.get(&format!("{base}/drain"));
    assert_eq!(status, 405, "GET of a drain action: {body}");
    assert!(body.contains("use POST"), "{body}");
    let (status, _) = lb.get("/no/such/path");
    assert_eq!(status, 404);

    // Strict parse (every sample line is `name{labels} value`) happens in `metrics()`.
    let m = lb.metrics();
    for name in [
        "ringmail_lb_worker_info",
        "ringmail_lb_worker_accepts_total",
        "ringmail_lb_worker_active_connections",
        "ringmail_lb_backend_up",
        "ringmail_lb_backend_active_connections",
        "ringmail_lb_backend_connections_total",
        "ringmail_lb_backend_bytes_total",
        "ringmail_lb_backend_connect_errors_total",
        "ringmail_lb_backend_health_checks_total",
        "ringmail_lb_connect_duration_seconds_bucket",
    ] {
        assert!(m.iter().any(|s| s.name == name), "/metrics lacks {name}");
    }
    assert_eq!(
        m.iter()
            .filter(|s| s.name == "ringmail_lb_worker_info")
            .count(),
        2,
        "2 workers expected"
    );
    assert!(metric_sum(&m, "ringmail_lb_worker_accepts_total", &[]) >= 40.0);
    let a_label = a.addr.to_string();
    assert!(
        metric_sum(
            &m,
            "ringmail_lb_backend_connections_total",
            &[("pool", POOL), ("backend", &a_label)]
        ) >= 20.0
    );
    for dir in ["to_backend", "to_client"] {
        let v = metric_sum(
            &m,
            "ringmail_lb_backend_bytes_total",
            &[("backend", &a_label), ("direction", dir)],
        );
        assert!(v > 0.0, "no bytes counted {dir}");
    }
    let inf = metric_sum(
        &m,
        "ringmail_lb_connect_duration_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert!(inf >= 40.0, "connect histogram counts {inf} connects");
}

// ---------------------------------------------------------------------------------------------
// 10. IPv6

fn ipv6(engine: &str) {
    skip_unless!(ipv6_available());
    let backend = Backend::start("[::1]:0".parse().unwrap(), Mode::Echo);
    let lb = Quick::new(engine)
        .listen(free_addr_v6())
        .backend(backend.addr)
        .start();
    lb.wait_backend_up(POOL, backend.addr, true, UP);
    let mut rng = Rng::from_time();
    for len in [1, 1000, 256 << 10] {
        echo_through(lb.addr(), &rng.bytes(len))
            .unwrap_or_else(|e| panic!("IPv6 relay of {len} B: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// 11. Per-source rate limit

fn rate_limit(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        engine,
        admin,
        listen,
        "roundrobin",
        &format!("\"{}\"", a.addr),
        "source_rate = { max = 5, period = \"10s\" }",
    );
    let lb = Lb::from_config(&cfg, vec![listen], admin);
    lb.expect_engine(engine);
    lb.wait_backend_up("mail", a.addr, true, UP);

    for i in 0..5 {
        served_by(listen)
            .unwrap_or_else(|e| panic!("connection {i} within the rate limit failed: {e}"));
    }
    // The 6th is accepted by the kernel but closed by the lb before any backend is involved.
    if let Ok(mut s) = connect(listen) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if let Ok(line) = read_line(&mut s) {
            panic!("6th connection within 10 s was served (greeting {line:?})");
        }
    }
    lb.wait_metric(
        "ringmail_lb_refused_total",
        &[("reason", "rate_limit")],
        Duration::from_secs(3),
        |v| v >= 1.0,
    );
    // The limit is per source address: another one is still served.
    assert_eq!(
        served_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), listen),
        "a"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Config check (engine independent)

#[test]
fn config_check_reports_every_error() {
    let dir = TempDir::new("check");
    let text = r#"[global]
workers = 2

[[listener]]
name = "imaps"
bind = "127.0.0.1:10993"
pool = "nosuchpool"

[pool.imap]
algorithm = "roundrobin"
health = { check = "tcp", interval = "200ms", timeout = "150ms", rise = 0, fall = 2 }
backends = ["127.0.0.1:notaport"]
"#;
    let path = dir.write("bad.toml", text);
    let p = path.display().to_string();
    let (status, out) = run_bounded(
        Command::new(RINGMAIL).args(["lb", "--config", &p, "--check"]),
        Duration::from_secs(20),
    );
    assert!(!status.success(), "--check accepted a bad config:\n{out}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&format!("{p}:")))
        .collect();
    let mut reported = BTreeSet::new();
    for l in &lines {
        let rest = &l[p.len() + 1..];
        let mut parts = rest.splitn(3, ':');
        let line: usize = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no line number in {l:?}"));
        let _col: usize = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no column in {l:?}"));
        assert!(
            parts.next().is_some_and(|m| !m.trim().is_empty()),
            "no message in {l:?}"
        );
        reported.insert(line);
    }
    // Line 7: unknown pool; line 11: rise = 0; line 12: backend address without a port number.
    for want in [7, 11, 12] {
        assert!(
            reported.contains(&want),
            "no error reported on line {want}; output:\n{out}"
        );
    }
    assert_eq!(
        lines.len(),
        3,
        "expected exactly 3 error lines; output:\n{out}"
    );
}

#[test]
fn config_check_accepts_valid_and_shipped_configs() {
    let dir = TempDir::new("check");
    let good = config(
        "auto",
        free_addr(),
        free_addr(),
        "roundrobin",
        "\"127.0.0.1:20001\", \"127.0.0.1:20002\"",
        "",
    );
    let mut files = vec![dir.write("good.toml", &good)];
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dataplane/configs");
    if let Ok(entries) = std::fs::read_dir(&shipped) {
        let mut found: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        found.sort();
        files.extend(found);
    } else {
        eprintln!(
            "note: {} does not exist; only the built-in example is checked",
            shipped.display()
        );
    }
    for f in files {
        let p = f.display().to_string();
        let (status, out) = run_bounded(
            Command::new(RINGMAIL).args(["lb", "--config", &p, "--check"]),
            Duration::from_secs(20),
        );
        assert!(status.success(), "--check rejected {p}:\n{out}");
    }
}
