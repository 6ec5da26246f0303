//! Shared harness for the `ringmail lb` integration tests: child-process guards, free ports, real
//! loopback TCP backends, a tiny HTTP client for the admin listener and a Prometheus text parser.
//!
//! Everything here is bounded: every loop has a deadline or a count, every child process is killed
//! when its guard drops, and every backend thread stops when its owner drops.
#![allow(dead_code)]
// each test crate uses a different subset
// The workspace denies `unsafe`; the harness needs it only for signals (`kill(2)`) and for probing
// io_uring with a raw syscall. Each block says why it is sound.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Independent DKIM verification (dkimpy).
pub mod dkimverify;
/// Network namespaces, bridges and veth pairs (root-only tests).
pub mod netns;

/// Path of the binary under test.
pub const RINGMAIL: &str = env!("CARGO_BIN_EXE_ringmail");

/// How long any single client socket operation may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Skipping

/// True when every test must really run (CI): a skip is then a failure.
pub fn require_all() -> bool {
    std::env::var("RINGMAIL_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Reports a skipped test; panics instead when `RINGMAIL_REQUIRE_ALL=1`.
pub fn skip(reason: &str) {
    if require_all() {
        panic!("test cannot run but RINGMAIL_REQUIRE_ALL=1: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// Returns from the calling test after reporting why, if `$check` is an `Err(reason)`.
#[allow(unused_macros)]
macro_rules! skip_unless {
    ($check:expr) => {
        if let Err(reason) = $check {
            $crate::common::skip(&reason);
            return;
        }
    };
}

/// Declares each scenario `fn(engine: &str)` as two tests, `uring::NAME` and `epoll::NAME`.
#[allow(unused_macros)]
macro_rules! per_engine {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { $crate::common::run_scenario("uring", super::$name) } )*
        }
        mod epoll {
            $( #[test] fn $name() { $crate::common::run_scenario("epoll", super::$name) } )*
        }
    };
}

/// Runs one scenario on `engine`, skipping (failing under RINGMAIL_REQUIRE_ALL) where the
/// kernel does not allow that engine.
pub fn run_scenario(engine: &str, scenario: fn(&str)) {
    skip_unless!(engine_available(engine));
    scenario(engine);
}

/// True when running as root (uid 0), read from /proc.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Whether the kernel lets this process use the given engine.
pub fn engine_available(engine: &str) -> Result<(), String> {
    match engine {
        "epoll" | "auto" => Ok(()),
        "uring" => probe_io_uring(),
        other => Err(format!("unknown engine {other}")),
    }
}

fn probe_io_uring() -> Result<(), String> {
    // struct io_uring_params is 120 bytes; zeroed is a valid request for a plain ring.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes exactly one io_uring_params, which `params` is
    // large enough to hold and outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            4 as libc::c_uint,
            params.as_mut_ptr() as *mut libc::c_void,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return Err(format!(
            "io_uring is not available here (io_uring_setup: {err})"
        ));
    }
    // SAFETY: `fd` is a descriptor we just received and own.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Whether `::1` can be bound (IPv6 loopback present).
pub fn ipv6_available() -> Result<(), String> {
    TcpListener::bind("[::1]:0")
        .map(drop)
        .map_err(|e| format!("IPv6 loopback ::1 unavailable: {e}"))
}

/// Path of a system binary, or why it is missing.
pub fn find_binary(path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{path} is not installed"))
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories, ports, randomness

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ringmail-itest-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Lowest port the kernel hands out as an ephemeral (client) port.
fn ephemeral_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

static NEXT_PORT: AtomicUsize = AtomicUsize::new(0);

/// A port on `ip` that was free a moment ago. It is taken below the kernel's ephemeral range, so
/// no client socket of this test run can grab it by chance between this check and its use; each
/// call in one process returns a different port.
pub fn free_port_on(ip: IpAddr) -> u16 {
    const LO: usize = 10_000;
    let hi = usize::from(ephemeral_low());
    if hi > LO + 1000 {
        let span = hi - LO;
        let base = (std::process::id() as usize).wrapping_mul(7919);
        for _ in 0..500 {
            let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
            let port = (LO + (base + n * 104_729) % span) as u16;
            if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port that was free a moment ago (see [`free_port_on`]).
pub fn free_port() -> u16 {
    free_port_on(IpAddr::from([127, 0, 0, 1]))
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `[::1]:<free port>`.
pub fn free_addr_v6() -> SocketAddr {
    let ip = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    SocketAddr::new(ip, free_port_on(ip))
}

/// Small deterministic PRNG (xorshift64*); the seed is printed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn from_time() -> Rng {
        let seed = std::env::var("RINGMAIL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("random seed: RINGMAIL_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or gives up after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process killed (SIGKILL) and reaped on drop. Its stdout and stderr go to a log file,
/// whose tail is printed when the test panics.
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> io::Result<ChildGuard> {
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        Ok(ChildGuard {
            name: name.to_string(),
            child,
            log,
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped child,
        // so it cannot have been reused by another process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) failed: {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let text = self.log_text();
            let tail = &text[text.len().saturating_sub(6000)..];
            let tail = tail
                .get(tail.find('\n').map_or(0, |i| i + 1)..)
                .unwrap_or(tail);
            eprintln!(
                "----- {} log (tail) -----\n{tail}\n----- end of {} log -----",
                self.name, self.name
            );
        }
    }
}

/// Runs a command to completion (bounded by `timeout`) and returns its status and combined output.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> (ExitStatus, String) {
    let dir = TempDir::new("run");
    let mut guard =
        ChildGuard::spawn("command", cmd, dir.path().join("out.log")).expect("spawn command");
    let status = guard
        .wait_timeout(timeout)
        .unwrap_or_else(|| panic!("command did not finish within {timeout:?}: {cmd:?}"));
    (status, guard.log_text())
}

// ---------------------------------------------------------------------------------------------
// Readiness

/// Whether some socket is in LISTEN state on `port` (per /proc/net/tcp and tcp6). Used instead of a
/// probe connection so that readiness checks never pass traffic through the load balancer.
pub fn is_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
        })
    })
}

// ---------------------------------------------------------------------------------------------
// The load balancer under test

/// A running `ringmail lb`.
pub struct Lb {
    pub child: ChildGuard,
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub dir: TempDir,
}

/// Builder for quick mode (`ringmail lb --listen … --backend …`).
pub struct Quick {
    engine: String,
    listen: SocketAddr,
    backends: Vec<SocketAddr>,
    opts: Vec<(String, String)>,
}

impl Quick {
    /// Quick mode on a free loopback port, two workers, fast health checks (200 ms, rise 2, fall 2).
    pub fn new(engine: &str) -> Quick {
        let mut q = Quick {
            engine: engine.to_string(),
            listen: free_addr(),
            backends: Vec::new(),
            opts: Vec::new(),
        };
        q = q
            .opt("--workers", "2")
            .opt("--health-interval", "200ms")
            .opt("--rise", "2")
            .opt("--fall", "2");
        q
    }

    pub fn listen(mut self, addr: SocketAddr) -> Quick {
        self.listen = addr;
        self
    }

    pub fn backend(mut self, addr: SocketAddr) -> Quick {
        self.backends.push(addr);
        self
    }

    /// Sets (or replaces) a `--flag value` option.
    pub fn opt(mut self, flag: &str, value: &str) -> Quick {
        self.opts.retain(|(f, _)| f != flag);
        self.opts.push((flag.to_string(), value.to_string()));
        self
    }

    pub fn start(self) -> Lb {
        let admin = free_addr();
        let mut args: Vec<String> = vec![
            "lb".into(),
            "--listen".into(),
            self.listen.to_string(),
            "--engine".into(),
            self.engine.clone(),
            "--admin".into(),
            admin.to_string(),
        ];
        for b in &self.backends {
            args.push("--backend".into());
            args.push(b.to_string());
        }
        for (f, v) in &self.opts {
            args.push(f.clone());
            args.push(v.clone());
        }
        let lb = Lb::spawn(args, vec![self.listen], admin, TempDir::new("lb"));
        lb.expect_engine(&self.engine);
        lb
    }
}

impl Lb {
    /// Config mode: writes `config` to `lb.toml` in a fresh temp dir and runs `ringmail lb --config`.
    /// `listen` and `admin` must match what the config binds.
    pub fn from_config(config: &str, listen: Vec<SocketAddr>, admin: SocketAddr) -> Lb {
        let dir = TempDir::new("lbcfg");
        let path = dir.write("lb.toml", config);
        let args = vec!["lb".into(), "--config".into(), path.display().to_string()];
        Lb::spawn(args, listen, admin, dir)
    }

    fn spawn(args: Vec<String>, listen: Vec<SocketAddr>, admin: SocketAddr, dir: TempDir) -> Lb {
        let mut cmd = Command::new(RINGMAIL);
        cmd.args(&args).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let child = ChildGuard::spawn("ringmail lb", &mut cmd, dir.path().join("lb.log"))
            .unwrap_or_else(|e| panic!("spawn {RINGMAIL}: {e}"));
        let mut lb = Lb {
            child,
            listen,
            admin,
            dir,
        };
        lb.wait_ready(&args);
        lb
    }

    /// Path of the config file in config mode.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("lb.toml")
    }

    /// Replaces the config file (the caller then sends SIGHUP).
    pub fn rewrite_config(&self, config: &str) {
        let tmp = self.dir.path().join("lb.toml.new");
        fs::write(&tmp, config).unwrap();
        fs::rename(&tmp, self.config_path()).unwrap();
    }

    fn wait_ready(&mut self, args: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "ringmail {} exited during startup with {status}",
                    args.join(" ")
                );
            }
            let healthy = matches!(http(self.admin, "GET", "/healthz"), Ok((200, _)));
            if healthy && self.listen.iter().all(|a| is_listening(a.port())) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ringmail {} not ready within 15 s",
                args.join(" ")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first (usually only) listener.
    pub fn addr(&self) -> SocketAddr {
        self.listen[0]
    }

    /// Asserts that every worker reports running the requested engine.
    pub fn expect_engine(&self, engine: &str) {
        if engine == "auto" {
            return;
        }
        let samples = self.metrics();
        let workers: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "ringmail_lb_worker_info")
            .collect();
        assert!(
            !workers.is_empty(),
            "no ringmail_lb_worker_info in /metrics"
        );
        for w in workers {
            assert_eq!(
                w.label("engine"),
                Some(engine),
                "worker runs the wrong engine: {w:?}"
            );
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.admin, "GET", path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn post(&self, path: &str) -> (u16, String) {
        http(self.admin, "POST", path).unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `/metrics`, parsed strictly (panics on a malformed line).
    pub fn metrics(&self) -> Vec<Sample> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        parse_metrics(&body).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{body}"))
    }

    /// Sum of the samples of `name` whose labels include `labels` (0 when none).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    /// Polls a metric until `pred` holds; panics with the last value after `timeout`.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut last = f64::NAN;
        wait_for(timeout, || {
            last = self.metric(name, labels);
            pred(last).then_some(last)
        })
        .unwrap_or_else(|| {
            panic!(
                "{name}{labels:?} never reached the expected value within {timeout:?}; last {last}"
            )
        })
    }

    /// Waits until `ringmail_lb_backend_up{pool,backend}` is 1 (`up`) or 0.
    pub fn wait_backend_up(
        &self,
        pool: &str,
        backend: SocketAddr,
        up: bool,
        timeout: Duration,
    ) -> Duration {
        let start = Instant::now();
        let b = backend.to_string();
        let want = if up { 1.0 } else { 0.0 };
        let found = wait_for(timeout, || {
            let s = self.metrics();
            let v = s
                .iter()
                .find(|s| {
                    s.name == "ringmail_lb_backend_up"
                        && s.label("pool") == Some(pool)
                        && s.label("backend") == Some(&b)
                })
                .map(|s| s.value);
            (v == Some(want)).then_some(())
        });
        assert!(
            found.is_some(),
            "backend {pool}/{b} did not become up={up} within {timeout:?}"
        );
        start.elapsed()
    }

    pub fn sigterm(&self) {
        self.child.signal(libc::SIGTERM);
    }

    pub fn sighup(&self) {
        self.child.signal(libc::SIGHUP);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client for the admin listener

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(16 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(ErrorKind::InvalidData, format!("no header end in {text:?}"))
    })?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("bad status line in {head:?}"),
            )
        })?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> io::Result<String> {
    let bad = || io::Error::new(ErrorKind::InvalidData, "bad chunked body");
    let mut out = String::new();
    for _ in 0..100_000 {
        let (size, rest) = body.split_once("\r\n").ok_or_else(bad)?;
        let size =
            usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).map_err(|_| bad())?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or_else(bad)?);
        body = rest.get(size + 2..).ok_or_else(bad)?;
    }
    Err(bad())
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
}

