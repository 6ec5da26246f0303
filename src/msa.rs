//! `ringmail msa`: wiring of the submission role.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use ringmail_mx::config::{Cidr, valid_domain};
use ringmail_mx::hop::HopSecurity;
use ringmail_mx::msa::MsaServer;
use ringmail_mx::msa_config::{self, MsaConfig};

#[derive(Args)]
pub struct MsaArgs {
    /// TOML configuration file with [msa]. Without it, quick mode.
    #[arg(long, conflicts_with_all = ["listen", "listen_tls", "accounts", "spool", "relay", "relay_tls", "relay_ca", "relay_tls_name", "relay_tls_no_verify", "relay_auth_user", "relay_password_file", "auth_mechanisms"])]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Quick mode: submission with STARTTLS (e.g. 0.0.0.0:587).
    #[arg(long, required_unless_present = "config")]
    listen: Option<SocketAddr>,
    /// Quick mode: submission with implicit TLS (e.g. 0.0.0.0:465).
    #[arg(long)]
    listen_tls: Option<SocketAddr>,
    /// Quick mode: account store (sqlite:PATH, postgres://…, ldap://…).
    #[arg(long, required_unless_present = "config")]
    accounts: Option<String>,
    /// Quick mode: the spool (durable queue) directory.
    #[arg(long, required_unless_present = "config")]
    spool: Option<PathBuf>,
    /// Quick mode: the MTA next hop everything is relayed to. Repeatable: a new connection
    /// tries each in turn from a rotating start, passing over a dead one.
    #[arg(long, required_unless_present = "config")]
    relay: Vec<SocketAddr>,
    /// Quick mode: the MDA (SMTP) mail for our own domains goes to (repeatable); absent: the
    /// MTA.
    #[arg(long)]
    local_relay: Vec<SocketAddr>,
    /// Quick mode: host name in the greeting, Received and Message-ID.
    #[arg(long)]
    hostname: Option<String>,
    /// Quick mode: admin listener (/metrics, queue API).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Quick mode: a load balancer whose PROXY v1/v2 headers are accepted (repeatable).
    #[arg(long)]
    trusted_proxy: Vec<IpAddr>,
    /// Quick mode: SASL mechanisms offered after TLS, comma-separated, in order: PLAIN, LOGIN,
    /// SCRAM-SHA-256 (default PLAIN,LOGIN: Cyrus SASL clients pick the strongest advertised
    /// mechanism and do not fall back, so offer SCRAM-SHA-256 only when the accounts that log
    /// in have {SCRAM-SHA-256} secrets).
    #[arg(long, value_delimiter = ',')]
    auth_mechanisms: Vec<String>,
    /// Quick mode: concurrent sessions per client address (default 50; 421 4.7.0 beyond).
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    #[command(flatten)]
    hop: crate::hop::HopArgs,
}

pub fn cmd_msa(args: MsaArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => match msa_config::load_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => {
            let hostname = args
                .hostname
                .clone()
                .unwrap_or_else(crate::mx::quick_hostname);
            if !valid_domain(&hostname) {
                bail!("--hostname {hostname:?} is not a fully qualified host name");
            }
            let mut c = MsaConfig::quick(
                hostname,
                vec![args.listen.context("--listen")?],
                args.listen_tls.into_iter().collect(),
                args.accounts.clone().context("--accounts")?,
                args.spool.clone().context("--spool")?,
                crate::mx::hop_list(&args.relay, "--relay")?,
            )
            .with_local_relay(if args.local_relay.is_empty() {
                Vec::new()
            } else {
                crate::mx::hop_list(&args.local_relay, "--local-relay")?
            });
            c.relay_security = args.hop.security(HopSecurity::default())?;
            c.admin = args.admin;
            if !args.auth_mechanisms.is_empty() {
                c.auth_mechanisms =
                    msa_config::parse_mechanisms(args.auth_mechanisms.iter().map(String::as_str))
                        .map_err(|e| anyhow::anyhow!("--auth-mechanisms: {e}"))?;
                if let Some(e) =
                    msa_config::mechanisms_store_conflict(&c.auth_mechanisms, &c.accounts)
                {
                    bail!("--auth-mechanisms: {e}");
                }
            }
            if let Some(n) = args.max_connections_per_ip {
                c.max_connections_per_ip = n.max(1);
            }
            c.trusted_proxies = args
                .trusted_proxy
                .iter()
                .map(|ip| Cidr {
                    addr: *ip,
                    prefix: if ip.is_ipv4() { 32 } else { 128 },
                })
                .collect();
            c
        }
    };
    if args.check {
        println!(
            "{}: ok ({} STARTTLS and {} implicit TLS listeners, relay {} with {})",
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.listen.len(),
            cfg.listen_tls.len(),
            crate::mx::addr_list(&cfg.relay),
            cfg.relay_security.describe()
        );
        return Ok(ExitCode::SUCCESS);
    }
    crate::mx::serve_until_signal(|| start(cfg), MsaServer::reload_tls, MsaServer::stop)
}

/// Starts an MSA (also for `ringmail up`).
pub fn start(cfg: MsaConfig) -> Result<MsaServer> {
    MsaServer::start(cfg, Some(crate::mx::pin)).context("starting the MSA")
}
