//! Netlink module against the real kernel, each test in a network namespace
//! of its own (unshared by a dedicated thread), so the host is never
//! touched. Root only: without root every test prints a skip line.
//!
//! Child processes (`ip`, `bird`) spawned from the unshared thread inherit
//! its namespace: fork/clone copies the calling thread's namespaces
//! (checked by `namespace_is_private` below).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringmail_bgp_glue::netlink::{
    KernelTable, LoopbackVips, Netlink, NetlinkError, RTPROT_RINGMAIL,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const V4_B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
const V4_PRE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
const TABLE: u32 = 1000;

fn is_root() -> bool {
    // Effective uid is the second field of "Uid:".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_NET_ADMIN)");
            return;
        }
    };
}

/// Runs `f` on a new thread that first moves into a fresh network
/// namespace (with `lo` up) and then drives `f` on a current-thread tokio
/// runtime. A panic in `f` fails the calling test.
fn in_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    in_netns_lo(true, f)
}

/// [`in_netns`], bringing `lo` up only if `lo_up` (which needs
/// CAP_NET_ADMIN itself).
fn in_netns_lo<F, Fut>(lo_up: bool, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let t = std::thread::spawn(move || {
        #[allow(unsafe_code)]
        // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET affects only
        // the calling thread (this dedicated one), which ends with the test.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        if lo_up {
            ip(&["link", "set", "lo", "up"]);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(f());
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

/// `ip ARGS`, which must succeed; returns stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn ip_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let out = ip(&all);
    if out.trim().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_str(&out).expect("ip -j output is JSON")
}

/// Addresses on lo as (local, prefixlen, nodad).
fn lo_addrs() -> Vec<(IpAddr, u64, bool)> {
    let v = ip_json(&["addr", "show", "dev", "lo"]);
    let mut out = Vec::new();
    for link in v.as_array().expect("array") {
        for a in link["addr_info"].as_array().expect("addr_info") {
            let ip: IpAddr = a["local"].as_str().expect("local").parse().expect("ip");
            let len = a["prefixlen"].as_u64().expect("prefixlen");
            let nodad = a["nodad"].as_bool().unwrap_or(false);
            out.push((ip, len, nodad));
        }
    }
    out
}

fn has_addr(ip: IpAddr) -> bool {
    lo_addrs().iter().any(|(a, _, _)| *a == ip)
}

/// Routes of `table` as (dst, protocol, dev).
fn table_routes(table: u32) -> Vec<(String, String, String)> {
    let t = table.to_string();
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        let v = ip_json(&[fam, "route", "show", "table", &t]);
        for r in v.as_array().expect("array") {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            out.push((s("dst"), s("protocol"), s("dev")));
        }
    }
    out
}

#[test]
fn namespace_is_private() {
    require_root!();
    in_netns(|| async {
        let links = ip_json(&["link", "show"]);
        let names: Vec<&str> = links
            .as_array()
            .expect("array")
            .iter()
            .map(|l| l["ifname"].as_str().expect("ifname"))
            .collect();
        assert_eq!(
            names,
            ["lo"],
            "children of the unshared thread see its netns"
        );
        let nl = Netlink::new().expect("netlink");
        assert_eq!(nl.link_index("lo").await.expect("lo"), 1);
        match nl.link_index("ringmail-nope0").await {
            Err(NetlinkError::NoSuchInterface { name, .. }) => assert_eq!(name, "ringmail-nope0"),
            other => panic!("expected NoSuchInterface, got {other:?}"),
        }
    });
}

#[test]
fn loopback_vips_add_is_idempotent_and_removes_only_its_own() {
    require_root!();
    in_netns(|| async {
        ip(&["addr", "add", "192.0.2.9/32", "dev", "lo"]);
        let nl = Netlink::new().expect("netlink");

        let mut first = LoopbackVips::add(&nl, &[V4, V6, V4_PRE, V4])
            .await
            .expect("add");
        assert_eq!(first.owned(), [V4, V6]);
        assert_eq!(first.preexisting(), [V4_PRE]);
        let addrs = lo_addrs();
        assert!(addrs.contains(&(V4, 32, false)), "{addrs:?}");
        assert!(addrs.contains(&(V6, 128, true)), "v6 has nodad: {addrs:?}");
        assert!(addrs.contains(&(V4_PRE, 32, false)), "{addrs:?}");

        // Usable at once: binding fails with EADDRNOTAVAIL while tentative.
        UdpSocket::bind((V6, 0)).expect("bind the v6 VIP right away");
        UdpSocket::bind((V4, 0)).expect("bind the v4 VIP");

        // A second add (restart while the addresses are still there) owns
        // nothing, and removing its nothing keeps everything.
        let mut second = LoopbackVips::add(&nl, &[V4, V6, V4_PRE])
            .await
            .expect("second add");
        assert!(second.owned().is_empty());
        assert_eq!(second.preexisting(), [V4, V6, V4_PRE]);
        second.remove_owned().await.expect("remove nothing");
        assert!(has_addr(V4) && has_addr(V6) && has_addr(V4_PRE));

        first.remove_owned().await.expect("remove owned");
        assert!(first.owned().is_empty());
        assert!(!has_addr(V4), "v4 VIP removed");
        assert!(!has_addr(V6), "v6 VIP removed");
        assert!(has_addr(V4_PRE), "pre-existing address kept");

        // Already gone is fine.
        let mut third = LoopbackVips::add(&nl, &[V4_B]).await.expect("add");
        ip(&["addr", "del", "192.0.2.2/32", "dev", "lo"]);
        third.remove_owned().await.expect("gone already is fine");
    });
}

#[test]
fn kernel_table_announce_withdraw_flush() {
    require_root!();
    in_netns(|| async {
        let nl = Netlink::new().expect("netlink");
        let kt = KernelTable::new(&nl, TABLE).await.expect("table");
        let proto = RTPROT_RINGMAIL.to_string();

        // Someone else's routes in the same table: never touched.
        ip(&[
            "route",
            "add",
            "192.0.2.50/32",
            "dev",
            "lo",
            "table",
            "1000",
        ]);
        ip(&["route", "add", "192.0.2.2/32", "dev", "lo", "table", "1000"]);

        for _ in 0..2 {
            kt.announce(V4).await.expect("announce v4");
            kt.announce(V6).await.expect("announce v6");
        }
        let routes = table_routes(TABLE);
        let ours: Vec<_> = routes.iter().filter(|r| r.1 == proto).collect();
        assert_eq!(ours.len(), 2, "replace is idempotent: {routes:?}");
        assert!(routes.contains(&("192.0.2.1".into(), proto.clone(), "lo".into())));
        assert!(routes.contains(&("2001:db8::1".into(), proto.clone(), "lo".into())));
        assert_eq!(kt.list().await.expect("list"), [V4, V6]);
        // Nothing leaked into the main table.
        assert!(table_routes(254).iter().all(|r| r.1 != proto));

        kt.withdraw(V4).await.expect("withdraw v4");
        kt.withdraw(V4).await.expect("withdraw v4 again");
        // Same prefix, other protocol: not ours, stays.
        kt.withdraw(V4_B).await.expect("withdraw foreign");
        assert!(!table_routes(TABLE).iter().any(|r| r.0 == "192.0.2.1"));
        assert!(table_routes(TABLE).iter().any(|r| r.0 == "192.0.2.2"));
        assert_eq!(kt.list().await.expect("list"), [V6]);

        kt.announce(V4_B)
            .await
            .expect("announce over a foreign route");
        assert_eq!(kt.flush().await.expect("flush"), 2);
        assert!(kt.list().await.expect("list").is_empty());
        let left: Vec<String> = table_routes(TABLE).into_iter().map(|r| r.0).collect();
        assert!(left.contains(&"192.0.2.50".to_owned()), "{left:?}");
        assert_eq!(kt.flush().await.expect("flush empty"), 0);
    });
}

#[test]
fn kernel_table_refuses_reserved_tables() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let nl = Netlink::new().expect("netlink");
        for t in [0, 253, 254, 255] {
            assert!(matches!(
                KernelTable::new(&nl, t).await,
                Err(NetlinkError::ReservedTable(n)) if n == t
            ));
        }
    });
}

