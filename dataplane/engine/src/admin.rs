//! The admin listener: Prometheus metrics and a small HTTP API to see backends and drain or
//! re-weight one. It runs on its own thread with a small tokio runtime, away from the workers;
//! it only reads their atomics and flips the backends' admin state and weight.
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /healthz`: `ok`.
//! - `GET /api/backends`: JSON list of every backend.
//! - `POST /api/pools/{pool}/backends/{backend}/drain|ready|weight/{n}` (backend: name or address).

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::runtime::{AdminState, BackendRuntime, PoolRuntime};
use crate::stats::{CONNECT_BUCKETS, Refusal, Stats};

/// Another part of the process that shows its status and takes commands on the admin listener
/// (the anycast glue: `/api/announce`).
pub trait AdminExtension: Send + Sync + std::fmt::Debug {
    /// Appends Prometheus text-format metrics.
    fn render_metrics(&self, out: &mut String);
    /// Answers `method` on `path` (split on `/`) when the path is this extension's: status code
    /// and JSON body.
    fn handle(&self, method: &str, path: &[&str]) -> Option<(u16, serde_json::Value)>;
    /// The method `path` answers to when it is this extension's (for a 405 on another method).
    fn allowed_method(&self, _path: &[&str]) -> Option<&'static str> {
        None
    }
}

/// What the admin listener shows; the pools are swapped on reload.
#[derive(Debug)]
pub struct View {
    pub extensions: Vec<Arc<dyn AdminExtension>>,
    pub pools: Vec<Arc<PoolRuntime>>,
    pub stats: Arc<Stats>,
    pub maxconn: u32,
    pub open_files: u64,
    pub relay: ringmail_proxy_core::config::RelayMode,
}

/// A running admin listener.
pub struct AdminServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` and serves the admin API on a dedicated thread.
pub fn spawn(addr: SocketAddr, view: Arc<RwLock<View>>) -> io::Result<AdminServer> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("ringmail-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed");
                    return;
                }
            };
            rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener failed");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let view = Arc::clone(&view);
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let view = Arc::clone(&view);
                                async move { Ok::<_, std::convert::Infallible>(handle(req, &view)) }
                            });
                            if let Err(e) = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await
                            {
                                debug!(error = %e, "admin connection error");
                            }
                        });
                    }
                }
            }
        });
        })?;
    Ok(AdminServer {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

fn handle<B>(req: Request<B>, view: &RwLock<View>) -> Response<Full<Bytes>> {
    let view = view.read().unwrap_or_else(|e| e.into_inner());
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, ["metrics"]) => {
            let mut text = render_metrics(&view);
            for ext in &view.extensions {
                ext.render_metrics(&mut text);
            }
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        (&Method::GET, ["api", "backends"]) => {
            let list: Vec<_> = view
                .pools
                .iter()
                .flat_map(|p| p.backends.iter().map(move |b| backend_json(p, b)))
                .collect();
            json_reply(StatusCode::OK, serde_json::Value::Array(list))
        }
        (&Method::POST, ["api", "pools", pool, "backends", backend, action @ ..]) => {
            let Some(p) = view.pools.iter().find(|p| p.config.name == *pool) else {
                return json_reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no pool {pool}")}),
                );
            };
            let Some(i) = p
                .backends
                .iter()
                .position(|b| b.name == *backend || b.addr.to_string() == *backend)
            else {
                return json_reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no backend {backend} in pool {pool}")}),
                );
            };
            match action {
                ["drain"] => p.set_admin(i, AdminState::Drain),
                ["ready"] => p.set_admin(i, AdminState::Ready),
                ["weight", w] => match w.parse::<u32>() {
                    Ok(w) if (1..=256).contains(&w) => p.set_weight(i, w),
                    _ => {
                        return json_reply(
                            StatusCode::BAD_REQUEST,
                            json!({"error": format!("weight must be an integer from 1 to 256, got {w:?}")}),
                        );
                    }
                },
                _ => return json_reply(StatusCode::NOT_FOUND, json!({"error": "unknown action"})),
            }
            info!(pool = %pool, backend = %p.backends[i].name, action = %action.join("/"), "admin change");
            json_reply(StatusCode::OK, backend_json(p, &p.backends[i]))
        }
        (method, parts) => {
            for ext in &view.extensions {
                if let Some((status, body)) = ext.handle(method.as_str(), parts) {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    return json_reply(status, body);
                }
            }
            let allow = match parts {
                ["healthz"] | ["metrics"] | ["api", "backends"] => Some("GET"),
                ["api", "pools", _, "backends", _, ..] => Some("POST"),
                _ => view.extensions.iter().find_map(|e| e.allowed_method(parts)),
            };
            match allow {
                Some(allow) => {
                    let mut r = json_reply(
                        StatusCode::METHOD_NOT_ALLOWED,
                        json!({"error": format!("{method} not allowed here; use {allow}")}),
                    );
                    r.headers_mut()
                        .insert("allow", hyper::header::HeaderValue::from_static(allow));
                    r
                }
                None => json_reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
            }
        }
    }
}

