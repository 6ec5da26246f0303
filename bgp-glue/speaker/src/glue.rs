//! The announcer: reads backend health, runs the I/O-free [`Announcer`], and carries its
//! decisions out: BGP UPDATEs through the speaker's sessions, or host routes in a kernel table for
//! BIRD/FRR. It owns the loopback VIPs too.
//!
//! ```text
//!   health fn (LB pools or own checks) ──every 100 ms──► Announcer ──► desired routes
//!   drain / resume / stop commands ─────────────────────────┘              │
//!                          ┌────────────────────────────────────────────────┤
//!                          ▼                                                ▼
//!        speaker tasks (one per neighbour)                    kernel table N (netlink)
//! ```
//!
//! Everything runs on one thread with a current-thread tokio runtime, apart from the proxy's
//! workers. Loopback VIPs are added before [`Glue::start`] returns (so the proxy can bind them)
//! and removed by [`Glue::stop`], after the withdrawals went out.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ringmail_announce_core::announce::{
    Announcer, DrainPhase, Settings, Transition, VipSpec, VipState, VipStatus,
};
use ringmail_announce_core::bgp::SessionConfig;
use ringmail_announce_core::handoff::{self, HandoffRules};
use ringmail_announce_core::{Announcement, Community};
use ringmail_proxy_core::config::{Announce, AnnounceMode, Handoff, Loopback};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::netlink::{KernelTable, LocalVips, LoopbackVips, Netlink};
use crate::speaker::{NeighborSpec, NeighborStatus, run_neighbor};

/// How often health is read. Withdrawal latency is the proxy's fall x interval plus at most this.
pub const TICK: Duration = Duration::from_millis(100);

/// How long withdrawals from the kernel table may keep failing before the process aborts to
/// remove them (see `Task::reconcile_kernel`).
const KERNEL_GIVE_UP: Duration = Duration::from_secs(5);

/// One reading of the proxy's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReading {
    /// The proxy can serve (all workers running).
    pub serving: bool,
    /// Healthy backends behind each VIP, in the configuration's VIP order.
    pub healthy: Vec<usize>,
}

/// Called every [`TICK`] on the glue's thread.
pub type HealthFn = Box<dyn FnMut() -> HealthReading + Send>;

/// Why the glue could not start.
#[derive(Debug, thiserror::Error)]
pub enum GlueError {
    #[error("netlink: {0}")]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error("cannot start the announcer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the announcer thread stopped during startup")]
    Startup,
    #[error("connection hand-off ([announce.handoff]): {0}")]
    Handoff(String),
}

