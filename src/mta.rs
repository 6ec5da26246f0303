//! `ringmail mta`: wiring of the outbound role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use ringmail_mx::config::{Cidr, valid_domain};
use ringmail_mx::dkim::DkimKeySpec;
use ringmail_mx::hop::{HopSecurity, TlsLevel};
use ringmail_mx::mta::MtaServer;
use ringmail_mx::mta_config::{self, MtaConfig};

#[derive(Args)]
pub struct MtaArgs {
    /// TOML configuration file with [mta]. Without it, quick mode.
    #[arg(long, conflicts_with_all = ["listen", "spool", "relay", "transport", "resolver", "dkim", "relay_tls", "relay_ca", "relay_tls_name", "relay_tls_no_verify", "relay_auth_user", "relay_password_file"])]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Quick mode: where our MSAs and MXs hand mail over (e.g. 10.0.0.30:25).
    #[arg(long, required_unless_present = "config")]
    listen: Option<SocketAddr>,
    /// Quick mode: the spool (durable queue) directory.
    #[arg(long, required_unless_present = "config")]
    spool: Option<PathBuf>,
    /// Quick mode: send everything to this smart host instead of looking up MX records.
    /// Repeatable: a new connection tries each in turn from a rotating start.
    #[arg(long, conflicts_with = "resolver")]
    relay: Vec<SocketAddr>,
    /// Quick mode: mail for DOMAIN goes to IP:PORT, no MX lookup, ahead of --relay (e.g. our
    /// own domain to our MX: example.com=10.0.0.10:25). Repeatable; a domain named again gets
    /// further next hops, tried in turn.
    #[arg(long, value_parser = parse_transport)]
    transport: Vec<(String, SocketAddr)>,
    /// Quick mode: the DNS server for MX, A/AAAA and MTA-STS lookups (default: resolv.conf).
    #[arg(long)]
    resolver: Option<SocketAddr>,
    /// Quick mode: a DKIM key, DOMAIN:SELECTOR:KEYFILE (repeatable; two keys for one domain,
    /// e.g. RSA and Ed25519, sign with both).
    #[arg(long, value_parser = parse_dkim)]
    dkim: Vec<DkimKeySpec>,
    /// Quick mode: EHLO name (the name the MTA's PTR and SPF records give).
    #[arg(long)]
    hostname: Option<String>,
    /// Quick mode: clients allowed to relay, as addresses or CIDR blocks (repeatable;
    /// default: loopback).
    #[arg(long)]
    trusted: Vec<String>,
    /// Quick mode: the port of remote MX hosts (labs; default 25).
    #[arg(long)]
    remote_port: Option<u16>,
    /// Quick mode: an extra CA (PEM) for MTA-STS policy hosts and enforced MX certificates.
    #[arg(long)]
    mta_sts_ca: Option<PathBuf>,
    /// Quick mode: do not look up MTA-STS policies.
    #[arg(long)]
    no_mta_sts: bool,
    /// Quick mode: admin listener (/metrics, queue API).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Quick mode: tell the sender once when a message is still undelivered after this long
    /// (e.g. 4h; Postfix's delay_warning_time). Default: no delay notice.
    #[arg(long, value_parser = crate::parse_duration)]
    delay_warning: Option<std::time::Duration>,
    #[command(flatten)]
    hop: crate::hop::HopArgs,
}

fn parse_dkim(s: &str) -> Result<DkimKeySpec, String> {
    let mut parts = s.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(d), Some(sel), Some(k)) if valid_domain(d) && !sel.is_empty() && !k.is_empty() => {
            Ok(DkimKeySpec {
                domain: d.to_ascii_lowercase(),
                selector: sel.to_string(),
                key_file: PathBuf::from(k),
            })
        }
        _ => Err(format!("{s:?} is not DOMAIN:SELECTOR:KEYFILE")),
    }
}

fn parse_transport(s: &str) -> Result<(String, SocketAddr), String> {
    let (domain, hop) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not DOMAIN=IP:PORT"))?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !valid_domain(&domain) {
        return Err(format!("{domain:?} is not a domain name"));
    }
    let addr = hop.parse().map_err(|_| format!("{hop:?} is not IP:PORT"))?;
    Ok((domain, addr))
}

pub fn cmd_mta(args: MtaArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => match mta_config::load_file(path) {
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
            let mut c = MtaConfig::quick(
                hostname,
                vec![args.listen.context("--listen")?],
                args.spool.clone().context("--spool")?,
            );
            c.relay = if args.relay.is_empty() {
                Vec::new()
            } else {
                crate::mx::hop_list(&args.relay, "--relay")?
            };
            for (domain, addr) in &args.transport {
                let hops = c.transport.entry(domain.clone()).or_default();
                if hops.contains(addr) {
                    bail!("--transport {domain}={addr} is given twice");
                }
                hops.push(*addr);
            }
            c.relay_security = args.hop.security(HopSecurity::level(TlsLevel::May))?;
            if c.relay.is_empty() && c.relay_security != HopSecurity::level(TlsLevel::May) {
                bail!("--relay-tls and --relay-auth-user apply to the smart host: set --relay");
            }
            c.resolver = args.resolver;
            c.dkim = args.dkim.clone();
            c.admin = args.admin;
            c.mta_sts = !args.no_mta_sts;
            c.mta_sts_ca = args.mta_sts_ca.clone();
            c.delay_warning = args.delay_warning;
            if let Some(p) = args.remote_port {
                c.remote_port = p;
            }
            if !args.trusted.is_empty() {
                c.trusted_clients = args
                    .trusted
                    .iter()
                    .map(|t| Cidr::parse(t).map_err(|e| anyhow::anyhow!("--trusted {t:?}: {e}")))
                    .collect::<Result<_>>()?;
            }
            c
        }
    };
    if args.check {
        // Keys are read here too: a missing or bad key file is a configuration error.
        if let Err(e) = ringmail_mx::dkim::DkimSigner::load(&cfg.dkim) {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
        let transports: String = cfg
            .transport
            .iter()
            .map(|(domain, hops)| format!("{domain} to {}; ", crate::mx::addr_list(hops)))
            .collect();
        println!(
            "{}: ok ({} listeners, {} DKIM keys, {transports}{})",
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.listen.len(),
            cfg.dkim.len(),
            match (cfg.relay.is_empty(), cfg.transport.is_empty()) {
                (true, true) => "MX lookups".to_string(),
                (true, false) => "other domains by MX lookups".to_string(),
                (false, true) => format!(
                    "everything to {} with {}",
                    crate::mx::addr_list(&cfg.relay),
                    cfg.relay_security.describe()
                ),
                (false, false) => format!(
                    "other domains to {} with {}",
                    crate::mx::addr_list(&cfg.relay),
                    cfg.relay_security.describe()
                ),
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    crate::mx::serve_until_signal(|| start(cfg), MtaServer::reload_tls, MtaServer::stop)
}

/// Starts an MTA (also for `ringmail up`).
pub fn start(cfg: MtaConfig) -> Result<MtaServer> {
    MtaServer::start(cfg, Some(crate::mx::pin)).context("starting the MTA")
}
