//! The built-in BGP speaker's I/O: one tokio task per neighbour that connects (with backoff),
//! drives an I/O-free [`Session`] with the socket's bytes and the clock, and publishes what the
//! neighbour has been told.
//!
//! ```text
//!   desired routes (watch) ──► set_routes ─┐
//!   socket bytes ─────────────► receive ───┤ Session ──► poll_transmit ──► socket
//!   clock ────────────────────► timeouts ──┘    └──────► poll_event ─────► status, log
//! ```
//!
//! The speaker only connects out: it never listens on port 179, so it has no collision to
//! resolve. If the process dies the kernel closes the sockets, the routers' sessions drop and the
//! routes go with them (fail closed; graceful restart is never advertised).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ringmail_announce_core::Announcement;
use ringmail_announce_core::bgp::{Backoff, Event, Session, SessionConfig, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

/// What the status page shows for one neighbour.
#[derive(Debug, Clone, Default)]
pub struct NeighborStatus {
    pub name: String,
    pub addr: Option<SocketAddr>,
    pub remote_as: u32,
    pub state: &'static str,
    /// Routes the neighbour currently has from us (written to the socket).
    pub advertised: Vec<Announcement>,
    pub established_at: Option<SystemTime>,
    /// Last state change or failure, with its reason.
    pub last_change: Option<(SystemTime, String)>,
    pub sessions_established: u64,
    pub connect_failures: u64,
    pub updates_sent: u64,
    pub notifications_received: u64,
}

/// One neighbour's settings as the speaker needs them.
#[derive(Debug, Clone)]
pub struct NeighborSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub local_address: Option<IpAddr>,
    pub session: SessionConfig,
    pub connect_retry: Duration,
    pub max_connect_retry: Duration,
}

pub(crate) fn label(s: State) -> &'static str {
    match s {
        State::Idle => "idle",
        State::OpenSent => "open-sent",
        State::OpenConfirm => "open-confirm",
        State::Established => "established",
        State::Closing => "closing",
    }
}

fn set_change(status: &Mutex<NeighborStatus>, state: &'static str, why: String) {
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    s.state = state;
    s.last_change = Some((SystemTime::now(), why));
}

