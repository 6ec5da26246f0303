//! Tests for the configuration front end: the accepted schema and its defaults, every error kind
//! with its position, several errors at once, the shipped example files and hostile input.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::balance::Algorithm;
use crate::health::CheckKind;
use crate::proxy_protocol::Version as ProxyVersion;

const FILE: &str = "test.toml";

/// One listener, one pool, one backend: the smallest valid file.
const MINIMAL: &str = r#"
[[listener]]
bind = "127.0.0.1:1000"
pool = "p"

[pool.p]
backends = ["127.0.0.1:2000"]
"#;

fn ok(text: &str) -> LbConfig {
    match load_str(text, FILE) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn errs(text: &str) -> Vec<ConfigError> {
    match load_str(text, FILE) {
        Ok(c) => panic!("expected errors, got a config: {c:?}"),
        Err(e) => {
            assert!(!e.0.is_empty(), "Err with no errors");
            for err in &e.0 {
                assert_eq!(err.file, FILE);
                assert!(err.line >= 1 && err.column >= 1, "bad position in {err}");
            }
            e.0
        }
    }
}

/// Asserts that some error is on `line` and mentions every needle.
#[track_caller]
fn has(errors: &[ConfigError], line: usize, needles: &[&str]) {
    let found = errors
        .iter()
        .any(|e| e.line == line && needles.iter().all(|n| e.message.contains(n)));
    assert!(
        found,
        "no error on line {line} containing {needles:?}; got:\n{}",
        show(errors)
    );
}

fn show(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("{e}\n")).collect()
}

/// A valid file with `extra` inserted into the `[pool.p]` table (line 7 onwards).
fn with_pool(extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:1000\"\npool = \"p\"\n\n[pool.p]\nbackends = [\"127.0.0.1:2000\"]\n{extra}\n"
    )
}

