//! Site A of the example topology stood up whole, from the rendered files, in network namespaces
//! (root only), and the seed's mail flows run through it end to end:
//!
//! ```text
//!   "the Internet" (bridge brinet, 198.51.100.0/24)          site A (bridge brsite, 192.0.2.16/28)
//!   client .7 ──┐                                       ┌── lb-a1, lb-a2: ringmail lb (kernel table
//!   remote MX   ├── rt-a1 (.1 | .17), rt-a2 (.2 | .18) ─┤     100) + BIRD; the VIPs by BGP -> ECMP
//!   .25 (sink)  ┘   BIRD, rendered routers/<r>/bird.conf├── msa-a1, mx-a1, mda-a1, mta-a1: ringmail
//!                                                       │     ROLE --config <rendered config>
//!                                                       └── ns-a .30: NSD, the rendered zones
//! ```
//!
//! Every host loads its rendered nftables.conf. The flows:
//! 1. submission: client -> smtp.example.com:587 (anycast, through rt-a1's ECMP route to an LB)
//!    STARTTLS + AUTH -> LB -> MSA (PROXY v2) -> MTA (DKIM) -> MX of remote.test found through
//!    ns-a -> the remote MX, which gets the message with a valid DKIM-Signature for example.com;
//! 2. inbound: client -> mx-a1:25 -> LMTP -> mda-a1, then IMAPS to imap.example.com:993
//!    (anycast, through an LB) reads it;
//! 3. the firewall: the Internet cannot reach msa-a1:25 nor mta-a1:25, msa-a1 cannot reach the
//!    Internet's port 25.
//!
//! What the lab changes, mechanically, all in [`lab_topology`] and [`bird_config`]:
//! - the topology is a copy of the example with `[accounts] url` set to a SQLite file (seeded
//!   with `ringmail accounts`), a `[dns] resolver` (ns-a, which also serves remote.test) and a
//!   freshly generated DKIM key pair (its public half where the copy's `public_key` points);
//! - rendering uses `--root`, so every path of the role configs lives under the lab directory;
//!   the TLS certificates (one lab CA) are put where the configs name them;
//! - BIRD logs to stderr instead of syslog;
//! - each role runs with its rendered config where it was rendered (two LBs would both install
//!   theirs as lb.toml); the lab runs one host per mail role, so one root serves them all;
//! - the routers get the sysctls their rendered config asks for (forwarding, L4 ECMP hash), and
//!   every namespace a default route through rt-a1 (the topology has no notion of the uplink).
//!
//! Needs root, `ip`, `nft`, `bird`/`birdc`, `nsd`, `openssl` and `python3`; skips otherwise
//! (fails under `RINGMAIL_REQUIRE_ALL=1`). Everything is bounded and torn down on drop.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Hub, Netns, run, seq};
use common::*;
use ringmail_deploy::topology::{Host, Role, ServiceKind, Topology};

const EXAMPLE: &str = "deploy/examples/example.com.toml";
const SITE: &str = "a";

/// The Internet segment, outside every prefix the topology uses.
const INET_PREFIX: &str = "198.51.100";
const CLIENT: &str = "198.51.100.7";
const REMOTE_MX: &str = "198.51.100.25";
const REMOTE_DOMAIN: &str = "remote.test";

/// The site's LAN, as the example's address plan gives it.
const SITE_V4_LEN: u8 = 28;
const SITE_V6_LEN: u8 = 64;

const USER: &str = "alice@example.com";
const PASSWORD: &str = "lab-password-1";

