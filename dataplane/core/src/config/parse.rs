//! TOML front end: text in, a validated [`LbConfig`] or *every* problem out.
//!
//! # Model
//!
//! Loading is two passes over the text:
//!
//! 1. The `toml` crate parses the document into a tree in which every key and every value carries
//!    its byte span ([`toml::de::DeTable`], built on [`toml::Spanned`]). Syntax errors (including
//!    duplicate keys and duplicate `[pool.NAME]` tables) are collected with recovery, reported
//!    with their positions, and stop loading there: a half-parsed tree would only produce
//!    misleading follow-up errors.
//! 2. A schema walker visits the tree section by section. Each section has a fixed list of allowed
//!    keys; each value is checked by a typed converter (duration, socket address, bounded integer,
//!    enumerated word, name). Every failure is recorded as a [`ConfigError`] with the file, the
//!    1-based line and column of the offending key or value, and a reason that names the key and
//!    lists what is allowed, then the walk goes on. Cross-references (listener → pool, duplicate
//!    binds, duplicate backends) are checked last. Only when no error at all was found is an
//!    [`LbConfig`] returned, so the engine never sees a half-valid configuration.
//!
//! The walker is written by hand rather than with `#[serde(deny_unknown_fields)]` structs because
//! serde stops at the first problem; an operator fixing a file wants the whole list at once.
//! Errors are sorted by position; at most [`MAX_ERRORS`] are reported.
//!
//! # Schema
//!
//! ```toml
//! [global]                       # optional, every key optional
//! workers = 2                    # 1..=4096; default: one worker per online CPU
//! pin_workers = true             # default true
//! engine = "auto"                # auto | uring | epoll            (default auto)
//! relay = "buffered"             # buffered | splice               (default buffered)
//! maxconn = 100000               # 1..=4294967295                  (default 100000)
//! drain_timeout = "30s"          # may be "0s"                     (default 30s)
//! admin = "127.0.0.1:9100"       # /metrics and backend API; absent: disabled
//! source_rate = { max = 100, period = "10s" }   # per source address; absent: unlimited
//!
//! [[listener]]                   # at least one
//! name = "imaps"                 # optional, default: the bind address; unique
//! bind = "192.0.2.1:993"         # required; IPv6 as "[2001:db8::1]:993"; unique
//! pool = "imap"                  # required; a [pool.NAME] below
//!
//! [pool.imap]                    # NAME: 1..=64 of A-Z a-z 0-9 _ . -
//! algorithm = "leastconn"        # leastconn | roundrobin | weighted | source  (default leastconn)
//! proxy_protocol = "v2"          # v1 | v2 | none                  (default none); health
//!                                 # checks then send a LOCAL header (v1: UNKNOWN) first
//! connect_timeout = "3s"         # default 3s
//! idle_timeout = "30m"           # default 30m (IMAP IDLE clients stay silent up to 29 minutes)
//! connect_retries = 2            # default 2
//! health = { check = "tls", interval = "2s", timeout = "1s", rise = 2, fall = 3,
//!            ehlo_name = "lb1.example.com", tls_server_name = "imap.example.com" }
//! backends = [                   # required, non-empty; addresses unique within the pool
//!   { addr = "192.0.2.11:993", weight = 1, maxconn = 5000, name = "mda-a1" },
//!   "192.0.2.12:993",            # shorthand: weight 1, no maxconn, name = address
//! ]
//! ```
//!
//! `health` may equally be written as a `[pool.imap.health]` table. Its keys: `check`
//! (tcp | smtp | smtp-starttls | imap | tls, default tcp), `interval` (default 2s), `timeout`
//! (default 1s, at most `interval`), `rise` and `fall` (at least 1, default 2 and 3), `ehlo_name`
//! (default `ringmail-lb.invalid`) and `tls_server_name` (a DNS name or IP; absent: no SNI).
//!
//! Durations are strings: a whole number and a unit, `ms`, `s`, `m` or `h` (`"500ms"`, `"2s"`,
//! `"1m"`, `"1h"`), at most 168h. Addresses are IP literals with a port, never host names: the
//! load balancer does not resolve names. Port 0 is rejected everywhere.

use std::collections::{BinaryHeap, HashMap};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
pub use toml::de::{DeArray, DeTable, DeValue};

mod announce;

use super::model::{
    Backend, EngineChoice, Global, HealthCheck, LbConfig, Listener, Pool, RelayMode, SourceRate,
};
use crate::balance::Algorithm;
use crate::health::CheckKind;
use crate::proxy_protocol::Version as ProxyVersion;

/// One problem in a configuration file.
///
/// `line` and `column` are 1-based and count characters; `line` 0 means the problem concerns the
/// file as a whole (it could not be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// At most this many errors are reported; a last entry says how many more were found.
pub const MAX_ERRORS: usize = 100;

/// Configuration files larger than this are refused by [`load_file`].
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The longest duration accepted anywhere (7 days): far beyond any sane timeout, and small enough
/// that adding it to a clock reading can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

const MAX_WORKERS: u64 = 4096;
const MAX_WEIGHT: u64 = 256;