/// A valid file with `extra` as the body of `[global]` (line 2 onwards).
fn with_global(extra: &str) -> String {
    format!("[global]\n{extra}\n{MINIMAL}")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Accepted input and defaults
// ---------------------------------------------------------------------------------------------

#[test]
fn minimal_file_gets_model_defaults() {
    let c = ok(MINIMAL);
    assert_eq!(c.global, Global::default());
    assert_eq!(
        c.pools,
        vec![Pool::quick("p", vec![addr("127.0.0.1:2000")])]
    );
    assert_eq!(
        c.listeners,
        vec![Listener {
            name: "127.0.0.1:1000".into(),
            bind: addr("127.0.0.1:1000"),
            pool: 0
        }]
    );
    assert_eq!(c.pools[0].health, HealthCheck::default());
}

#[test]
fn full_schema_is_parsed() {
    let text = r#"
[global]
workers = 2
pin_workers = false
engine = "uring"
relay = "splice"
maxconn = 5000
drain_timeout = "0s"
admin = "127.0.0.1:9100"
source_rate = { max = 100, period = "10s" }

[[listener]]
name = "imaps"
bind = "192.0.2.1:993"
pool = "imap"

[[listener]]
name = "smtp"
bind = "192.0.2.2:587"
pool = "msa"

[pool.imap]
algorithm = "source"
proxy_protocol = "v2"
connect_timeout = "250ms"
idle_timeout = "1h"
connect_retries = 0
health = { check = "tls", interval = "2s", timeout = "2s", rise = 5, fall = 1, ehlo_name = "lb.example.com", tls_server_name = "imap.example.com" }
backends = [ { addr = "10.0.0.11:993", weight = 256, maxconn = 5000, name = "mda-a1" }, "10.0.0.12:993" ]

[pool.msa]
algorithm = "weighted"
proxy_protocol = "v1"
backends = ["10.0.0.21:587"]
[pool.msa.health]
check = "smtp-starttls"
"#;
    let c = ok(text);
    let g = &c.global;
    assert_eq!(g.workers, Some(2));
    assert!(!g.pin_workers);
    assert_eq!(g.engine, EngineChoice::Uring);
    assert_eq!(g.relay, RelayMode::Splice);
    assert_eq!(g.maxconn, 5000);
    assert_eq!(g.drain_timeout, Duration::ZERO);
    assert_eq!(g.admin, Some(addr("127.0.0.1:9100")));
    assert_eq!(
        g.source_rate,
        Some(SourceRate {
            max: 100,
            period: Duration::from_secs(10)
        })
    );

    // Pools keep file order; listeners point at them by index.
    assert_eq!(
        c.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["imap", "msa"]
    );
    assert_eq!(c.listeners[0].pool, 0);
    assert_eq!(c.listeners[1].pool, 1);
    assert_eq!(c.listeners[1].name, "smtp");

    let imap = &c.pools[0];
    assert_eq!(imap.algorithm, Algorithm::SourceHash);
    assert_eq!(imap.proxy_protocol, Some(ProxyVersion::V2));
    assert_eq!(imap.connect_timeout, Duration::from_millis(250));
    assert_eq!(imap.idle_timeout, Duration::from_secs(3600));
    assert_eq!(imap.connect_retries, 0);
    assert_eq!(
        imap.health,
        HealthCheck {
            kind: CheckKind::Tls,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            rise: 5,
            fall: 1,
            ehlo_name: "lb.example.com".into(),
            tls_server_name: Some("imap.example.com".into()),
        }
    );
    assert_eq!(
        imap.backends,
        vec![
            Backend {
                name: "mda-a1".into(),
                addr: addr("10.0.0.11:993"),
                weight: 256,
                maxconn: Some(5000)
            },
            Backend {
                name: "10.0.0.12:993".into(),
                addr: addr("10.0.0.12:993"),
                weight: 1,
                maxconn: None
            },
        ]
    );
    let msa = &c.pools[1];
    assert_eq!(msa.algorithm, Algorithm::Weighted);
    assert_eq!(msa.proxy_protocol, Some(ProxyVersion::V1));
    assert_eq!(msa.health.kind, CheckKind::SmtpStarttls);
    assert_eq!(msa.health.interval, HealthCheck::default().interval);
}

#[test]
fn every_enumerated_value_is_accepted() {
    for (word, want) in [
        ("leastconn", Algorithm::LeastConn),
        ("roundrobin", Algorithm::RoundRobin),
        ("weighted", Algorithm::Weighted),
        ("source", Algorithm::SourceHash),
    ] {
        assert_eq!(
            ok(&with_pool(&format!("algorithm = \"{word}\""))).pools[0].algorithm,
            want
        );
    }
    for (word, want) in [
        ("tcp", CheckKind::Tcp),
        ("smtp", CheckKind::Smtp),
        ("smtp-starttls", CheckKind::SmtpStarttls),
        ("imap", CheckKind::Imap),
        ("tls", CheckKind::Tls),
    ] {
        let c = ok(&with_pool(&format!("health = {{ check = \"{word}\" }}")));
        assert_eq!(c.pools[0].health.kind, want);
    }
    for (word, want) in [
        ("auto", EngineChoice::Auto),
        ("uring", EngineChoice::Uring),
        ("epoll", EngineChoice::Epoll),
    ] {
        assert_eq!(
            ok(&with_global(&format!("engine = \"{word}\"")))
                .global
                .engine,
            want
        );
    }
    for (word, want) in [
        ("buffered", RelayMode::Buffered),
        ("splice", RelayMode::Splice),
    ] {
        assert_eq!(
            ok(&with_global(&format!("relay = \"{word}\"")))
                .global
                .relay,
            want
        );
    }
    assert_eq!(
        ok(&with_pool("proxy_protocol = \"none\"")).pools[0].proxy_protocol,
        None
    );
}

#[test]
fn ipv6_binds_and_backends() {
    let text = r#"
[[listener]]
bind = "[2001:db8::1]:993"
pool = "p"
[[listener]]
bind = "[::1]:10993"
pool = "p"
[pool.p]
backends = ["[2001:db8::11]:993", { addr = "[2001:db8::12]:993", weight = 2 }, "192.0.2.13:993"]
"#;
    let c = ok(text);
    assert_eq!(c.listeners[0].bind, addr("[2001:db8::1]:993"));
    assert_eq!(c.listeners[0].name, "[2001:db8::1]:993");
    assert_eq!(c.listeners[1].bind, addr("[::1]:10993"));
    let b = &c.pools[0].backends;
    assert_eq!(b[0].addr, addr("[2001:db8::11]:993"));
    assert_eq!(b[0].name, "[2001:db8::11]:993");
    assert_eq!(b[1].weight, 2);
    assert_eq!(b[2].addr, addr("192.0.2.13:993"));
}

#[test]
fn durations_with_units() {
    for (text, want) in [
        ("500ms", Duration::from_millis(500)),
        ("2s", Duration::from_secs(2)),
        ("1m", Duration::from_secs(60)),
        ("1h", Duration::from_secs(3600)),
        ("168h", Duration::from_secs(168 * 3600)),
        ("0s", Duration::ZERO),
        ("007s", Duration::from_secs(7)),
    ] {
        let c = ok(&with_global(&format!("drain_timeout = \"{text}\"")));
        assert_eq!(c.global.drain_timeout, want, "{text}");
    }
}

#[test]
fn example_configs_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("dataplane/configs exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = load_file(&path) {
                panic!("{} does not validate:\n{e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "expected lb.toml, lb-loopback.toml and announce-kernel-table.toml, found {seen} files"
    );
}

#[test]
fn example_lb_toml_has_the_anycast_vips() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/lb.toml");
    let c = load_file(&path).unwrap();
    let binds: Vec<SocketAddr> = c.listeners.iter().map(|l| l.bind).collect();
    for want in [
        "192.0.2.1:993",
        "[2001:db8::1]:993",
        "192.0.2.2:587",
        "[2001:db8::2]:587",
    ] {
        assert!(binds.contains(&addr(want)), "{want} missing");
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: syntax and structure
// ---------------------------------------------------------------------------------------------

#[test]
fn syntax_error_has_its_line() {
    let e = errs("[global]\nmaxconn = 10\nengine = \n");
    has(&e, 3, &["TOML syntax error"]);
    let e = errs("[[listener]]\nbind = \"127.0.0.1:1\"\n[pool.p\n");
    has(&e, 3, &["TOML syntax error"]);
}

#[test]
fn duplicate_pool_tables_are_rejected() {
    let text = format!("{MINIMAL}\n[pool.p]\nbackends = [\"127.0.0.1:3000\"]\n");
    let e = errs(&text);
    assert!(
        e.iter().all(|e| e.message.contains("TOML syntax error")),
        "{}",
        show(&e)
    );
    has(&e, 9, &["duplicate key \"p\""]);
}

#[test]
fn duplicate_keys_are_rejected() {
    let e = errs(&with_global("maxconn = 1\nmaxconn = 2"));
    has(&e, 3, &["TOML syntax error"]);
}

#[test]
fn unknown_keys_at_every_level() {
    let text = r#"
colour = "blue"
[global]
wokers = 2
source_rate = { max = 1, period = "1s", burst = 5 }
[[listener]]
bind = "127.0.0.1:1000"
pool = "p"
port = 5
[pool.p]
algo = "leastconn"
health = { check = "tcp", intervall = "2s" }
backends = [{ addr = "127.0.0.1:2000", wieght = 2 }]
"#;
    let e = errs(text);
    has(
        &e,
        2,
        &[
            "unknown key \"colour\"",
            "the top level",
            "global, listener, pool",
        ],
    );
    has(
        &e,
        4,
        &[
            "\"wokers\"",
            "[global]",
            "did you mean `workers`",
            "pin_workers",
        ],
    );
    has(&e, 5, &["\"burst\"", "max, period"]);
    has(&e, 9, &["\"port\"", "[[listener]] #1", "name, bind, pool"]);
    has(&e, 11, &["\"algo\"", "[pool.p]", "algorithm"]);
    has(
        &e,
        12,
        &[
            "\"intervall\"",
            "did you mean `interval`",
            "tls_server_name",
        ],
    );
    has(
        &e,
        13,
        &[
            "\"wieght\"",
            "did you mean `weight`",
            "addr, weight, maxconn, name",
        ],
    );
    assert_eq!(e.len(), 7, "{}", show(&e));
    // Columns point at the key itself.
    let wokers = e.iter().find(|e| e.line == 4).unwrap();
    assert_eq!(wokers.column, 1);
    let burst = e.iter().find(|e| e.line == 5).unwrap();
    assert_eq!(burst.column, 41);
}

#[test]
fn wrong_shapes_get_hints() {
    let e = errs(
        "[listener]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
    );
    has(&e, 1, &["write [[listener]]"]);
    let e = errs("[[listener]]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\n");
    has(&e, 4, &["write [pool.NAME]"]);
    let e = errs("global = 5\nlistener = \"x\"\npool = []\n");
    has(&e, 1, &["`global` must be a table, found integer"]);
    has(
        &e,
        2,
        &["`listener` must be an array of tables, found string"],
    );
    has(&e, 3, &["`pool` must be a table of named pools"]);
    let e = errs("[[listener]]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pool]\np = 5\n");
    has(&e, 5, &["`pool.p` must be a table"]);
    let e = errs("listener = [1]\n");
    has(&e, 1, &["`listener[0]` must be a table"]);
}

#[test]
fn no_listeners_is_an_error() {
    let e = errs("[pool.p]\nbackends = [\"127.0.0.1:2\"]\n");
    has(&e, 1, &["no listeners"]);
    let e = errs("listener = []\n[pool.p]\nbackends = [\"127.0.0.1:2\"]\n");
    has(&e, 1, &["no listeners"]);
}

#[test]
fn missing_required_keys() {
    let e = errs("[[listener]]\nname = \"x\"\n[pool.p]\nbackends = [\"127.0.0.1:2\"]\n");
    has(&e, 1, &["missing the required key `bind`"]);
    has(&e, 1, &["missing the required key `pool`"]);
    let e = errs(&with_global("source_rate = { max = 5 }"));
    has(&e, 2, &["missing the required key `period`"]);
    let e = errs(&with_pool("").replace(
        "backends = [\"127.0.0.1:2000\"]",
        "backends = [{ weight = 2 }]",
    ));
    has(
        &e,
        6,
        &["`pool.p.backends[0]` is missing the required key `addr`"],
    );
}

// ---------------------------------------------------------------------------------------------
// Errors: values
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_addresses() {
    let cases = [
        ("mail.example.com:993", "host names are not resolved"),
        ("192.0.2.1", "missing port"),
        ("2001:db8::1", "missing port"),
        ("2001:db8::1:993x", "must be bracketed"),
        ("192.0.2.1:0", "port 0 is not allowed"),
        ("192.0.2.1:70000", "bad port \"70000\""),
        ("[2001:db8::1]:x", "bad port"),
        ("", "expected IP:PORT"),
        ("999.0.0.1:1", "host names are not resolved"),
    ];
    for (bad, why) in cases {
        let text = MINIMAL.replace("127.0.0.1:1000", bad);
        let e = errs(&text);
        has(&e, 3, &["`listener[0].bind`: invalid address", why]);
    }
    let e = errs(&with_global("admin = \"localhost:9100\""));
    has(
        &e,
        2,
        &["`global.admin`: invalid address \"localhost:9100\""],
    );
    let e = errs(&with_global("admin = 9100"));
    has(&e, 2, &["`global.admin` must be a string, found integer"]);
}

#[test]
fn backends_must_be_connectable() {
    for bad in ["0.0.0.0:25", "[::]:25", "224.0.0.1:25", "127.0.0.1:0"] {
        let e = errs(&MINIMAL.replace("127.0.0.1:2000", bad));
        has(&e, 7, &["`pool.p.backends[0]"]);
    }
}

#[test]
fn duplicate_listener_bind_and_name() {
    let text = r#"
[[listener]]
name = "a"
bind = "127.0.0.1:1000"
pool = "p"
[[listener]]
name = "b"
bind = "127.0.0.1:1000"
pool = "p"
[[listener]]
name = "a"
bind = "127.0.0.1:1001"
pool = "p"
[pool.p]
backends = ["127.0.0.1:2000"]
"#;
    let e = errs(text);
    has(
        &e,
        8,
        &["127.0.0.1:1000 is already bound by listener `a` (line 4)"],
    );
    has(&e, 11, &["listener name `a` is already used (line 3)"]);
    assert_eq!(e.len(), 2, "{}", show(&e));
}

#[test]
fn listener_naming_an_unknown_pool() {
    let text = MINIMAL.replace("pool = \"p\"", "pool = \"imap\"");
    let e = errs(&text);
    has(&e, 4, &["unknown pool \"imap\"", "defined pools: p"]);
    assert_eq!(e[0].column, 8);
    let e = errs("[[listener]]\nbind = \"127.0.0.1:1\"\npool = \"x\"\n");
    has(&e, 3, &["no pools are defined"]);
}

#[test]
fn backend_duplicates_within_a_pool() {
    let text = with_pool("").replace(
        "backends = [\"127.0.0.1:2000\"]",
        "backends = [\n  \"127.0.0.1:2000\",\n  { addr = \"127.0.0.1:2000\", name = \"x\" },\n  { addr = \"127.0.0.1:2001\", name = \"127.0.0.1:2000\" },\n]",
    );
    let e = errs(&text);
    has(
        &e,
        8,
        &["backend 127.0.0.1:2000 is listed twice in `pool.p` (first on line 7)"],
    );
    has(&e, 9, &["backend name `127.0.0.1:2000` is used twice"]);
    // The same address in two different pools is fine.
    let two = format!("{MINIMAL}\n[pool.q]\nbackends = [\"127.0.0.1:2000\"]\n");
    assert_eq!(ok(&two).pools.len(), 2);
}

#[test]
fn pool_without_backends() {
    let e = errs(
        "[[listener]]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pool.p]\nalgorithm = \"leastconn\"\n",
    );
    has(&e, 4, &["pool `p` has no `backends`"]);
    let e = errs(&MINIMAL.replace("[\"127.0.0.1:2000\"]", "[]"));
    has(&e, 7, &["`pool.p.backends` is empty"]);
    let e = errs(&MINIMAL.replace("[\"127.0.0.1:2000\"]", "\"127.0.0.1:2000\""));
    has(&e, 7, &["`pool.p.backends` must be an array"]);
    let e = errs(&MINIMAL.replace("[\"127.0.0.1:2000\"]", "[2000]"));
    has(
        &e,
        7,
        &["a backend is an \"IP:PORT\" string or a { addr = ... } table, found integer"],
    );
}

#[test]
fn numeric_bounds() {
    let backend = |extra: &str| {
        MINIMAL.replace(
            "[\"127.0.0.1:2000\"]",
            &format!("[{{ addr = \"127.0.0.1:2000\", {extra} }}]"),
        )
    };
    has(
        &errs(&backend("weight = 0")),
        7,
        &["`pool.p.backends[0].weight` must be between 1 and 256, got 0"],
    );
    has(
        &errs(&backend("weight = 257")),
        7,
        &["between 1 and 256, got 257"],
    );
    has(&errs(&backend("weight = -1")), 7, &["got -1"]);
    has(
        &errs(&backend("maxconn = 0")),
        7,
        &["`pool.p.backends[0].maxconn` must be between 1 and"],
    );
    has(
        &errs(&backend("name = \"has space\"")),
        7,
        &["invalid name \"has space\""],
    );
    has(
        &errs(&with_pool("health = { rise = 0 }")),
        7,
        &["`pool.p.health.rise` must be between 1"],
    );
    has(
        &errs(&with_pool("health = { fall = 0 }")),
        7,
        &["`pool.p.health.fall` must be between 1"],
    );
    has(
        &errs(&with_pool("connect_retries = -1")),
        7,
        &["`pool.p.connect_retries`"],
    );
    has(
        &errs(&with_global("maxconn = 0")),
        2,
        &["`global.maxconn` must be between 1 and 4294967295, got 0"],
    );
    has(
        &errs(&with_global("maxconn = 4294967296")),
        2,
        &["got 4294967296"],
    );
    has(
        &errs(&with_global("workers = 0")),
        2,
        &["`global.workers` must be between 1 and 4096"],
    );
    has(
        &errs(&with_global("source_rate = { max = 0, period = \"1s\" }")),
        2,
        &["`global.source_rate.max`"],
    );
    has(
        &errs(&with_global("maxconn = 1.5")),
        2,
        &["must be an integer, found float"],
    );
    has(
        &errs(&with_global("maxconn = \"10\"")),
        2,
        &["must be an integer, found string"],
    );
    has(
        &errs(&with_global("pin_workers = \"yes\"")),
        2,
        &["must be true or false, found string"],
    );
}

#[test]
fn health_timeout_longer_than_interval() {
    let e = errs(&with_pool(
        "health = { interval = \"1s\", timeout = \"2s\" }",
    ));
    has(
        &e,
        7,
        &["`pool.p.health.timeout` (2s) is longer than `pool.p.health.interval` (1s)"],
    );
    // Only the interval given: the default 1s timeout exceeds it; the error points at interval.
    let e = errs(&with_pool("[pool.p.health]\ninterval = \"500ms\""));
    has(
        &e,
        8,
        &["the default `pool.p.health.timeout` (1s) is longer than"],
    );
    // Equal is fine.
    ok(&with_pool(
        "health = { interval = \"1s\", timeout = \"1s\" }",
    ));
}

#[test]
fn unknown_enumerated_values_list_the_allowed_ones() {
    has(
        &errs(&with_pool("algorithm = \"random\"")),
        7,
        &[
            "unknown value \"random\"",
            "leastconn | roundrobin | weighted | source",
        ],
    );
    has(
        &errs(&with_pool("proxy_protocol = \"v3\"")),
        7,
        &["\"v3\"", "v1 | v2 | none"],
    );
    has(
        &errs(&with_pool("proxy_protocol = 2")),
        7,
        &["one of the strings v1 | v2 | none, found integer"],
    );
    has(
        &errs(&with_pool("health = { check = \"http\" }")),
        7,
        &["\"http\"", "tcp | smtp | smtp-starttls | imap | tls"],
    );
    has(
        &errs(&with_global("engine = \"io_uring\"")),
        2,
        &["\"io_uring\"", "auto | uring | epoll"],
    );
    has(
        &errs(&with_global("relay = \"zerocopy\"")),
        2,
        &["\"zerocopy\"", "buffered | splice"],
    );
    // Matching is exact: no case folding.
    has(
        &errs(&with_pool("algorithm = \"LeastConn\"")),
        7,
        &["unknown value"],
    );
}

#[test]
fn bad_durations() {
    let cases = [
        ("\"1.5s\"", "unknown unit \".5s\""),
        ("\"2 s\"", "unknown unit \" s\""),
        ("\"s\"", "expected a whole number and a unit"),
        ("\"10\"", "missing unit"),
        ("\"-1s\"", "expected a whole number"),
        ("\"1d\"", "unknown unit \"d\""),
        ("\"169h\"", "longer than the maximum of 168h"),
        ("\"99999999999999999999999h\"", "longer than the maximum"),
        ("\"18446744073709551615h\"", "longer than the maximum"),
        ("\"\"", "expected a whole number"),
        ("10", "a duration needs a unit: write \"10s\" or \"10ms\""),
        ("true", "must be a duration string"),
    ];
    for (bad, why) in cases {
        let e = errs(&with_pool(&format!("connect_timeout = {bad}")));
        has(&e, 7, &["`pool.p.connect_timeout`", why]);
    }
    for key in ["connect_timeout", "idle_timeout"] {
        has(
            &errs(&with_pool(&format!("{key} = \"0ms\""))),
            7,
            &["must be greater than zero"],
        );
    }
    has(
        &errs(&with_pool("health = { interval = \"0s\" }")),
        7,
        &["greater than zero"],
    );
    has(
        &errs(&with_global("source_rate = { max = 1, period = \"0s\" }")),
        2,
        &["greater than zero"],
    );
}

#[test]
fn names_are_checked() {
    let e = errs(
        &MINIMAL
            .replace("[pool.p]", "[pool.\"has space\"]")
            .replace("pool = \"p\"", "pool = \"has space\""),
    );
    has(&e, 6, &["`pool name`: invalid name \"has space\""]);
    // A bad pool name must not also produce an "unknown pool" error.
    assert_eq!(e.len(), 1, "{}", show(&e));
    let e = errs(&MINIMAL.replace("bind =", "name = \"\"\nbind ="));
    has(&e, 3, &["`listener[0].name`: invalid name \"\""]);
    has(
        &errs(&with_pool("health = { ehlo_name = \"a b\" }")),
        7,
        &["not a usable EHLO name"],
    );
    has(
        &errs(&with_pool(
            "health = { tls_server_name = \"-bad-.example\" }",
        )),
        7,
        &["neither a DNS name nor an IP address"],
    );
    has(
        &errs(&with_pool("health = { tls_server_name = \"a..b\" }")),
        7,
        &["neither a DNS name"],
    );
    let c = ok(&with_pool("health = { tls_server_name = \"192.0.2.1\" }"));
    assert_eq!(
        c.pools[0].health.tls_server_name.as_deref(),
        Some("192.0.2.1")
    );
}

#[test]
fn admin_must_not_clash_with_a_listener() {
    let e = errs(&with_global("admin = \"127.0.0.1:1000\""));
    has(
        &e,
        2,
        &["`global.admin` 127.0.0.1:1000 is also the bind address of listener"],
    );
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

#[test]
fn all_errors_are_reported_together_in_file_order() {
    let text = r#"[global]
maxconn = 0
engine = "fast"

[[listener]]
bind = "127.0.0.1"
pool = "nope"

[pool.p]
algorithm = "random"
health = { rise = 0, timeout = "5s" }
backends = [{ addr = "127.0.0.1:2000", weight = 0 }, "127.0.0.1:2000"]
"#;
    let e = errs(text);
    has(&e, 2, &["global.maxconn"]);
    has(&e, 3, &["global.engine"]);
    has(&e, 6, &["missing port"]);
    has(&e, 7, &["unknown pool \"nope\""]);
    has(&e, 10, &["pool.p.algorithm"]);
    has(&e, 11, &["pool.p.health.rise"]);
    has(&e, 12, &["pool.p.backends[0].weight"]);
    assert_eq!(e.len(), 7, "{}", show(&e));
    let positions: Vec<(usize, usize)> = e.iter().map(|e| (e.line, e.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
    // Display is file:line:column: message, one per line.
    let rendered = ConfigErrors(e.clone()).to_string();
    assert!(
        rendered.starts_with("test.toml:2:11: `global.maxconn`"),
        "{rendered}"
    );
    assert_eq!(rendered.lines().count(), 7);
}

#[test]
fn columns_count_characters() {
    let e = errs(&with_global("# ünïcødé\nengine   =   \"ü\""));
    let err = e
        .iter()
        .find(|e| e.message.contains("global.engine"))
        .unwrap();
    assert_eq!((err.line, err.column), (3, 14));
    let e = errs("[global]\nx = \"é\" ; y = 1\n");
    assert!(e.iter().all(|e| e.line == 2), "{}", show(&e));
}

#[test]
fn error_count_is_capped() {
    let mut text = String::from("[global]\n");
    for i in 0..500 {
        text.push_str(&format!("junk{i} = {i}\n"));
    }
    let e = errs(&text);
    assert_eq!(e.len(), parse::MAX_ERRORS + 1);
    assert!(e.last().unwrap().message.contains("more errors not shown"));
}

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_and_blank_input() {
    for text in ["", "   ", "\n\n\n", "# only a comment\n"] {
        has(&errs(text), 1, &["no listeners"]);
    }
}

#[test]
fn huge_numbers() {
    let e = errs(&with_global(
        "maxconn = 99999999999999999999999999999999999999999999",
    ));
    assert!(!e.is_empty());
    let e = errs(&with_global("maxconn = 9223372036854775807"));
    has(&e, 2, &["got 9223372036854775807"]);
    let e = errs(&with_global("maxconn = -9223372036854775808"));
    has(&e, 2, &["got -9223372036854775808"]);
    let e = errs(&with_global("workers = 0xffffffffffff"));
    has(&e, 2, &["global.workers"]);
    let e = errs(&with_global("maxconn = inf"));
    has(&e, 2, &["must be an integer, found float"]);
}

#[test]
fn deeply_nested_junk() {
    for depth in [100, 10_000, 200_000] {
        let arrays = format!(
            "{MINIMAL}junk = {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let _ = load_str(&arrays, FILE);
        let tables = format!(
            "{MINIMAL}junk = {}{}\n",
            "{a=".repeat(depth),
            "}".repeat(depth)
        );
        let _ = load_str(&tables, FILE);
        let dotted = format!("{}=1\n", vec!["a"; depth].join("."));
        assert!(load_str(&dotted, FILE).is_err());
    }
    let e = errs(&format!("{MINIMAL}junk = [[[[1]]]]\n"));
    has(&e, 8, &["unknown key \"junk\""]);
}

#[test]
fn nul_and_control_characters() {
    let e = errs(&with_global("engine = \"auto\\u0000\""));
    has(&e, 2, &["unknown value \"auto\\0\""]);
    let e = errs(&with_global("\"a\\u0000b\" = 1"));
    has(&e, 2, &["unknown key \"a\\0b\""]);
    let e = errs(&MINIMAL.replace("127.0.0.1:1000", "127.0.0.1:1000\\u0000"));
    has(&e, 3, &["invalid address"]);
    // A raw NUL byte is a syntax error, not a crash.
    let e = errs("[global]\nengine = \"a\0\"\n");
    has(&e, 2, &["TOML syntax error"]);
    let e = errs("\0");
    assert_eq!(e[0].line, 1);
}

#[test]
fn very_long_strings_are_shortened_in_messages() {
    let long = "x".repeat(1 << 20);
    let e = errs(&with_global(&format!("engine = \"{long}\"")));
    assert!(
        e[0].message.len() < 300,
        "message is {} bytes",
        e[0].message.len()
    );
    let e = errs(&with_global(&format!("{long} = 1")));
    assert!(e[0].message.len() < 400);
    let e = errs(&MINIMAL.replace("bind =", &format!("name = \"{long}\"\nbind =")));
    has(&e, 3, &["invalid name"]);
}

#[test]
fn arbitrary_junk_never_panics() {
    let samples = [
        "[[[",
        "]]]",
        "=",
        "a=",
        "=1",
        "[a]\n[a]",
        "[[a]]\n[a]",
        "a = {",
        "a = [1,",
        "\"",
        "'''",
        "a = 1979-05-27T07:32:00Z",
        "[global]\nadmin = 1979-05-27",
        "[pool.p]\nbackends = [[]]",
        "[pool.p]\nbackends = [{}]",
        "[pool.p.backends]",
        "[[pool.p.backends]]\naddr = \"1.2.3.4:5\"",
        "listener = [{}, {}, {}]",
        "[pool.\"\"]\nbackends = [\"1.2.3.4:5\"]",
        "\u{feff}[global]",
        "\r\n\r\n[global]\r\nfoo = 1\r\n",
        "[global]\nsource_rate = 5",
        "[global]\nsource_rate = {}",
    ];
    for s in samples {
        if let Err(e) = load_str(s, FILE) {
            assert!(
                e.0.iter().all(|e| e.line >= 1 && e.column >= 1),
                "{s:?}: {e}"
            );
        }
    }
    // Array-of-tables backends are accepted: TOML makes them the same as an inline array.
    let c = ok(
        "[[listener]]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool.p.backends]]\naddr = \"127.0.0.1:2\"\nweight = 3\n",
    );
    assert_eq!(c.pools[0].backends[0].weight, 3);
}

// ---------------------------------------------------------------------------------------------
// load_file
// ---------------------------------------------------------------------------------------------

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ringmail-cfg-test-{}-{tag}.toml",
        std::process::id()
    ))
}

#[test]
fn load_file_reads_and_reports_the_path() {
    let path = temp_path("valid");
    std::fs::write(&path, MINIMAL).unwrap();
    assert!(load_file(&path).is_ok());
    std::fs::write(&path, "[global]\nmaxconn = 0\n").unwrap();
    let e = load_file(&path).unwrap_err().0;
    assert!(
        e.iter()
            .any(|e| e.file == path.display().to_string() && e.line == 2)
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unreadable_files_are_line_zero() {
    let missing = temp_path("missing-does-not-exist");
    let e = load_file(&missing).unwrap_err().0;
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].column), (0, 0));
    assert!(e[0].message.contains("cannot open"), "{}", e[0]);

    let e = load_file(&std::env::temp_dir()).unwrap_err().0;
    assert_eq!(e[0].line, 0);
}

#[test]
fn non_utf8_file_points_at_the_bad_byte() {
    let path = temp_path("latin1");
    std::fs::write(&path, b"[global]\nengine = \"caf\xe9\"\n").unwrap();
    let e = load_file(&path).unwrap_err().0;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].column), (2, 14));
    assert!(e[0].message.contains("not valid UTF-8"));
}