fn backend_json(pool: &PoolRuntime, b: &BackendRuntime) -> serde_json::Value {
    json!({
        "pool": pool.config.name,
        "name": b.name,
        "addr": b.addr.to_string(),
        "up": b.is_up(),
        "admin": match b.admin_state() { AdminState::Ready => "ready", AdminState::Drain => "drain" },
        "weight": b.weight.load(Ordering::Relaxed),
        "active": b.active.load(Ordering::Relaxed),
        "total": b.sum(|c| &c.total),
        "connect_errors": b.sum(|c| &c.connect_errors),
        "bytes_to_backend": b.sum(|c| &c.bytes_to_backend),
        "bytes_to_client": b.sum(|c| &c.bytes_to_client),
        "checks_ok": b.checks_ok.load(Ordering::Relaxed),
        "checks_failed": b.checks_failed.load(Ordering::Relaxed),
        "last_check_error": b.last_check_error.lock().map(|e| e.clone()).unwrap_or(None),
    })
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric in the Prometheus text exposition format.
pub fn render_metrics(view: &View) -> String {
    let mut o = String::with_capacity(4096);
    let stats = &view.stats;
    let _ = writeln!(
        o,
        "# HELP ringmail_lb_maxconn Effective global connection limit.\n# TYPE ringmail_lb_maxconn gauge"
    );
    let _ = writeln!(o, "ringmail_lb_maxconn {}", view.maxconn);
    let _ = writeln!(
        o,
        "# HELP ringmail_lb_open_files_limit Open-file limit of the process.\n# TYPE ringmail_lb_open_files_limit gauge"
    );
    let _ = writeln!(o, "ringmail_lb_open_files_limit {}", view.open_files);

    let _ = writeln!(
        o,
        "# HELP ringmail_lb_worker_info Engine and relay mode of each worker.\n# TYPE ringmail_lb_worker_info gauge"
    );
    let relay = crate::lb::relay_label(view.relay);
    for (i, w) in stats.workers.iter().enumerate() {
        let engine = w.engine().map_or("starting", |e| e.label());
        let _ = writeln!(
            o,
            "ringmail_lb_worker_info{{worker=\"{i}\",engine=\"{engine}\",relay=\"{relay}\"}} 1"
        );
    }
    let counter = |o: &mut String,
                   name: &str,
                   help: &str,
                   kind: &str,
                   f: &dyn Fn(&crate::stats::WorkerStats) -> u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, w) in stats.workers.iter().enumerate() {
            let _ = writeln!(o, "{name}{{worker=\"{i}\"}} {}", f(w));
        }
    };
    counter(
        &mut o,
        "ringmail_lb_worker_accepts_total",
        "Connections accepted.",
        "counter",
        &|w| w.accepts.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "ringmail_lb_worker_active_connections",
        "Client connections being proxied.",
        "gauge",
        &|w| w.active.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "ringmail_lb_worker_idle_timeouts_total",
        "Connections closed for idleness.",
        "counter",
        &|w| w.idle_timeouts.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "ringmail_lb_worker_local_connect_errors_total",
        "Backend connects that failed for a local reason (no free port, descriptors, memory).",
        "counter",
        &|w| w.local_connect_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "ringmail_lb_worker_buffer_starved_total",
        "Receives that found the io_uring buffer ring empty (a private buffer took over).",
        "counter",
        &|w| w.buffer_starved.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        o,
        "# HELP ringmail_lb_refused_total Connections refused at accept.\n# TYPE ringmail_lb_refused_total counter"
    );
    for r in Refusal::ALL {
        let _ = writeln!(
            o,
            "ringmail_lb_refused_total{{reason=\"{}\"}} {}",
            r.label(),
            stats.total(|w| &w.refused[r as usize])
        );
    }

    let _ = writeln!(
        o,
        "# HELP ringmail_lb_connect_duration_seconds Time to connect to a backend.\n# TYPE ringmail_lb_connect_duration_seconds histogram"
    );
    let mut cumulative = 0u64;
    for (i, le) in CONNECT_BUCKETS.iter().enumerate() {
        cumulative += stats.total(|w| &w.connect_buckets[i]);
        let _ = writeln!(
            o,
            "ringmail_lb_connect_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    cumulative += stats.total(|w| &w.connect_buckets[CONNECT_BUCKETS.len()]);
    let _ = writeln!(
        o,
        "ringmail_lb_connect_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        o,
        "ringmail_lb_connect_duration_seconds_sum {}",
        stats.total(|w| &w.connect_sum_ns) as f64 / 1e9
    );
    let _ = writeln!(
        o,
        "ringmail_lb_connect_duration_seconds_count {}",
        stats.total(|w| &w.connect_count)
    );

    type Metric = (&'static str, &'static str, &'static str);
    let metrics: [Metric; 7] = [
        (
            "ringmail_lb_backend_up",
            "1 when health checks pass.",
            "gauge",
        ),
        (
            "ringmail_lb_backend_admin_drain",
            "1 when drained through the admin API.",
            "gauge",
        ),
        ("ringmail_lb_backend_weight", "Current weight.", "gauge"),
        (
            "ringmail_lb_backend_active_connections",
            "Connections to the backend.",
            "gauge",
        ),
        (
            "ringmail_lb_backend_connections_total",
            "Connections sent to the backend.",
            "counter",
        ),
        (
            "ringmail_lb_backend_connect_errors_total",
            "Failed connects to the backend.",
            "counter",
        ),
        (
            "ringmail_lb_backend_bytes_total",
            "Bytes relayed, by direction.",
            "counter",
        ),
    ];
    for (name, help, kind) in metrics {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &view.pools {
            for b in &p.backends {
                let labels = format!(
                    "pool=\"{}\",backend=\"{}\"",
                    esc(&p.config.name),
                    esc(&b.name)
                );
                let v = match name {
                    "ringmail_lb_backend_up" => u64::from(b.is_up()),
                    "ringmail_lb_backend_admin_drain" => {
                        u64::from(b.admin_state() == AdminState::Drain)
                    }
                    "ringmail_lb_backend_weight" => u64::from(b.weight.load(Ordering::Relaxed)),
                    "ringmail_lb_backend_active_connections" => {
                        u64::from(b.active.load(Ordering::Relaxed))
                    }
                    "ringmail_lb_backend_connections_total" => b.sum(|c| &c.total),
                    "ringmail_lb_backend_connect_errors_total" => b.sum(|c| &c.connect_errors),
                    _ => {
                        let _ = writeln!(
                            o,
                            "{name}{{{labels},direction=\"to_backend\"}} {}",
                            b.sum(|c| &c.bytes_to_backend)
                        );
                        let _ = writeln!(
                            o,
                            "{name}{{{labels},direction=\"to_client\"}} {}",
                            b.sum(|c| &c.bytes_to_client)
                        );
                        continue;
                    }
                };
                let _ = writeln!(o, "{name}{{{labels}}} {v}");
            }
        }
    }
    let _ = writeln!(
        o,
        "# HELP ringmail_lb_backend_health_checks_total Health check results.\n# TYPE ringmail_lb_backend_health_checks_total counter"
    );
    for p in &view.pools {
        for b in &p.backends {
            let labels = format!(
                "pool=\"{}\",backend=\"{}\"",
                esc(&p.config.name),
                esc(&b.name)
            );
            let _ = writeln!(
                o,
                "ringmail_lb_backend_health_checks_total{{{labels},result=\"ok\"}} {}",
                b.checks_ok.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                o,
                "ringmail_lb_backend_health_checks_total{{{labels},result=\"failed\"}} {}",
                b.checks_failed.load(Ordering::Relaxed)
            );
        }
    }
    o
}