const TOP_KEYS: &[&str] = &["global", "listener", "pool", "announce"];
const GLOBAL_KEYS: &[&str] = &[
    "workers",
    "pin_workers",
    "engine",
    "relay",
    "maxconn",
    "drain_timeout",
    "admin",
    "source_rate",
];
const SOURCE_RATE_KEYS: &[&str] = &["max", "period"];
const LISTENER_KEYS: &[&str] = &["name", "bind", "pool"];
const POOL_KEYS: &[&str] = &[
    "algorithm",
    "proxy_protocol",
    "connect_timeout",
    "idle_timeout",
    "connect_retries",
    "health",
    "backends",
];
const HEALTH_KEYS: &[&str] = &[
    "check",
    "interval",
    "timeout",
    "rise",
    "fall",
    "ehlo_name",
    "tls_server_name",
];
const BACKEND_KEYS: &[&str] = &["addr", "weight", "maxconn", "name"];

const ENGINES: &[(&str, EngineChoice)] = &[
    ("auto", EngineChoice::Auto),
    ("uring", EngineChoice::Uring),
    ("epoll", EngineChoice::Epoll),
];
const RELAYS: &[(&str, RelayMode)] = &[
    ("buffered", RelayMode::Buffered),
    ("splice", RelayMode::Splice),
];
const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("leastconn", Algorithm::LeastConn),
    ("roundrobin", Algorithm::RoundRobin),
    ("weighted", Algorithm::Weighted),
    ("source", Algorithm::SourceHash),
];
const CHECKS: &[(&str, CheckKind)] = &[
    ("tcp", CheckKind::Tcp),
    ("smtp", CheckKind::Smtp),
    ("smtp-starttls", CheckKind::SmtpStarttls),
    ("imap", CheckKind::Imap),
    ("tls", CheckKind::Tls),
];
const PROXY_VERSIONS: &[(&str, Option<ProxyVersion>)] = &[
    ("v1", Some(ProxyVersion::V1)),
    ("v2", Some(ProxyVersion::V2)),
    ("none", None),
];

/// Byte range of a key or value in the configuration text.
pub type Span = Range<usize>;
/// A TOML value with its span.
pub type Value<'i> = Spanned<DeValue<'i>>;

/// Parses and validates a configuration; `file` is used in error messages.
pub fn load_str(text: &str, file: &str) -> Result<LbConfig, ConfigErrors> {
    load_str_with(text, file, validate)
}

/// Reads and validates a configuration file. Reading is the only I/O; a file that cannot be read
/// (missing, a directory, too large, not UTF-8) is reported as a [`ConfigError`] at line 0, except
/// invalid UTF-8, which is reported at the position of the first bad byte.
pub fn load_file(path: &Path) -> Result<LbConfig, ConfigErrors> {
    load_file_with(path, validate)
}

/// The TOML front end for any schema: syntax errors are collected with recovery and reported with
/// their positions; then `schema` walks the document, recording every problem in the [`Ctx`].
/// Only when it found none is its result returned. The role servers use this with their own
/// schemas, so every configuration file of ringmail reports errors the same way.
pub fn load_str_with<T>(
    text: &str,
    file: &str,
    schema: impl FnOnce(&mut Ctx<'_>, &DeTable<'_>) -> Option<T>,
) -> Result<T, ConfigErrors> {
    let mut ctx = Ctx::new(text, file);
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            let msg = e.message().trim().replace('\n', "; ");
            let span = e.span().unwrap_or(0..0);
            // Name the offending text when it is a short single-line token (e.g. the duplicate key).
            let token = text
                .get(span.clone())
                .filter(|t| !t.trim().is_empty() && t.len() <= 64 && !t.contains(['\n', '\r']));
            let msg = match token {
                Some(t) => format!("TOML syntax error: {msg} {}", quote(t)),
                None => format!("TOML syntax error: {msg}"),
            };
            ctx.error(span, msg);
        }
        return Err(ctx.into_errors());
    }
    let config = schema(&mut ctx, doc.get_ref());
    match config {
        Some(config) if !ctx.has_errors() => Ok(config),
        _ => Err(ctx.into_errors()),
    }
}

/// [`load_str_with`] for a file (see [`load_file`] for how unreadable files are reported).
pub fn load_file_with<T>(
    path: &Path,
    schema: impl FnOnce(&mut Ctx<'_>, &DeTable<'_>) -> Option<T>,
) -> Result<T, ConfigErrors> {
    let name = path.display().to_string();
    let whole_file = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: name.clone(),
            line: 0,
            column: 0,
            message,
        }])
    };
    let file = std::fs::File::open(path).map_err(|e| whole_file(format!("cannot open: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| whole_file(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(whole_file(format!(
            "file is larger than {MAX_FILE_BYTES} bytes; refusing to load it"
        )));
    }
    match String::from_utf8(bytes) {
        Ok(text) => load_str_with(&text, &name, schema),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let prefix = String::from_utf8_lossy(e.as_bytes().get(..valid).unwrap_or_default());
            let mut ctx = Ctx::new(&prefix, &name);
            ctx.error(valid..valid, "file is not valid UTF-8");
            Err(ctx.into_errors())
        }
    }
}

