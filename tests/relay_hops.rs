//! Several next hops on one relay route, with failover: a real `ringmail mx` (quick mode,
//! `--relay A --relay B`) relaying over LMTP to two sinks, a real `ringmail msa` relaying over
//! SMTP to two sinks, and a real `ringmail mta` with two smart hosts (the same scenarios):
//!
//! * the first hop down (nothing listening): every message reaches the second, none lost, none
//!   twice, the queue empty, the failovers counted;
//! * both up: the messages spread over both;
//! * both down: the messages stay queued, each hop's error in their last reply (`ringmail
//!   queue show`); then one hop comes up and `ringmail queue flush` delivers them all.
//!
//! The MSA's submissions go through Python's smtplib; without python3 its test prints `SKIP:`
//! (fails under `RINGMAIL_REQUIRE_ALL=1`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(30);
const ALICE_PW: &str = "alice-Submission-pw";

// ---------------------------------------------------------------------------------------------
// The next hops: sinks that count the messages by Message-ID

/// An LMTP (or SMTP) server that accepts everything and counts messages by Message-ID; LMTP
/// answers the end of the data once per recipient.
struct Sink {
    addr: SocketAddr,
    ids: Arc<Mutex<HashMap<String, usize>>>,
}

impl Sink {
    fn start(lmtp: bool) -> Sink {
        Sink::start_on("127.0.0.1:0".parse().unwrap(), lmtp)
    }

    fn start_on(bind: SocketAddr, lmtp: bool) -> Sink {
        let l = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = l.local_addr().unwrap();
        let ids: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let ids2 = Arc::clone(&ids);
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                let ids = Arc::clone(&ids2);
                thread::spawn(move || {
                    let _ = session(s, lmtp, &ids);
                });
            }
        });
        Sink { addr, ids }
    }

    fn total(&self) -> usize {
        self.ids.lock().unwrap().values().sum()
    }

    fn ids(&self) -> HashMap<String, usize> {
        self.ids.lock().unwrap().clone()
    }
}

fn session(s: TcpStream, lmtp: bool, ids: &Mutex<HashMap<String, usize>>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 sink.test ready\r\n")?;
    let (mut rcpts, mut id) = (0usize, String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let u = line.to_ascii_uppercase();
        let verb = if lmtp { "LHLO" } else { "EHLO" };
        if u.starts_with(verb) {
            w.write_all(b"250-sink.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")?;
        } else if u.starts_with("EHLO") || u.starts_with("LHLO") {
            // The wrong greeting for this protocol.
            w.write_all(b"500 5.5.1 wrong protocol\r\n")?;
        } else if u.starts_with("MAIL FROM:") {
            rcpts = 0;
            w.write_all(b"250 2.1.0 ok\r\n")?;
        } else if u.starts_with("RCPT TO:") {
            rcpts += 1;
            w.write_all(b"250 2.1.5 ok\r\n")?;
        } else if u.starts_with("DATA") {
            w.write_all(b"354 go ahead\r\n")?;
            id.clear();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                if id.is_empty() && line.to_ascii_lowercase().starts_with("message-id:") {
                    id = line[11..].trim().to_string();
                }
            }
            *ids.lock().unwrap().entry(id.clone()).or_default() += 1;
            for _ in 0..if lmtp { rcpts } else { 1 } {
                w.write_all(b"250 2.0.0 delivered\r\n")?;
            }
        } else if u.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 2.0.0 ok\r\n")?;
        }
    }
}

/// A loopback address nothing listens on (a next hop that is down).
fn dead_addr() -> SocketAddr {
    let a = free_addr();
    assert!(!is_listening(a.port()));
    a
}

// ---------------------------------------------------------------------------------------------
// The roles under test

/// A relaying role started with a list of next hops.
trait Relayer {
    /// Hands `n` messages to the role, Message-IDs `<TAG-i@relay-hops.test>`.
    fn submit(&self, n: usize, tag: &str);
    fn spool(&self) -> &Path;
    fn admin(&self) -> SocketAddr;
    fn log(&self) -> String;
    /// The name of the failover counter in its `/metrics`.
    fn failover_metric(&self) -> &'static str;
}