#[test]
fn oversized_file_is_refused() {
    let path = temp_path("huge");
    let big = vec![b'#'; usize::try_from(parse::MAX_FILE_BYTES).unwrap() + 10];
    std::fs::write(&path, big).unwrap();
    let e = load_file(&path).unwrap_err().0;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(e[0].line, 0);
    assert!(e[0].message.contains("larger than"));
}

/// A cheap, deterministic stand-in for the fuzz target that runs with the unit tests: mutate the
/// example configuration (delete, duplicate, replace and insert characters, splice lines) and
/// check the fuzz invariants on every variant.
#[test]
fn mutated_examples_never_panic_and_always_have_positions() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/lb.toml");
    let base: Vec<char> = std::fs::read_to_string(path).unwrap().chars().collect();
    let alphabet: Vec<char> = "[]{}=\"',.#\n 0123456789abcxyz:_-\\\0é".chars().collect();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        usize::try_from(seed % n.max(1) as u64).unwrap()
    };
    for _ in 0..400 {
        let mut text = base.clone();
        for _ in 0..1 + next(6) {
            let at = next(text.len());
            match next(4) {
                0 => {
                    let len = next(40).min(text.len() - at);
                    text.drain(at..at + len);
                }
                1 => {
                    let len = next(80).min(text.len() - at);
                    let copy: Vec<char> = text[at..at + len].to_vec();
                    let to = next(text.len());
                    text.splice(to..to, copy);
                }
                2 => {
                    if at < text.len() {
                        text[at] = alphabet[next(alphabet.len())];
                    }
                }
                _ => text.insert(at, alphabet[next(alphabet.len())]),
            }
        }
        let text: String = text.into_iter().collect();
        match load_str(&text, FILE) {
            Ok(c) => assert!(c.listeners.iter().all(|l| l.pool < c.pools.len())),
            Err(e) => {
                let lines = text.split('\n').count();
                for err in &e.0 {
                    assert!(
                        err.line >= 1 && err.column >= 1 && err.line <= lines,
                        "{err}"
                    );
                }
            }
        }
    }
}