/// Error sink plus the text needed to turn byte offsets into lines and columns.
///
/// Only the [`MAX_ERRORS`] errors earliest in the file are kept (a max-heap on byte offset, ties
/// in the order found), the rest are counted; lines and columns are computed only for the kept
/// ones, from an index of line starts. A hostile file with millions of errors therefore costs
/// neither quadratic time nor unbounded memory.
pub struct Ctx<'a> {
    text: &'a str,
    file: &'a str,
    /// Byte offset of the start of every line.
    line_starts: Vec<usize>,
    /// (byte offset, sequence number, message).
    errors: BinaryHeap<(usize, u64, String)>,
    /// Every error found, kept or not.
    total: u64,
}

impl<'a> Ctx<'a> {
    fn new(text: &'a str, file: &'a str) -> Self {
        let newlines = text.bytes().enumerate().filter(|&(_, b)| b == b'\n');
        let line_starts = std::iter::once(0)
            .chain(newlines.map(|(i, _)| i + 1))
            .collect();
        Ctx {
            text,
            file,
            line_starts,
            errors: BinaryHeap::new(),
            total: 0,
        }
    }

    pub fn has_errors(&self) -> bool {
        self.total > 0
    }

    /// Records one problem at `span` (byte offsets into the text).
    pub fn error(&mut self, span: Span, message: impl Into<String>) {
        self.errors.push((span.start, self.total, message.into()));
        self.total += 1;
        if self.errors.len() > MAX_ERRORS {
            self.errors.pop();
        }
    }

    /// 1-based line of a byte offset (offsets past the end are clamped).
    pub fn line(&self, offset: usize) -> usize {
        self.line_starts
            .partition_point(|&start| start <= offset)
            .max(1)
    }

