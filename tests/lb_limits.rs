//! Limits and timeouts of `ringmail lb`, end to end against real loopback TCP backends: the
//! global and per-backend connection limits, the backend connect timeout with its retry, the idle
//! timeout, and the automatic io_uring → epoll fallback when io_uring is forbidden by seccomp.
//!
//! Every scenario except the fallback runs once per engine (`uring::*` and `epoll::*`); an engine
//! the kernel does not offer is skipped with a message (a failure under `RINGMAIL_REQUIRE_ALL=1`).
// The seccomp test installs a BPF filter in the child between fork and exec (`pre_exec`), which
// needs `unsafe`; each block says why it is sound.
#![allow(unsafe_code)]

#[macro_use]
mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Quick mode's pool name.
const POOL: &str = "default";
/// The pool name in the config files written here.
const CFG_POOL: &str = "mail";
/// How long a backend may take to be reported up after start.
const UP: Duration = Duration::from_secs(5);

per_engine!(
    global_maxconn,
    backend_maxconn,
    connect_timeout_retry,
    idle_timeout,
);

/// A config-mode file: one listener feeding pool `mail`. `pool` holds extra pool keys, `health`
/// the inline health table body, `backends` the TOML array body.
fn config(
    engine: &str,
    admin: SocketAddr,
    listen: SocketAddr,
    pool: &str,
    health: &str,
    backends: &str,
) -> String {
    format!(
        r#"[global]
workers = 2
engine = "{engine}"
admin = "{admin}"

[[listener]]
name = "main"
bind = "{listen}"
pool = "{CFG_POOL}"

[pool.{CFG_POOL}]
{pool}
health = {{ {health} }}
backends = [{backends}]
"#
    )
}

fn start_config(engine: &str, pool: &str, health: &str, backends: &str) -> Lb {
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(engine, admin, listen, pool, health, backends);
    let lb = Lb::from_config(&cfg, vec![listen], admin);
    lb.expect_engine(engine);
    lb
}

/// Asserts that the proxy closes `s` (EOF or reset) within `within`, without sending anything.
fn expect_closed(s: &mut TcpStream, within: Duration, what: &str) -> Duration {
    s.set_read_timeout(Some(within)).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        Ok(n) => panic!(
            "{what}: received {n} bytes ({:?}) instead of being closed",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!(
            "{what}: not closed within {within:?} (read: {e}, after {:?})",
            t0.elapsed()
        ),
    }
    t0.elapsed()
}

// ---------------------------------------------------------------------------------------------
// 1. Global maxconn