/// Re-runs this test binary without CAP_NET_ADMIN (`setpriv`), where
/// `eperm_child` adds a VIP and prints the error.
#[test]
fn eperm_names_the_capability() {
    require_root!();
    if which("setpriv").is_none() {
        eprintln!("skipped: setpriv not found");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--inh-caps", "-net_admin"])
        .arg(exe)
        .args(["eperm_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("RINGMAIL_NL_EPERM_CHILD", "1")
        .output()
        .expect("run setpriv");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed: {text}");
    assert!(
        text.contains("EPERM-CHILD: adding address 192.0.2.1/32 on lo: operation not permitted (EPERM): needs CAP_NET_ADMIN"),
        "{text}"
    );
}

#[test]
fn eperm_child() {
    if std::env::var_os("RINGMAIL_NL_EPERM_CHILD").is_none() {
        return; // only meaningful when started by eperm_names_the_capability
    }
    in_netns_lo(false, || async {
        let nl = Netlink::new().expect("netlink");
        let err = LoopbackVips::add(&nl, &[V4])
            .await
            .expect_err("no CAP_NET_ADMIN");
        assert_eq!(err.errno(), Some(1));
        assert!(matches!(err, NetlinkError::PermissionDenied { .. }));
        println!("EPERM-CHILD: {err}");
    });
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A BIRD started for a test; killed and its directory removed on drop,
/// also when the test panics.
struct BirdGuard {
    child: Child,
    dir: PathBuf,
}

impl Drop for BirdGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn birdc(birdc: &Path, ctl: &Path, cmd: &str) -> String {
    let out = Command::new(birdc)
        .arg("-s")
        .arg(ctl)
        .args(cmd.split_whitespace())
        .output()
        .expect("run birdc");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `birdc show route all table T` until `pred` holds or 10 s pass.
fn wait_bird(birdc_bin: &Path, ctl: &Path, table: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = birdc(birdc_bin, ctl, &format!("show route all table {table}"));
        if pred(&out) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kernel-table mode end to end: routes installed by `KernelTable`
/// are learned by BIRD 2 (`protocol kernel { kernel table N; learn; }`),
/// and a withdraw disappears from BIRD too.
#[test]
fn bird_learns_kernel_table_routes() {
    require_root!();
    let (Some(bird), Some(birdc_bin)) = (which("bird"), which("birdc")) else {
        if std::env::var_os("RINGMAIL_REQUIRE_ALL").is_some_and(|v| v == "1") {
            panic!("bird/birdc not on PATH and RINGMAIL_REQUIRE_ALL=1");
        }
        eprintln!("skipped: bird (BIRD 2) not on PATH");
        return;
    };
    in_netns(move || async move {
        let dir = std::env::temp_dir().join(format!("ringmail-bird-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let conf = dir.join("bird.conf");
        let ctl = dir.join("ctl");
        // table 100 like the deploy example; `protocol device` is required
        // (without it BIRD does not know lo and drops the routes).
        std::fs::write(
            &conf,
            "router id 192.0.2.254;\n\
             protocol device { }\n\
             ipv4 table vip4;\n\
             ipv6 table vip6;\n\
             protocol kernel k4 { kernel table 100; learn; scan time 1;\n\
               ipv4 { table vip4; import all; export none; }; }\n\
             protocol kernel k6 { kernel table 100; learn; scan time 1;\n\
               ipv6 { table vip6; import all; export none; }; }\n",
        )
        .expect("write bird.conf");

        let nl = Netlink::new().expect("netlink");
        let kt = KernelTable::new(&nl, 100).await.expect("table 100");
        kt.announce(V4).await.expect("announce v4");
        kt.announce(V6).await.expect("announce v6");

        let child = Command::new(&bird)
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&ctl)
            .arg("-P")
            .arg(dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bird");
        let _guard = BirdGuard {
            child,
            dir: dir.clone(),
        };

        let src = format!("Kernel.source: {RTPROT_RINGMAIL}");
        let v4 = wait_bird(&birdc_bin, &ctl, "vip4", |o| o.contains("192.0.2.1/32"));
        assert!(
            v4.contains("192.0.2.1/32"),
            "BIRD learned the v4 route:\n{v4}"
        );
        assert!(v4.contains("dev lo") && v4.contains(&src), "{v4}");
        let v6 = wait_bird(&birdc_bin, &ctl, "vip6", |o| o.contains("2001:db8::1/128"));
        assert!(
            v6.contains("2001:db8::1/128"),
            "BIRD learned the v6 route:\n{v6}"
        );
        assert!(v6.contains("dev lo") && v6.contains(&src), "{v6}");

        kt.withdraw(V4).await.expect("withdraw v4");
        let v4 = wait_bird(&birdc_bin, &ctl, "vip4", |o| !o.contains("192.0.2.1/32"));
        assert!(
            !v4.contains("192.0.2.1/32"),
            "BIRD dropped the withdrawn route:\n{v4}"
        );
        kt.flush().await.expect("flush");
    });
}