fn prerequisites() -> Result<(), String> {
    if !is_root() {
        return Err("needs root (network namespaces, nftables, BIRD, NSD)".into());
    }
    for (prog, arg) in [
        ("ip", "-V"),
        ("nft", "--version"),
        ("bird", "--version"),
        ("birdc", "-h"),
        ("nsd", "-v"),
        ("openssl", "version"),
        ("python3", "--version"),
    ] {
        let ok = Command::new(prog)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Err(format!("needs {prog} installed"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The lab's inputs: topology copy, keys, certificates, accounts

/// The example topology, changed only where a lab must (see the module documentation), written
/// to `dir/topology.toml` next to a fresh DKIM key pair. Returns the topology file.
fn lab_topology(dir: &Path, root: &Path) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXAMPLE);
    let original = ringmail_deploy::load_file(&example).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&example).unwrap();
    let ns_a = original.dns.nameservers[0]
        .ipv4
        .expect("the first name server has IPv4");
    let swaps = [
        // The account store: a SQLite file under the root instead of PostgreSQL.
        (
            "url = \"postgres://ringmail@db.example.com/ringmail\"",
            "url = \"sqlite:/var/lib/ringmail/accounts.db\"".to_string(),
        ),
        // The resolver of the MX and MTA hosts: ns-a, which also serves remote.test.
        (
            "hostmaster = \"hostmaster@example.com\"",
            format!("hostmaster = \"hostmaster@example.com\"\nresolver = \"{ns_a}\""),
        ),
    ];
    let mut lab = text.clone();
    for (from, to) in &swaps {
        assert!(lab.contains(from), "the example has no `{from}`");
        lab = lab.replacen(from, to, 1);
    }
    let path = dir.join("topology.toml");
    std::fs::write(&path, lab).unwrap();
    // The DKIM key: generated where the rendered MTA config will look (under the root), its
    // public half where the copy's relative `public_key` points (next to the copy).
    for d in &original.domains {
        for k in &d.dkim {
            let private = root.join(k.private_key_path.strip_prefix("/").unwrap());
            std::fs::create_dir_all(private.parent().unwrap()).unwrap();
            let (st, out) = run_bounded(
                Command::new(RINGMAIL)
                    .args(["dkim", "keygen", "--domain", d.name.as_str()])
                    .args(["--selector", &k.selector, "--out"])
                    .arg(&private),
                Duration::from_secs(60),
            );
            assert!(st.success(), "dkim keygen: {out}");
            let public_rel = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("public_key = \""))
                .and_then(|l| l.strip_suffix('"'))
                .expect("public_key in the example");
            let public = dir.join(public_rel);
            std::fs::create_dir_all(public.parent().unwrap()).unwrap();
            let (st, out) = run_bounded(
                Command::new("openssl")
                    .args(["pkey", "-pubout", "-in"])
                    .arg(&private)
                    .arg("-out")
                    .arg(&public),
                Duration::from_secs(20),
            );
            assert!(st.success(), "openssl pkey: {out}");
        }
    }
    path
}

/// A lab CA and, for each host, a certificate for its name and the service names (the LBs
/// pass TLS through to the MSAs and MDAs), at the paths the rendered configs name.
fn certificates(t: &Topology, hosts: &[&Host], root: &Path, dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ringmail lab CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let tls = root.join("etc/ringmail/tls");
    std::fs::create_dir_all(&tls).unwrap();
    for h in hosts {
        let mut names = vec![h.name.to_string()];
        names.extend(t.services.iter().map(|s| s.name.to_string()));
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, h.name.as_str());
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(tls.join(format!("{}.crt", h.name)), cert.pem()).unwrap();
        std::fs::write(tls.join(format!("{}.key", h.name)), key.serialize_pem()).unwrap();
    }
    let ca_file = dir.join("lab-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    ca_file
}