async fn connect(spec: &NeighborSpec) -> std::io::Result<TcpStream> {
    let socket = match spec.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(local) = spec.local_address {
        socket.bind(SocketAddr::new(local, 0))?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(spec.addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs one neighbour until `stop` turns true; then sends Cease and returns.
pub async fn run_neighbor(
    spec: NeighborSpec,
    mut routes: watch::Receiver<Vec<Announcement>>,
    mut stop: watch::Receiver<bool>,
    status: Arc<Mutex<NeighborStatus>>,
) {
    let mut backoff = Backoff::new(spec.connect_retry, spec.max_connect_retry);
    {
        let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
        s.name = spec.name.clone();
        s.addr = Some(spec.addr);
        s.remote_as = spec.session.remote_as;
        s.state = "idle";
    }
    loop {
        if *stop.borrow() {
            return;
        }
        set_change(&status, "connect", format!("connecting to {}", spec.addr));
        let stream = tokio::select! {
            r = connect(&spec) => r,
            _ = stop.changed() => return,
        };
        match stream {
            Ok(stream) => {
                let stopped =
                    drive(&spec, stream, &mut routes, &mut stop, &status, &mut backoff).await;
                if stopped {
                    return;
                }
            }
            Err(e) => {
                let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
                s.connect_failures += 1;
                s.state = "active";
                s.last_change = Some((SystemTime::now(), format!("connect failed: {e}")));
                drop(s);
                warn!(neighbor = %spec.name, addr = %spec.addr, error = %e, "BGP connect failed");
            }
        }
        backoff.on_closed(Instant::now());
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Runs one TCP session to its end. Returns true when it ended because of `stop`.
async fn drive(
    spec: &NeighborSpec,
    mut stream: TcpStream,
    routes: &mut watch::Receiver<Vec<Announcement>>,
    stop: &mut watch::Receiver<bool>,
    status: &Mutex<NeighborStatus>,
    backoff: &mut Backoff,
) -> bool {
    let (local, peer) = match (stream.local_addr(), stream.peer_addr()) {
        (Ok(l), Ok(p)) => (l, p),
        _ => return false,
    };
    let mut session = Session::new(spec.session.clone());
    session.connected(local, peer, Instant::now());
    session.set_routes(&routes.borrow_and_update());
    set_change(status, "open-sent", format!("TCP up {local} -> {peer}"));
    let mut buf = vec![0u8; 8192];
    let mut stopping = false;
    loop {
        // Flush everything the session wants sent, then publish what the peer now has.
        // A peer that stops reading must not freeze this task (and with it the hold timer,
        // withdrawals and Cease): a write that does not finish within the hold time ends the
        // session, as a missed keepalive would.
        let write_limit = spec.session.hold_time.max(Duration::from_secs(3));
        while let Some(bytes) = session.poll_transmit() {
            let why = match tokio::time::timeout(write_limit, stream.write_all(&bytes)).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("write failed: {e}"),
                Err(_) => format!(
                    "the peer read nothing for {}s (write stalled); closing",
                    write_limit.as_secs()
                ),
            };
            session.disconnected(Instant::now());
            finish(spec, status, &why);
            return stopping;
        }
        while let Some(ev) = session.poll_event() {
            on_event(spec, status, ev, backoff);
        }
        {
            let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
            s.state = label(session.state());
            s.advertised = session.advertised();
        }
        if session.should_close() {
            // FIN after our last message (a NOTIFICATION), then drain what the peer still sends
            // for up to a second: closing with unread data would send an RST, which may
            // discard the NOTIFICATION before the peer reads it.
            let _ = stream.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await;
            session.disconnected(Instant::now());
            finish(spec, status, "session closed");
            return stopping;
        }
        let deadline = session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let why = match r {
                        Ok(_) => "peer closed the connection".to_string(),
                        Err(e) => format!("read failed: {e}"),
                    };
                    session.disconnected(Instant::now());
                    while let Some(ev) = session.poll_event() {
                        on_event(spec, status, ev, backoff);
                    }
                    finish(spec, status, &why);
                    return stopping;
                }
                Ok(n) => session.receive(&buf[..n], Instant::now()),
            },
            _ = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
            changed = routes.changed(), if !stopping => {
                if changed.is_ok() {
                    let desired = routes.borrow_and_update().clone();
                    session.set_routes(&desired);
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                session.shutdown(Instant::now());
            }
        }
    }
}

fn finish(spec: &NeighborSpec, status: &Mutex<NeighborStatus>, why: &str) {
    info!(neighbor = %spec.name, addr = %spec.addr, reason = why, "BGP session down");
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    s.state = "idle";
    s.advertised.clear();
    s.established_at = None;
    s.last_change = Some((SystemTime::now(), why.to_string()));
}

fn on_event(spec: &NeighborSpec, status: &Mutex<NeighborStatus>, ev: Event, backoff: &mut Backoff) {
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    match ev {
        Event::Established { .. } => {
            backoff.on_established(Instant::now());
            s.sessions_established += 1;
            s.established_at = Some(SystemTime::now());
            s.last_change = Some((SystemTime::now(), format!("{ev:?}")));
            info!(neighbor = %spec.name, addr = %spec.addr, "BGP session established");
        }
        Event::Closed { ref reason } => {
            s.last_change = Some((SystemTime::now(), format!("closed: {reason}")));
            warn!(neighbor = %spec.name, addr = %spec.addr, reason = %reason, "BGP session closed");
        }
        other => {
            tracing::debug!(neighbor = %spec.name, event = ?other, "BGP event");
        }
    }
}
