//! ringmail-mx: the MX role. Inbound SMTP on port 25 for our domains only: sender checks
//! (iprev, SPF, DKIM, DMARC, ARC, DNSBL), a durable queue, and relay to the MDA.
//!
//! ```text
//!  Internet ─▶ [LB, PROXY v2] ─▶ worker per core (current-thread tokio, SO_REUSEPORT)
//!                                   └─ session: smtp core + policy ─▶ spool (group commit) ─▶ 250
//!  spool ─▶ relay thread: dispatcher + delivery workers ─▶ MDA (LMTP/SMTP), bounces ─▶ MTA
//!  admin thread: /metrics, /api/queue
//! ```
//!
//! The pieces: [`config`] (TOML schema), [`session`] (one SMTP session), [`relay`] (delivery),
//! [`runtime`] (thread-per-core listeners), [`proxy`] (PROXY headers from trusted LBs), [`tls`]
//! (certificates, reload), [`admin`] (metrics and the queue API). The MTA ([`mta`]) adds
//! [`outbound`] (delivery to the world), [`resolve`] (MX hosts and their addresses), [`sts`]
//! (MTA-STS, delivery TLS) and [`dkim`] (signing and keys).
#![forbid(unsafe_code)]

pub mod admin;
pub mod arfilter;
pub mod config;
pub mod dkim;
mod driver;
pub mod hop;
mod limits;
pub mod mda;
pub mod mda_config;
pub mod mda_imap;
pub mod msa;
pub mod msa_config;
pub mod mta;
pub mod mta_config;
pub mod outbound;
pub mod proxy;
pub mod relay;
pub mod resolve;
pub mod runtime;
pub mod session;
pub mod sts;
pub mod tls;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use ringmail_mailauth::{AuthConfig, Checker};
use ringmail_queue::{QueueConfig, Spool};
use tracing::{info, warn};

use crate::admin::MxStats;
use crate::config::MxConfig;
use crate::runtime::Workers;
use crate::session::Mx;
use crate::tls::TlsStore;

/// Default message size limit of the roles that take mail from clients (MX, MSA), advertised
/// as `SIZE`: 64 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 64 << 20;

/// Default limit of the internal hops behind them (the MDA's LMTP, the MTA): the edge limit
/// plus 1 MiB for the header fields the edge adds (Received, Authentication-Results,
/// DKIM-Signature), so that nothing an edge accepted is refused further on.
pub const DEFAULT_INTERNAL_MAX_MESSAGE_SIZE: u64 = DEFAULT_MAX_MESSAGE_SIZE + (1 << 20);

