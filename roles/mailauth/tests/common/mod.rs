//! Reusable test fixture for sender authentication: a real authoritative DNS server on
//! loopback and an independent DKIM/ARC signer.
//!
//! - DNS: NSD (Debian package `nsd`), started by [`DnsServer::start`] as a foreground process
//!   on `127.0.0.1:<free high port>` (UDP and TCP) from a config and zone files written into a
//!   private temporary directory. It needs no privileges and serves ordinary zone files, so
//!   long TXT records (2048-bit DKIM keys) are real multi-string TXT records answered over
//!   UDP with EDNS or over TCP, as on the Internet. It is stopped with SIGTERM (its worker
//!   processes go with it) when the [`DnsServer`] is dropped.
//! - Keys and signatures: dkimpy (`python3-dkim`; `dknewkey`, `dkimsign`, `arcsign`), which
//!   calls `openssl` for RSA keys, needs `python3-nacl` for ed25519 and `python3-authres`
//!   for ARC. Nothing of the code under test signs.
//!
//! Tests call [`tools_available`] first: when a tool is missing it prints
//! `SKIP: <tool> not installed` and the test returns early, unless `RINGMAIL_REQUIRE_ALL=1`,
//! when it panics. Only loopback is used; addresses in records are documentation ranges
//! (192.0.2.0/24, 2001:db8::/32), never contacted.
//!
//! Loopback client addresses are not used for iprev: hickory-resolver answers every
//! `*.127.in-addr.arpa` PTR query with `localhost` itself (RFC 6761) without asking the
//! server.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Debian packages the fixture needs, for messages.
pub const PACKAGES: &str = "nsd python3-dkim python3-nacl python3-authres openssl";