    /// 1-based line and column (in characters) of a byte offset; offsets past the end or inside a
    /// character are clamped.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line(offset);
        let line_start = self
            .line_starts
            .get(line - 1)
            .copied()
            .unwrap_or(0)
            .min(offset);
        let column = self
            .text
            .get(line_start..offset)
            .map_or(0, |s| s.chars().count())
            + 1;
        (line, column)
    }

    fn into_errors(mut self) -> ConfigErrors {
        let mut out: Vec<ConfigError> = Vec::with_capacity(self.errors.len() + 1);
        for (offset, _, message) in std::mem::take(&mut self.errors).into_sorted_vec() {
            let (line, column) = self.position(offset);
            out.push(ConfigError {
                file: self.file.to_string(),
                line,
                column,
                message,
            });
        }
        let shown = u64::try_from(out.len()).unwrap_or(u64::MAX);
        if self.total > shown
            && let Some(last) = out.last()
        {
            let note = ConfigError {
                message: format!("{} more errors not shown", self.total - shown),
                ..last.clone()
            };
            out.push(note);
        }
        ConfigErrors(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Document structure
// ---------------------------------------------------------------------------------------------

fn validate(ctx: &mut Ctx<'_>, root: &DeTable<'_>) -> Option<LbConfig> {
    check_keys(ctx, root, TOP_KEYS, "the top level");

    let global = match root.get("global") {
        None => Some(Global::default()),
        Some(v) => table(ctx, v, "global").and_then(|t| parse_global(ctx, t)),
    };

    let (pools, pool_names) = parse_pools(ctx, root.get("pool"));
    // A host that only announces (`ringmail announce`) has pools and VIPs but no listeners.
    let mut binds = Vec::new();
    let listeners = match (root.get("listener"), root.get("announce")) {
        (None, Some(_)) => Some(Vec::new()),
        (l, _) => parse_listeners(ctx, l, &pool_names, &mut binds),
    };
    let announce = match root.get("announce") {
        None => Some(None),
        Some(a) => announce::parse_announce(ctx, a, &pool_names, listeners.as_deref()).map(Some),
    };

    if let Some(global) = &global
        && let Some(admin) = global.admin
        && let Some((_, clash)) = binds.iter().find(|(b, _)| *b == admin)
    {
        let span = value_span(root, &["global", "admin"]);
        ctx.error(
            span,
            format!("`global.admin` {admin} is also the bind address of listener `{clash}`"),
        );
    }

    // A backend that is one of this LB's own listeners would proxy every connection back to
    // itself until the descriptors run out.
    for pool in pools.iter().flatten() {
        for b in &pool.backends {
            if let Some((_, listener)) = binds.iter().find(|(bind, _)| *bind == b.addr) {
                ctx.error(
                    value_span(root, &["pool", &pool.name, "backends"]),
                    format!(
                        "`{}.backends`: backend {} is this load balancer's own listener `{listener}` (a loop)",
                        pool.name, b.addr
                    ),
                );
            }
        }
    }

    let pools: Option<Vec<Pool>> = pools.into_iter().collect();
    Some(LbConfig {
        global: global?,
        listeners: listeners?,
        pools: pools?,
        announce: announce?,
    })
}

/// Span of the value at `path` (tables only), or the start of the file.
fn value_span(root: &DeTable<'_>, path: &[&str]) -> Span {
    let mut table = root;
    let mut span = 0..0;
    for key in path {
        let Some(v) = table.get(*key) else {
            return span;
        };
        span = v.span();
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    span
}

fn parse_global(ctx: &mut Ctx<'_>, t: &DeTable<'_>) -> Option<Global> {
    check_keys(ctx, t, GLOBAL_KEYS, "[global]");
    let mut g = Global::default();
    let mut ok = true;
    if let Some(v) = t.get("workers") {
        match integer(ctx, v, "global.workers", 1, MAX_WORKERS) {
            Some(n) => g.workers = usize::try_from(n).ok(),
            None => ok = false,
        }
    }
    ok &= set(
        &mut g.pin_workers,
        t.get("pin_workers")
            .map(|v| boolean(ctx, v, "global.pin_workers")),
    );
    ok &= set(
        &mut g.engine,
        t.get("engine")
            .map(|v| choice(ctx, v, "global.engine", ENGINES)),
    );
    ok &= set(
        &mut g.relay,
        t.get("relay")
            .map(|v| choice(ctx, v, "global.relay", RELAYS)),
    );
    ok &= set(
        &mut g.maxconn,
        t.get("maxconn")
            .map(|v| integer_u32(ctx, v, "global.maxconn", 1)),
    );
    ok &= set(
        &mut g.drain_timeout,
        t.get("drain_timeout")
            .map(|v| duration(ctx, v, "global.drain_timeout", true)),
    );
    if let Some(v) = t.get("admin") {
        match socket_addr(ctx, v, "global.admin") {
            Some(a) => g.admin = Some(a),
            None => ok = false,
        }
    }
    if let Some(v) = t.get("source_rate") {
        match table(ctx, v, "global.source_rate").and_then(|rt| parse_source_rate(ctx, v, rt)) {
            Some(r) => g.source_rate = Some(r),
            None => ok = false,
        }
    }
    ok.then_some(g)
}

fn parse_source_rate(ctx: &mut Ctx<'_>, v: &Value<'_>, t: &DeTable<'_>) -> Option<SourceRate> {
    check_keys(ctx, t, SOURCE_RATE_KEYS, "global.source_rate");
    let max = required(ctx, v, t, "max", "global.source_rate")
        .and_then(|m| integer_u32(ctx, m, "global.source_rate.max", 1));
    let period = required(ctx, v, t, "period", "global.source_rate")
        .and_then(|p| duration(ctx, p, "global.source_rate.period", false));
    Some(SourceRate {
        max: max?,
        period: period?,
    })
}

/// Pools in file order (`None` where a pool had errors) and their names, for listener lookup.
fn parse_pools(ctx: &mut Ctx<'_>, v: Option<&Value<'_>>) -> (Vec<Option<Pool>>, Vec<String>) {
    let Some(v) = v else {
        return (Vec::new(), Vec::new());
    };
    let DeValue::Table(t) = v.get_ref() else {
        let hint = if matches!(v.get_ref(), DeValue::Array(_)) {
            "; write [pool.NAME], not [[pool]]"
        } else {
            ""
        };
        ctx.error(
            v.span(),
            format!(
                "`pool` must be a table of named pools, found {}{hint}",
                v.get_ref().type_str()
            ),
        );
        return (Vec::new(), Vec::new());
    };
    let mut entries: Vec<_> = t.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let mut pools = Vec::with_capacity(entries.len());
    let mut names = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let name = key.get_ref().as_ref();
        let name_ok = check_name(ctx, key.span(), name, "pool name", NameKind::Simple);
        let where_ = format!("pool.{name}");
        let pool = table(ctx, value, &where_).and_then(|pt| parse_pool(ctx, name, value, pt));
        pools.push(if name_ok { pool } else { None });
        names.push(name.to_string());
    }
    (pools, names)
}

fn parse_pool(ctx: &mut Ctx<'_>, name: &str, v: &Value<'_>, t: &DeTable<'_>) -> Option<Pool> {
    let here = format!("pool.{name}");
    check_keys(ctx, t, POOL_KEYS, &format!("[{here}]"));
    let mut p = Pool::quick(name, Vec::new());
    let mut ok = true;
    let key = |k: &str| format!("{here}.{k}");
    ok &= set(
        &mut p.algorithm,
        t.get("algorithm")
            .map(|x| choice(ctx, x, &key("algorithm"), ALGORITHMS)),
    );
    ok &= set(
        &mut p.proxy_protocol,
        t.get("proxy_protocol")
            .map(|x| choice(ctx, x, &key("proxy_protocol"), PROXY_VERSIONS)),
    );
    ok &= set(
        &mut p.connect_timeout,
        t.get("connect_timeout")
            .map(|x| duration(ctx, x, &key("connect_timeout"), false)),
    );
    ok &= set(
        &mut p.idle_timeout,
        t.get("idle_timeout")
            .map(|x| duration(ctx, x, &key("idle_timeout"), false)),
    );
    ok &= set(
        &mut p.connect_retries,
        t.get("connect_retries")
            .map(|x| integer_u32(ctx, x, &key("connect_retries"), 0)),
    );
    if let Some(h) = t.get("health") {
        let health = table(ctx, h, &key("health")).and_then(|ht| parse_health(ctx, &here, ht));
        match health {
            Some(h) => p.health = h,
            None => ok = false,
        }
    }
    match t.get("backends") {
        None => {
            ctx.error(
                v.span(),
                format!("pool `{name}` has no `backends`; add backends = [\"IP:PORT\", ...]"),
            );
            ok = false;
        }
        Some(b) => match parse_backends(ctx, &here, b) {
            Some(list) => p.backends = list,
            None => ok = false,
        },
    }
    ok.then_some(p)
}

fn parse_health(ctx: &mut Ctx<'_>, pool: &str, t: &DeTable<'_>) -> Option<HealthCheck> {
    let here = format!("{pool}.health");
    check_keys(ctx, t, HEALTH_KEYS, &here);
    let key = |k: &str| format!("{here}.{k}");
    let mut h = HealthCheck::default();
    let mut ok = true;
    ok &= set(
        &mut h.kind,
        t.get("check")
            .map(|x| choice(ctx, x, &key("check"), CHECKS)),
    );
    let interval = t
        .get("interval")
        .map(|x| duration(ctx, x, &key("interval"), false));
    let timeout = t
        .get("timeout")
        .map(|x| duration(ctx, x, &key("timeout"), false));
    ok &= set(&mut h.interval, interval);
    ok &= set(&mut h.timeout, timeout);
    ok &= set(
        &mut h.rise,
        t.get("rise").map(|x| integer_u32(ctx, x, &key("rise"), 1)),
    );
    ok &= set(
        &mut h.fall,
        t.get("fall").map(|x| integer_u32(ctx, x, &key("fall"), 1)),
    );
    if let Some(x) = t.get("ehlo_name") {
        match string(ctx, x, &key("ehlo_name")) {
            Some(s) if valid_ehlo_name(s) => h.ehlo_name = s.to_string(),
            Some(s) => {
                ctx.error(
                    x.span(),
                    format!(
                        "`{}`: {} is not a usable EHLO name (1..=255 printable ASCII characters, \
                         no spaces)",
                        key("ehlo_name"),
                        quote(s)
                    ),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(x) = t.get("tls_server_name") {
        match string(ctx, x, &key("tls_server_name")) {
            Some(s) if valid_server_name(s) => h.tls_server_name = Some(s.to_string()),
            Some(s) => {
                ctx.error(
                    x.span(),
                    format!(
                        "`{}`: {} is neither a DNS name nor an IP address",
                        key("tls_server_name"),
                        quote(s)
                    ),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if ok && h.timeout > h.interval {
        // Point at the timeout if the file set it, else at the interval it was set too short.
        let (span, timeout) = match t.get("timeout") {
            Some(x) => (x.span(), format!("`{}` ({:?})", key("timeout"), h.timeout)),
            None => (
                t.get("interval").map_or(0..0, |x| x.span()),
                format!("the default `{}` ({:?})", key("timeout"), h.timeout),
            ),
        };
        ctx.error(
            span,
            format!(
                "{timeout} is longer than `{}` ({:?}): checks would overlap",
                key("interval"),
                h.interval
            ),
        );
        ok = false;
    }
    ok.then_some(h)
}

fn parse_backends(ctx: &mut Ctx<'_>, pool: &str, v: &Value<'_>) -> Option<Vec<Backend>> {
    let here = format!("{pool}.backends");
    let DeValue::Array(items) = v.get_ref() else {
        ctx.error(
            v.span(),
            format!(
                "`{here}` must be an array of \"IP:PORT\" strings or {{ addr = ... }} tables, \
                 found {}",
                v.get_ref().type_str()
            ),
        );
        return None;
    };
    if items.is_empty() {
        ctx.error(
            v.span(),
            format!("`{here}` is empty: a pool needs at least one backend"),
        );
        return None;
    }
    let mut ok = true;
    let mut out = Vec::with_capacity(items.len());
    let mut by_addr: HashMap<SocketAddr, Span> = HashMap::new();
    let mut by_name: HashMap<String, Span> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{here}[{i}]");
        let Some(b) = parse_backend(ctx, &at, item) else {
            ok = false;
            continue;
        };
        if let Some(first) = by_addr.get(&b.addr) {
            let line = ctx.line(first.start);
            ctx.error(
                item.span(),
                format!(
                    "`{at}`: backend {} is listed twice in `{pool}` (first on line {line})",
                    b.addr
                ),
            );
            ok = false;
            continue;
        }
        by_addr.insert(b.addr, item.span());
        if let Some(first) = by_name.get(&b.name) {
            let line = ctx.line(first.start);
            ctx.error(
                item.span(),
                format!(
                    "`{at}`: backend name `{}` is used twice in `{pool}` (first on line {line})",
                    b.name
                ),
            );
            ok = false;
            continue;
        }
        by_name.insert(b.name.clone(), item.span());
        out.push(b);
    }
    ok.then_some(out)
}

fn parse_backend(ctx: &mut Ctx<'_>, at: &str, v: &Value<'_>) -> Option<Backend> {
    match v.get_ref() {
        DeValue::String(_) => {
            let addr = backend_addr(ctx, v, at)?;
            Some(Backend {
                name: addr.to_string(),
                addr,
                weight: 1,
                maxconn: None,
            })
        }
        DeValue::Table(t) => {
            check_keys(ctx, t, BACKEND_KEYS, at);
            let key = |k: &str| format!("{at}.{k}");
            let addr =
                required(ctx, v, t, "addr", at).and_then(|a| backend_addr(ctx, a, &key("addr")));
            let mut ok = true;
            let mut weight = 1;
            ok &= set(
                &mut weight,
                t.get("weight")
                    .map(|w| integer(ctx, w, &key("weight"), 1, MAX_WEIGHT)),
            );
            let mut maxconn = None;
            if let Some(m) = t.get("maxconn") {
                match integer_u32(ctx, m, &key("maxconn"), 1) {
                    Some(m) => maxconn = Some(m),
                    None => ok = false,
                }
            }
            let mut name = None;
            if let Some(n) = t.get("name") {
                match string(ctx, n, &key("name")) {
                    Some(s) if check_name(ctx, n.span(), s, &key("name"), NameKind::Backend) => {
                        name = Some(s.to_string());
                    }
                    _ => ok = false,
                }
            }
            let addr = addr?;
            let weight = u32::try_from(weight).ok()?;
            ok.then(|| Backend {
                name: name.unwrap_or_else(|| addr.to_string()),
                addr,
                weight,
                maxconn,
            })
        }
        other => {
            ctx.error(
                v.span(),
                format!(
                    "`{at}`: a backend is an \"IP:PORT\" string or a {{ addr = ... }} table, \
                     found {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

fn backend_addr(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<SocketAddr> {
    let addr = socket_addr(ctx, v, what)?;
    let broadcast = matches!(addr.ip(), IpAddr::V4(a) if a.is_broadcast());
    if addr.ip().is_unspecified() || addr.ip().is_multicast() || broadcast {
        ctx.error(
            v.span(),
            format!(
                "`{what}`: {} cannot be connected to (unspecified, multicast or broadcast)",
                addr.ip()
            ),
        );
        return None;
    }
    Some(addr)
}

/// Parses `[[listener]]`; `binds` gets every bind address that parsed (with the listener's
/// name, or the address), also of listeners with other errors.
fn parse_listeners(
    ctx: &mut Ctx<'_>,
    v: Option<&Value<'_>>,
    pool_names: &[String],
    binds: &mut Vec<(SocketAddr, String)>,
) -> Option<Vec<Listener>> {
    let Some(v) = v else {
        ctx.error(
            0..0,
            "no listeners: add at least one [[listener]] with `bind` and `pool`",
        );
        return None;
    };
    let DeValue::Array(items) = v.get_ref() else {
        let hint = if matches!(v.get_ref(), DeValue::Table(_)) {
            "; write [[listener]], not [listener]"
        } else {
            ""
        };
        ctx.error(
            v.span(),
            format!(
                "`listener` must be an array of tables, found {}{hint}",
                v.get_ref().type_str()
            ),
        );
        return None;
    };
    if items.is_empty() {
        ctx.error(
            v.span(),
            "no listeners: add at least one [[listener]] with `bind` and `pool`",
        );
        return None;
    }
    let mut ok = true;
    let mut out = Vec::with_capacity(items.len());
    let mut by_bind: HashMap<SocketAddr, (String, Span)> = HashMap::new();
    let mut by_name: HashMap<String, Span> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("listener[{i}]");
        let Some(t) = table(ctx, item, &at) else {
            ok = false;
            continue;
        };
        check_keys(ctx, t, LISTENER_KEYS, &format!("[[listener]] #{}", i + 1));
        let key = |k: &str| format!("{at}.{k}");
        let bind_v = required(ctx, item, t, "bind", &at);
        let bind = bind_v.and_then(|b| socket_addr(ctx, b, &key("bind")));
        let pool_v = required(ctx, item, t, "pool", &at);
        let pool = pool_v.and_then(|p| {
            let name = string(ctx, p, &key("pool"))?;
            match pool_names.iter().position(|n| n == name) {
                Some(idx) => Some(idx),
                None => {
                    let known = if pool_names.is_empty() {
                        "no pools are defined; add a [pool.NAME] table".to_string()
                    } else {
                        format!("defined pools: {}", pool_names.join(", "))
                    };
                    ctx.error(
                        p.span(),
                        format!("`{}`: unknown pool {}; {known}", key("pool"), quote(name)),
                    );
                    None
                }
            }
        });
        let name = match t.get("name") {
            None => bind.map(|b| b.to_string()),
            Some(n) => string(ctx, n, &key("name"))
                .filter(|s| check_name(ctx, n.span(), s, &key("name"), NameKind::Simple))
                .map(str::to_string),
        };
        // Duplicate binds are reported even when the listener has other errors, so that every
        // error is reported at once.
        let bind_span = bind_v.map_or(item.span(), |b| b.span());
        if let Some(bind) = bind {
            if let Some((other, first)) = by_bind.get(&bind) {
                let line = ctx.line(first.start);
                ctx.error(
                    bind_span.clone(),
                    format!(
                        "`{}`: {bind} is already bound by listener `{other}` (line {line})",
                        key("bind")
                    ),
                );
                ok = false;
                continue;
            }
            let label = name.clone().unwrap_or_else(|| bind.to_string());
            by_bind.insert(bind, (label, bind_span.clone()));
        }
        let (Some(bind), Some(pool), Some(name)) = (bind, pool, name) else {
            ok = false;
            continue;
        };
        let name_span = t.get("name").map_or(bind_span, |n| n.span());
        if let Some(first) = by_name.get(&name) {
            let line = ctx.line(first.start);
            ctx.error(
                name_span,
                format!(
                    "`{}`: listener name `{name}` is already used (line {line})",
                    key("name")
                ),
            );
            ok = false;
            continue;
        }
        by_name.insert(name.clone(), name_span);
        out.push(Listener { name, bind, pool });
    }
    binds.extend(by_bind.into_iter().map(|(bind, (name, _))| (bind, name)));
    ok.then_some(out)
}

// ---------------------------------------------------------------------------------------------
// Typed converters: each returns `None` after recording an error.
// ---------------------------------------------------------------------------------------------

/// Applies an optional converted value to a field; false if conversion failed.
pub fn set<T>(field: &mut T, converted: Option<Option<T>>) -> bool {
    match converted {
        None => true,
        Some(Some(v)) => {
            *field = v;
            true
        }
        Some(None) => false,
    }
}

/// Reports every key of `t` not in `allowed`, with a suggestion when one is close.
pub fn check_keys(ctx: &mut Ctx<'_>, t: &DeTable<'_>, allowed: &[&str], section: &str) {
    // Tables are stored sorted by key; report in file order.
    let mut keys: Vec<_> = t.keys().collect();
    keys.sort_by_key(|k| k.span().start);
    for key in keys {
        let k = key.get_ref().as_ref();
        if allowed.contains(&k) {
            continue;
        }
        let suggestion = allowed
            .iter()
            .map(|a| (edit_distance(k, a), *a))
            .filter(|(d, _)| *d <= 2)
            .min()
            .map(|(_, a)| format!(" (did you mean `{a}`?)"))
            .unwrap_or_default();
        ctx.error(
            key.span(),
            format!(
                "unknown key {} in {section}{suggestion}; allowed keys: {}",
                quote(k),
                allowed.join(", ")
            ),
        );
    }
}

pub fn required<'t, 'i>(
    ctx: &mut Ctx<'_>,
    parent: &Value<'_>,
    t: &'t DeTable<'i>,
    key: &str,
    section: &str,
) -> Option<&'t Value<'i>> {
    let v = t.get(key);
    if v.is_none() {
        ctx.error(
            parent.span(),
            format!("`{section}` is missing the required key `{key}`"),
        );
    }
    v
}

pub fn mismatch(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str, expected: &str) {
    ctx.error(
        v.span(),
        format!(
            "`{what}` must be {expected}, found {}",
            v.get_ref().type_str()
        ),
    );
}

pub fn table<'t, 'i>(ctx: &mut Ctx<'_>, v: &'t Value<'i>, what: &str) -> Option<&'t DeTable<'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(t),
        _ => {
            mismatch(ctx, v, what, "a table");
            None
        }
    }
}

pub fn string<'t>(ctx: &mut Ctx<'_>, v: &'t Value<'_>, what: &str) -> Option<&'t str> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        _ => {
            mismatch(ctx, v, what, "a string");
            None
        }
    }
}

pub fn boolean(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<bool> {
    match v.get_ref() {
        DeValue::Boolean(b) => Some(*b),
        _ => {
            mismatch(ctx, v, what, "true or false");
            None
        }
    }
}

pub fn integer(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str, min: u64, max: u64) -> Option<u64> {
    let DeValue::Integer(i) = v.get_ref() else {
        mismatch(ctx, v, what, "an integer");
        return None;
    };
    let n = i128::from_str_radix(i.as_str(), i.radix()).ok();
    match n {
        Some(n) if n >= i128::from(min) && n <= i128::from(max) => u64::try_from(n).ok(),
        _ => {
            let shown = n.map_or_else(
                || "a number too large to represent".to_string(),
                |n| n.to_string(),
            );
            ctx.error(
                v.span(),
                format!("`{what}` must be between {min} and {max}, got {shown}"),
            );
            None
        }
    }
}

pub fn integer_u32(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str, min: u32) -> Option<u32> {
    integer(ctx, v, what, u64::from(min), u64::from(u32::MAX)).and_then(|n| u32::try_from(n).ok())
}

pub fn choice<T: Copy>(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    what: &str,
    options: &[(&str, T)],
) -> Option<T> {
    let allowed = || {
        options
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let DeValue::String(s) = v.get_ref() else {
        mismatch(ctx, v, what, &format!("one of the strings {}", allowed()));
        return None;
    };
    match options.iter().find(|(n, _)| *n == s.as_ref()) {
        Some((_, t)) => Some(*t),
        None => {
            ctx.error(
                v.span(),
                format!(
                    "`{what}`: unknown value {}; allowed: {}",
                    quote(s),
                    allowed()
                ),
            );
            None
        }
    }
}

pub fn duration(
    ctx: &mut Ctx<'_>,
    v: &Value<'_>,
    what: &str,
    allow_zero: bool,
) -> Option<Duration> {
    let s = match v.get_ref() {
        DeValue::String(s) => s.as_ref(),
        DeValue::Integer(i) => {
            ctx.error(
                v.span(),
                format!(
                    "`{what}`: a duration needs a unit: write \"{}s\" or \"{}ms\"",
                    i.as_str(),
                    i.as_str()
                ),
            );
            return None;
        }
        _ => {
            mismatch(
                ctx,
                v,
                what,
                "a duration string like \"500ms\", \"2s\", \"1m\" or \"1h\"",
            );
            return None;
        }
    };
    match parse_duration(s) {
        Ok(d) if d.is_zero() && !allow_zero => {
            ctx.error(v.span(), format!("`{what}` must be greater than zero"));
            None
        }
        Ok(d) => Some(d),
        Err(reason) => {
            ctx.error(v.span(), format!("`{what}`: {}: {reason}", quote(s)));
            None
        }
    }
}

/// Parses `<digits><unit>` with unit `ms`, `s`, `m` or `h`, at most [`MAX_DURATION`].
fn parse_duration(s: &str) -> Result<Duration, String> {
    let usage = "expected a whole number and a unit (ms, s, m, h), e.g. \"500ms\", \"2s\", \"1m\"";
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(usage.to_string());
    }
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("missing unit; {usage}")),
        _ => return Err(format!("unknown unit {}; {usage}", quote(unit))),
    };
    let limit = u64::try_from(MAX_DURATION.as_millis()).unwrap_or(u64::MAX);
    let too_long = || {
        format!(
            "longer than the maximum of {}h",
            MAX_DURATION.as_secs() / 3600
        )
    };
    let n: u64 = digits.parse().map_err(|_| too_long())?;
    let millis = n
        .checked_mul(millis_per_unit)
        .filter(|&m| m <= limit)
        .ok_or_else(too_long)?;
    Ok(Duration::from_millis(millis))
}

pub fn socket_addr(ctx: &mut Ctx<'_>, v: &Value<'_>, what: &str) -> Option<SocketAddr> {
    let s = string(ctx, v, what)?;
    match parse_socket_addr(s) {
        Ok(a) => Some(a),
        Err(reason) => {
            ctx.error(
                v.span(),
                format!("`{what}`: invalid address {}: {reason}", quote(s)),
            );
            None
        }
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err("port 0 is not allowed".to_string());
        }
        return Ok(a);
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err("missing port; write IP:PORT, with IPv6 as [ADDR]:PORT".to_string());
    }
    if let Some((host, port)) = s.rsplit_once(':') {
        if host.contains(':') && !host.starts_with('[') {
            return Err("IPv6 addresses must be bracketed, as in [2001:db8::1]:993".to_string());
        }
        let host_ip = host.trim_start_matches('[').trim_end_matches(']');
        if host_ip.parse::<IpAddr>().is_ok() {
            return Err(format!("bad port {}; expected 1..=65535", quote(port)));
        }
        return Err(
            "expected an IP address and port (host names are not resolved), e.g. \
             \"192.0.2.1:993\" or \"[2001:db8::1]:993\""
                .to_string(),
        );
    }
    Err("expected IP:PORT, e.g. \"192.0.2.1:993\" or \"[2001:db8::1]:993\"".to_string())
}

#[derive(Clone, Copy)]
pub enum NameKind {
    /// Pool and listener names: `A-Z a-z 0-9 _ . -`, at most 64.
    Simple,
    /// Backend names also allow `: [ ] @ %` so that addresses are valid names; at most 128.
    Backend,
}

pub fn check_name(ctx: &mut Ctx<'_>, span: Span, name: &str, what: &str, kind: NameKind) -> bool {
    let (max, extra): (usize, &str) = match kind {
        NameKind::Simple => (64, "_.-"),
        NameKind::Backend => (128, "_.-:[]@%"),
    };
    let good = !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    if !good {
        ctx.error(
            span,
            format!(
                "`{what}`: invalid name {}; use 1..={max} characters from A-Z a-z 0-9 {}",
                quote(name),
                extra
                    .chars()
                    .map(String::from)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    }
    good
}

fn valid_ehlo_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

fn valid_server_name(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Quotes user text for an error message, escaping control characters and shortening very long
/// strings so a hostile file cannot produce unreadable or enormous messages.
pub fn quote(s: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Levenshtein distance, for "did you mean" hints (keys are short; inputs are capped).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(64).collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}
