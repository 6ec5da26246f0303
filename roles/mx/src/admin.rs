//! The MX admin listener: Prometheus metrics and the queue API that `ringmail queue` uses while
//! the server holds the spool.
//!
//! - `GET /metrics`
//! - `GET /api/queue` (every envelope, JSON), `GET /api/queue/{id}`
//! - `POST /api/queue/{id}/delete`, `POST /api/queue/{id}/retry`, `POST /api/queue/flush`

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ringmail_queue::{QueueId, Spool};
use serde_json::json;
use tracing::debug;

/// Counters of the MX, all workers together.
#[derive(Debug, Default)]
pub struct MxStats {
    pub sessions: AtomicU64,
    pub sessions_active: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub bytes_accepted: AtomicU64,
    pub recipients_accepted: AtomicU64,
    pub refused_connect: AtomicU64,
    pub refused_relay: AtomicU64,
    pub refused_unknown_user: AtomicU64,
    pub refused_spf: AtomicU64,
    pub refused_dmarc: AtomicU64,
    pub refused_rate: AtomicU64,
    pub refused_proxy: AtomicU64,
    pub refused_other: AtomicU64,
    pub tls_sessions: AtomicU64,
    pub acks_maybe_lost: AtomicU64,
    pub deliveries_ok: AtomicU64,
    pub deliveries_deferred: AtomicU64,
    pub deliveries_failed: AtomicU64,
    /// New connections that passed over an unreachable next hop to the next one.
    pub relay_failovers: AtomicU64,
}

impl MxStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, spool: &Spool, out: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "ringmail_mx_sessions_total",
            "SMTP sessions accepted.",
            g(&self.sessions),
        );
        counter(
            "ringmail_mx_messages_accepted_total",
            "Messages acknowledged with 250 (on stable storage).",
            g(&self.messages_accepted),
        );
        counter(
            "ringmail_mx_bytes_accepted_total",
            "Bytes of accepted messages.",
            g(&self.bytes_accepted),
        );
        counter(
            "ringmail_mx_recipients_accepted_total",
            "Recipients of accepted messages.",
            g(&self.recipients_accepted),
        );
        counter(
            "ringmail_mx_tls_sessions_total",
            "Sessions that completed STARTTLS.",
            g(&self.tls_sessions),
        );
        counter(
            "ringmail_mx_acks_maybe_lost_total",
            "Messages queued whose 250 may not have reached the client (possible duplicates).",
            g(&self.acks_maybe_lost),
        );
        counter(
            "ringmail_mx_relay_failovers_total",
            "Next hops passed over (connect, greeting, STARTTLS or AUTH failed) for the next one.",
            g(&self.relay_failovers),
        );
        let _ = writeln!(
            out,
            "# HELP ringmail_mx_refused_total Connections, recipients and messages refused, by reason.\n# TYPE ringmail_mx_refused_total counter"
        );
        for (reason, c) in [
            ("connect", &self.refused_connect),
            ("relay", &self.refused_relay),
            ("unknown_user", &self.refused_unknown_user),
            ("spf", &self.refused_spf),
            ("dmarc", &self.refused_dmarc),
            ("rate", &self.refused_rate),
            ("proxy", &self.refused_proxy),
            ("other", &self.refused_other),
        ] {
            let _ = writeln!(
                out,
                "ringmail_mx_refused_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringmail_mx_deliveries_total Delivery attempts to the next hop, by result.\n# TYPE ringmail_mx_deliveries_total counter"
        );
        for (result, c) in [
            ("delivered", &self.deliveries_ok),
            ("deferred", &self.deliveries_deferred),
            ("failed", &self.deliveries_failed),
        ] {
            let _ = writeln!(
                out,
                "ringmail_mx_deliveries_total{{result=\"{result}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringmail_mx_sessions_active SMTP sessions in progress.\n# TYPE ringmail_mx_sessions_active gauge\nringmail_mx_sessions_active {}",
            g(&self.sessions_active)
        );
        let q = spool.stats();
        let _ = writeln!(
            out,
            "# HELP ringmail_queue_messages Messages in the queue.\n# TYPE ringmail_queue_messages gauge\nringmail_queue_messages {}\n# HELP ringmail_queue_recipients_pending Recipients still to deliver.\n# TYPE ringmail_queue_recipients_pending gauge\nringmail_queue_recipients_pending {}\n# HELP ringmail_queue_oldest_seconds Age of the oldest queued message.\n# TYPE ringmail_queue_oldest_seconds gauge\nringmail_queue_oldest_seconds {}\n# HELP ringmail_queue_commits_total Messages committed.\n# TYPE ringmail_queue_commits_total counter\nringmail_queue_commits_total {}\n# HELP ringmail_queue_dir_fsyncs_total Group commit rounds (directory fsyncs).\n# TYPE ringmail_queue_dir_fsyncs_total counter\nringmail_queue_dir_fsyncs_total {}\n# HELP ringmail_queue_syncfs_total Group commit rounds made durable with one syncfs.\n# TYPE ringmail_queue_syncfs_total counter\nringmail_queue_syncfs_total {}\n# HELP ringmail_queue_dsns_total Bounces and delay notices generated.\n# TYPE ringmail_queue_dsns_total counter\nringmail_queue_dsns_total {}",
            q.messages,
            q.recipients_pending,
            q.oldest_age.map_or(0, |d| d.as_secs()),
            q.commits,
            q.dir_fsyncs,
            q.syncfs,
            q.dsns,
        );
        let _ = writeln!(
            out,
            "# HELP ringmail_queue_files_synced_total Files flushed by group commits (segments and message files).\n# TYPE ringmail_queue_files_synced_total counter\nringmail_queue_files_synced_total {}\n# HELP ringmail_queue_segments Segment files holding small messages.\n# TYPE ringmail_queue_segments gauge\nringmail_queue_segments {}",
            q.files_synced, q.segments,
        );
    }
}

