//! Wiring of the anycast glue: health from the load balancer's pools (or from checks of its own
//! in `ringmail announce`), the admin API under `/api/announce`, and the standalone subcommand.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ringmail_bgp_glue::glue::{Glue, HealthFn, HealthReading};
use ringmail_dataplane::admin::{self, AdminExtension, View};
use ringmail_dataplane::healthcheck;
use ringmail_dataplane::runtime::{AdminState, PoolRuntime};
use ringmail_dataplane::stats::Stats;
use ringmail_proxy_core::config::{Announce, LbConfig};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

/// Healthy backends of a pool, as the announcement sees them: up by the health checks *and*
/// checked at least once (the proxy starts backends optimistically up; a route must not be),
/// and not drained by an operator.
fn healthy(pool: &PoolRuntime) -> usize {
    pool.backends
        .iter()
        .filter(|b| {
            b.is_up()
                && b.admin_state() == AdminState::Ready
                && b.checks_ok.load(Ordering::Relaxed) > 0
        })
        .count()
}

/// Health of every VIP from the pools in `view` (looked up by name, so a reload that reorders
/// pools does not confuse it). `serving` says whether the proxy can serve.
pub fn health_from_view(
    config: &LbConfig,
    announce: &Announce,
    view: Arc<RwLock<View>>,
    serving: impl Fn() -> bool + Send + 'static,
) -> HealthFn {
    let vip_pools: Vec<Vec<String>> = announce
        .vips
        .iter()
        .map(|v| {
            v.pools
                .iter()
                .map(|&i| config.pools[i].name.clone())
                .collect()
        })
        .collect();
    Box::new(move || {
        let view = view.read().unwrap_or_else(|e| e.into_inner());
        let healthy = vip_pools
            .iter()
            .map(|names| {
                view.pools
                    .iter()
                    .filter(|p| names.contains(&p.config.name))
                    .map(|p| healthy(p))
                    .sum()
            })
            .collect();
        HealthReading {
            serving: serving(),
            healthy,
        }
    })
}

/// In kernel-table mode, a TUN interface that lives as long as this process, for the table's
/// routes to go through: if the process dies, the kernel deletes the interface and the routes,
/// and BIRD/FRR withdraw them (fail closed). Without it (no /dev/net/tun) the routes go via `lo`
/// and would outlive a crash until the next start flushes them; that is logged.
pub fn route_device(announce: &Announce) -> (Option<std::os::fd::OwnedFd>, Option<String>) {
    let ringmail_proxy_core::config::AnnounceMode::KernelTable { table } = announce.mode else {
        return (None, None);
    };
    let name = format!("ringmail-t{table}");
    let name = if name.len() < 16 {
        name
    } else {
        format!("rm-t{}", table % 1_000_000_000)
    };
    match ringmail_dataplane::sys::open_tun(&name) {
        Ok(fd) => {
            info!(device = %name, table, "kernel-table routes go through a process-owned TUN interface: they vanish if this process dies");
            (Some(fd), Some(name))
        }
        Err(e) => {
            tracing::warn!(error = %e, table, "cannot create a TUN interface for the kernel-table routes; they go via lo and would outlive a crash of this process until its next start");
            (None, None)
        }
    }
}

/// `/api/announce` on the admin listener.
#[derive(Debug)]
pub struct GlueAdmin(pub Arc<Glue>);

impl AdminExtension for GlueAdmin {
    fn render_metrics(&self, out: &mut String) {
        self.0.render_metrics(out);
    }

    fn allowed_method(&self, path: &[&str]) -> Option<&'static str> {
        match path {
            ["api", "announce"] => Some("GET"),
            ["api", "announce", "drain" | "resume"] => Some("POST"),
            _ => None,
        }
    }

    fn handle(&self, method: &str, path: &[&str]) -> Option<(u16, serde_json::Value)> {
        match (method, path) {
            ("GET", ["api", "announce"]) => Some((200, self.0.status_json())),
            ("POST", ["api", "announce", "drain"]) => {
                info!("admin: drain requested");
                self.0.request_drain();
                Some((202, json!({"drain": "started"})))
            }
            ("POST", ["api", "announce", "resume"]) => {
                if self.0.resume() {
                    info!("admin: drain ended");
                    Some((202, json!({"drain": "resumed"})))
                } else {
                    Some((
                        409,
                        json!({"error": "the process is shutting down; its routes stay withdrawn"}),
                    ))
                }
            }
            _ => None,
        }
    }
}

/// `ringmail announce --config FILE`: the glue alone, with health checks of its own.
pub fn cmd_announce(config: LbConfig, path: PathBuf) -> Result<std::process::ExitCode> {
    let Some(announce) = config.announce.clone() else {
        bail!(
            "{}: no [announce] section; `ringmail announce` needs VIPs and how to announce them",
            path.display()
        );
    };
    if !config.listeners.is_empty() {
        tracing::warn!(
            "{} has [[listener]] sections; `ringmail announce` proxies nothing and ignores them",
            path.display()
        );
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let pools: Vec<Arc<PoolRuntime>> = config
        .pools
        .iter()
        .map(|p| Arc::new(PoolRuntime::new(p.clone(), 1, None)))
        .collect();
    let checker = healthcheck::spawn(pools.clone()).context("starting health checks")?;
    let view = Arc::new(RwLock::new(View {
        extensions: Vec::new(),
        pools,
        stats: Arc::new(Stats::new(0)),
        maxconn: 0,
        open_files: 0,
        relay: config.global.relay,
    }));
    let health = health_from_view(&config, &announce, Arc::clone(&view), || true);
    let (tun, device) = route_device(&announce);
    let glue = Arc::new(Glue::start(&announce, health, device).context("starting the announcer")?);
    view.write()
        .unwrap_or_else(|e| e.into_inner())
        .extensions
        .push(Arc::new(GlueAdmin(Arc::clone(&glue))));
    let admin = match config.global.admin {
        Some(addr) => Some(
            admin::spawn(addr, Arc::clone(&view))
                .with_context(|| format!("starting the admin listener on {addr}"))?,
        ),
        None => None,
    };
    info!(vips = announce.vips.len(), "announcer running");
    if let Some(sig) = signals.forever().next() {
        info!(signal = sig, "stopping: drain sequence");
    }
    glue.drain(announce.graceful_wait + Duration::from_secs(10));
    glue.stop();
    checker.stop();
    if let Some(a) = admin {
        a.stop();
    }
    drop(tun);
    Ok(std::process::ExitCode::SUCCESS)
}