/// Loads an nftables script with `nft -f -`.
fn nft(script: &str) -> Result<(), GlueError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| GlueError::Handoff(format!("cannot run nft (the nftables package): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| GlueError::Handoff(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| GlueError::Handoff(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GlueError::Handoff(format!(
            "nft refused the rules ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

enum Cmd {
    /// `terminating`: the process is shutting down (SIGTERM); the drain can no longer be
    /// resumed.
    Drain {
        done: oneshot::Sender<()>,
        terminating: bool,
    },
    Resume,
    Stop {
        done: oneshot::Sender<()>,
    },
}

#[derive(Debug, Default)]
struct StatusData {
    vips: Vec<(VipStatus, Option<SystemTime>)>,
    drain: &'static str,
    serving: bool,
    transitions: u64,
    kernel_routes: Vec<Announcement>,
    /// Per VIP: wall-clock time of its last transition and the text of it.
    last: Vec<Option<(SystemTime, String)>>,
}

#[derive(Debug)]
struct Shared {
    mode: String,
    /// Set by the shutdown drain; resume is refused from then on.
    terminating: std::sync::atomic::AtomicBool,
    status: Mutex<StatusData>,
    neighbors: Vec<Arc<Mutex<NeighborStatus>>>,
    /// The connection hand-off, when configured.
    handoff: Option<Handoff>,
}

/// Packets the hand-off rules counted, per family (`ip`, `ip6`): passed on to the peers, and
/// dropped as a peer's hand-off this host does not own either.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HandoffCounters {
    pub passed: Vec<(String, u64)>,
    pub dropped: Vec<(String, u64)>,
}

impl HandoffCounters {
    /// Reads the counters from `nft -j list table` output of the hand-off tables.
    pub fn parse(json_docs: &[String]) -> HandoffCounters {
        let mut c = HandoffCounters::default();
        for doc in json_docs {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(doc) else {
                continue;
            };
            let items = v["nftables"].as_array().cloned().unwrap_or_default();
            for item in items {
                let rule = &item["rule"];
                let (Some(family), Some(comment)) =
                    (rule["family"].as_str(), rule["comment"].as_str())
                else {
                    continue;
                };
                let packets = rule["expr"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|e| e["counter"]["packets"].as_u64());
                let Some(packets) = packets else { continue };
                let list = if comment == handoff::PASSED_COMMENT {
                    &mut c.passed
                } else if comment == handoff::DROPPED_COMMENT {
                    &mut c.dropped
                } else {
                    continue;
                };
                list.push((family.to_string(), packets));
            }
        }
        c
    }

    /// The live counters (runs `nft`; empty when it cannot).
    fn read() -> HandoffCounters {
        let docs: Vec<String> = ["ip", "ip6"]
            .iter()
            .filter_map(|family| {
                let out = std::process::Command::new("nft")
                    .args(["-j", "list", "table", family, handoff::TABLE])
                    .stderr(std::process::Stdio::null())
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .collect();
        HandoffCounters::parse(&docs)
    }
}

/// A running announcer.
#[derive(Debug)]
pub struct Glue {
    cmd: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn session_config(
    b: &ringmail_proxy_core::config::Bgp,
    n: &ringmail_proxy_core::config::Neighbor,
    prepend: u8,
) -> SessionConfig {
    SessionConfig {
        local_as: b.local_as,
        remote_as: n.remote_as,
        router_id: b.router_id,
        hold_time: b.hold_time,
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        med: n.med,
        local_pref: n.local_pref,
        communities: n.communities.iter().map(|&c| Community(c)).collect(),
        next_hop_v4: n.next_hop_v4,
        next_hop_v6: n.next_hop_v6,
        graceful_prepend: prepend,
    }
}

impl Glue {
    /// Adds the loopback VIPs (when configured), clears routes a crashed run left in the kernel
    /// table, starts the BGP sessions, and begins following `health`. Nothing is announced before
    /// the proxy reports itself serving and a VIP has been healthy for the announce delay.
    ///
    /// `route_device` is the interface kernel-table routes go through (default `lo`); see
    /// [`KernelTable::with_device`].
    pub fn start(
        config: &Announce,
        health: HealthFn,
        route_device: Option<String>,
    ) -> Result<Glue, GlueError> {
        let settings = Settings {
            announce_delay: config.announce_delay,
            max_announce_delay: config.max_announce_delay,
            flap_window: config.flap_window,
            graceful_wait: config.graceful_wait,
        };
        let vips: Vec<VipSpec> = config
            .vips
            .iter()
            .map(|v| VipSpec {
                addr: v.addr,
                min_healthy: v.min_healthy,
            })
            .collect();
        let (mode, neighbors) = match &config.mode {
            AnnounceMode::Bgp(b) => (
                format!("bgp (AS {}, router id {})", b.local_as, b.router_id),
                b.neighbors
                    .iter()
                    .map(|n| NeighborSpec {
                        name: n.name.clone(),
                        addr: n.addr,
                        local_address: n.local_address,
                        session: session_config(b, n, config.drain_prepend),
                        connect_retry: b.connect_retry,
                        max_connect_retry: b.max_connect_retry,
                    })
                    .collect::<Vec<_>>(),
            ),
            AnnounceMode::KernelTable { table } => (format!("kernel-table {table}"), Vec::new()),
        };
        let table = match config.mode {
            AnnounceMode::KernelTable { table } => Some(table),
            AnnounceMode::Bgp(_) => None,
        };
        let shared = Arc::new(Shared {
            mode,
            terminating: std::sync::atomic::AtomicBool::new(false),
            status: Mutex::new(StatusData {
                drain: "running",
                last: vec![None; vips.len()],
                ..StatusData::default()
            }),
            neighbors: neighbors
                .iter()
                .map(|_| Arc::new(Mutex::new(NeighborStatus::default())))
                .collect(),
            handoff: config.handoff.clone(),
        });
        let loopback_mode = config.loopback;
        let handoff = config.handoff.clone();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), GlueError>>();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ringmail-announce".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(GlueError::Spawn(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let task = Task::setup(
                        settings,
                        vips,
                        loopback_mode,
                        table,
                        route_device,
                        neighbors,
                        thread_shared,
                        health,
                        handoff,
                    )
                    .await;
                    match task {
                        Ok(task) => {
                            let _ = ready_tx.send(Ok(()));
                            task.run(cmd_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(GlueError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Glue {
                cmd: cmd_tx,
                shared,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(GlueError::Startup)
            }
        }
    }

    /// Runs the drain sequence: graceful re-announcement, the graceful wait, withdrawal. Returns
    /// once the withdrawal has been written to every established session (or the kernel table),
    /// or after `graceful_wait` + `timeout` at most.
    ///
    /// This is the shutdown drain: afterwards [`Glue::resume`] is refused, so an operator cannot
    /// bring the routes back while the proxy stops accepting.
    pub fn drain(&self, timeout: Duration) {
        self.shared
            .terminating
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::Drain {
            done: tx,
            terminating: true,
        };
        if self.cmd.send(cmd).is_ok() {
            let _ = wait_blocking(rx, timeout);
        }
    }

    /// Starts the drain sequence without waiting (admin request).
    pub fn request_drain(&self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Drain {
            done: tx,
            terminating: false,
        });
    }

    /// Ends an operator drain. Returns false (and does nothing) once the process is shutting
    /// down.
    pub fn resume(&self) -> bool {
        if self
            .shared
            .terminating
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        self.cmd.send(Cmd::Resume).is_ok()
    }

    /// Withdraws everything still announced, closes the sessions with Cease, removes kernel-table
    /// routes and the loopback addresses this process added.
    /// Idempotent.
    pub fn stop(&self) {
        let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Stop { done: tx }).is_ok() {
            let _ = wait_blocking(rx, Duration::from_secs(10));
        }
        let _ = t.join();
    }

    /// The status page (`GET /api/announce`).
    pub fn status_json(&self) -> serde_json::Value {
        let st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        let vips: Vec<_> = st
            .vips
            .iter()
            .zip(&st.last)
            .map(|((v, announce_at), last)| {
                json!({
                    "address": v.addr.to_string(),
                    "state": v.state.label(),
                    "healthy": v.healthy,
                    "min_healthy": v.min_healthy,
                    "announce_at_unix": announce_at.map(unix),
                    "last_transition": last.as_ref().map(|(at, text)| json!({
                        "at_unix": unix(*at),
                        "what": text,
                    })),
                })
            })
            .collect();
        let neighbors: Vec<_> = self
            .shared
            .neighbors
            .iter()
            .map(|n| {
                let n = n.lock().unwrap_or_else(|e| e.into_inner());
                json!({
                    "name": n.name,
                    "address": n.addr.map(|a| a.to_string()),
                    "remote_as": n.remote_as,
                    "state": n.state,
                    "advertised": n.advertised.iter().map(route_json).collect::<Vec<_>>(),
                    "established_at_unix": n.established_at.map(unix),
                    "last_change": n.last_change.as_ref().map(|(at, why)| json!({"at_unix": unix(*at), "reason": why})),
                    "sessions_established": n.sessions_established,
                    "connect_failures": n.connect_failures,
                })
            })
            .collect();
        drop(st);
        let handoff = self.shared.handoff.as_ref().map(|h| {
            let c = HandoffCounters::read();
            let map = |l: &[(String, u64)]| {
                l.iter()
                    .map(|(f, n)| (f.clone(), json!(n)))
                    .collect::<serde_json::Map<_, _>>()
            };
            json!({
                "peers": h.peers.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "device": h.device,
                "dscp": h.dscp,
                "packets_passed_on": map(&c.passed),
                "packets_dropped": map(&c.dropped),
            })
        });
        let st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "mode": self.shared.mode,
            "serving": st.serving,
            "drain": st.drain,
            "vips": vips,
            "neighbors": neighbors,
            "kernel_routes": st.kernel_routes.iter().map(route_json).collect::<Vec<_>>(),
            "handoff": handoff,
        })
    }

    /// Prometheus metrics for the VIPs and neighbours.
    pub fn render_metrics(&self, out: &mut String) {
        let st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str("# HELP ringmail_announce_vip_state 1 for the VIP's current state (withdrawn, announced, graceful).\n# TYPE ringmail_announce_vip_state gauge\n");
        for (v, _) in &st.vips {
            for s in [VipState::Withdrawn, VipState::Announced, VipState::Graceful] {
                let _ = writeln!(
                    out,
                    "ringmail_announce_vip_state{{vip=\"{}\",state=\"{}\"}} {}",
                    v.addr,
                    s.label(),
                    u8::from(v.state == s)
                );
            }
        }
        out.push_str("# HELP ringmail_announce_vip_healthy_backends Healthy backends behind the VIP.\n# TYPE ringmail_announce_vip_healthy_backends gauge\n");
        for (v, _) in &st.vips {
            let _ = writeln!(
                out,
                "ringmail_announce_vip_healthy_backends{{vip=\"{}\"}} {}",
                v.addr, v.healthy
            );
        }
        out.push_str("# HELP ringmail_announce_vip_last_transition_seconds Unix time of the VIP's last state change.\n# TYPE ringmail_announce_vip_last_transition_seconds gauge\n");
        for ((v, _), last) in st.vips.iter().zip(&st.last) {
            if let Some((at, _)) = last {
                let _ = writeln!(
                    out,
                    "ringmail_announce_vip_last_transition_seconds{{vip=\"{}\"}} {:.3}",
                    v.addr,
                    unix(*at)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringmail_announce_transitions_total VIP state changes.\n# TYPE ringmail_announce_transitions_total counter\nringmail_announce_transitions_total {}",
            st.transitions
        );
        let _ = writeln!(
            out,
            "# HELP ringmail_announce_draining 1 while the drain sequence runs or ran.\n# TYPE ringmail_announce_draining gauge\nringmail_announce_draining {}",
            u8::from(st.drain != "running")
        );
        drop(st);
        if self.shared.neighbors.is_empty() {
            return;
        }
        out.push_str("# HELP ringmail_bgp_session_established 1 while the BGP session is Established.\n# TYPE ringmail_bgp_session_established gauge\n");
        let rows: Vec<NeighborStatus> = self
            .shared
            .neighbors
            .iter()
            .map(|n| n.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        for n in &rows {
            let _ = writeln!(
                out,
                "ringmail_bgp_session_established{{neighbor=\"{}\"}} {}",
                n.name,
                u8::from(n.state == "established")
            );
        }
        out.push_str("# HELP ringmail_bgp_routes_advertised Routes the neighbour has from us.\n# TYPE ringmail_bgp_routes_advertised gauge\n");
        for n in &rows {
            let _ = writeln!(
                out,
                "ringmail_bgp_routes_advertised{{neighbor=\"{}\"}} {}",
                n.name,
                n.advertised.len()
            );
        }
        out.push_str("# HELP ringmail_bgp_sessions_established_total Sessions that reached Established.\n# TYPE ringmail_bgp_sessions_established_total counter\n");
        for n in &rows {
            let _ = writeln!(
                out,
                "ringmail_bgp_sessions_established_total{{neighbor=\"{}\"}} {}",
                n.name, n.sessions_established
            );
        }
        out.push_str("# HELP ringmail_bgp_connect_failures_total Failed TCP connects to the neighbour.\n# TYPE ringmail_bgp_connect_failures_total counter\n");
        for n in &rows {
            let _ = writeln!(
                out,
                "ringmail_bgp_connect_failures_total{{neighbor=\"{}\"}} {}",
                n.name, n.connect_failures
            );
        }
        if self.shared.handoff.is_some() {
            let c = HandoffCounters::read();
            out.push_str("# HELP ringmail_announce_handoff_packets_total Packets of flows this host does not own: passed on to the peers, or dropped (a peer's hand-off not ours either).\n# TYPE ringmail_announce_handoff_packets_total counter\n");
            for (action, list) in [("passed", &c.passed), ("dropped", &c.dropped)] {
                for (family, n) in list {
                    let _ = writeln!(
                        out,
                        "ringmail_announce_handoff_packets_total{{family=\"{family}\",action=\"{action}\"}} {n}"
                    );
                }
            }
        }
    }
}

impl Drop for Glue {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn route_json(r: &Announcement) -> serde_json::Value {
    json!({"prefix": r.prefix.to_string(), "graceful": r.graceful})
}

fn wait_blocking(rx: oneshot::Receiver<()>, timeout: Duration) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    let mut rx = rx;
    loop {
        match rx.try_recv() {
            Ok(()) => return Ok(()),
            Err(oneshot::error::TryRecvError::Closed) => return Err(()),
            Err(oneshot::error::TryRecvError::Empty) => {
                if Instant::now() >= deadline {
                    return Err(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// How the VIPs were made local.
enum Local {
    Addresses(LoopbackVips),
    Routes(LocalVips),
}

/// The glue's state on its thread.
struct Task {
    announcer: Announcer,
    /// The VIPs in configuration order.
    addrs: Vec<IpAddr>,
    health: HealthFn,
    shared: Arc<Shared>,
    netlink: Option<Netlink>,
    loopback: Option<Local>,
    kernel: Option<KernelTable>,
    /// Routes installed in the kernel table.
    installed: Vec<Announcement>,
    routes_tx: watch::Sender<Vec<Announcement>>,
    stop_tx: watch::Sender<bool>,
    speakers: Vec<tokio::task::JoinHandle<()>>,
    /// Callers waiting for the drain's withdrawal to be on the wire.
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// When the withdrawal was decided (to bound the wait for it to be sent).
    withdrawn_at: Option<Instant>,
    /// The shutdown drain has begun: no resume.
    terminating: bool,
    /// Since when kernel-table writes have been failing, and when that was last logged.
    kernel_failing_since: Option<Instant>,
    kernel_warned_at: Option<Instant>,
    /// The kernel-table routes go through a process-owned TUN interface (see
    /// [`Glue::start`]): ending the process removes them.
    route_device_is_tun: bool,
    /// The hand-off tables are installed (removed last, at stop).
    handoff: bool,
}

impl Task {
    #[allow(clippy::too_many_arguments)]
    async fn setup(
        settings: Settings,
        vips: Vec<VipSpec>,
        loopback_mode: Loopback,
        table: Option<u32>,
        route_device: Option<String>,
        neighbors: Vec<NeighborSpec>,
        shared: Arc<Shared>,
        health: HealthFn,
        handoff: Option<Handoff>,
    ) -> Result<Task, GlueError> {
        let addrs: Vec<IpAddr> = vips.iter().map(|v| v.addr).collect();
        let route_device_is_tun = route_device.is_some();
        let netlink = if loopback_mode != Loopback::None || table.is_some() {
            Some(Netlink::new()?)
        } else {
            None
        };
        let loopback = match (&netlink, loopback_mode) {
            (Some(nl), Loopback::Address) => {
                let lo = LoopbackVips::add(nl, &addrs).await?;
                info!(added = ?lo.owned(), already_there = ?lo.preexisting(), "anycast VIPs on lo");
                Some(Local::Addresses(lo))
            }
            (Some(nl), Loopback::LocalRoute) => {
                let lo = LocalVips::add(nl, &addrs).await?;
                info!(vips = ?lo.vips(), "anycast VIPs made local by local routes (no address on lo)");
                Some(Local::Routes(lo))
            }
            _ => None,
        };
        let kernel = match (&netlink, table) {
            (Some(nl), Some(table)) => {
                let device = route_device.as_deref().unwrap_or(crate::netlink::LOOPBACK);
                let k = KernelTable::with_device(nl, table, device).await?;
                let stale = k.flush().await?;
                if stale > 0 {
                    info!(
                        table,
                        stale, "removed routes a previous run left in the kernel table"
                    );
                }
                Some(k)
            }
            _ => None,
        };
        // Before anything is announced: from the first packet on, flows this host does not own
        // go to the peers instead of being reset.
        if let Some(h) = &handoff {
            nft(&handoff::ruleset(&HandoffRules {
                vips: &addrs,
                peers: &h.peers,
                device: &h.device,
                dscp: h.dscp,
            }))?;
            info!(peers = ?h.peers, device = %h.device, dscp = h.dscp, "connection hand-off: packets of flows this host does not own go to its peers (nftables table {})", handoff::TABLE);
        }
        let (routes_tx, routes_rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let speakers = neighbors
            .into_iter()
            .zip(shared.neighbors.iter())
            .map(|(spec, status)| {
                tokio::spawn(run_neighbor(
                    spec,
                    routes_rx.clone(),
                    stop_rx.clone(),
                    Arc::clone(status),
                ))
            })
            .collect();
        Ok(Task {
            addrs,
            announcer: Announcer::new(settings, vips),
            health,
            shared,
            netlink,
            loopback,
            kernel,
            installed: Vec::new(),
            routes_tx,
            stop_tx,
            speakers,
            drain_waiters: Vec::new(),
            withdrawn_at: None,
            terminating: false,
            kernel_failing_since: None,
            kernel_warned_at: None,
            route_device_is_tun,
            handoff: handoff.is_some(),
        })
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Drain { done, terminating }) => {
                        self.terminating |= terminating;
                        let t = self.announcer.begin_drain(Instant::now());
                        info!(terminating, "drain: routes re-announced with GRACEFUL_SHUTDOWN");
                        self.apply(t).await;
                        self.drain_waiters.push(done);
                    }
                    Some(Cmd::Resume) if self.terminating => {
                        warn!("resume refused: the process is shutting down");
                    }
                    Some(Cmd::Resume) => {
                        let t = self.announcer.resume(Instant::now());
                        info!("drain ended by the operator");
                        self.withdrawn_at = None;
                        self.apply(t).await;
                    }
                    Some(Cmd::Stop { done }) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
            }
            let now = Instant::now();
            let reading = (self.health)();
            self.announcer.set_serving(reading.serving, now);
            for (i, h) in reading.healthy.iter().enumerate() {
                self.announcer.observe(i, *h, now);
            }
            let t = self.announcer.poll(now);
            self.apply(t).await;
            if self.announcer.drain_phase() == DrainPhase::Withdrawn && self.withdrawn_at.is_none()
            {
                self.withdrawn_at = Some(now);
            }
            self.reconcile_kernel().await;
            self.status(reading.serving);
            self.check_drain_done();
        }
    }

    /// Logs transitions and pushes the desired routes out.
    async fn apply(&mut self, transitions: Vec<Transition>) {
        if transitions.is_empty() {
            return;
        }
        {
            let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            st.transitions += transitions.len() as u64;
            for t in &transitions {
                let text = format!("{} -> {}: {}", t.from.label(), t.to.label(), t.reason);
                if let Some(i) = self.addrs.iter().position(|a| *a == t.vip)
                    && let Some(slot) = st.last.get_mut(i)
                {
                    *slot = Some((SystemTime::now(), text));
                }
                info!(vip = %t.vip, from = t.from.label(), to = t.to.label(), reason = %t.reason, "announcement changed");
            }
        }
        if self.announcer.drain_phase() == DrainPhase::Withdrawn && self.withdrawn_at.is_none() {
            self.withdrawn_at = Some(Instant::now());
        }
        self.routes_tx.send_replace(self.announcer.desired());
        self.reconcile_kernel().await;
    }

    /// Brings the kernel table in line with the desired routes. A route that could not be
    /// written is retried at the next tick (and reported each time).
    async fn reconcile_kernel(&mut self) {
        let Some(k) = &self.kernel else { return };
        let desired = self.announcer.desired();
        if desired == self.installed {
            self.kernel_failing_since = None;
            return;
        }
        let mut installed = Vec::with_capacity(desired.len());
        let mut errors = Vec::new();
        for r in &self.installed {
            let wanted = desired.iter().any(|d| d.prefix == r.prefix);
            if !wanted && let Err(e) = k.withdraw(r.prefix).await {
                errors.push(format!("removing {}: {e}", r.prefix));
                installed.push(*r);
            }
        }
        for d in &desired {
            if self.installed.contains(d) {
                installed.push(*d);
                continue;
            }
            match k.announce_with(d.prefix, d.graceful).await {
                Ok(()) => installed.push(*d),
                Err(e) => errors.push(format!("installing {}: {e}", d.prefix)),
            }
        }
        self.installed = installed;
        if errors.is_empty() {
            self.kernel_failing_since = None;
            return;
        }
        let now = Instant::now();
        let since = *self.kernel_failing_since.get_or_insert(now);
        if self
            .kernel_warned_at
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5))
        {
            self.kernel_warned_at = Some(now);
            warn!(errors = ?errors, "kernel-table routes cannot be brought in line; retrying every tick");
        }
        // A route that should be gone but stays would keep attracting traffic. When the routes
        // go through the process-owned TUN interface, ending the process removes them all: fail
        // closed rather than announce a dead pool.
        let stuck = self
            .installed
            .iter()
            .any(|r| !desired.iter().any(|d| d.prefix == r.prefix));
        if stuck && self.route_device_is_tun && now.duration_since(since) > KERNEL_GIVE_UP {
            tracing::error!(
                errors = ?errors,
                "kernel-table routes could not be withdrawn for {}s; aborting so the kernel removes them with this process's TUN interface",
                KERNEL_GIVE_UP.as_secs()
            );
            std::process::abort();
        }
    }

    fn status(&mut self, serving: bool) {
        let now = Instant::now();
        let sys_now = SystemTime::now();
        let vips: Vec<_> = self
            .announcer
            .status(now)
            .into_iter()
            .map(|v| {
                let at = v
                    .announce_at
                    .map(|t| sys_now + t.saturating_duration_since(now));
                (v, at)
            })
            .collect();
        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        st.vips = vips;
        st.serving = serving;
        st.drain = match self.announcer.drain_phase() {
            DrainPhase::Running => "running",
            DrainPhase::Graceful { .. } => "graceful",
            DrainPhase::Withdrawn => "withdrawn",
        };
        st.kernel_routes = self.installed.clone();
    }

    /// The drain's withdrawal counts as sent when every established session has nothing left
    /// advertised and the kernel table holds none of our routes, or 5 s after it was decided.
    fn check_drain_done(&mut self) {
        let Some(at) = self.withdrawn_at else { return };
        if self.drain_waiters.is_empty() {
            return;
        }
        let sent = self.installed.is_empty()
            && self.shared.neighbors.iter().all(|n| {
                let n = n.lock().unwrap_or_else(|e| e.into_inner());
                n.state != "established" || n.advertised.is_empty()
            });
        if sent || at.elapsed() > Duration::from_secs(5) {
            if !sent {
                warn!("drain: not every neighbour confirmed the withdrawal within 5 s");
            } else {
                info!("drain: withdrawal sent to every neighbour");
            }
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    async fn shutdown(&mut self) {
        // Withdraw first (an UPDATE to every established session), then Cease.
        self.routes_tx.send_replace(Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline
            && self.shared.neighbors.iter().any(|n| {
                let n = n.lock().unwrap_or_else(|e| e.into_inner());
                n.state == "established" && !n.advertised.is_empty()
            })
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop_tx.send_replace(true);
        // Every neighbour gets its Cease in parallel; one that does not finish in 3 s is cut off
        // (its socket closes with the task, which ends the session just as surely).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        for s in self.speakers.drain(..) {
            let abort = s.abort_handle();
            if tokio::time::timeout_at(deadline, s).await.is_err() {
                abort.abort();
            }
        }
        if let Some(k) = &self.kernel
            && let Err(e) = k.flush().await
        {
            warn!(error = %e, "cannot flush the kernel-table routes");
        }
        self.installed.clear();
        match self.loopback.take() {
            Some(Local::Addresses(mut lo)) => {
                let owned = lo.owned().to_vec();
                match lo.remove_owned().await {
                    Ok(()) => info!(removed = ?owned, "anycast VIPs removed from lo"),
                    Err(e) => warn!(error = %e, "cannot remove the anycast VIPs from lo"),
                }
            }
            Some(Local::Routes(mut lo)) => {
                let vips = lo.vips().to_vec();
                match lo.remove().await {
                    Ok(()) => info!(removed = ?vips, "anycast VIPs' local routes removed"),
                    Err(e) => warn!(error = %e, "cannot remove the anycast VIPs' local routes"),
                }
            }
            None => {}
        }
        if std::mem::take(&mut self.handoff) {
            match nft(&handoff::removal()) {
                Ok(()) => info!("connection hand-off rules removed"),
                Err(e) => warn!(error = %e, "cannot remove the connection hand-off rules"),
            }
        }
        let _ = &self.netlink;
        for w in self.drain_waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HandoffCounters;

    #[test]
    fn handoff_counters_from_nft_json() {
        let ip = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "ringmail_handoff", "handle": 3}}, {"rule": {"family": "ip", "table": "ringmail_handoff", "chain": "orphan", "handle": 5, "comment": "handed off by a peer and not ours either", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "dscp"}}, "right": 45}}, {"counter": {"packets": 2, "bytes": 120}}, {"drop": null}]}}, {"rule": {"family": "ip", "table": "ringmail_handoff", "chain": "orphan", "handle": 6, "comment": "passed on to the peers", "expr": [{"mangle": {"key": {"payload": {"protocol": "ip", "field": "dscp"}}, "value": 45}}, {"dup": {"addr": "198.51.100.12", "dev": "up0"}}, {"counter": {"packets": 95, "bytes": 5054}}, {"drop": null}]}}]}"#;
        let c = HandoffCounters::parse(&[ip.to_string(), "not json".to_string()]);
        assert_eq!(c.passed, vec![("ip".to_string(), 95)]);
        assert_eq!(c.dropped, vec![("ip".to_string(), 2)]);
    }
}