fn find_in_path(tool: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// True when every tool is installed. Otherwise prints `SKIP: <tool> not installed` and
/// returns false, or panics when `RINGMAIL_REQUIRE_ALL=1`.
pub fn tools_available(tools: &[&str]) -> bool {
    let mut missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_in_path(t).is_none())
        .collect();
    // ed25519 keys and ARC need python modules beyond python3-dkim.
    for (tool, module) in [("dknewkey", "nacl"), ("arcsign", "authres")] {
        if tools.contains(&tool)
            && !missing.contains(&tool)
            && !Command::new("/usr/bin/python3")
                .args(["-c", &format!("import {module}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            missing.push(if module == "nacl" {
                "python3-nacl"
            } else {
                "python3-authres"
            });
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "SKIP: {} not installed (Debian packages: {PACKAGES})",
        missing.join(", ")
    );
    if std::env::var("RINGMAIL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{msg} and RINGMAIL_REQUIRE_ALL=1");
    }
    eprintln!("{msg}");
    false
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "ringmail-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A zone: origin plus zone-file lines (relative names are relative to the origin).
/// An SOA and an NS record are added.
#[derive(Clone, Debug)]
pub struct Zone {
    pub origin: String,
    pub lines: Vec<String>,
}

impl Zone {
    pub fn new(origin: &str) -> Zone {
        Zone {
            origin: origin.trim_end_matches('.').to_string(),
            lines: Vec::new(),
        }
    }

    /// Adds one zone-file line, e.g. `"mail A 192.0.2.10"`.
    pub fn rr(mut self, line: &str) -> Zone {
        self.lines.push(line.to_string());
        self
    }

    /// Adds a TXT record of any length (split into strings of at most 255 bytes).
    pub fn txt(self, name: &str, text: &str) -> Zone {
        let line = format!("{name} TXT {}", txt_rdata(text));
        self.rr(&line)
    }

    fn file(&self) -> String {
        let o = &self.origin;
        let mut s = format!(
            "$ORIGIN {o}.\n$TTL 60\n@ IN SOA ns.{o}. hostmaster.{o}. 1 3600 600 86400 60\n@ IN NS ns.{o}.\n"
        );
        for l in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// TXT RDATA in zone-file syntax: quoted strings of at most 255 bytes each, `"` and `\`
/// escaped.
pub fn txt_rdata(text: &str) -> String {
    text.as_bytes()
        .chunks(255)
        .map(|c| {
            let mut q = String::from("\"");
            for &b in c {
                if b == b'"' || b == b'\\' {
                    q.push('\\');
                }
                q.push(char::from(b));
            }
            q.push('"');
            q
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The reverse-zone owner name of an IPv4 or IPv6 address (with trailing dot).
pub fn reverse_name(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        std::net::IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

/// An NSD process serving `zones` on `127.0.0.1:port`, UDP and TCP.
pub struct DnsServer {
    addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().unwrap().port();
        if port >= 1024 && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl DnsServer {
    /// Writes the config and zones, starts NSD, and waits until it answers (at most 10 s).
    /// Retries on another port when the chosen one was taken meanwhile.
    /// An empty zone is added for each top-level domain of `zones` that is not served
    /// already, so that names outside the given zones (the DMARC tree walk asks for
    /// `_dmarc.test`) get NXDOMAIN as from the real DNS rather than REFUSED.
    pub fn start(zones: &[Zone]) -> DnsServer {
        let mut zones = zones.to_vec();
        let mut tlds: Vec<String> = zones
            .iter()
            .filter_map(|z| z.origin.rsplit('.').next().map(str::to_string))
            .collect();
        tlds.sort();
        tlds.dedup();
        for tld in tlds {
            if !zones.iter().any(|z| z.origin == tld) {
                zones.push(Zone::new(&tld));
            }
        }
        let probe = zones
            .first()
            .map_or("test".to_string(), |z| z.origin.clone());
        DnsServer::launch(&probe, |dir| {
            let mut conf = String::new();
            for (i, z) in zones.iter().enumerate() {
                let file = dir.join(format!("zone{i}.zone"));
                std::fs::write(&file, z.file()).expect("write zone");
                conf.push_str(&format!(
                    "zone:\n  name: \"{}\"\n  zonefile: \"{}\"\n\n",
                    z.origin,
                    file.display()
                ));
            }
            conf
        })
    }

    /// Serves zone files written elsewhere: `(origin, path)` each.
    #[allow(dead_code)]
    pub fn start_files(files: &[(String, PathBuf)]) -> DnsServer {
        let probe = files.first().map_or("test".to_string(), |f| f.0.clone());
        DnsServer::launch(&probe, |_| {
            files
                .iter()
                .map(|(origin, path)| {
                    format!(
                        "zone:\n  name: \"{origin}\"\n  zonefile: \"{}\"\n\n",
                        path.display()
                    )
                })
                .collect()
        })
    }

    /// Starts NSD with the `zone:` stanzas `zones(dir)` returns (it may write files into the
    /// server's directory), and waits until it answers for `probe` (at most 10 s).
    fn launch(probe: &str, zones: impl Fn(&Path) -> String) -> DnsServer {
        let nsd = find_in_path("nsd").expect("nsd installed");
        let mut last_err = String::new();
        for _ in 0..5 {
            let dir = TempDir::new("nsd");
            let port = free_port();
            let d = dir.path().display();
            let mut conf = format!(
                "server:\n  ip-address: 127.0.0.1@{port}\n  port: {port}\n  username: \"\"\n  chroot: \"\"\n  \
                 zonesdir: \"{d}\"\n  database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  \
                 pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  \
                 logfile: \"{d}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n  hide-version: yes\n  \
                 refuse-any: yes\n\nremote-control:\n  control-enable: no\n\n"
            );
            conf.push_str(&zones(dir.path()));
            let conf_path = dir.path().join("nsd.conf");
            std::fs::write(&conf_path, conf).expect("write nsd.conf");
            let mut child = Command::new(&nsd)
                .arg("-d")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn nsd");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(dir.path().join("nsd.log")).unwrap_or_default();
                    last_err = format!("nsd exited with {status}: {log}");
                    break;
                }
                if answers(addr, probe) {
                    return DnsServer {
                        addr,
                        child,
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log =
                        std::fs::read_to_string(dir.path().join("nsd.log")).unwrap_or_default();
                    panic!("nsd did not answer within 10 s: {log}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nsd could not start: {last_err}");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Sends one SOA query for `name` over UDP and says whether an answer came back.
fn answers(addr: SocketAddr, name: &str) -> bool {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut q = vec![0x52, 0x4d, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 6, 0, 1]);
    if sock.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == [0x52, 0x4d])
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // SIGTERM lets NSD stop its worker processes too; SIGKILL only as a fallback.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// DKIM key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    Rsa2048,
    Ed25519,
}

/// A DKIM key made by dkimpy's `dknewkey`.
pub struct DkimKey {
    pub selector: String,
    pub domain: String,
    pub ktype: KeyType,
    pub private_key: PathBuf,
    /// The TXT record value for `<selector>._domainkey.<domain>`.
    pub dns_txt: String,
}

impl DkimKey {
    /// Generates a key in `dir`.
    pub fn generate(dir: &Path, selector: &str, domain: &str, ktype: KeyType) -> DkimKey {
        let base = dir.join(format!("{selector}.{domain}"));
        let mut cmd = Command::new("dknewkey");
        if ktype == KeyType::Ed25519 {
            cmd.args(["--ktype", "ed25519"]);
        }
        let out = cmd
            .arg(&base)
            .stdin(Stdio::null())
            .output()
            .expect("run dknewkey");
        assert!(
            out.status.success(),
            "dknewkey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = PathBuf::from(format!("{}.key", base.display()));
        let dns = PathBuf::from(format!("{}.dns", base.display()));
        let dns_txt = std::fs::read_to_string(&dns).expect("read .dns");
        DkimKey {
            selector: selector.into(),
            domain: domain.into(),
            ktype,
            private_key: key,
            dns_txt: dns_txt.trim().to_string(),
        }
    }

    /// Like [`DkimKey::generate`], but a key for the same selector, domain and type is
    /// generated once per test process (RSA key generation is slow) and its private key
    /// file written into `dir`.
    pub fn cached(dir: &Path, selector: &str, domain: &str, ktype: KeyType) -> DkimKey {
        type Cache = Mutex<HashMap<(String, String, KeyType), (Vec<u8>, String)>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(Cache::default);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        let (key, dns_txt) = cache
            .entry((selector.to_string(), domain.to_string(), ktype))
            .or_insert_with(|| {
                let tmp = TempDir::new("dknewkey");
                let k = DkimKey::generate(tmp.path(), selector, domain, ktype);
                (std::fs::read(&k.private_key).expect("read key"), k.dns_txt)
            })
            .clone();
        let private_key = dir.join(format!("{selector}.{domain}.key"));
        std::fs::write(&private_key, key).expect("write key");
        DkimKey {
            selector: selector.into(),
            domain: domain.into(),
            ktype,
            private_key,
            dns_txt,
        }
    }

    /// The zone-file owner name of the key record, relative to `origin`.
    pub fn owner(&self) -> String {
        format!("{}._domainkey", self.selector)
    }

    /// Signs `msg` with `dkimsign` (relaxed/relaxed) and returns the signed message.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let alg = match self.ktype {
            KeyType::Rsa2048 => "rsa-sha256",
            KeyType::Ed25519 => "ed25519-sha256",
        };
        self.sign_with(msg, alg)
    }

    /// Signs with an explicit `--signalg` (e.g. "rsa-sha1").
    pub fn sign_with(&self, msg: &[u8], alg: &str) -> Vec<u8> {
        run_filter(
            Command::new("dkimsign")
                .args([
                    "--hcanon",
                    "relaxed",
                    "--bcanon",
                    "relaxed",
                    "--signalg",
                    alg,
                ])
                .arg(&self.selector)
                .arg(&self.domain)
                .arg(&self.private_key),
            msg,
        )
    }

    /// Adds an ARC set with `arcsign` (the message must carry an `Authentication-Results:`
    /// header of `srv_id`) and returns the sealed message.
    pub fn arc_seal(&self, msg: &[u8], srv_id: &str) -> Vec<u8> {
        run_filter(
            Command::new("arcsign")
                .arg(&self.selector)
                .arg(&self.domain)
                .arg(&self.private_key)
                .arg(srv_id),
            msg,
        )
    }
}

fn run_filter(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn signer");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().expect("signer output");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "signer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
