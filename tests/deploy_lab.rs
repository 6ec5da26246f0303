//! Site A of the example topology stood up whole from the rendered files by
//! `ringmail deploy lab` (root only: network namespaces, the rendered nftables rulesets, BIRD on
//! the routers and LBs, NSD with the rendered zones, every mail role with its rendered config;
//! see src/lab.rs for the picture and the lab's few, documented changes), and the seed's mail
//! flows run through it end to end:
//! 1. submission: the Internet client resolves smtp.example.com through ns-a, then 587 on the
//!    anycast address (rt-a1's ECMP route to either LB) with STARTTLS and AUTH -> LB -> MSA
//!    (PROXY v2: the MSA sees the client's address) -> MTA (DKIM) -> remote.test's MX, found
//!    through ns-a: a sink in the remote namespace gets the message, and its DKIM-Signature
//!    verifies (dkimpy) against the record of the rendered zone;
//! 2. inbound: the client delivers to mx-a1:25 (an MX of example.com in the rendered zone) ->
//!    LMTP -> mda-a1, and reads it over IMAPS at imap.example.com's anycast address;
//! 3. the firewall: the Internet cannot reach msa-a1:25 nor mta-a1:25, msa-a1 cannot reach the
//!    Internet's port 25 (dropped, not refused), while mx-a1:25 and mta-a1 -> Internet:25 pass;
//! 4. SIGTERM: the lab must leave no namespace behind.
//!
//! Needs root, `ip`, `nft`, `bird`, `nsd`, `ss` and `python3`; skips otherwise (fails under
//! `RINGMAIL_REQUIRE_ALL=1`). Every wait is bounded; on failure the lab's processes are killed
//! and its namespaces deleted by the guards below.

#[macro_use]
mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{run, seq};
use common::*;
use ringmail_deploy::topology::{Host, Role, ServiceKind, Topology};

const EXAMPLE: &str = "deploy/examples/example.com.toml";
const SITE: &str = "a";

/// The lab's Internet (src/lab.rs): the client and the remote host.
const CLIENT: &str = "198.51.100.7";
const REMOTE_MX: &str = "198.51.100.25";
const REMOTE_DOMAIN: &str = "remote.test";

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
        ("nsd", "-v"),
        ("ss", "-V"),
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

/// Deletes whatever namespaces named `<prefix>-…` are left (and kills what runs in them): the
/// safety net when the test fails before `deploy lab` could tear down itself.
struct Leftovers(String);

impl Leftovers {
    fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.0)))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for ns in self.namespaces() {
            // Netns's drop kills what is left in the namespace and deletes it.
            drop(common::netns::Netns(ns));
        }
    }
}

/// `ringmail deploy lab` running site A, and where its pieces are.
struct Lab {
    /// The CLI (killed on drop; a SIGTERM is the orderly way down).
    cli: ChildGuard,
    /// The remote MX's sink, once started.
    sink: Option<ChildGuard>,
    prefix: String,
    dir: PathBuf,
    t: Topology,
}