#[derive(Clone, Copy)]
enum Role {
    /// Relays over LMTP.
    Mx,
    /// Relays over SMTP.
    Msa,
    /// Relays to its smart hosts over SMTP.
    Mta,
}

impl Role {
    fn lmtp(self) -> bool {
        matches!(self, Role::Mx)
    }

    fn start(self, dir: &TempDir, hops: &[SocketAddr]) -> Box<dyn Relayer> {
        match self {
            Role::Mx | Role::Mta => Plain::start(self, dir, hops),
            Role::Msa => Msa::start(dir, hops),
        }
    }
}

/// An MX (quick mode, LMTP to its next hops) or an MTA (quick mode, smart hosts; loopback
/// may relay), both fed over plain SMTP.
struct Plain {
    role: Role,
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    spool: PathBuf,
}

impl Plain {
    fn start(role: Role, dir: &TempDir, hops: &[SocketAddr]) -> Box<dyn Relayer> {
        let (addr, admin) = (free_addr(), free_addr());
        let spool = dir.path().join("spool");
        let mut cmd = Command::new(RINGMAIL);
        cmd.env("RUST_LOG", "info");
        if matches!(role, Role::Mx) {
            cmd.args([
                "mx",
                "--domain",
                "example.test",
                "--hostname",
                "mx.example.test",
            ])
            .args(["--workers", "1", "--relay-protocol", "lmtp"]);
        } else {
            cmd.args(["mta", "--hostname", "mta.example.test", "--no-mta-sts"]);
        }
        cmd.args(["--listen", &addr.to_string(), "--admin", &admin.to_string()])
            .arg("--spool")
            .arg(&spool);
        for h in hops {
            cmd.args(["--relay", &h.to_string()]);
        }
        let mut child = ChildGuard::spawn("ringmail", &mut cmd, dir.path().join("role.log"))
            .expect("spawn ringmail");
        wait_listening(&mut child, &[addr, admin]);
        Box::new(Plain {
            role,
            child,
            addr,
            admin,
            spool,
        })
    }
}

impl Relayer for Plain {
    fn submit(&self, n: usize, tag: &str) {
        let mut s = connect(self.addr).expect("connect");
        expect(&mut s, None, 220);
        expect(&mut s, Some("EHLO client.sender.test"), 250);
        for i in 0..n {
            // The MTA caches connections per recipient domain: a domain per message makes it
            // open a new connection for each.
            let rcpt = match self.role {
                Role::Mx => format!("user{i}@example.test"),
                _ => format!("user@d{i}.example.org"),
            };
            expect(&mut s, Some("MAIL FROM:<carol@sender.test>"), 250);
            expect(&mut s, Some(&format!("RCPT TO:<{rcpt}>")), 250);
            expect(&mut s, Some("DATA"), 354);
            let msg = format!(
                "From: <carol@sender.test>\r\nTo: <{rcpt}>\r\nSubject: {tag} {i}\r\n\
                 Message-ID: <{tag}-{i}@relay-hops.test>\r\n\r\nhello {i}\r\n."
            );
            expect(&mut s, Some(&msg), 250);
        }
        expect(&mut s, Some("QUIT"), 221);
    }

    fn spool(&self) -> &Path {
        &self.spool
    }

    fn admin(&self) -> SocketAddr {
        self.admin
    }

    fn log(&self) -> String {
        self.child.log_text()
    }

    fn failover_metric(&self) -> &'static str {
        "ringmail_mx_relay_failovers_total"
    }
}

struct Msa {
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    spool: PathBuf,
}