/// `ringmail accounts` against the store the rendered configs name.
fn accounts(url: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(RINGMAIL)
        .args(["accounts", "--db", url])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "ringmail accounts {args:?} hangs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ringmail accounts {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rendered BIRD config with its log on stderr (captured in the lab's log files).
fn bird_config(rendered: &Path) -> String {
    let text =
        std::fs::read_to_string(rendered).unwrap_or_else(|e| panic!("{}: {e}", rendered.display()));
    assert!(text.contains("log syslog all;"), "{}", rendered.display());
    text.replace("log syslog all;", "log stderr all;")
}

/// The Internet's zones ns-a also serves: remote.test (MX, SPF) and the reverse zone
/// of the Internet segment (the client's PTR), as (origin, zone file text).
fn internet_zones() -> [(String, String); 2] {
    let soa = format!(
        "$TTL 300\n@ IN SOA ns.{REMOTE_DOMAIN}. hostmaster.{REMOTE_DOMAIN}. 1 3600 600 86400 300\n\
         @ IN NS ns.{REMOTE_DOMAIN}.\n"
    );
    let client = CLIENT.rsplit('.').next().unwrap();
    let reverse: Vec<&str> = INET_PREFIX.split('.').rev().collect();
    [
        (
            REMOTE_DOMAIN.to_string(),
            format!(
                "{soa}@ IN MX 10 mx\n\
                 @ IN TXT \"v=spf1 ip4:{INET_PREFIX}.0/24 -all\"\n\
                 ns IN A {REMOTE_MX}\n\
                 mx IN A {REMOTE_MX}\n\
                 mail IN A {CLIENT}\n"
            ),
        ),
        (
            format!("{}.in-addr.arpa", reverse.join(".")),
            format!("{soa}{client} IN PTR mail.{REMOTE_DOMAIN}.\n"),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Python pieces: a remote MX (SMTP sink) and the Internet client

/// Accepts mail on port 25 and writes each message to `DIR/msg-N.eml`.
const SINK: &str = r#"
import os, socket, sys, threading, time
out = sys.argv[1]
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", 25)); srv.listen(64)
print("ready", flush=True)
def serve(c):
    c.settimeout(60)
    f = c.makefile("rb")
    say = lambda s: c.sendall(s.encode() + b"\r\n")
    say("220 mx.remote.test ESMTP lab sink")
    while True:
        line = f.readline()
        if not line:
            return
        cmd = line.decode("utf-8", "replace").strip()
        up = cmd.upper()
        print("<", cmd, flush=True)
        if up.startswith("EHLO"):
            c.sendall(b"250-mx.remote.test\r\n250 8BITMIME\r\n")
        elif up.startswith(("HELO", "MAIL", "RCPT", "RSET", "NOOP")):
            say("250 ok")
        elif up == "DATA":
            say("354 go ahead")
            data = []
            while True:
                l = f.readline()
                if not l:
                    return
                if l in (b".\r\n", b".\n"):
                    break
                data.append(l[1:] if l.startswith(b"..") else l)
            tmp = os.path.join(out, "tmp-%d" % time.time_ns())
            with open(tmp, "wb") as m:
                m.write(b"".join(data))
            os.rename(tmp, os.path.join(out, "msg-%d.eml" % time.time_ns()))
            say("250 queued")
        elif up == "QUIT":
            say("221 bye")
            return
        else:
            say("502 not here")
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The Internet client: `resolve`, `submit`, `inbound`, `imap`, `probe` (see each function).
const CLIENT_PY: &str = r#"
import email.utils, imaplib, random, smtplib, socket, ssl, struct, sys, time

def dns(server, name, qtype):
    """A (1) or MX (15) records of name, asked of server over UDP."""
    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    r = s.recv(4096)
    def name_at(off):
        labels = []
        while True:
            n = r[off]
            if n == 0:
                return ".".join(labels), off + 1
            if n & 0xC0 == 0xC0:
                return ".".join(labels + [name_at(((n & 0x3F) << 8) | r[off + 1])[0]]), off + 2
            labels.append(r[off + 1:off + 1 + n].decode())
            off += 1 + n
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", r[:12])
    assert rid == qid and flags & 0xF == 0, "DNS error %x for %s" % (flags, name)
    off = 12
    for _ in range(qd):
        off = name_at(off)[1] + 4
    out = []
    for _ in range(an):
        off = name_at(off)[1]
        typ, _, _, rdlen = struct.unpack(">HHIH", r[off:off + 10])
        off += 10
        if typ == 1 and qtype == 1:
            out.append(socket.inet_ntoa(r[off:off + 4]))
        elif typ == 15 and qtype == 15:
            out.append((struct.unpack(">H", r[off:off + 2])[0], name_at(off + 2)[0]))
        off += rdlen
    return sorted(out)

class PinnedSMTP(smtplib.SMTP):
    """SMTP to a name (the TLS server name) at an address found in our DNS."""
    def __init__(self, addr, *args, **kw):
        self.pinned = addr
        super().__init__(*args, **kw)
    def _get_socket(self, host, port, timeout):
        return socket.create_connection((self.pinned, port), timeout)

class PinnedIMAP(imaplib.IMAP4_SSL):
    def __init__(self, addr, *args, **kw):
        self.pinned = addr
        super().__init__(*args, **kw)
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.pinned, self.port), timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)

def message(frm, to, token, body):
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: lab %s\r\nDate: %s\r\nMessage-ID: <%s@lab>\r\n\r\n%s\r\n"
            % (frm, to, token, email.utils.formatdate(), token, body))

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "resolve":      # SERVER NAME TYPE
    print(dns(args[0], args[1], {"A": 1, "MX": 15}[args[2]]))
elif cmd == "submit":     # NS NAME USER PASSWORD RCPT TOKEN CAFILE
    ns, name, user, pw, rcpt, token, ca = args
    addr = dns(ns, name, 1)[0]
    ctx = ssl.create_default_context(cafile=ca)
    with PinnedSMTP(addr, name, 587, timeout=20) as s:
        s.ehlo("client.remote.test")
        s.starttls(context=ctx)
        s.ehlo("client.remote.test")
        s.login(user, pw)
        refused = s.sendmail(user, [rcpt], message(user, rcpt, token, "Submitted through the lab."))
        assert not refused, refused
    print("submitted via", name, addr)
elif cmd == "inbound":    # NS DOMAIN MXHOST SENDER RCPT TOKEN CAFILE
    ns, domain, mxhost, sender, rcpt, token, ca = args
    mxs = [h for _, h in dns(ns, domain, 15)]
    assert mxhost in mxs, (mxhost, mxs)
    addr = dns(ns, mxhost, 1)[0]
    ctx = ssl.create_default_context(cafile=ca)
    with PinnedSMTP(addr, mxhost, 25, timeout=20) as s:
        s.ehlo("mail.remote.test")
        s.starttls(context=ctx)
        s.ehlo("mail.remote.test")
        refused = s.sendmail(sender, [rcpt], message(sender, rcpt, token, "Delivered through the lab."))
        assert not refused, refused
    print("delivered via", mxhost, addr, "of", mxs)
elif cmd == "imap":       # NS NAME USER PASSWORD TOKEN CAFILE TIMEOUT
    ns, name, user, pw, token, ca, timeout = args
    addr = dns(ns, name, 1)[0]
    ctx = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + float(timeout)
    while True:
        with PinnedIMAP(addr, name, 993, ssl_context=ctx, timeout=10) as m:
            m.login(user, pw)
            m.select("INBOX")
            _, found = m.search(None, "SUBJECT", token)
            if found[0]:
                _, data = m.fetch(found[0].split()[0], "(RFC822)")
                sys.stdout.write(data[0][1].decode("utf-8", "replace"))
                print("\nread via", name, addr)
                break
        if time.monotonic() > deadline:
            sys.exit("no message with %s in %s's INBOX" % (token, user))
        time.sleep(0.5)
elif cmd == "probe":      # ADDR PORT TIMEOUT: open, timeout or the errno name
    import errno
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(float(args[2]))
    try:
        s.connect((args[0], int(args[1])))
        print("open")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

// ---------------------------------------------------------------------------------------------
// The lab

/// Everything the lab starts, dropped in field order: the processes, the namespaces (which
/// kills anything left in them), the hub, the files.
struct Lab {
    procs: Vec<ChildGuard>,
    nodes: BTreeMap<String, Netns>,
    hub: Hub,
    dir: TempDir,
    rendered: PathBuf,
    ca: PathBuf,
    t: Topology,
}

impl Lab {
    fn ns(&self, label: &str) -> &Netns {
        self.nodes
            .get(label)
            .unwrap_or_else(|| panic!("no namespace {label}"))
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) {
        let log = self.dir.path().join(format!("{name}.log"));
        let g = ChildGuard::spawn(name, cmd, log).unwrap_or_else(|e| panic!("{name}: {e}"));
        self.procs.push(g);
    }

    /// Python `CLIENT_PY cmd args…` in namespace `label`, bounded; its output, or a panic.
    fn client(&self, label: &str, args: &[&str], timeout: Duration) -> String {
        let (st, out) = run_bounded(
            self.ns(label)
                .cmd("python3")
                .args(["-c", CLIENT_PY])
                .args(args),
            timeout,
        );
        assert!(
            st.success(),
            "client {args:?} in {label} failed: {st}\n{out}"
        );
        out
    }

    /// Whether something listens on TCP `port` in namespace `label`.
    fn listening(&self, label: &str, port: u16) -> bool {
        run(self.ns(label).cmd("ss").args(["-Hltn"]))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
    }

    fn wait_listening(&self, label: &str, port: u16, timeout: Duration) {
        if wait_for(timeout, || self.listening(label, port).then_some(())).is_none() {
            self.fail(&format!(
                "nothing listens on {label}:{port} after {timeout:?}"
            ));
        }
    }

    /// The next hops of `label`'s kernel route to `dst`.
    fn nexthops(&self, label: &str, dst: &str) -> Vec<String> {
        let fam = if dst.contains(':') { "-6" } else { "-4" };
        let out =
            run(self.ns(label).cmd("ip").args([fam, "route", "show", dst])).unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut hops: Vec<String> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops
    }

    /// Panics with the logs of every process (the tails are printed as the guards drop).
    fn fail(&self, what: &str) -> ! {
        let mut status = String::new();
        for r in ["rt-a1", "rt-a2"] {
            if let Ok(out) = run(Command::new("birdc")
                .arg("-s")
                .arg(self.dir.path().join(format!("bird-{r}.ctl")))
                .args(["show", "protocols"]))
            {
                status.push_str(&format!("--- {r}: birdc show protocols\n{out}\n"));
            }
        }
        panic!("{what}\n{status}");
    }
}

fn short(h: &Host) -> String {
    h.name.short().to_string()
}

fn site_hosts(t: &Topology) -> Vec<&Host> {
    let site = t
        .sites
        .iter()
        .position(|s| s.name == SITE)
        .expect("site a in the example");
    // Every LB of the site, and the first host of each mail role: the one the rendered configs
    // name as next hop (msa -> mta, mx -> mda, mx bounces -> mta).
    let mut hosts: Vec<&Host> = t.hosts_with(Role::Lb).filter(|h| h.site == site).collect();
    for role in [Role::Msa, Role::Mx, Role::Mda, Role::Mta] {
        hosts.push(
            t.hosts_with(role)
                .find(|h| h.site == site)
                .unwrap_or_else(|| panic!("site {SITE} has no {role}")),
        );
    }
    hosts
}

fn build(started: Instant) -> Lab {
    let dir = TempDir::new("deploy-lab");
    let root = dir.path().join("root");
    let rendered = dir.path().join("rendered");
    std::fs::create_dir_all(&root).unwrap();
    let topology = lab_topology(dir.path(), &root);

    // Render with every path under the lab's root.
    let (st, out) = run_bounded(
        Command::new(RINGMAIL)
            .args(["deploy", "render", "--topology"])
            .arg(&topology)
            .arg("--out")
            .arg(&rendered)
            .arg("--root")
            .arg(&root),
        Duration::from_secs(30),
    );
    assert!(st.success(), "deploy render: {out}");
    let t = ringmail_deploy::load_file(&topology).unwrap_or_else(|e| panic!("{e}"));
    let hosts = site_hosts(&t);
    let ca = certificates(&t, &hosts, &root, dir.path());
    for role in ["msa", "mx", "mta", "mda"] {
        std::fs::create_dir_all(root.join(format!("var/lib/ringmail/{role}"))).unwrap();
    }
    let store = t
        .accounts
        .replacen("sqlite:", &format!("sqlite:{}", root.display()), 1);
    accounts(&store, &["domain", "add", t.primary().name.as_str()], None);
    accounts(&store, &["add", USER, "--password-stdin"], Some(PASSWORD));
    eprintln!(
        "rendered, keys, certificates, accounts: {:?}",
        started.elapsed()
    );

    let prefix = format!("rml{}x{}", std::process::id(), seq());
    let hub = Hub::create(format!("{prefix}-hub"), &["brsite", "brinet"], &dir);
    let mut lab = Lab {
        procs: Vec::new(),
        nodes: BTreeMap::new(),
        hub,
        dir,
        rendered,
        ca,
        t: t.clone(),
    };
    let site = t.sites.iter().position(|s| s.name == SITE).unwrap();
    let routers: Vec<_> = t.routers.iter().filter(|r| r.site == site).collect();
    let gw4 = routers[0].ipv4.expect("router IPv4");
    let gw6 = routers[0].ipv6.expect("router IPv6");
    let ns_a = &t.dns.nameservers[0];

    // (label, site LAN addresses or Internet address)
    let mut lan: Vec<(String, Ipv4Addr, Option<std::net::Ipv6Addr>)> = hosts
        .iter()
        .map(|h| (short(h), h.ipv4.unwrap(), h.ipv6))
        .collect();
    lan.push((ns_a.name.short().to_string(), ns_a.ipv4.unwrap(), ns_a.ipv6));
    for (label, v4, v6) in &lan {
        let ns = Netns::create(format!("{prefix}-{label}"));
        lab.hub.plug("brsite", &ns, "eth0", &lab.dir);
        ns.ip_batch(
            false,
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("addr add {v4}/{SITE_V4_LEN} dev eth0"),
                format!("route add default via {gw4}"),
            ],
            &lab.dir,
        );
        if let Some(v6) = v6 {
            ns.ip_batch(
                true,
                &[
                    format!("addr add {v6}/{SITE_V6_LEN} dev eth0 nodad"),
                    format!("route add default via {gw6}"),
                ],
                &lab.dir,
            );
        }
        lab.nodes.insert(label.clone(), ns);
    }
    for (i, r) in routers.iter().enumerate() {
        let ns = Netns::create(format!("{prefix}-{}", r.name));
        lab.hub.plug("brsite", &ns, "eth0", &lab.dir);
        lab.hub.plug("brinet", &ns, "eth1", &lab.dir);
        // What the rendered router config asks for ("Also set …"), and forwarding.
        ns.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ]);
        ns.ip_batch(
            false,
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                "link set eth1 up".into(),
                format!("addr add {}/{SITE_V4_LEN} dev eth0", r.ipv4.unwrap()),
                format!("addr add {INET_PREFIX}.{}/24 dev eth1", i + 1),
            ],
            &lab.dir,
        );
        ns.ip_batch(
            true,
            &[format!(
                "addr add {}/{SITE_V6_LEN} dev eth0 nodad",
                r.ipv6.unwrap()
            )],
            &lab.dir,
        );
        lab.nodes.insert(r.name.clone(), ns);
    }
    for (label, addr) in [("client", CLIENT), ("remote", REMOTE_MX)] {
        let ns = Netns::create(format!("{prefix}-{label}"));
        lab.hub.plug("brinet", &ns, "eth0", &lab.dir);
        ns.ip_batch(
            false,
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("addr add {addr}/24 dev eth0"),
                format!("route add default via {INET_PREFIX}.1"),
            ],
            &lab.dir,
        );
        lab.nodes.insert(label.to_string(), ns);
    }

    // Each host's rendered ruleset.
    for h in &hosts {
        let file = lab.rendered.join(format!("hosts/{}/nftables.conf", h.name));
        run(lab.ns(&short(h)).cmd("nft").arg("-f").arg(&file))
            .unwrap_or_else(|e| panic!("{}: {e}", h.name));
    }
    eprintln!(
        "{} namespaces, rulesets loaded: {:?}",
        lab.nodes.len() + 1,
        started.elapsed()
    );

    // ns-a: NSD with the rendered zones (their include file as is) and remote.test.
    let nsd_dir = lab.dir.path().join("nsd");
    std::fs::create_dir_all(&nsd_dir).unwrap();
    let mut internet = String::new();
    for (origin, text) in internet_zones() {
        let file = nsd_dir.join(format!("{origin}.zone"));
        std::fs::write(&file, text).unwrap();
        internet.push_str(&format!(
            "zone:\n  name: \"{origin}\"\n  zonefile: \"{}\"\n",
            file.display()
        ));
    }
    let d = nsd_dir.display();
    let conf = format!(
        "server:\n  ip-address: {}\n  port: 53\n  username: \"\"\n  chroot: \"\"\n  \
         zonesdir: \"{}\"\n  database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  \
         pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  \
         logfile: \"{d}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n\n\
         remote-control:\n  control-enable: no\n\n\
         include: \"{}\"\n\n{internet}",
        ns_a.ipv4.unwrap(),
        lab.rendered.join("dns").display(),
        lab.rendered.join("dns/nsd-zones.conf").display(),
    );
    std::fs::write(nsd_dir.join("nsd.conf"), conf).unwrap();
    let ns_label = ns_a.name.short().to_string();
    let mut nsd = lab.ns(&ns_label).cmd("nsd");
    nsd.arg("-d").arg("-c").arg(nsd_dir.join("nsd.conf"));
    lab.spawn("nsd", &mut nsd);

    // The remote MX.
    let inbox = lab.dir.path().join("remote-inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let mut sink = lab.ns("remote").cmd("python3");
    sink.args(["-u", "-c", SINK]).arg(&inbox);
    lab.spawn("remote-mx", &mut sink);

    // The mail roles, each with its rendered config.
    for h in &hosts {
        for &role in &h.roles {
            if role == Role::Lb {
                continue;
            }
            let config = lab
                .rendered
                .join(format!("hosts/{}/ringmail-{role}.toml", h.name));
            let mut cmd = lab.ns(&short(h)).cmd(RINGMAIL);
            cmd.env("RUST_LOG", "info")
                .arg(role.name())
                .arg("--config")
                .arg(&config);
            lab.spawn(&format!("{}-{role}", short(h)), &mut cmd);
        }
    }
    // The routers' and LBs' BIRD, and the LBs.
    for r in &routers {
        start_bird(
            &mut lab,
            &r.name.clone(),
            &format!("routers/{}/bird.conf", r.name),
        );
    }
    for h in hosts.iter().filter(|h| h.has(Role::Lb)) {
        let label = short(h);
        start_bird(&mut lab, &label, &format!("hosts/{}/bird.conf", h.name));
        let config = lab
            .rendered
            .join(format!("hosts/{}/ringmail-lb.toml", h.name));
        let mut cmd = lab.ns(&label).cmd(RINGMAIL);
        cmd.env("RUST_LOG", "info")
            .args(["lb", "--config"])
            .arg(&config);
        lab.spawn(&format!("{label}-lb"), &mut cmd);
    }

    // Ready: DNS answers, the roles listen, both routers route both VIPs to both LBs.
    let wait = Duration::from_secs(30);
    let ns_ip = ns_a.ipv4.unwrap().to_string();
    let probe = format!("mx-a1.{}", t.primary().name);
    let answered = wait_for(wait, || {
        let (st, _) = run_bounded(
            lab.ns("client")
                .cmd("python3")
                .args(["-c", CLIENT_PY, "resolve", &ns_ip, &probe, "A"]),
            Duration::from_secs(10),
        );
        st.success().then_some(())
    });
    if answered.is_none() {
        lab.fail("ns-a does not answer");
    }
    for h in &hosts {
        for &role in &h.roles {
            let port = match role {
                Role::Msa => 587,
                Role::Mx | Role::Mta => 25,
                Role::Mda => 993,
                Role::Lb => continue,
            };
            lab.wait_listening(&short(h), port, wait);
        }
    }
    eprintln!("DNS and every role up: {:?}", started.elapsed());
    let lb_addrs: Vec<String> = hosts
        .iter()
        .filter(|h| h.has(Role::Lb))
        .map(|h| h.ipv4.unwrap().to_string())
        .collect();
    let mut lb_sorted = lb_addrs.clone();
    lb_sorted.sort();
    let vips: Vec<String> = t
        .services
        .iter()
        .filter_map(|s| s.ipv4)
        .map(|a| a.to_string())
        .collect();
    let ecmp = wait_for(Duration::from_secs(45), || {
        routers
            .iter()
            .all(|r| vips.iter().all(|v| lab.nexthops(&r.name, v) == lb_sorted))
            .then_some(())
    });
    if ecmp.is_none() {
        let have: Vec<String> = routers
            .iter()
            .flat_map(|r| {
                vips.iter()
                    .map(|v| format!("{} {v}: {:?}", r.name, lab.nexthops(&r.name, v)))
                    .collect::<Vec<_>>()
            })
            .collect();
        lab.fail(&format!(
            "the routers' ECMP routes to the VIPs are not {lb_sorted:?}: {have:?}"
        ));
    }
    eprintln!(
        "both routers route {vips:?} over {lb_sorted:?} (ECMP): {:?}",
        started.elapsed()
    );
    lab
}