/// Many errors in a large file must not make reporting quadratic (positions are computed from a
/// line index and only for the errors actually reported).
#[test]
fn many_errors_in_a_large_file_stay_fast() {
    let started = std::time::Instant::now();
    let mut lines = String::from("[global]\n");
    while lines.len() < 3 * 1024 * 1024 {
        lines.push_str(&format!("k{} = 1\n", lines.len()));
    }
    let e = errs(&lines);
    assert_eq!(e.len(), parse::MAX_ERRORS + 1);
    // The earliest errors are the ones kept, wherever the walk found them.
    has(&e, 1, &["no listeners"]);
    assert!(
        e[1..].iter().all(|e| e.line >= 2 && e.line < 200),
        "{}",
        show(&e)
    );
    let mut long_line = String::from("[global]\nsource_rate = { max = 1, ");
    for i in 0..150_000 {
        long_line.push_str(&format!("k{i} = 1, "));
    }
    long_line.push_str("period = \"1s\" }\n");
    let e = errs(&long_line);
    assert_eq!(e.len(), parse::MAX_ERRORS + 1);
    has(&e, 1, &["no listeners"]);
    assert!(e[1..].iter().all(|e| e.line == 2), "{}", show(&e));
    assert!(
        e[parse::MAX_ERRORS]
            .message
            .contains("149901 more errors not shown")
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// [announce]
// ---------------------------------------------------------------------------------------------

const ANNOUNCE_BGP: &str = r#"
[[listener]]
bind = "192.0.2.1:993"
pool = "imap"

[[listener]]
bind = "[2001:db8::1]:993"
pool = "imap"

[pool.imap]
backends = ["10.0.0.11:993"]

[pool.other]
backends = ["10.0.0.12:993"]

[announce]
graceful_wait = "3s"
drain_prepend = 2

[[announce.vip]]
address = "192.0.2.1"

[[announce.vip]]
address = "2001:db8::1"
pools = ["imap", "other"]
min_healthy = 2

[announce.bgp]
local_as = 4200000001
router_id = "10.0.0.2"
hold_time = "0s"

[[announce.bgp.neighbor]]
address = "10.0.0.1"
remote_as = 65000
med = 5
communities = ["65000:1", "1:65535"]

[[announce.bgp.neighbor]]
address = "[2001:db8:ff::1]:1179"
remote_as = 4200000001
name = "ibgp"
local_address = "2001:db8:ff::2"
families = ["ipv6", "ipv4"]
next_hop_v4 = "10.0.0.2"
"#;

#[test]
fn announce_bgp_section() {
    let c = ok(ANNOUNCE_BGP);
    let a = c.announce.expect("announce parsed");
    assert_eq!(a.loopback, Loopback::Address);
    assert_eq!(a.graceful_wait, Duration::from_secs(3));
    assert_eq!(a.announce_delay, Duration::from_secs(2));
    assert_eq!(a.drain_prepend, 2);
    assert_eq!(a.vips.len(), 2);
    assert_eq!(a.vips[0].pools, vec![0], "pools taken from the listeners");
    assert_eq!(a.vips[0].min_healthy, 1);
    assert_eq!(a.vips[1].pools, vec![0, 1]);
    assert_eq!(a.vips[1].min_healthy, 2);
    let AnnounceMode::Bgp(b) = a.mode else {
        panic!("bgp mode expected")
    };
    assert_eq!(b.local_as, 4_200_000_001);
    assert_eq!(b.hold_time, Duration::ZERO);
    assert_eq!(b.connect_retry, Duration::from_secs(1));
    let n0 = &b.neighbors[0];
    assert_eq!(n0.addr, addr("10.0.0.1:179"));
    assert_eq!(n0.name, "10.0.0.1");
    assert!(n0.ipv4 && !n0.ipv6, "family defaults to the address's");
    assert_eq!(n0.med, Some(5));
    assert_eq!(n0.local_pref, 100);
    assert_eq!(n0.communities, vec![65000 << 16 | 1, 1 << 16 | 65535]);
    let n1 = &b.neighbors[1];
    assert_eq!(n1.addr, addr("[2001:db8:ff::1]:1179"));
    assert!(n1.ipv4 && n1.ipv6);
    assert_eq!(n1.next_hop_v4, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(n1.local_address, Some("2001:db8:ff::2".parse().unwrap()));
}

#[test]
fn announce_only_needs_no_listener() {
    let c = ok(r#"
[announce]
mode = "kernel-table"
kernel_table = 1000
loopback = "local-route"
[[announce.vip]]
address = "192.0.2.9"
pools = ["p"]
[pool.p]
backends = ["127.0.0.1:2000"]
"#);
    assert!(c.listeners.is_empty());
    let a = c.announce.unwrap();
    assert_eq!(a.mode, AnnounceMode::KernelTable { table: 1000 });
    assert_eq!(a.loopback, Loopback::LocalRoute);
}

#[test]
fn announce_errors_are_all_reported_with_positions() {
    let e = errs(
        r#"[[listener]]
bind = "192.0.2.1:993"
pool = "imap"
[pool.imap]
backends = ["10.0.0.11:993"]
[announce]
kernel_table = 254
drain_prepend = 11
announce_dleay = "1s"
[[announce.vip]]
address = "192.0.2.7"
[[announce.vip]]
address = "224.0.0.1"
pools = ["nope"]
[[announce.vip]]
address = "192.0.2.1"
[[announce.vip]]
address = "192.0.2.1"
[announce.bgp]
local_as = 23456
router_id = "0.0.0.0"
hold_time = "2s"
[[announce.bgp.neighbor]]
address = "10.0.0.1"
remote_as = 65000
communities = ["65536:1"]
families = ["ipx"]
local_address = "2001:db8::1"
[[announce.bgp.neighbor]]
address = "10.0.0.1"
"#,
    );
    has(&e, 7, &["kernel_table", "main"]);
    has(&e, 8, &["drain_prepend", "between 0 and 10"]);
    has(&e, 9, &["announce_dleay", "did you mean `announce_delay`"]);
    has(&e, 10, &["192.0.2.7", "no [[listener]] binds it"]);
    has(&e, 13, &["224.0.0.1", "cannot be announced"]);
    has(&e, 14, &["unknown pool", "nope"]);
    has(&e, 18, &["already listed", "line 16"]);
    has(&e, 20, &["AS_TRANS"]);
    has(&e, 21, &["router_id"]);
    has(&e, 22, &["hold_time", "3s and 65535s"]);
    has(&e, 26, &["65536:1"]);
    has(&e, 27, &["ipx"]);
    has(&e, 28, &["same family"]);
    has(&e, 30, &["already listed"]);
    has(&e, 29, &["remote_as"]);
}

#[test]
fn announce_handoff_section() {
    let c = ok(&format!(
        "{ANNOUNCE_BGP}\n[announce.handoff]\npeers = [\"198.51.100.12\", \"3fff::12\"]\ndevice = \"bond0.12\"\n"
    ));
    let h = c.announce.unwrap().handoff.expect("handoff parsed");
    assert_eq!(
        h.peers,
        vec![
            "198.51.100.12".parse::<std::net::IpAddr>().unwrap(),
            "3fff::12".parse().unwrap()
        ]
    );
    assert_eq!(h.device, "bond0.12");
    assert_eq!(h.dscp, 45, "default mark");
    assert!(ok(ANNOUNCE_BGP).announce.unwrap().handoff.is_none());
}

/// A kernel-table `[announce]` for pool `p` with `vips` (three lines each, from line 5), then
/// `tail`.
fn kernel_table_announce(vips: &[&str], tail: &str) -> String {
    let mut s = String::from(
        "[pool.p]\nbackends = [\"127.0.0.1:2000\"]\n[announce]\nmode = \"kernel-table\"\n",
    );
    for v in vips {
        s.push_str(&format!(
            "[[announce.vip]]\naddress = \"{v}\"\npools = [\"p\"]\n"
        ));
    }
    s + tail
}

#[test]
fn announce_handoff_errors_are_all_reported() {
    let e = errs(&kernel_table_announce(
        &["192.0.2.1", "2001:db8::1"],
        r#"[announce.handoff]
peers = ["192.0.2.1", "127.0.0.1", "10.0.0.2", "10.0.0.2", "peer"]
device = "eth0; flush ruleset"
dscp = 64
lifetime = "1s"
"#,
    ));
    has(&e, 12, &["192.0.2.1", "a VIP"]);
    has(&e, 12, &["127.0.0.1", "not a unicast address"]);
    has(&e, 12, &["10.0.0.2", "listed twice"]);
    has(&e, 12, &["peer", "not an IP address"]);
    has(&e, 13, &["device", "not an interface name"]);
    has(&e, 14, &["dscp", "between 1 and 63"]);
    has(&e, 15, &["lifetime"]);
    let e = errs(&kernel_table_announce(
        &["2001:db8::1"],
        "[announce.handoff]\npeers = [\"10.0.0.2\"]\ndevice = \"eth0\"\n",
    ));
    has(&e, 8, &["no IPv6 address", "2001:db8::1"]);
    let e = errs(&kernel_table_announce(
        &["192.0.2.1"],
        "[announce.handoff]\npeers = []\n",
    ));
    has(&e, 9, &["peers", "empty"]);
    has(&e, 8, &["device"]);
}

#[test]
fn announce_refuses_unroutable_vips_and_too_many_communities() {
    let many: Vec<String> = (0..257).map(|i| format!("\"65000:{i}\"")).collect();
    let e = errs(&format!(
        r#"[pool.p]
backends = ["127.0.0.1:2000"]
[announce]
[[announce.vip]]
address = "127.0.0.2"
pools = ["p"]
[[announce.vip]]
address = "fe80::1"
pools = ["p"]
[[announce.vip]]
address = "::ffff:192.0.2.1"
pools = ["p"]
[[announce.vip]]
address = "169.254.0.1"
pools = ["p"]
[announce.bgp]
local_as = 65001
router_id = "10.0.0.2"
[[announce.bgp.neighbor]]
address = "10.0.0.1"
remote_as = 65000
communities = [{}]
"#,
        many.join(", ")
    ));
    has(&e, 5, &["127.0.0.2", "loopback"]);
    has(&e, 8, &["fe80::1", "link-local"]);
    has(&e, 11, &["IPv4-mapped"]);
    has(&e, 14, &["169.254.0.1", "link-local"]);
    has(&e, 22, &["257 communities", "at most 256"]);
}

#[test]
fn announce_mode_needs_its_section() {
    let e = errs(
        r#"[pool.p]
backends = ["127.0.0.1:2000"]
[announce]
mode = "bgp"
[[announce.vip]]
address = "192.0.2.9"
pools = ["p"]
"#,
    );
    has(&e, 3, &["no [announce.bgp] section"]);
    let e = errs(
        r#"[pool.p]
backends = ["127.0.0.1:2000"]
[announce]
mode = "kernel-table"
[[announce.vip]]
address = "192.0.2.9"
pools = ["p"]
[announce.bgp]
local_as = 1
"#,
    );
    has(&e, 8, &["only used with announce.mode = \"bgp\""]);
    let e = errs(
        r#"[pool.p]
backends = ["127.0.0.1:2000"]
[announce]
mode = "ospf"
"#,
    );
    has(&e, 4, &["ospf", "bgp | kernel-table"]);
    has(&e, 3, &["no VIPs"]);
}

#[test]
fn cross_checks_run_beside_other_errors() {
    let e = errs(
        r#"[global]
admin = "127.0.0.1:9000"
[[listener]]
bind = "127.0.0.1:9000"
pool = "nope"
[[listener]]
bind = "127.0.0.1:9000"
pool = "p"
[[listener]]
bind = "127.0.0.1:9993"
pool = "p"
[pool.p]
backends = ["127.0.0.1:9993"]
[pool.q]
backends = ["255.255.255.255:25"]
"#,
    );
    has(&e, 5, &["unknown pool"]);
    has(&e, 7, &["already bound by listener", "line 4"]);
    has(&e, 2, &["global.admin", "also the bind address"]);
    has(&e, 13, &["own listener", "a loop"]);
    has(&e, 15, &["255.255.255.255", "broadcast"]);
}