impl Msa {
    fn start(dir: &TempDir, hops: &[SocketAddr]) -> Box<dyn Relayer> {
        let db = format!("sqlite:{}", dir.path().join("msa-accounts.db").display());
        accounts(&db, &["domain", "add", "example.test"], None);
        accounts(
            &db,
            &["add", "alice@example.test", "--password-stdin"],
            Some(&format!("{ALICE_PW}\n")),
        );
        let (addr, admin) = (free_addr(), free_addr());
        let spool = dir.path().join("msa-spool");
        let mut cmd = Command::new(RINGMAIL);
        cmd.env("RUST_LOG", "info")
            .args(["msa", "--listen", &addr.to_string(), "--accounts", &db])
            .args(["--hostname", "smtp.example.test"])
            .args(["--admin", &admin.to_string()])
            .arg("--spool")
            .arg(&spool);
        for h in hops {
            cmd.args(["--relay", &h.to_string()]);
        }
        let mut child = ChildGuard::spawn("ringmail msa", &mut cmd, dir.path().join("msa.log"))
            .expect("spawn ringmail msa");
        wait_listening(&mut child, &[addr, admin]);
        Box::new(Msa {
            child,
            addr,
            admin,
            spool,
        })
    }
}

impl Relayer for Msa {
    /// As alice, STARTTLS and AUTH, all in one session (smtplib).
    fn submit(&self, n: usize, tag: &str) {
        let script = format!(
            "import smtplib, ssl\n\
             ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE\n\
             s = smtplib.SMTP('{ip}', {port}, timeout=20); s.starttls(context=ctx)\n\
             s.login('alice@example.test', '{ALICE_PW}')\n\
             for i in range({n}):\n\
             \x20   s.sendmail('alice@example.test', ['bob%d@example.org' % i], 'From: Alice <alice@example.test>\\r\\nTo: bob@example.org\\r\\nSubject: {tag} %d\\r\\nMessage-ID: <{tag}-%d@relay-hops.test>\\r\\n\\r\\nhello %d\\r\\n' % (i, i, i))\n\
             s.quit()\n",
            ip = self.addr.ip(),
            port = self.addr.port(),
        );
        let (st, out) = run_bounded(
            Command::new("python3").arg("-c").arg(&script),
            Duration::from_secs(60),
        );
        assert!(st.success(), "smtplib: {out}");
    }

    fn spool(&self) -> &Path {
        &self.spool
    }

    fn admin(&self) -> SocketAddr {
        self.admin
    }

    fn log(&self) -> String {
        self.child.log_text()
    }

    fn failover_metric(&self) -> &'static str {
        "ringmail_msa_relay_failovers_total"
    }
}

fn wait_listening(child: &mut ChildGuard, addrs: &[SocketAddr]) {
    let ready = wait_for(Duration::from_secs(20), || {
        if let Some(st) = child.try_wait() {
            panic!("exited with {st}:\n{}", child.log_text());
        }
        addrs.iter().all(|a| is_listening(a.port())).then_some(())
    });
    assert!(
        ready.is_some(),
        "not listening on {addrs:?}:\n{}",
        child.log_text()
    );
}

