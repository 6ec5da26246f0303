//! `ringmail mda`: wiring of the delivery role (LMTP into Maildir++) and its IMAP server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use ringmail_mx::config::{Cidr, valid_domain};
use ringmail_mx::mda::{MdaConfig, MdaServer};

#[derive(Args)]
pub struct MdaArgs {
    /// TOML configuration file with [mda]. Without it, quick mode.
    #[arg(long, conflicts_with_all = ["lmtp", "maildir", "accounts"])]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Quick mode: LMTP listener for our MX and MSA (e.g. 10.0.0.20:24).
    #[arg(long, required_unless_present = "config")]
    lmtp: Option<SocketAddr>,
    /// IMAP listener with STARTTLS (e.g. 0.0.0.0:143).
    #[arg(long)]
    imap: Option<SocketAddr>,
    /// IMAP listener with implicit TLS (e.g. 0.0.0.0:993).
    #[arg(long)]
    imaps: Option<SocketAddr>,
    /// Quick mode: root of the users' homes: DIR/<domain>/<user>/Maildir (Dovecot's layout).
    #[arg(long, required_unless_present = "config")]
    maildir: Option<PathBuf>,
    /// Quick mode: account store (sqlite:PATH, postgres://…, ldap://…).
    #[arg(long, required_unless_present = "config")]
    accounts: Option<String>,
    /// Host name in the LMTP greeting and message file names.
    #[arg(long)]
    hostname: Option<String>,
    /// Clients allowed to deliver over LMTP, as addresses or CIDR blocks (repeatable;
    /// default: loopback).
    #[arg(long)]
    trusted: Vec<String>,
    /// A load balancer whose PROXY v1/v2 headers the IMAP listeners accept (and require;
    /// repeatable). On the implicit TLS port a direct TLS client from that address still works.
    #[arg(long)]
    trusted_proxy: Vec<std::net::IpAddr>,
    /// Deliver mail for ADDRESS to a program instead of a mailbox: ADDRESS=/path/to/cmd
    /// [ARG ...] (repeatable; no shell; message on stdin; exit 75 = try again later).
    #[arg(long, value_parser = parse_program)]
    program: Vec<(String, Vec<String>)>,
    /// IMAP certificate chain (PEM); without it a self-signed certificate for --hostname.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// IMAP private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a delivery program may run.
    #[arg(long, default_value_t = 60)]
    program_timeout: u64,
    /// Sustained IMAP commands per second per session (default: 500, bursts of 1000).
    #[arg(long)]
    imap_commands_per_second: Option<u32>,
    /// Seconds from connect within which an IMAP client must log in (default 180).
    #[arg(long)]
    imap_login_timeout: Option<u64>,
    /// IMAP connections at once per client address (default 50).
    #[arg(long)]
    imap_max_connections_per_ip: Option<usize>,
    /// Logged-in IMAP sessions at once per user and client address (default 10).
    #[arg(long)]
    imap_max_userip_connections: Option<usize>,
    /// Failed IMAP logins per client address in 10 minutes before its logins are refused
    /// unchecked (default 10).
    #[arg(long)]
    imap_max_auth_failures: Option<u32>,
}

fn parse_program(s: &str) -> Result<(String, Vec<String>), String> {
    let (addr, cmd) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ADDRESS=/path/to/cmd [ARG ...]"))?;
    let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
    if !addr.contains('@') || argv.is_empty() || !argv[0].starts_with('/') {
        return Err(format!(
            "{s:?} is not ADDRESS=/path/to/cmd [ARG ...] (an absolute path)"
        ));
    }
    Ok((addr.to_ascii_lowercase(), argv))
}

pub fn cmd_mda(args: MdaArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => match ringmail_mx::mda_config::load_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => quick(&args)?,
    };
    if args.check {
        println!(
            "{}: ok ({} LMTP, {} IMAP, {} IMAPS listeners, {} program addresses)",
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.lmtp.len(),
            cfg.imap.len(),
            cfg.imaps.len(),
            cfg.programs.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    crate::mx::serve_until_signal(|| start(cfg), |_| {}, MdaServer::stop)
}

fn quick(args: &MdaArgs) -> Result<MdaConfig> {
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(crate::mx::quick_hostname);
    if !valid_domain(&hostname) {
        bail!("--hostname {hostname:?} is not a fully qualified host name");
    }
    let mut cfg = MdaConfig::quick(
        hostname,
        vec![args.lmtp.context("--lmtp")?],
        args.maildir.clone().context("--maildir")?,
        args.accounts.clone().context("--accounts")?,
    );
    if !args.trusted.is_empty() {
        cfg.trusted_clients = args
            .trusted
            .iter()
            .map(|t| Cidr::parse(t).map_err(|e| anyhow::anyhow!("--trusted {t:?}: {e}")))
            .collect::<Result<_>>()?;
    }
    cfg.programs = args.program.iter().cloned().collect();
    cfg.program_timeout = std::time::Duration::from_secs(args.program_timeout);
    cfg.trusted_proxies = args
        .trusted_proxy
        .iter()
        .map(|ip| Cidr {
            addr: *ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        })
        .collect();
    cfg.imap = args.imap.into_iter().collect();
    cfg.imap_commands_per_second = args.imap_commands_per_second;
    let l = &mut cfg.imap_limits;
    if let Some(s) = args.imap_login_timeout {
        l.login_timeout = std::time::Duration::from_secs(s);
    }
    l.max_connections_per_ip = args
        .imap_max_connections_per_ip
        .unwrap_or(l.max_connections_per_ip);
    l.max_userip_connections = args
        .imap_max_userip_connections
        .unwrap_or(l.max_userip_connections);
    l.max_auth_failures = args.imap_max_auth_failures.unwrap_or(l.max_auth_failures);
    cfg.imaps = args.imaps.into_iter().collect();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        cfg.tls = Some(ringmail_mx::config::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    Ok(cfg)
}

/// Starts the LMTP side of an MDA (also for `ringmail up`).
pub fn start(cfg: MdaConfig) -> Result<MdaServer> {
    MdaServer::start(cfg, Some(crate::mx::pin)).context("starting the MDA")
}