/// Parses the text exposition format strictly: every line is empty, a `#` comment, or
/// `name{labels} value [timestamp]`.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", no + 1))?);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let key = rest[..eq].trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {key:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => return Err("bad escape in label value".into()),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            rest = &rest[end + 1..];
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("duplicate label {key}"));
            }
        }
    }
    if !rest.starts_with(' ') {
        return Err("no space before value".into());
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("missing value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Sum of the samples named `name` whose labels include all of `labels`.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Test backends

/// What a test backend does with each accepted connection.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Echo every byte; close after the client's EOF.
    Echo,
    /// Send `"{id}\n"` first, then echo.
    Greet(String),
    /// Read until EOF, then reply `"got {n}\n"` and close (half-close check).
    SinkThenReply,
    /// Read a PROXY v1 line, reply `"{source}\n"` (e.g. `127.0.0.1:40000`, or `ERR …`) and close.
    ProxyV1Report,
}

struct BackendShared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    conns: Mutex<Vec<TcpStream>>,
}

/// A real TCP server on a loopback port, served by std threads. Stops (listener closed and every
/// open connection shut down) on [`Backend::kill`] or drop.
pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<BackendShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Backend {
    /// Listens on `bind` (port 0 for any) and serves with `mode`.
    pub fn start(bind: SocketAddr, mode: Mode) -> Backend {
        let listener =
            TcpListener::bind(bind).unwrap_or_else(|e| panic!("backend bind {bind}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(BackendShared {
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("backend-{addr}"))
            .spawn(move || accept_loop(listener, sh, mode))
            .unwrap();
        Backend {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Any free loopback port.
    pub fn any(mode: Mode) -> Backend {
        Backend::start("127.0.0.1:0".parse().unwrap(), mode)
    }

    /// Connections accepted so far (health checks included).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Stops listening and shuts down every open connection, like a crashed server.
    pub fn kill(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<BackendShared>, mode: Mode) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                let _ = stream.set_nodelay(true);
                {
                    let mut conns = shared.conns.lock().unwrap();
                    conns.retain(|c| c.peer_addr().is_ok());
                    if let Ok(c) = stream.try_clone() {
                        conns.push(c);
                    }
                }
                let mode = mode.clone();
                let _ = thread::Builder::new()
                    .name("backend-conn".into())
                    .spawn(move || serve(stream, mode));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    // `listener` drops here: the port is closed.
}

fn serve(mut s: TcpStream, mode: Mode) {
    let _ = match mode {
        Mode::Echo => echo(&mut s),
        Mode::Greet(id) => s
            .write_all(format!("{id}\n").as_bytes())
            .and_then(|_| echo(&mut s)),
        Mode::SinkThenReply => sink_then_reply(&mut s),
        Mode::ProxyV1Report => proxy_report(&mut s),
    };
}

fn echo(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return s.shutdown(Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

fn sink_then_reply(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    s.write_all(format!("got {total}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)
}

fn proxy_report(s: &mut TcpStream) -> io::Result<()> {
    // A PROXY v1 line is at most 107 bytes including CRLF; read byte by byte so nothing after it
    // is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 108 && !line.ends_with(b"\r\n") {
        if s.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let reply = match parse_proxy_v1(&text) {
        Some(src) => src.to_string(),
        None => format!("ERR {}", text.escape_debug()),
    };
    s.write_all(format!("{reply}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)
}

/// Source address of a PROXY v1 line (`PROXY TCP4 src dst sport dport\r\n`).
pub fn parse_proxy_v1(line: &str) -> Option<SocketAddr> {
    let line = line.strip_suffix("\r\n")?;
    let f: Vec<&str> = line.split(' ').collect();
    if f.len() != 6 || f[0] != "PROXY" || !(f[1] == "TCP4" || f[1] == "TCP6") {
        return None;
    }
    let ip: IpAddr = f[2].parse().ok()?;
    let _dst: IpAddr = f[3].parse().ok()?;
    let port: u16 = f[4].parse().ok()?;
    let _dport: u16 = f[5].parse().ok()?;
    if ip.is_ipv4() != (f[1] == "TCP4") {
        return None;
    }
    Some(SocketAddr::new(ip, port))
}

// ---------------------------------------------------------------------------------------------
// Test clients

/// Connects with bounded connect, read and write timeouts.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects from a chosen local address (e.g. another 127.0.0.x for source hashing).
pub fn connect_from(src: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads one `\n`-terminated line (at most 4 KiB) without the newline. EOF before any newline is
/// an `UnexpectedEof` error.
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 4096 {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&line)),
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
    Err(io::Error::new(ErrorKind::InvalidData, "line too long"))
}

/// Connects, reads the backend's greeting id and returns it together with the open stream.
pub fn open_greeted(addr: SocketAddr) -> io::Result<(String, TcpStream)> {
    let mut s = connect(addr)?;
    let id = read_line(&mut s)?;
    Ok((id, s))
}

/// Connects, reads the greeting id, checks one echo round trip and closes.
pub fn served_by(addr: SocketAddr) -> io::Result<String> {
    let (id, mut s) = open_greeted(addr)?;
    round_trip(&mut s, b"ping\n")?;
    Ok(id)
}

/// Writes `msg` and reads back exactly as many bytes, checking they are equal.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::new(ErrorKind::InvalidData, "echo mismatch"));
    }
    Ok(())
}

/// Tallies `served_by` results per backend id; any error panics with its index.
pub fn tally(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let id = served_by(addr)
            .unwrap_or_else(|e| panic!("connection {i} of {n} via {addr} failed: {e}"));
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Reads everything until EOF (bounded by the socket's read timeout and `limit`).
pub fn read_all(s: &mut TcpStream, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.take(limit as u64).read_to_end(&mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// A remote SMTP server for delivery tests

/// A small SMTP sink (each end of data answered after `delay`) that counts messages by
/// Message-ID (duplicates show as counts above 1) and keeps the last message's text.
pub struct IdSink {
    pub addr: SocketAddr,
    pub ids: Arc<Mutex<HashMap<String, usize>>>,
    pub last: Arc<Mutex<String>>,
}

impl IdSink {
    pub fn start(delay: Duration) -> IdSink {
        IdSink::start_on("127.0.0.1:0".parse().unwrap(), delay)
    }

    pub fn start_on(bind: SocketAddr, delay: Duration) -> IdSink {
        IdSink::start_with(bind, delay, "")
    }

    /// `extensions`: extra EHLO reply lines, e.g. `"250-8BITMIME\r\n250-SMTPUTF8\r\n"`
    /// (PIPELINING always comes last).
    pub fn start_with(bind: SocketAddr, delay: Duration, extensions: &'static str) -> IdSink {
        let l = TcpListener::bind(bind).unwrap();
        let addr = l.local_addr().unwrap();
        let ids: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let ids2 = Arc::clone(&ids);
        let last: Arc<Mutex<String>> = Arc::default();
        let last2 = Arc::clone(&last);
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                let ids = Arc::clone(&ids2);
                let last = Arc::clone(&last2);
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    let _ = w.write_all(b"220 sink ESMTP\r\n");
                    let mut line = String::new();
                    let mut in_data = false;
                    let mut id = String::new();
                    let mut text = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if in_data {
                            if line == ".\r\n" {
                                in_data = false;
                                thread::sleep(delay);
                                *ids.lock().unwrap().entry(id.clone()).or_default() += 1;
                                *last.lock().unwrap() = std::mem::take(&mut text);
                                if w.write_all(b"250 2.0.0 ok\r\n").is_err() {
                                    return;
                                }
                            } else {
                                if line.to_ascii_lowercase().starts_with("message-id:") {
                                    id = line[11..].trim().to_string();
                                }
                                text.push_str(&line);
                            }
                            continue;
                        }
                        let u = line.to_ascii_uppercase();
                        let ehlo = format!("250-sink\r\n{extensions}250 PIPELINING\r\n");
                        let reply: &[u8] = if u.starts_with("EHLO") {
                            ehlo.as_bytes()
                        } else if u.starts_with("DATA") {
                            in_data = true;
                            b"354 go\r\n"
                        } else if u.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n");
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        if w.write_all(reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        IdSink { addr, ids, last }
    }
}

/// `ringmail accounts --db DB ARGS...`, with `stdin` (e.g. a password) on standard input;
/// asserts success.
pub fn accounts(db: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(RINGMAIL)
        .args(["accounts", "--db", db])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "accounts {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ringmail ROLE --check --config FILE`, FILE (`ROLE.toml` in `dir`) holding `text`: the exit
/// code and what it printed (stdout and stderr).
pub fn check_config(dir: &Path, role: &str, text: &str) -> (Option<i32>, String) {
    let path = dir.join(format!("{role}.toml"));
    fs::write(&path, text).unwrap();
    let (status, out) = run_bounded(
        Command::new(RINGMAIL)
            .args([role, "--check", "--config"])
            .arg(&path),
        Duration::from_secs(20),
    );
    (status.code(), out)
}