/// Sends `cmd` (if any) and reads one reply, which must have code `want`.
fn expect(s: &mut TcpStream, cmd: Option<&str>, want: u16) {
    if let Some(c) = cmd {
        s.write_all(format!("{c}\r\n").as_bytes())
            .expect("write to the MX");
    }
    loop {
        let line = read_line(s).unwrap_or_else(|e| panic!("reply to {cmd:?}: {e}"));
        assert!(
            line.starts_with(&want.to_string()),
            "{cmd:?}: want {want}, got {line:?}"
        );
        if line.as_bytes().get(3) != Some(&b'-') {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The queue tool and the metrics

fn queue(r: &dyn Relayer, args: &[&str]) -> String {
    let (st, out) = run_bounded(
        Command::new(RINGMAIL)
            .arg("queue")
            .arg("--spool")
            .arg(r.spool())
            .args(["--admin", &r.admin().to_string()])
            .args(args),
        Duration::from_secs(30),
    );
    assert!(st.success(), "ringmail queue {args:?}: {out}");
    out
}

/// The ids of the queued messages.
fn queued_ids(r: &dyn Relayer) -> Vec<String> {
    let out = queue(r, &["--json", "list"]);
    let start = out
        .find('[')
        .unwrap_or_else(|| panic!("no JSON in {out:?}"));
    let v: serde_json::Value =
        serde_json::from_str(out[start..].trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| e["id"].as_str().expect("an id").to_string())
        .collect()
}

fn wait_queue_empty(r: &dyn Relayer) {
    wait_for(WAIT, || {
        queue(r, &["list"])
            .contains("Mail queue is empty")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the queue is not empty: {}", queue(r, &["list"])));
}

fn metric(r: &dyn Relayer, name: &str) -> f64 {
    let (status, body) = http(r.admin(), "GET", "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    metric_sum(&parse_metrics(&body).expect("Prometheus text"), name, &[])
}

/// Waits until the sinks hold `n` messages in all; then checks that each of the `n` Message-IDs
/// of `tag` arrived exactly once.
fn wait_delivered(r: &dyn Relayer, sinks: &[&Sink], n: usize, tag: &str) {
    let total = || sinks.iter().map(|s| s.total()).sum::<usize>();
    wait_for(WAIT, || (total() >= n).then_some(())).unwrap_or_else(|| {
        panic!(
            "{} of {n} messages arrived; queue:\n{}\nlog:\n{}",
            total(),
            queue(r, &["list"]),
            r.log()
        )
    });
    let mut all: HashMap<String, usize> = HashMap::new();
    for s in sinks {
        for (id, c) in s.ids() {
            *all.entry(id).or_default() += c;
        }
    }
    for i in 0..n {
        let id = format!("<{tag}-{i}@relay-hops.test>");
        assert_eq!(all.get(&id), Some(&1), "{id}: {all:?}");
    }
    assert_eq!(all.len(), n, "{all:?}");
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/// The first next hop is down: everything goes to the second, nothing is lost or doubled.
fn first_hop_down(role: Role, tag: &str) {
    let dir = TempDir::new(&format!("relay-hops-{tag}-a"));
    let dead = dead_addr();
    let sink = Sink::start(role.lmtp());
    let r = role.start(&dir, &[dead, sink.addr]);
    const N: usize = 20;
    r.submit(N, tag);
    wait_delivered(&*r, &[&sink], N, tag);
    wait_queue_empty(&*r);
    // The first new connection starts at the first hop, which is down: at least one failover.
    assert!(
        metric(&*r, r.failover_metric()) >= 1.0,
        "no failover counted:\n{}",
        r.log()
    );
    let log = r.log();
    assert!(
        log.contains("trying the next one") && log.contains(&dead.to_string()),
        "the failover is not logged:\n{log}"
    );
}

/// Both next hops up: new connections alternate, so both get messages.
fn both_up_spread(role: Role, tag: &str) {
    let dir = TempDir::new(&format!("relay-hops-{tag}-b"));
    let (s1, s2) = (Sink::start(role.lmtp()), Sink::start(role.lmtp()));
    let r = role.start(&dir, &[s1.addr, s2.addr]);
    const N: usize = 20;
    r.submit(N, tag);
    wait_delivered(&*r, &[&s1, &s2], N, tag);
    eprintln!("{tag}: {} and {} messages", s1.total(), s2.total());
    assert!(
        s1.total() >= 1 && s2.total() >= 1,
        "not spread: {} and {}\n{}",
        s1.total(),
        s2.total(),
        r.log()
    );
    wait_queue_empty(&*r);
    assert_eq!(metric(&*r, r.failover_metric()), 0.0);
}

/// Both next hops down: the mail stays queued with both errors; one comes up, a flush delivers.
fn both_down_then_flush(role: Role, tag: &str) {
    let dir = TempDir::new(&format!("relay-hops-{tag}-c"));
    let (d1, d2) = (dead_addr(), dead_addr());
    let r = role.start(&dir, &[d1, d2]);
    const N: usize = 3;
    r.submit(N, tag);
    // Each message's last reply names both hops and their errors.
    let shown = wait_for(WAIT, || {
        let ids = queued_ids(&*r);
        if ids.len() != N {
            return None;
        }
        let shows: Vec<String> = ids.iter().map(|id| queue(&*r, &["show", id])).collect();
        shows
            .iter()
            .all(|s| {
                s.contains("delivery failed on all 2 next hops")
                    && s.contains(&d1.to_string())
                    && s.contains(&d2.to_string())
            })
            .then_some(shows)
    })
    .unwrap_or_else(|| {
        panic!(
            "the queue never showed both hops' errors: {}\n{}",
            queue(&*r, &["list"]),
            r.log()
        )
    });
    eprintln!("{tag}: {}", shown[0]);
    assert!(shown[0].to_lowercase().contains("refused"), "{}", shown[0]);
    // The second hop comes up: a flush delivers everything there.
    let sink = Sink::start_on(d2, role.lmtp());
    queue(&*r, &["flush"]);
    wait_delivered(&*r, &[&sink], N, tag);
    wait_queue_empty(&*r);
}

fn have_python() -> bool {
    if Path::new("/usr/bin/python3").exists() {
        true
    } else {
        skip("python3 not installed");
        false
    }
}

#[test]
fn mx_first_hop_down_delivers_everything_to_the_second() {
    first_hop_down(Role::Mx, "mxa");
}

#[test]
fn mx_spreads_over_both_hops() {
    both_up_spread(Role::Mx, "mxb");
}

#[test]
fn mx_both_hops_down_queues_then_flush_delivers() {
    both_down_then_flush(Role::Mx, "mxc");
}

#[test]
fn msa_first_hop_down_delivers_everything_to_the_second() {
    if have_python() {
        first_hop_down(Role::Msa, "msaa");
    }
}

#[test]
fn msa_spreads_over_both_hops() {
    if have_python() {
        both_up_spread(Role::Msa, "msab");
    }
}

#[test]
fn msa_both_hops_down_queues_then_flush_delivers() {
    if have_python() {
        both_down_then_flush(Role::Msa, "msac");
    }
}

#[test]
fn mta_first_smart_host_down_delivers_everything_to_the_second() {
    first_hop_down(Role::Mta, "mtaa");
}

#[test]
fn mta_spreads_over_both_smart_hosts() {
    both_up_spread(Role::Mta, "mtab");
}

#[test]
fn mta_both_smart_hosts_down_queues_then_flush_delivers() {
    both_down_then_flush(Role::Mta, "mtac");
}

#[test]
fn config_lists_are_checked() {
    let dir = TempDir::new("relay-hops-config");
    let head = "[mx]\nhostname = \"mx.example.test\"\nlisten = [\"127.0.0.1:2525\"]\ndomains = [\"example.test\"]\nspool = \"/tmp/x\"\n[mx.relay]\n";
    let (code, out) = check_config(
        dir.path(),
        "mx",
        &format!("{head}next_hop = [\"127.0.0.1:24\", \"127.0.0.2:24\"]\n"),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("127.0.0.1:24, 127.0.0.2:24"), "{out}");
    let (code, out) = check_config(
        dir.path(),
        "mx",
        &format!("{head}next_hop = [\"127.0.0.1:24\", \"127.0.0.1:24\"]\nbounce_next_hop = []\n"),
    );
    assert_eq!(code, Some(2), "{out}");
    for want in ["mx.toml:7:", "listed twice", "mx.toml:8:", "is empty"] {
        assert!(out.contains(want), "{want} missing from {out}");
    }
    // Quick mode: a repeated flag twice with the same address is refused.
    let (st, out) = run_bounded(
        Command::new(RINGMAIL)
            .args(["mx", "--listen", "127.0.0.1:1", "--domain", "example.test"])
            .args(["--spool", "/nonexistent/spool"])
            .args(["--relay", "127.0.0.1:24", "--relay", "127.0.0.1:24"]),
        Duration::from_secs(20),
    );
    assert!(!st.success() && out.contains("given twice"), "{out}");
}