impl Lab {
    fn cmd(&self, label: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &format!("{}-{label}", self.prefix),
            program,
        ]);
        c
    }

    /// Python `CLIENT_PY cmd args…` in namespace `label`, bounded; its output, or a panic.
    fn client(&self, label: &str, args: &[&str], timeout: Duration) -> String {
        let (st, out) = run_bounded(
            self.cmd(label, "python3")
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

    /// The next hops of `label`'s kernel route to `dst`, sorted.
    fn nexthops(&self, label: &str, dst: &str) -> Vec<String> {
        let family = if dst.contains(':') { "-6" } else { "-4" };
        let out =
            run(self.cmd(label, "ip").args([family, "route", "show", dst])).unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut hops: Vec<String> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops
    }

    fn inbox(&self) -> PathBuf {
        self.dir.join("remote-inbox")
    }

    fn rendered(&self) -> PathBuf {
        self.dir.join("lab/rendered")
    }

    fn ca(&self) -> String {
        self.dir.join("lab/lab-ca.pem").display().to_string()
    }
}

fn short(h: &Host) -> String {
    h.name.short().to_string()
}

/// Starts `ringmail deploy lab` for site A and waits (bounded) until it reports ready.
fn start(dir: &Path, prefix: &str, started: Instant) -> Lab {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXAMPLE);
    let t = ringmail_deploy::load_file(&example).unwrap_or_else(|e| panic!("{e}"));
    let mut cli = ChildGuard::spawn(
        "deploy lab",
        Command::new(RINGMAIL)
            .args(["deploy", "lab", "--topology"])
            .arg(&example)
            .arg("--dir")
            .arg(dir.join("lab"))
            .args(["--site", SITE, "--name", prefix, "--timeout", "60"])
            .arg("--user")
            .arg(format!("{USER}:{PASSWORD}")),
        dir.join("deploy-lab.log"),
    )
    .expect("start ringmail deploy lab");
    let ready = wait_for(Duration::from_secs(90), || {
        if cli.try_wait().is_some() {
            return Some(false);
        }
        cli.log_text().contains("lab ready").then_some(true)
    });
    assert_eq!(
        ready,
        Some(true),
        "deploy lab did not come up:\n{}",
        cli.log_text()
    );
    eprintln!("deploy lab ready: {:?}", started.elapsed());
    Lab {
        cli,
        sink: None,
        prefix: prefix.to_string(),
        dir: dir.to_path_buf(),
        t,
    }
}

/// The message files the remote MX has received.
fn remote_inbox(lab: &Lab) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(lab.inbox())
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
    let dir = TempDir::new("deploy-lab");
    let prefix = format!("rml{}x{}", std::process::id(), seq());
    let leftovers = Leftovers(prefix.clone());
    let mut lab = start(dir.path(), &prefix, started);
    let t = lab.t.clone();
    let t = &t;

    // Ready means ECMP: both routers route every VIP, IPv4 and IPv6, over both LBs.
    let site = t.sites.iter().position(|s| s.name == SITE).unwrap();
    let lbs = |v6: bool| -> Vec<String> {
        let mut v: Vec<String> = t
            .hosts_with(Role::Lb)
            .filter(|h| h.site == site)
            .flat_map(|h| h.addrs())
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| a.to_string())
            .collect();
        v.sort();
        v
    };
    for r in t.routers.iter().filter(|r| r.site == site) {
        for v in t.services.iter().flat_map(|s| s.addrs()) {
            let hops = lab.nexthops(&r.name, &v.to_string());
            assert_eq!(hops, lbs(v.is_ipv6()), "{} -> {v}", r.name);
        }
    }

    // The remote MX: a sink on the lab's remote host.
    std::fs::create_dir_all(lab.inbox()).unwrap();
    let sink = ChildGuard::spawn(
        "remote MX",
        lab.cmd("remote", "python3")
            .args(["-u", "-c", SINK])
            .arg(lab.inbox()),
        dir.path().join("remote-mx.log"),
    )
    .expect("start the sink");
    wait_for(Duration::from_secs(10), || {
        sink.log_text().contains("ready").then_some(())
    })
    .unwrap_or_else(|| panic!("sink did not start:\n{}", sink.log_text()));
    lab.sink = Some(sink);

    let ns_ip = t.dns.nameservers[0].ipv4.unwrap().to_string();
    let ca = lab.ca();
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
        panic!("the submitted message never reached the remote MX");
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
            std::fs::read_to_string(lab.rendered().join(format!("dns/{domain}.zone"))).unwrap();
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

    // SIGTERM: the lab kills what it started and deletes its namespaces.
    lab.sink = None;
    lab.cli.signal(libc::SIGTERM);
    let status = lab.cli.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "deploy lab after SIGTERM: {status:?}\n{}",
        lab.cli.log_text()
    );
    assert!(lab.cli.log_text().contains("lab torn down"));
    assert_eq!(
        leftovers.namespaces(),
        Vec::<String>::new(),
        "namespaces left"
    );
    eprintln!("torn down: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "took {:?}",
        started.elapsed()
    );
}