/// Why the MX could not start.
#[derive(Debug, thiserror::Error)]
pub enum MxError {
    #[error("spool {path}: {source}")]
    Spool {
        path: String,
        source: ringmail_queue::QueueError,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("sender checks: {0}")]
    Auth(#[from] ringmail_mailauth::AuthError),
    #[error("cannot listen: {0}")]
    Listen(io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    #[error("account store: {0}")]
    Accounts(#[from] ringmail_accounts::AccountError),
    #[error("DKIM keys: {0}")]
    Dkim(dkim::DkimError),
    #[error("resolver: {0}")]
    Resolver(String),
    #[error("mailbox store: {0}")]
    Store(String),
    #[error("a relay route has no next hop")]
    NoNextHop,
    #[error("next hop {addr}: {source}")]
    NextHop {
        addr: std::net::SocketAddr,
        source: hop::HopError,
    },
}

/// Opens the account store on a runtime of its own that lives as long as the server: the
/// connection tasks a database or directory client spawns at open keep running there, while
/// sessions on the per-core runtimes use the store.
pub(crate) fn open_accounts(
    url: &str,
) -> Result<(ringmail_accounts::Accounts, tokio::runtime::Runtime), MxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ringmail-accounts")
        .enable_all()
        .build()
        .map_err(MxError::Thread)?;
    let accounts = rt.block_on(ringmail_accounts::Accounts::open(url))?;
    Ok((accounts, rt))
}

/// Opens a role's spool, recovering what a crash left, with the role's retry schedule; bounces
/// are routed to the MTA.
pub(crate) fn open_spool(
    dir: &std::path::Path,
    hostname: &str,
    retry_min: std::time::Duration,
    retry_max: std::time::Duration,
    max_lifetime: std::time::Duration,
    delay_warning: Option<std::time::Duration>,
) -> Result<Spool, MxError> {
    let mut qcfg = QueueConfig::new(dir);
    qcfg.hostname = hostname.to_string();
    qcfg.retry_min = retry_min;
    qcfg.retry_max = retry_max;
    qcfg.max_lifetime = max_lifetime;
    qcfg.bounce_after_delay_warning = delay_warning;
    qcfg.bounce_route = "mta".into();
    let (spool, recovery) = Spool::open(qcfg).map_err(|e| MxError::Spool {
        path: dir.display().to_string(),
        source: e,
    })?;
    info!(spool = %dir.display(), messages = recovery.messages, ?recovery, "spool opened");
    Ok(spool)
}

/// A running MX.
pub struct MxServer {
    mx: Arc<Mx>,
    /// Where the account store's connection tasks run.
    accounts_rt: Option<tokio::runtime::Runtime>,
    workers: Option<Workers>,
    relay_stop: tokio::sync::watch::Sender<bool>,
    relay: Option<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
}

impl MxServer {
    /// Opens the spool (recovering what a crash left), starts the workers, the relay and the
    /// admin listener. `pin` pins worker N to CPU N (see [`Workers::start`]).
    pub fn start(
        cfg: MxConfig,
        pin: Option<fn(usize) -> io::Result<()>>,
    ) -> Result<MxServer, MxError> {
        let cfg = Arc::new(cfg);
        let spool = open_spool(
            &cfg.spool,
            &cfg.hostname,
            cfg.relay.retry_min,
            cfg.relay.retry_max,
            cfg.relay.max_lifetime,
            None,
        )?;
        let checker = if cfg.checks.enabled {
            let mut a = AuthConfig::new(cfg.hostname.clone());
            a.nameserver = cfg.checks.dns;
            Some(Checker::new(a)?)
        } else {
            None
        };
        let tls = Arc::new(TlsStore::new(cfg.tls.clone(), &cfg.hostname)?);
        let (accounts, accounts_rt) = match &cfg.accounts {
            Some(url) => {
                let (a, rt) = open_accounts(url)?;
                (Some(a), Some(rt))
            }
            None => (None, None),
        };
        let stats = Arc::new(MxStats::default());
        let mx = Arc::new(Mx::new(
            Arc::clone(&cfg),
            spool.clone(),
            checker,
            accounts,
            tls,
            Arc::clone(&stats),
        ));

        // The next hops' TLS settings are checked before anything listens.
        let relay_mx = Arc::new(relay::RelayCtx::for_mx(&mx)?);
        let nworkers = cfg.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let session_mx = Arc::clone(&mx);
        let workers = Workers::start_mode(
            cfg.runtime,
            nworkers,
            &cfg.listen,
            pin,
            move |stream, peer, local| session::run(Arc::clone(&session_mx), stream, peer, local),
        )
        .map_err(MxError::Listen)?;

        let (relay_stop, stop_rx) = tokio::sync::watch::channel(false);
        let relay = std::thread::Builder::new()
            .name("ringmail-mx-relay".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(relay::run(relay_mx, stop_rx)),
                    Err(e) => warn!(error = %e, "cannot build the relay runtime"),
                }
            })
            .map_err(MxError::Thread)?;

        let admin = match cfg.admin {
            Some(addr) => Some(
                admin::spawn(addr, Arc::clone(&stats), spool.clone(), "ringmail-mx-admin")
                    .map_err(MxError::Listen)?,
            ),
            None => None,
        };
        info!(
            listen = ?cfg.listen,
            domains = ?cfg.domains,
            workers = nworkers,
            runtime = ?cfg.runtime,
            next_hop = ?cfg.relay.next_hop,
            checks = cfg.checks.enabled,
            "mx started"
        );
        Ok(MxServer {
            mx,
            accounts_rt,
            workers: Some(workers),
            relay_stop,
            relay: Some(relay),
            admin,
        })
    }

    /// Re-reads the TLS certificate files (SIGHUP).
    pub fn reload_tls(&self) {
        match self.mx.tls.reload() {
            Ok(true) => info!("TLS certificates reloaded"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "TLS reload failed; the previous certificates stay"),
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.mx.spool
    }

    pub fn stats(&self) -> Arc<MxStats> {
        Arc::clone(&self.mx.stats)
    }

    /// Stops accepting, lets sessions finish their exchange briefly, stops the relay.
    pub fn stop(mut self) {
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        let _ = self.relay_stop.send(true);
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
        // The admin thread serves until the process exits.
        drop(self.admin.take());
        if let Some(rt) = self.accounts_rt.take() {
            rt.shutdown_background();
        }
        info!("mx stopped");
    }
}

#[cfg(test)]
mod size_tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use crate::config::{MxConfig, Relay, RelayProtocol};
    use crate::mda::MdaConfig;
    use crate::msa_config::MsaConfig;
    use crate::mta_config::MtaConfig;

    #[test]
    fn default_size_limits_never_refuse_further_on_what_an_edge_accepted() {
        let addr: SocketAddr = "127.0.0.1:25".parse().expect("addr");
        let mx = MxConfig::quick(
            "mx.example.test".into(),
            addr,
            vec!["example.test".into()],
            PathBuf::from("/nonexistent"),
            Relay::new(vec![addr], RelayProtocol::Lmtp),
        );
        let msa = MsaConfig::quick(
            "msa.example.test".into(),
            vec![addr],
            Vec::new(),
            "sqlite::memory:".into(),
            PathBuf::from("/nonexistent"),
            vec![addr],
        );
        let mta = MtaConfig::quick("mta.example.test".into(), vec![addr], PathBuf::from("/x"));
        let mda = MdaConfig::quick(
            "mda.example.test".into(),
            vec![addr],
            PathBuf::from("/x"),
            "sqlite::memory:".into(),
        );
        assert_eq!(mx.max_message_size, crate::DEFAULT_MAX_MESSAGE_SIZE);
        assert_eq!(msa.max_message_size, crate::DEFAULT_MAX_MESSAGE_SIZE);
        // Room for the header fields an edge adds before relaying.
        for edge in [mx.max_message_size, msa.max_message_size] {
            assert!(mda.max_message_size >= edge + (1 << 20));
            assert!(mta.max_message_size >= edge + (1 << 20));
        }
    }
}