/// `--maxconn 3`: three proxied connections are served and held; a fourth is accepted by the
/// kernel but closed by the proxy at once, never reaching the backend, and counted as
/// `refused_total{reason="maxconn"}`. Closing one held connection frees a slot again.
fn global_maxconn(engine: &str) {
    let backend = Backend::any(Mode::Echo);
    // Health interval 60 s: after the first (immediate) check, the checker does not connect to
    // the backend again during the test, so the backend's accept count is the proxy's alone.
    let lb = Quick::new(engine)
        .backend(backend.addr)
        .opt("--maxconn", "3")
        .opt("--health-interval", "60s")
        .start();
    lb.wait_backend_up(POOL, backend.addr, true, UP);
    let label = backend.addr.to_string();
    lb.wait_metric(
        "ringmail_lb_backend_health_checks_total",
        &[("pool", POOL), ("backend", &label)],
        UP,
        |v| v >= 1.0,
    );
    assert_eq!(lb.metric("ringmail_lb_maxconn", &[]), 3.0);
    let base = backend.accepted();

    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = connect(lb.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        round_trip(&mut s, format!("held {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} within maxconn not relayed: {e}"));
        held.push(s);
    }
    assert_eq!(backend.accepted(), base + 3, "backend accepts for 3 held");

    // The 4th: accepted by the kernel, then closed by the lb before any backend is involved.
    match connect(lb.addr()) {
        Ok(mut s) => {
            let took = expect_closed(
                &mut s,
                Duration::from_secs(1),
                "4th connection over maxconn",
            );
            eprintln!("connection over maxconn closed after {took:?}");
        }
        Err(e) => eprintln!("connection over maxconn refused at connect: {e}"),
    }
    lb.wait_metric(
        "ringmail_lb_refused_total",
        &[("reason", "maxconn")],
        Duration::from_secs(3),
        |v| v >= 1.0,
    );
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        backend.accepted(),
        base + 3,
        "the connection over maxconn reached the backend"
    );

    // The held ones are unaffected.
    for (i, s) in held.iter_mut().enumerate() {
        round_trip(s, b"still here\n")
            .unwrap_or_else(|e| panic!("held connection {i} broken by the refusal: {e}"));
    }

    // Free one slot: once the lb has noticed, a new connection is served again.
    drop(held.pop());
    lb.wait_metric(
        "ringmail_lb_worker_active_connections",
        &[],
        Duration::from_secs(5),
        |v| v == 2.0,
    );
    let mut s = connect(lb.addr()).expect("connect after a slot was freed");
    round_trip(&mut s, b"again\n").expect("connection after a slot was freed not relayed");
    assert_eq!(backend.accepted(), base + 4);
    assert_eq!(
        lb.metric("ringmail_lb_refused_total", &[("reason", "maxconn")]),
        1.0,
        "more refusals than the one connection over the limit"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Per-backend maxconn

/// Backend `a` has `maxconn = 2`: once two connections are held on it, every new connection goes
/// to `b`, and `a`'s active count (sampled continuously) never exceeds 2. Freeing one slot on `a`
/// puts it back into rotation.
fn backend_maxconn(engine: &str) {
    let a = Backend::any(Mode::Greet("a".into()));
    let b = Backend::any(Mode::Greet("b".into()));
    let backends = format!(
        "{{ addr = \"{}\", maxconn = 2 }}, {{ addr = \"{}\" }}",
        a.addr, b.addr
    );
    let lb = start_config(
        engine,
        "algorithm = \"roundrobin\"",
        "check = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2",
        &backends,
    );
    lb.wait_backend_up(CFG_POOL, a.addr, true, UP);
    lb.wait_backend_up(CFG_POOL, b.addr, true, UP);
    let a_label = a.addr.to_string();

    // Sample a's active connections while the test runs.
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(Mutex::new((0.0f64, 0usize)));
    let sampler = {
        let (stop, max_seen, admin, a_label) =
            (stop.clone(), max_seen.clone(), lb.admin, a_label.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((200, body)) = http(admin, "GET", "/metrics")
                    && let Ok(samples) = parse_metrics(&body)
                {
                    let v = metric_sum(
                        &samples,
                        "ringmail_lb_backend_active_connections",
                        &[("pool", CFG_POOL), ("backend", &a_label)],
                    );
                    let mut m = max_seen.lock().unwrap();
                    m.0 = m.0.max(v);
                    m.1 += 1;
                }
                thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for i in 0..10 {
        if on_a.len() == 2 {
            break;
        }
        let (id, s) = open_greeted(lb.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        match id.as_str() {
            "a" => on_a.push(s),
            "b" => on_b.push(s),
            other => panic!("unknown backend id {other:?}"),
        }
    }
    assert_eq!(on_a.len(), 2, "roundrobin never filled backend a");
    lb.wait_metric(
        "ringmail_lb_backend_active_connections",
        &[("pool", CFG_POOL), ("backend", &a_label)],
        Duration::from_secs(3),
        |v| v == 2.0,
    );

    // a is full: everything goes to b.
    for i in 0..12 {
        let (id, mut s) = open_greeted(lb.addr())
            .unwrap_or_else(|e| panic!("connection {i} while a is full: {e}"));
        assert_eq!(id, "b", "connection {i} went to the full backend a");
        round_trip(&mut s, b"ping\n").unwrap();
        on_b.push(s);
    }
    for (i, s) in on_a.iter_mut().enumerate() {
        round_trip(s, b"still on a\n").unwrap_or_else(|e| panic!("held connection {i} on a: {e}"));
    }
    assert_eq!(
        lb.metric(
            "ringmail_lb_backend_active_connections",
            &[("pool", CFG_POOL), ("backend", &a_label)]
        ),
        2.0
    );
    assert_eq!(
        lb.metric("ringmail_lb_refused_total", &[]),
        0.0,
        "connections were refused although b had room"
    );

    // Free one slot on a: it is back in rotation.
    drop(on_a.pop());
    lb.wait_metric(
        "ringmail_lb_backend_active_connections",
        &[("pool", CFG_POOL), ("backend", &a_label)],
        Duration::from_secs(5),
        |v| v == 1.0,
    );
    let mut back_on_a = false;
    for i in 0..8 {
        let (id, s) = open_greeted(lb.addr())
            .unwrap_or_else(|e| panic!("connection {i} after freeing a slot: {e}"));
        if id == "a" {
            back_on_a = true;
            on_a.push(s);
            break;
        }
        on_b.push(s);
    }
    assert!(
        back_on_a,
        "backend a got no connection after a slot was freed"
    );
    // Full again: the next ones go to b.
    for i in 0..4 {
        let (id, s) = open_greeted(lb.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(id, "b", "connection {i} went to backend a, full again");
        on_b.push(s);
    }

    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let (max, samples) = *max_seen.lock().unwrap();
    eprintln!("backend a: {samples} samples, at most {max} active");
    assert!(samples >= 5, "too few metric samples ({samples})");
    assert!(
        max <= 2.0,
        "backend a had {max} active connections, maxconn is 2"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Connect timeout and retry

/// A listening socket whose accept queue is full and that never accepts: further SYNs are
/// dropped, so a connect to it hangs. `Err` when this kernel does not behave like that.
struct BlackHole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fill: Vec<TcpStream>,
}

impl BlackHole {
    fn new() -> Result<BlackHole, String> {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
        let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&bind.into()).map_err(|e| e.to_string())?;
        listener.listen(0).map_err(|e| e.to_string())?;
        let addr = listener
            .local_addr()
            .map_err(|e| e.to_string())?
            .as_socket()
            .ok_or("listener has no socket address")?;
        let probe = Duration::from_millis(300);
        let mut fill = Vec::new();
        for _ in 0..4 {
            match TcpStream::connect_timeout(&addr, probe) {
                Ok(s) => fill.push(s),
                Err(e) if e.kind() == ErrorKind::TimedOut => break,
                Err(e) => return Err(format!("filling the accept queue of {addr}: {e}")),
            }
        }
        // The check the test relies on: a fresh connect now hangs.
        let t0 = Instant::now();
        match TcpStream::connect_timeout(&addr, probe) {
            Err(e) if e.kind() == ErrorKind::TimedOut => Ok(BlackHole {
                addr,
                _listener: listener,
                _fill: fill,
            }),
            Ok(_) => Err(format!(
                "a connect to a listener with a full accept queue ({} queued) still completes \
                 on this kernel, so a hanging backend cannot be simulated",
                fill.len()
            )),
            Err(e) => Err(format!(
                "probe connect to the full listener failed after {:?} with {e} instead of \
                 hanging",
                t0.elapsed()
            )),
        }
    }
}

/// Pool of `x` (connects hang) and `y`, `connect_timeout = 300ms`, `connect_retries = 1`. The
/// health check interval is 60 s and its timeout 59 s, so the checker's first check of `x` is
/// still pending throughout the test and `x` stays up (unconfirmed): the balancer keeps picking
/// it. Every client is nevertheless served by `y`, those first sent to `x` after about 300 ms,
/// and the timed-out connects are counted against `x`.
fn connect_timeout_retry(engine: &str) {
    let x = match BlackHole::new() {
        Ok(x) => x,
        Err(reason) => {
            skip(&reason);
            return;
        }
    };
    let y = Backend::any(Mode::Greet("y".into()));
    let lb = start_config(
        engine,
        "algorithm = \"roundrobin\"\nconnect_timeout = \"300ms\"\nconnect_retries = 1",
        "check = \"tcp\", interval = \"60s\", timeout = \"59s\", rise = 1, fall = 3",
        &format!("\"{}\", \"{}\"", x.addr, y.addr),
    );
    let x_label = x.addr.to_string();
    let y_label = y.addr.to_string();
    lb.wait_metric(
        "ringmail_lb_backend_health_checks_total",
        &[("pool", CFG_POOL), ("backend", &y_label), ("result", "ok")],
        UP,
        |v| v >= 1.0,
    );

    let mut times = Vec::new();
    for i in 0..20 {
        let t0 = Instant::now();
        let id = served_by(lb.addr())
            .unwrap_or_else(|e| panic!("connection {i} failed after {:?}: {e}", t0.elapsed()));
        let took = t0.elapsed();
        assert_eq!(id, "y", "connection {i} served by {id:?}");
        times.push(took);
    }
    eprintln!("connection times: {times:?}");
    let slow: Vec<Duration> = times
        .iter()
        .copied()
        .filter(|t| *t >= Duration::from_millis(280))
        .collect();
    assert!(
        !slow.is_empty(),
        "no connection waited for the connect timeout: roundrobin never picked x? {times:?}"
    );
    for t in &times {
        assert!(
            *t < Duration::from_millis(2500),
            "a connection took {t:?}: the 300 ms connect timeout was not applied"
        );
    }
    let errors = lb.metric(
        "ringmail_lb_backend_connect_errors_total",
        &[("pool", CFG_POOL), ("backend", &x_label)],
    );
    assert!(
        errors >= slow.len() as f64,
        "{errors} connect errors counted for x, {} connections waited for its timeout",
        slow.len()
    );
    assert_eq!(
        lb.metric(
            "ringmail_lb_backend_connect_errors_total",
            &[("pool", CFG_POOL), ("backend", &y_label)],
        ),
        0.0
    );
    // Passive health: `fall` (3) connect failures in a row took x out long before its next
    // check (its first one is still pending), so only three clients waited for the timeout.
    assert_eq!(
        errors, 3.0,
        "x should be taken out after exactly `fall` failed connects"
    );
    assert_eq!(
        slow.len(),
        3,
        "after the mark-down no client should wait: {times:?}"
    );
    assert_eq!(
        lb.metric(
            "ringmail_lb_backend_up",
            &[("pool", CFG_POOL), ("backend", &x_label)]
        ),
        0.0,
        "x was not taken out by its consecutive connect failures"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Idle timeout

/// `idle_timeout = "1s"`: a silent connection is closed by the proxy after 1–3.5 s and counted
/// in `idle_timeouts_total`; one that exchanges a byte every 300 ms for 3 s stays open.
fn idle_timeout(engine: &str) {
    let backend = Backend::any(Mode::Echo);
    let lb = start_config(
        engine,
        "idle_timeout = \"1s\"",
        "check = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2",
        &format!("\"{}\"", backend.addr),
    );
    lb.wait_backend_up(CFG_POOL, backend.addr, true, UP);
    assert_eq!(
        lb.metric("ringmail_lb_worker_idle_timeouts_total", &[]),
        0.0
    );

    let mut s = connect(lb.addr()).unwrap();
    round_trip(&mut s, b"hello\n").unwrap();
    let took = expect_closed(&mut s, Duration::from_secs(5), "idle connection");
    eprintln!("idle connection closed {took:?} after its last traffic");
    assert!(
        took >= Duration::from_millis(900),
        "idle connection closed after {took:?}, before the 1 s idle timeout"
    );
    assert!(
        took <= Duration::from_millis(3500),
        "idle connection closed only after {took:?} (idle timeout 1 s)"
    );
    let idle = lb.wait_metric(
        "ringmail_lb_worker_idle_timeouts_total",
        &[],
        Duration::from_secs(3),
        |v| v >= 1.0,
    );
    lb.wait_metric(
        "ringmail_lb_worker_active_connections",
        &[],
        Duration::from_secs(3),
        |v| v == 0.0,
    );

    // A connection with traffic every 300 ms outlives the timeout several times over.
    let mut s = connect(lb.addr()).unwrap();
    let t0 = Instant::now();
    for i in 0..200 {
        if t0.elapsed() >= Duration::from_secs(3) {
            break;
        }
        round_trip(&mut s, b"x").unwrap_or_else(|e| {
            panic!(
                "busy connection broken at exchange {i}, {:?} in: {e}",
                t0.elapsed()
            )
        });
        thread::sleep(Duration::from_millis(300));
    }
    round_trip(&mut s, b"still open\n").expect("busy connection closed");
    assert_eq!(
        lb.metric("ringmail_lb_worker_idle_timeouts_total", &[]),
        idle,
        "an idle timeout fired for the busy connection"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. io_uring forbidden by seccomp: automatic fallback to epoll

/// `AUDIT_ARCH_X86_64` from `<linux/audit.h>` (EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `io_uring_setup` on x86_64.
const NR_IO_URING_SETUP: u32 = 425;

fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A seccomp program that makes `io_uring_setup` fail with EPERM and allows everything else.
fn deny_io_uring_filter() -> [libc::sock_filter; 6] {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    [
        // seccomp_data.arch
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, 4),
        // another architecture (never the case for a native binary): allow
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
        // seccomp_data.nr
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, 0),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, NR_IO_URING_SETUP, 0, 1),
        bpf_stmt(
            BPF_RET | BPF_K,
            libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
        ),
        bpf_stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// `ringmail lb …` whose process cannot create an io_uring (seccomp filter installed between
/// fork and exec).
fn lb_command_without_io_uring(args: &[String]) -> Command {
    use std::os::unix::process::CommandExt;
    let filter = deny_io_uring_filter();
    let mut cmd = Command::new(RINGMAIL);
    cmd.args(args).env("RUST_LOG", "info");
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed. It performs two prctl(2) calls and nothing else: no allocation, no
    // locks. The filter array is owned by the closure (copied in before the fork) and outlives
    // both calls; `sock_fprog` points at it with its exact length.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog as libc::c_ulong,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Quick-mode arguments for one echo backend.
fn quick_args(
    engine: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
) -> Vec<String> {
    [
        "lb",
        "--listen",
        &listen.to_string(),
        "--backend",
        &backend.to_string(),
        "--engine",
        engine,
        "--admin",
        &admin.to_string(),
        "--workers",
        "2",
        "--health-interval",
        "200ms",
        "--rise",
        "2",
        "--fall",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until the lb answers `/healthz` and its listener is in LISTEN state.
fn wait_ready(lb: &mut Lb) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = lb.child.try_wait() {
            panic!(
                "ringmail lb exited during startup with {status}:\n{}",
                lb.child.log_text()
            );
        }
        let healthy = matches!(http(lb.admin, "GET", "/healthz"), Ok((200, _)));
        if healthy && lb.listen.iter().all(|a| is_listening(a.port())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ringmail lb not ready within 15 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// With io_uring_setup failing (EPERM), `--engine auto` starts on epoll in every worker, says so
/// in its log and relays traffic; `--engine uring` refuses to start and names io_uring.
#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_forbidden() {
    if !cfg!(target_arch = "x86_64") {
        skip("the seccomp filter of this test is written for x86_64 only");
        return;
    }
    if engine_available("uring").is_err() {
        eprintln!(
            "note: io_uring is unavailable here even without the filter; the fallback is still \
             checked"
        );
    }
    let backend = Backend::any(Mode::Echo);

    // --engine auto: falls back.
    let (listen, admin) = (free_addr(), free_addr());
    let dir = TempDir::new("lb-seccomp");
    let mut cmd = lb_command_without_io_uring(&quick_args("auto", listen, admin, backend.addr));
    let child = match ChildGuard::spawn(
        "ringmail lb (auto, no io_uring)",
        &mut cmd,
        dir.path().join("lb.log"),
    ) {
        Ok(c) => c,
        Err(e) => {
            skip(&format!(
                "cannot start a process under a seccomp filter here: {e}"
            ));
            return;
        }
    };
    let mut lb = Lb {
        child,
        listen: vec![listen],
        admin,
        dir,
    };
    wait_ready(&mut lb);
    let workers: Vec<Sample> = lb
        .metrics()
        .into_iter()
        .filter(|s| s.name == "ringmail_lb_worker_info")
        .collect();
    assert_eq!(workers.len(), 2, "2 workers expected: {workers:?}");
    for w in &workers {
        assert_eq!(
            w.label("engine"),
            Some("epoll"),
            "worker does not run epoll although io_uring is forbidden: {w:?}"
        );
    }
    let log = lb.child.log_text();
    assert!(
        log.contains("falling back to the epoll engine"),
        "no fallback warning in the log:\n{log}"
    );
    lb.wait_backend_up(POOL, backend.addr, true, UP);
    for i in 0..3 {
        let mut s = connect(lb.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        round_trip(&mut s, format!("through epoll {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} not relayed: {e}"));
    }
    assert!(lb.child.try_wait().is_none(), "lb exited");
    drop(lb);

    // --engine uring: refuses to start.
    let (listen, admin) = (free_addr(), free_addr());
    let dir = TempDir::new("lb-seccomp-uring");
    let mut cmd = lb_command_without_io_uring(&quick_args("uring", listen, admin, backend.addr));
    let mut child = ChildGuard::spawn(
        "ringmail lb (uring, no io_uring)",
        &mut cmd,
        dir.path().join("lb.log"),
    )
    .expect("spawn under the seccomp filter");
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "--engine uring kept running although io_uring is forbidden:\n{}",
                child.log_text()
            )
        });
    let out = child.log_text();
    assert!(
        !status.success(),
        "--engine uring exited with {status} although io_uring is forbidden:\n{out}"
    );
    assert!(
        out.contains("io_uring"),
        "the startup error does not mention io_uring:\n{out}"
    );
    assert!(
        !out.contains("falling back to the epoll engine"),
        "--engine uring fell back to epoll:\n{out}"
    );
}