fn start_bird(lab: &mut Lab, label: &str, rendered: &str) {
    let conf = lab.dir.path().join(format!("bird-{label}.conf"));
    std::fs::write(&conf, bird_config(&lab.rendered.join(rendered))).unwrap();
    let ctl = lab.dir.path().join(format!("bird-{label}.ctl"));
    let mut cmd = lab.ns(label).cmd("bird");
    cmd.args(["-f", "-c"])
        .arg(&conf)
        .arg("-s")
        .arg(&ctl)
        .arg("-P")
        .arg(lab.dir.path().join(format!("bird-{label}.pid")));
    lab.spawn(&format!("bird-{label}"), &mut cmd);
}

/// The message files the remote MX has received.
fn remote_inbox(lab: &Lab) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(lab.dir.path().join("remote-inbox"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn site_a_stands_up_from_the_rendered_files_and_carries_mail() {
    skip_unless!(prerequisites());
    let started = Instant::now();
    let lab = build(started);
    let t = &lab.t;
    let ns_ip = t.dns.nameservers[0].ipv4.unwrap().to_string();
    let ca = lab.ca.display().to_string();
    let domain = t.primary().name.to_string();
    let service = |kind: ServiceKind| {
        t.services
            .iter()
            .find(|s| s.kind == kind)
            .unwrap()
            .name
            .to_string()
    };
    let token = format!("out{}", std::process::id());

    // 1. Submission through the anycast LB, out through the MTA to remote.test's MX.
    let out = lab.client(
        "client",
        &[
            "submit",
            &ns_ip,
            &service(ServiceKind::Submission),
            USER,
            PASSWORD,
            &format!("bob@{REMOTE_DOMAIN}"),
            &token,
            &ca,
        ],
        Duration::from_secs(40),
    );
    eprintln!("{}: {:?}", out.trim(), started.elapsed());
    let got = wait_for(Duration::from_secs(30), || {
        remote_inbox(&lab).into_iter().find_map(|p| {
            let m = std::fs::read(&p).ok()?;
            String::from_utf8_lossy(&m).contains(&token).then_some(m)
        })
    });
    let Some(message) = got else {
        lab.fail("the submitted message never reached the remote MX");
    };
    let text = String::from_utf8_lossy(&message).into_owned();
    // The MSA saw the client's own address (PROXY v2 from the LB) and its login.
    assert!(
        text.contains(&format!("[{CLIENT}])\r\n\t(Authenticated sender: {USER})")),
        "{text}"
    );
    let sig = text
        .split("\r\n")
        .find(|l| l.starts_with("DKIM-Signature:"))
        .unwrap_or_else(|| panic!("no DKIM-Signature:\n{text}"));
    assert!(sig.contains(&format!("d={domain}")), "{sig}");
    // The signature verifies against the record in the rendered zone, which ns-a serves.
    if dkimverify::dkimpy_missing().is_none() {
        let zone =
            std::fs::read_to_string(lab.rendered.join(format!("dns/{domain}.zone"))).unwrap();
        let key = &t.primary().dkim[0];
        let owner = format!("{}._domainkey", key.selector);
        // The record's line and its continuation lines.
        let mut lines = zone.lines().skip_while(|l| !l.starts_with(&owner));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no {owner} in the zone"));
        let line = std::iter::once(first)
            .chain(lines.take_while(|l| l.starts_with(char::is_whitespace)))
            .collect::<Vec<_>>()
            .join(" ");
        let (_, data) = dkimverify::zone_txt(&line).unwrap_or_else(|| panic!("{line}"));
        let name = format!("{owner}.{domain}");
        let results = dkimverify::dkim_verify(&message, &[(name, data)]).unwrap();
        assert!(
            results
                .iter()
                .any(|r| r.starts_with(&format!("d={domain} s={}", key.selector))
                    && r.ends_with(" pass")),
            "{results:?}\n{text}"
        );
        eprintln!(
            "remote MX got it, DKIM {results:?}: {:?}",
            started.elapsed()
        );
    } else {
        eprintln!("remote MX got it with a DKIM-Signature (dkimpy missing: not verified)");
    }

    // 2. Inbound at mx-a1, delivered to mda-a1, read over IMAPS through the anycast LB.
    let token_in = format!("in{}", std::process::id());
    let mx = lab.t.hosts_with(Role::Mx).next().unwrap().name.to_string();
    let out = lab.client(
        "client",
        &[
            "inbound",
            &ns_ip,
            &domain,
            &mx,
            &format!("carol@{REMOTE_DOMAIN}"),
            USER,
            &token_in,
            &ca,
        ],
        Duration::from_secs(40),
    );
    eprintln!("{}: {:?}", out.trim(), started.elapsed());
    let out = lab.client(
        "client",
        &[
            "imap",
            &ns_ip,
            &service(ServiceKind::Imap),
            USER,
            PASSWORD,
            &token_in,
            &ca,
            "30",
        ],
        Duration::from_secs(45),
    );
    // The MX's sender checks asked ns-a (the topology's resolver): the Internet host's PTR and
    // remote.test's SPF record. (DMARC stays temperror: ns-a is authoritative only and refuses
    // the queries above remote.test that a recursive resolver would answer.)
    for check in ["iprev=pass", "spf=pass"] {
        assert!(out.contains(check), "{check} missing:\n{out}");
    }
    assert!(out.contains(&format!("lab {token_in}")), "{out}");
    assert!(out.contains("Delivered through the lab."), "{out}");
    eprintln!(
        "{}: {:?}",
        out.lines().last().unwrap_or_default(),
        started.elapsed()
    );

    // 3. The firewall, as the seed's table says.
    let first = |role: Role| lab.t.hosts_with(role).next().unwrap();
    let addr = |role: Role| -> IpAddr { first(role).ipv4.unwrap().into() };
    let (msa, mta) = (short(first(Role::Msa)), short(first(Role::Mta)));
    for (from, to, port) in [
        ("client", addr(Role::Msa).to_string(), 25),
        ("client", addr(Role::Mta).to_string(), 25),
        (msa.as_str(), REMOTE_MX.to_string(), 25),
    ] {
        let r = lab.client(
            from,
            &["probe", &to, &port.to_string(), "2"],
            Duration::from_secs(10),
        );
        assert_ne!(r.trim(), "open", "{from} -> {to}:{port} must be blocked");
        // Dropped by the firewall, not refused by the host: no RST.
        assert_ne!(r.trim(), "ECONNREFUSED", "{from} -> {to}:{port}");
        eprintln!("{from} -> {to}:{port}: {}", r.trim());
    }
    // The controls: the same kind of connections where the table allows them.
    for (from, to, port) in [
        ("client", addr(Role::Mx).to_string(), 25),
        (mta.as_str(), REMOTE_MX.to_string(), 25),
    ] {
        let r = lab.client(
            from,
            &["probe", &to, &port.to_string(), "2"],
            Duration::from_secs(10),
        );
        assert_eq!(r.trim(), "open", "{from} -> {to}:{port}");
    }
    eprintln!("all flows done: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "took {:?}",
        started.elapsed()
    );
}