/// Serves the admin API until the process ends.
pub async fn serve<M: Metrics>(
    addr: SocketAddr,
    stats: Arc<M>,
    spool: Spool,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_listener(listener, stats, spool).await;
    Ok(())
}

/// What `/metrics` renders: the MX's or the MSA's counters.
pub trait Metrics: Send + Sync + 'static {
    fn render(&self, spool: &Spool, out: &mut String);
}

impl Metrics for MxStats {
    fn render(&self, spool: &Spool, out: &mut String) {
        MxStats::render(self, spool, out)
    }
}

/// Binds `addr` and serves the admin API on a thread of its own (named `name`) until the
/// process exits.
pub fn spawn<M: Metrics>(
    addr: std::net::SocketAddr,
    stats: Arc<M>,
    spool: Spool,
    name: &str,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(l) = tokio::net::TcpListener::from_std(std_listener) {
                    serve_listener(l, stats, spool).await;
                }
            });
        })
}

/// Serves the admin API on an already bound listener.
pub async fn serve_listener<M: Metrics>(
    listener: tokio::net::TcpListener,
    stats: Arc<M>,
    spool: Spool,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stats = Arc::clone(&stats);
        let spool = spool.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let stats = Arc::clone(&stats);
                let spool = spool.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &*stats, &spool).await) }
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

async fn handle<B, M: Metrics>(req: Request<B>, stats: &M, spool: &Spool) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |s: &str| s.parse::<QueueId>().ok();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            let mut out = String::new();
            stats.render(spool, &mut out);
            reply(StatusCode::OK, "text/plain; version=0.0.4", out)
        }
        (&Method::GET, ["api", "queue"]) => match spool.list() {
            Ok(list) => json_reply(StatusCode::OK, json!(list)),
            Err(e) => json_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            ),
        },
        (&Method::GET, ["api", "queue", q]) => match id(q).map(|q| spool.get(&q)) {
            Some(Ok(Some(env))) => json_reply(StatusCode::OK, json!(env)),
            Some(Ok(None)) | None => json_reply(
                StatusCode::NOT_FOUND,
                json!({"error": format!("no message {q}")}),
            ),
            Some(Err(e)) => json_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            ),
        },
        (&Method::POST, ["api", "queue", "flush"]) => {
            let spool = spool.clone();
            match tokio::task::spawn_blocking(move || spool.flush()).await {
                Ok(Ok(n)) => json_reply(StatusCode::OK, json!({"flushed": n})),
                Ok(Err(e)) => json_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": e.to_string()}),
                ),
                Err(e) => json_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": e.to_string()}),
                ),
            }
        }
        (&Method::POST, ["api", "queue", q, action @ ("delete" | "retry")]) => {
            let Some(qid) = id(q) else {
                return json_reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no message {q}")}),
                );
            };
            let spool = spool.clone();
            let action = action.to_string();
            let act = action.clone();
            let r = tokio::task::spawn_blocking(move || match act.as_str() {
                "delete" => spool.delete(&qid),
                _ => spool.retry_now(&qid),
            })
            .await;
            match r {
                Ok(Ok(true)) => json_reply(StatusCode::OK, json!({"id": q, "done": action})),
                Ok(Ok(false)) => json_reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no message {q}")}),
                ),
                Ok(Err(e)) => json_reply(StatusCode::CONFLICT, json!({"error": e.to_string()})),
                Err(e) => json_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": e.to_string()}),
                ),
            }
        }
        (method, parts) => match allowed_method(parts) {
            Some(allow) => method_not_allowed(method, allow),
            None => json_reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        },
    }
}

/// The one method a known path answers to (for 405 and its `Allow` header).
fn allowed_method(parts: &[&str]) -> Option<&'static str> {
    match parts {
        ["api", "queue", "flush"] | ["api", "queue", _, "delete" | "retry"] => Some("POST"),
        ["metrics"] | ["api", "queue"] | ["api", "queue", _] => Some("GET"),
        _ => None,
    }
}

/// 405 with the `Allow` header (RFC 9110 15.5.6).
pub fn method_not_allowed(method: &Method, allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = json_reply(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"error": format!("{method} not allowed here; use {allow}")}),
    );
    r.headers_mut()
        .insert("allow", hyper::header::HeaderValue::from_static(allow));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_paths_name_their_method() {
        assert_eq!(allowed_method(&["metrics"]), Some("GET"));
        assert_eq!(allowed_method(&["api", "queue", "flush"]), Some("POST"));
        assert_eq!(
            allowed_method(&["api", "queue", "ABC", "delete"]),
            Some("POST")
        );
        assert_eq!(allowed_method(&["api", "queue", "ABC"]), Some("GET"));
        assert_eq!(allowed_method(&["api", "nope"]), None);
        let r = method_not_allowed(&Method::DELETE, "GET");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()["allow"], "GET");
    }
}
