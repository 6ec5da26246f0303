//! IMAP load over implicit TLS (993-style), for any IMAP server (ringmail mda, Dovecot).
//!
//! `imap load`: N concurrent sessions, each LOGIN, SELECT, `UID SEARCH ALL` (to learn the
//! UIDs), then for a fixed duration a weighted random mix of header fetches, body fetches,
//! `UID STORE +FLAGS/-FLAGS (\Flagged)`, `FETCH 1:* (FLAGS)` and NOOP, with per-operation
//! latency in HDR histograms.
//!
//! `imap idle`: K sessions, each LOGIN, SELECT, IDLE, held open for a bounded time; the RSS
//! (and PSS) of the server's whole process tree is sampled before the first connection and
//! with all K idling, so the memory per idle IDLE session can be derived.
//!
//! The client is minimal but follows the protocol: responses are read line by line, literals
//! `{n}` are read by length (they may contain anything, including CRLF and text that looks
//! like a tagged response), and a command is complete at the line carrying its own tag.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::ensure_loopback;
use crate::submit::AnyCert;
use crate::util::{LatencySummary, emit_json, new_histogram, parse_duration, proc_cpu_seconds};

#[derive(Debug, Subcommand)]
pub enum ImapTest {
    /// Operation mix over N concurrent sessions for a fixed duration.
    Load(LoadArgs),
    /// Hold K sessions in IDLE and measure the server process tree's memory per session.
    Idle(IdleArgs),
}

pub fn run(test: ImapTest) -> Result<()> {
    match test {
        ImapTest::Load(a) => run_load(a),
        ImapTest::Idle(a) => run_idle(a),
    }
}

/// Connection and login settings shared by both modes.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// The implicit-TLS IMAP address (loopback only).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    #[arg(long, default_value = "INBOX")]
    mailbox: String,
    /// PID at the root of the server's process tree (its CPU time, RSS and PSS are sampled
    /// over the PID and all its descendants).
    #[arg(long)]
    pid: Option<u32>,
    /// Free-form label copied into the JSON result.
    #[arg(long)]
    label: Option<String>,
    /// Write the JSON result here instead of stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Timeout for any single read from the server.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    op_timeout: Duration,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 16)]
    sessions: usize,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Operation weights: header (UID FETCH u (BODY.PEEK[HEADER])), body (UID FETCH u
    /// (BODY.PEEK[])), store (UID STORE u +FLAGS/-FLAGS (\Flagged), alternating), flags
    /// (FETCH 1:* (FLAGS)), noop.
    #[arg(long, default_value = "header=4,body=2,store=2,flags=1,noop=1")]
    mix: String,
    /// Seed of the per-session random UID and operation choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Sessions to open and hold in IDLE.
    #[arg(long, default_value_t = 2000)]
    sessions: usize,
    /// Sessions being set up at the same time.
    #[arg(long, default_value_t = 32)]
    open_concurrency: usize,
    /// Wait after all sessions idle before sampling memory.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    settle: Duration,
    /// Give up opening sessions after this long (safety bound).
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    max_open_time: Duration,
}

// ---------------------------------------------------------------------------------------------
// Minimal IMAP client

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Largest literal accepted from the server (a guard against a broken parser).
const MAX_LITERAL: usize = 64 << 20;

struct Session {
    s: BufReader<TlsStream>,
    tag: u64,
    timeout: Duration,
    line: Vec<u8>,
}

/// The outcome of one tagged command.
#[derive(Default)]
struct Resp {
    ok: bool,
    /// The tagged line (for error messages).
    status: String,
    /// Untagged `* ... FETCH` responses (including unsolicited ones, e.g. flag changes made
    /// by other sessions).
    fetches: usize,
    /// Bytes received in literals.
    literal_bytes: usize,
    /// Untagged lines, if asked for (literals included inline).
    untagged: Vec<Vec<u8>>,
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCert(provider.signature_verification_algorithms));
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// IMAP quoted string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// The literal length announced at the end of a line (`... {123}\r\n`), if any.
fn literal_len(line: &[u8]) -> Option<usize> {
    let l = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))?;
    let l = l.strip_suffix(b"}")?;
    let open = l.iter().rposition(|&b| b == b'{')?;
    let n = &l[open + 1..];
    let n = n.strip_suffix(b"+").unwrap_or(n);
    if n.is_empty() || !n.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(n).ok()?.parse().ok()
}

impl Session {
    async fn connect(c: &ConnArgs, tls: &tokio_rustls::TlsConnector) -> Result<Session> {
        let tcp = tokio::time::timeout(c.op_timeout, TcpStream::connect(c.target))
            .await
            .context("connect timed out")??;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost")?.to_owned();
        let t = tokio::time::timeout(c.op_timeout, tls.connect(name, tcp))
            .await
            .context("TLS handshake timed out")??;
        let mut s = Session {
            s: BufReader::with_capacity(16 * 1024, t),
            tag: 0,
            timeout: c.op_timeout,
            line: Vec::with_capacity(1024),
        };
        let mut lit = 0;
        s.read_response(&mut lit).await?;
        if !s.line.starts_with(b"* OK") {
            bail!(
                "unexpected greeting: {}",
                String::from_utf8_lossy(&s.line).trim_end()
            );
        }
        Ok(s)
    }

    /// Reads one complete response line into `self.line`, literals included.
    async fn read_response(&mut self, literal_bytes: &mut usize) -> Result<()> {
        self.line.clear();
        loop {
            let n = tokio::time::timeout(self.timeout, self.s.read_until(b'\n', &mut self.line))
                .await
                .context("read timed out")??;
            if n == 0 {
                bail!("connection closed by the server");
            }
            let start = self.line.len() - n;
            match literal_len(&self.line[start..]) {
                Some(len) if len > MAX_LITERAL => bail!("literal of {len} bytes"),
                Some(len) => {
                    let at = self.line.len();
                    self.line.resize(at + len, 0);
                    tokio::time::timeout(self.timeout, self.s.read_exact(&mut self.line[at..]))
                        .await
                        .context("literal read timed out")??;
                    *literal_bytes += len;
                }
                None => return Ok(()),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.s.get_mut();
        w.write_all(bytes).await?;
        w.flush().await?;
        Ok(())
    }

    /// Sends a tagged command and reads up to its tagged completion.
    async fn command(&mut self, cmd: &str, collect: bool) -> Result<Resp> {
        self.tag += 1;
        let tag = format!("T{} ", self.tag);
        self.send(format!("{tag}{cmd}\r\n").as_bytes()).await?;
        self.complete(&tag, collect).await
    }

    async fn complete(&mut self, tag: &str, collect: bool) -> Result<Resp> {
        let mut r = Resp::default();
        loop {
            self.read_response(&mut r.literal_bytes).await?;
            if self.line.starts_with(tag.as_bytes()) {
                let rest = &self.line[tag.len()..];
                r.ok = rest.len() >= 2 && rest[..2].eq_ignore_ascii_case(b"OK");
                r.status = String::from_utf8_lossy(&self.line).trim_end().to_string();
                return Ok(r);
            }
            if self.line.starts_with(b"* ") {
                if is_fetch(&self.line) {
                    r.fetches += 1;
                }
                if collect {
                    r.untagged.push(self.line.clone());
                }
            } else if self.line.starts_with(b"+") {
                bail!(
                    "unexpected continuation request: {}",
                    String::from_utf8_lossy(&self.line)
                );
            }
        }
    }

    async fn ok(&mut self, cmd: &str) -> Result<Resp> {
        let r = self.command(cmd, false).await?;
        if !r.ok {
            bail!("{cmd:?} failed: {}", r.status);
        }
        Ok(r)
    }

    /// LOGIN and SELECT; returns the mailbox's UIDs.
    async fn login_select(&mut self, c: &ConnArgs, want_uids: bool) -> Result<Vec<u32>> {
        let r = self
            .command(
                &format!("LOGIN {} {}", quote(&c.user), quote(&c.password)),
                false,
            )
            .await?;
        if !r.ok {
            bail!("LOGIN failed: {}", r.status);
        }
        self.ok(&format!("SELECT {}", quote(&c.mailbox))).await?;
        if !want_uids {
            return Ok(Vec::new());
        }
        let r = self.command("UID SEARCH ALL", true).await?;
        if !r.ok {
            bail!("UID SEARCH ALL failed: {}", r.status);
        }
        let mut uids = Vec::new();
        for l in &r.untagged {
            let s = String::from_utf8_lossy(l);
            let mut w = s.split_ascii_whitespace();
            if w.next() == Some("*") && w.next().is_some_and(|k| k.eq_ignore_ascii_case("SEARCH")) {
                uids.extend(w.filter_map(|x| x.parse::<u32>().ok()));
            }
        }
        Ok(uids)
    }
}

/// `* <n> FETCH ...`
fn is_fetch(line: &[u8]) -> bool {
    let mut w = line.split(|&b| b == b' ');
    w.next();
    w.next()
        .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
        && w.next().is_some_and(|k| k.eq_ignore_ascii_case(b"FETCH"))
}

// ---------------------------------------------------------------------------------------------
// Process tree sampling

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `root` and every process whose parent chain leads to it.
fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(pp) = parent_of(pid)
            {
                children.entry(pp).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

fn status_kb(pid: u32, file: &str, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
struct TreeSample {
    processes: usize,
    rss_bytes: u64,
    pss_bytes: u64,
}

fn sample_tree(root: u32) -> TreeSample {
    let pids = tree(root);
    let mut s = TreeSample {
        processes: pids.len(),
        ..TreeSample::default()
    };
    for p in pids {
        s.rss_bytes += status_kb(p, "status", "VmRSS:") * 1024;
        s.pss_bytes += status_kb(p, "smaps_rollup", "Pss:") * 1024;
    }
    s
}

fn tree_cpu(root: u32) -> f64 {
    tree(root)
        .into_iter()
        .filter_map(|p| proc_cpu_seconds(p).ok())
        .sum()
}

/// Fails early when the soft RLIMIT_NOFILE is below `want` (raise it with `ulimit -n`; the
/// crate forbids `unsafe`, so no setrlimit here).
fn check_nofile(want: u64) -> Result<()> {
    let limits = fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    match soft {
        Some(n) if n < want => {
            bail!("RLIMIT_NOFILE is {n}, need {want}: run `ulimit -n {want}` first")
        }
        _ => Ok(()),
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Op {
    Header,
    Body,
    Store,
    Flags,
    Noop,
}

impl Op {
    const ALL: [Op; 5] = [Op::Header, Op::Body, Op::Store, Op::Flags, Op::Noop];
    fn name(self) -> &'static str {
        match self {
            Op::Header => "header",
            Op::Body => "body",
            Op::Store => "store",
            Op::Flags => "flags",
            Op::Noop => "noop",
        }
    }
}

fn parse_mix(s: &str) -> Result<Vec<(Op, u32)>> {
    let mut mix = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("mix entry {part:?} is not NAME=WEIGHT"))?;
        let op = Op::ALL
            .into_iter()
            .find(|o| o.name() == k.trim())
            .ok_or_else(|| anyhow!("unknown operation {k:?}"))?;
        let w: u32 = v.trim().parse().with_context(|| format!("weight {v:?}"))?;
        if w > 0 {
            mix.push((op, w));
        }
    }
    if mix.is_empty() {
        bail!("empty operation mix");
    }
    Ok(mix)
}

/// xorshift64*: enough randomness to pick UIDs and operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Serialize)]
struct OpResult {
    count: u64,
    errors: u64,
    ops_per_sec: f64,
    #[serde(flatten)]
    latency: LatencySummary,
}

#[derive(Debug, Serialize)]
struct LoadResult {
    test: &'static str,
    label: Option<String>,
    target: SocketAddr,
    sessions: usize,
    sessions_started: usize,
    messages: usize,
    mix: String,
    seconds: f64,
    ops: u64,
    errors: u64,
    ops_per_sec: f64,
    first_error: Option<String>,
    literal_bytes: u64,
    per_op: BTreeMap<&'static str, OpResult>,
    /// CPU seconds of the server's process tree during the measured interval.
    server_cpu_s: Option<f64>,
    client_cpu_s: f64,
}

struct SessionOut {
    hists: HashMap<Op, Histogram<u64>>,
    errors: HashMap<Op, u64>,
    first_error: Option<String>,
    literal_bytes: u64,
}

async fn one_op(s: &mut Session, op: Op, uid: u32, flag_on: &mut bool) -> Result<Resp> {
    let cmd = match op {
        Op::Header => format!("UID FETCH {uid} (BODY.PEEK[HEADER])"),
        Op::Body => format!("UID FETCH {uid} (BODY.PEEK[])"),
        Op::Store => {
            *flag_on = !*flag_on;
            let sign = if *flag_on { '+' } else { '-' };
            format!("UID STORE {uid} {sign}FLAGS (\\Flagged)")
        }
        Op::Flags => "FETCH 1:* (FLAGS)".to_string(),
        Op::Noop => "NOOP".to_string(),
    };
    let r = s.command(&cmd, false).await?;
    if !r.ok {
        bail!("{cmd:?}: {}", r.status);
    }
    if matches!(op, Op::Header | Op::Body) && (r.fetches == 0 || r.literal_bytes == 0) {
        bail!(
            "{cmd:?}: {} FETCH responses, {} literal bytes",
            r.fetches,
            r.literal_bytes
        );
    }
    Ok(r)
}

fn run_load(args: LoadArgs) -> Result<()> {
    ensure_loopback(args.conn.target)?;
    let mix = parse_mix(&args.mix)?;
    check_nofile(args.sessions as u64 + 64)?;
    let rt = runtime(args.conn.threads)?;
    let result = rt.block_on(async {
        let tls = tls_connector()?;
        // Set every session up first (LOGIN, SELECT, UID SEARCH), so the measured interval
        // holds only the operation mix.
        let mut setups = Vec::new();
        for _ in 0..args.sessions.max(1) {
            let (c, tls) = (args.conn.clone(), tls.clone());
            setups.push(tokio::spawn(async move {
                let mut s = Session::connect(&c, &tls).await?;
                let uids = s.login_select(&c, true).await?;
                anyhow::Ok((s, uids))
            }));
        }
        let mut sessions = Vec::new();
        let mut setup_error = None;
        for t in setups {
            match t.await? {
                Ok(x) => sessions.push(x),
                Err(e) => {
                    setup_error.get_or_insert(format!("session setup: {e:#}"));
                }
            }
        }
        if sessions.is_empty() {
            bail!(
                "no session could be set up: {}",
                setup_error.unwrap_or_default()
            );
        }
        let messages = sessions[0].1.len();
        if messages == 0 {
            bail!("the mailbox is empty");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let total_w: u64 = mix.iter().map(|(_, w)| u64::from(*w)).sum();
        let mix = Arc::new(mix);
        let server_cpu0 = args.conn.pid.map(tree_cpu);
        let client_cpu0 = proc_cpu_seconds(std::process::id()).unwrap_or(0.0);
        let started = sessions.len();
        let mut tasks = Vec::new();
        for (i, (mut s, uids)) in sessions.into_iter().enumerate() {
            let (stop, mix) = (Arc::clone(&stop), Arc::clone(&mix));
            let mut rng = Rng::new(args.seed.wrapping_add(i as u64 * 7919));
            tasks.push(tokio::spawn(async move {
                let mut out = SessionOut {
                    hists: HashMap::new(),
                    errors: HashMap::new(),
                    first_error: None,
                    literal_bytes: 0,
                };
                let mut flag_on = false;
                while !stop.load(Ordering::Relaxed) {
                    let mut x = rng.below(total_w);
                    let mut op = mix[0].0;
                    for (o, w) in mix.iter() {
                        if x < u64::from(*w) {
                            op = *o;
                            break;
                        }
                        x -= u64::from(*w);
                    }
                    let uid = uids[rng.below(uids.len() as u64) as usize];
                    let t = Instant::now();
                    match one_op(&mut s, op, uid, &mut flag_on).await {
                        Ok(r) => {
                            let ns = t.elapsed().as_nanos() as u64;
                            let _ = out
                                .hists
                                .entry(op)
                                .or_insert_with(new_histogram)
                                .record(ns.max(1));
                            out.literal_bytes += r.literal_bytes as u64;
                        }
                        Err(e) => {
                            *out.errors.entry(op).or_default() += 1;
                            out.first_error.get_or_insert(format!("{e:#}"));
                            // A failed read leaves the stream out of step: end this session.
                            break;
                        }
                    }
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), s.command("LOGOUT", false)).await;
                out
            }));
        }
        let start = Instant::now();
        tokio::time::sleep(args.duration).await;
        stop.store(true, Ordering::Relaxed);
        let seconds = start.elapsed().as_secs_f64();
        let server_cpu_s = match (args.conn.pid, server_cpu0) {
            (Some(p), Some(c0)) => Some(tree_cpu(p) - c0),
            _ => None,
        };
        let client_cpu_s = proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - client_cpu0;
        let mut hists: HashMap<Op, Histogram<u64>> = HashMap::new();
        let mut errors: HashMap<Op, u64> = HashMap::new();
        let mut first_error = setup_error;
        let mut literal_bytes = 0;
        for t in tasks {
            let o = tokio::time::timeout(args.conn.op_timeout + Duration::from_secs(5), t)
                .await
                .context("a session did not stop")??;
            for (op, h) in o.hists {
                hists.entry(op).or_insert_with(new_histogram).add(h)?;
            }
            for (op, n) in o.errors {
                *errors.entry(op).or_default() += n;
            }
            if first_error.is_none() {
                first_error = o.first_error;
            }
            literal_bytes += o.literal_bytes;
        }
        let mut per_op = BTreeMap::new();
        let mut ops = 0;
        for op in Op::ALL {
            let h = hists.remove(&op).unwrap_or_else(new_histogram);
            let e = errors.get(&op).copied().unwrap_or(0);
            if h.is_empty() && e == 0 {
                continue;
            }
            ops += h.len();
            per_op.insert(
                op.name(),
                OpResult {
                    count: h.len(),
                    errors: e,
                    ops_per_sec: h.len() as f64 / seconds,
                    latency: LatencySummary::from_histogram(&h),
                },
            );
        }
        anyhow::Ok(LoadResult {
            test: "imap-load",
            label: args.conn.label.clone(),
            target: args.conn.target,
            sessions: args.sessions,
            sessions_started: started,
            messages,
            mix: args.mix.clone(),
            seconds,
            ops,
            errors: errors.values().sum(),
            ops_per_sec: ops as f64 / seconds,
            first_error,
            literal_bytes,
            per_op,
            server_cpu_s,
            client_cpu_s,
        })
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    emit_json(&result, args.conn.json.as_deref())
}

// ---------------------------------------------------------------------------------------------
// Idle

#[derive(Debug, Serialize)]
struct IdleResult {
    test: &'static str,
    label: Option<String>,
    target: SocketAddr,
    requested: usize,
    established: usize,
    errors: u64,
    first_error: Option<String>,
    open_s: f64,
    before: Option<TreeSample>,
    after: Option<TreeSample>,
    /// (RSS after - RSS before) / established sessions, over the server's process tree.
    rss_bytes_per_session: Option<f64>,
    /// The same with PSS (shared pages divided among the processes sharing them).
    pss_bytes_per_session: Option<f64>,
    /// Sessions that answered DONE with a tagged OK after the measurement.
    alive_after: usize,
}

fn run_idle(args: IdleArgs) -> Result<()> {
    ensure_loopback(args.conn.target)?;
    check_nofile(args.sessions as u64 + 64)?;
    let before = args.conn.pid.map(sample_tree);
    let rt = runtime(args.conn.threads)?;
    let result = rt.block_on(async {
        let tls = tls_connector()?;
        let sem = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
        let errors = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + args.max_open_time;
        let mut opens = Vec::new();
        for _ in 0..args.sessions {
            let (c, tls, sem, errors) = (
                args.conn.clone(),
                tls.clone(),
                Arc::clone(&sem),
                Arc::clone(&errors),
            );
            opens.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await?;
                let r = tokio::time::timeout_at(deadline, async {
                    let mut s = Session::connect(&c, &tls).await?;
                    s.login_select(&c, false).await?;
                    s.tag += 1;
                    let tag = format!("T{} ", s.tag);
                    s.send(format!("{tag}IDLE\r\n").as_bytes()).await?;
                    let mut lit = 0;
                    loop {
                        s.read_response(&mut lit).await?;
                        if s.line.starts_with(b"+") {
                            break;
                        }
                        if s.line.starts_with(tag.as_bytes()) {
                            bail!(
                                "IDLE refused: {}",
                                String::from_utf8_lossy(&s.line).trim_end()
                            );
                        }
                    }
                    anyhow::Ok((s, tag))
                })
                .await
                .unwrap_or_else(|_| Err(anyhow!("not open within --max-open-time")));
                if r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                r
            }));
        }
        let mut idle = Vec::new();
        let mut first_error = None;
        for t in opens {
            match t.await? {
                Ok(x) => idle.push(x),
                Err(e) => {
                    first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
        let open_s = start.elapsed().as_secs_f64();
        eprintln!(
            "imap idle: {} of {} sessions idling after {open_s:.1}s",
            idle.len(),
            args.sessions
        );
        tokio::time::sleep(args.settle).await;
        let after = args.conn.pid.map(sample_tree);
        // End IDLE on every session and check the tagged OK: the sessions were really alive.
        let mut dones = Vec::new();
        for (mut s, tag) in idle.drain(..) {
            dones.push(tokio::spawn(async move {
                s.send(b"DONE\r\n").await?;
                let r = s.complete(&tag, false).await?;
                drop(s);
                anyhow::Ok(r.ok)
            }));
        }
        let established = dones.len();
        let mut alive_after = 0;
        for d in dones {
            if matches!(
                tokio::time::timeout(args.conn.op_timeout, d).await,
                Ok(Ok(Ok(true)))
            ) {
                alive_after += 1;
            }
        }
        let per = |f: fn(&TreeSample) -> u64| match (&before, &after) {
            (Some(b), Some(a)) if established > 0 => {
                Some((f(a) as f64 - f(b) as f64) / established as f64)
            }
            _ => None,
        };
        anyhow::Ok(IdleResult {
            test: "imap-idle",
            label: args.conn.label.clone(),
            target: args.conn.target,
            requested: args.sessions,
            established,
            errors: errors.load(Ordering::Relaxed),
            first_error,
            open_s,
            rss_bytes_per_session: per(|s| s.rss_bytes),
            pss_bytes_per_session: per(|s| s.pss_bytes),
            before,
            after,
            alive_after,
        })
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    emit_json(&result, args.conn.json.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(literal_len(b"* 1 FETCH (UID 5 BODY[] {123}\r\n"), Some(123));
        assert_eq!(literal_len(b"* 1 FETCH (BODY[] {0}\r\n"), Some(0));
        assert_eq!(literal_len(b"A1 LOGIN {5+}\r\n"), Some(5));
        assert_eq!(literal_len(b"* OK {x}\r\n"), None);
        assert_eq!(literal_len(b"* OK done\r\n"), None);
        assert_eq!(literal_len(b"* OK {}\r\n"), None);
    }

    #[test]
    fn fetch_lines() {
        assert!(is_fetch(b"* 12 FETCH (FLAGS ())\r\n"));
        assert!(!is_fetch(b"* 12 EXISTS\r\n"));
        assert!(!is_fetch(b"* OK FETCH\r\n"));
    }

    #[test]
    fn mixes() {
        let m = parse_mix("header=4,body=0,noop=1").unwrap();
        assert_eq!(m, vec![(Op::Header, 4), (Op::Noop, 1)]);
        assert!(parse_mix("bogus=1").is_err());
        assert!(parse_mix("noop=0").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn own_tree() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(sample_tree(me).rss_bytes > 0);
    }
}
