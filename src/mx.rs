//! `ringmail mx` and `ringmail queue`: wiring of the MX role and the queue tool.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use ringmail_mx::MxServer;
use ringmail_mx::config::{self as mxconfig, MxConfig, Relay, RelayProtocol};
use ringmail_mx::hop::HopSecurity;
use ringmail_queue::{Envelope, QueueConfig, QueueId, Spool, inspect, summary_line};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

#[derive(Clone, Copy, ValueEnum)]
pub enum ProtocolArg {
    Lmtp,
    Smtp,
}

#[derive(Args)]
pub struct MxArgs {
    /// TOML configuration file. Without it, quick mode (--listen, --domain, --spool, --relay).
    #[arg(long, conflicts_with_all = ["listen", "domain", "spool", "relay", "bounce_relay", "relay_tls", "relay_ca", "relay_tls_name", "relay_tls_no_verify", "relay_auth_user", "relay_password_file"])]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Quick mode: address to listen on (e.g. 0.0.0.0:25).
    #[arg(long, required_unless_present = "config")]
    listen: Option<SocketAddr>,
    /// Quick mode: a domain to accept mail for (repeatable); every local part is accepted.
    #[arg(long, required_unless_present = "config")]
    domain: Vec<String>,
    /// Quick mode: the spool (durable queue) directory.
    #[arg(long, required_unless_present = "config")]
    spool: Option<PathBuf>,
    /// Quick mode: the next hop accepted mail is relayed to (the MDA). Repeatable: a new
    /// connection tries each in turn from a rotating start, passing over a dead one.
    #[arg(long, required_unless_present = "config")]
    relay: Vec<SocketAddr>,
    /// Quick mode: protocol to the next hop.
    #[arg(long, value_enum, default_value = "smtp")]
    relay_protocol: ProtocolArg,
    /// Quick mode: where bounces go (the MTA, over SMTP; repeatable). Without it they go to
    /// `--relay`, which cannot work when that is an MDA speaking LMTP.
    #[arg(long)]
    bounce_relay: Vec<SocketAddr>,
    /// Quick mode: host name in the greeting and trace headers.
    #[arg(long)]
    hostname: Option<String>,
    /// Quick mode: DNS server for the sender checks (iprev, SPF, DKIM, DMARC); without it the
    /// checks are off.
    #[arg(long)]
    dns: Option<SocketAddr>,
    /// Quick mode: admin listener (/metrics, queue API).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Quick mode: account store (sqlite:PATH, postgres://…, ldap://…); unknown users are then
    /// refused at RCPT.
    #[arg(long)]
    accounts: Option<String>,
    /// Quick mode: worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Quick mode: per-core runtimes (default) or one multi-thread runtime.
    #[arg(long, value_enum, default_value = "per-core")]
    runtime: RuntimeArg,
    #[command(flatten)]
    hop: crate::hop::HopArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RuntimeArg {
    PerCore,
    PerCorePinned,
    MultiThread,
}

/// Pins a role's worker N to the Nth CPU this process may run on (wrapping), so that under
/// `taskset` or a cpuset the workers stay on the CPUs they were given (the role crates forbid
/// the unsafe code it needs).
pub fn pin(worker: usize) -> std::io::Result<()> {
    let cpus = ringmail_dataplane::sys::allowed_cpus();
    match cpus.get(worker % cpus.len().max(1)) {
        Some(&cpu) => ringmail_dataplane::sys::pin_current_thread(cpu),
        None => Ok(()),
    }
}

/// Serves until SIGTERM or SIGINT; SIGHUP re-reads the TLS certificates. Handlers are installed
/// before `start` runs, so a signal during start-up is not lost.
pub fn serve_until_signal<S>(
    start: impl FnOnce() -> Result<S>,
    reload_tls: impl Fn(&S),
    stop: impl FnOnce(S),
) -> Result<ExitCode> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let server = start()?;
    for sig in signals.forever() {
        if sig == SIGHUP {
            reload_tls(&server);
            continue;
        }
        info!(signal = sig, "stopping");
        break;
    }
    stop(server);
    Ok(ExitCode::SUCCESS)
}

/// A repeatable quick-mode next hop flag: at least one address, none twice.
pub fn hop_list(addrs: &[SocketAddr], flag: &str) -> Result<Vec<SocketAddr>> {
    if addrs.is_empty() {
        bail!("{flag} is required");
    }
    for (i, a) in addrs.iter().enumerate() {
        if addrs[..i].contains(a) {
            bail!("{flag} {a} is given twice");
        }
    }
    Ok(addrs.to_vec())
}

/// `10.0.0.20:24, 10.0.0.21:24`.
pub fn addr_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn quick_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| mxconfig::valid_domain(s))
        .unwrap_or_else(|| "mx.localhost.localdomain".to_string())
}

pub fn cmd_mx(args: MxArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => match mxconfig::load_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => {
            let hostname = args.hostname.clone().unwrap_or_else(quick_hostname);
            if !mxconfig::valid_domain(&hostname) {
                bail!("--hostname {hostname:?} is not a fully qualified host name");
            }
            for d in &args.domain {
                if !mxconfig::valid_domain(d) {
                    bail!("--domain {d:?} is not a domain name");
                }
            }
            let protocol = match args.relay_protocol {
                ProtocolArg::Lmtp => RelayProtocol::Lmtp,
                ProtocolArg::Smtp => RelayProtocol::Smtp,
            };
            let mut c = MxConfig::quick(
                hostname,
                args.listen.context("--listen")?,
                args.domain.clone(),
                args.spool.clone().context("--spool")?,
                Relay::new(hop_list(&args.relay, "--relay")?, protocol),
            );
            c.relay.security = args.hop.security(HopSecurity::default())?;
            if !args.bounce_relay.is_empty() {
                c.relay.bounce_next_hop = Some(hop_list(&args.bounce_relay, "--bounce-relay")?);
            }
            c.admin = args.admin;
            c.accounts = args.accounts.clone();
            c.workers = args.workers;
            c.runtime = match args.runtime {
                RuntimeArg::PerCore => ringmail_mx::runtime::RuntimeMode::PerCore,
                RuntimeArg::PerCorePinned => ringmail_mx::runtime::RuntimeMode::PerCorePinned,
                RuntimeArg::MultiThread => ringmail_mx::runtime::RuntimeMode::MultiThread,
            };
            if let Some(dns) = args.dns {
                c.checks.enabled = true;
                c.checks.dns = Some(dns);
            }
            c
        }
    };
    if cfg.relay.protocol == RelayProtocol::Lmtp && cfg.relay.bounce_next_hop.is_none() {
        // Bounces are SMTP to another domain's sender: an MDA speaking LMTP takes neither.
        tracing::warn!(
            "no bounce route: the next hop speaks LMTP and there is no bounce_next_hop \
             (--bounce-relay), so bounces will stay queued; point it at the MTA"
        );
    }
    if args.check {
        println!(
            "{}: ok ({} listeners, {} domains, next hop {})",
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.listen.len(),
            cfg.domains.len(),
            addr_list(&cfg.relay.next_hop)
        );
        return Ok(ExitCode::SUCCESS);
    }
    serve_until_signal(|| start_for_up(cfg), MxServer::reload_tls, MxServer::stop)
}

/// Starts an MX (also for `ringmail up`).
pub fn start_for_up(cfg: MxConfig) -> Result<MxServer> {
    MxServer::start(cfg, Some(pin)).context("starting the MX")
}

#[derive(Args)]
pub struct QueueArgs {
    /// The spool directory.
    #[arg(long)]
    spool: PathBuf,
    /// The running server's admin listener: changes go through it while it holds the spool.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Every queued message, one line each (like postqueue -p).
    List,
    /// One message's envelope.
    Show { id: String },
    /// Remove a message (like postsuper -d).
    Delete { id: String },
    /// Deliver a message now (like postqueue -i).
    Retry { id: String },
    /// Deliver everything now (like postqueue -f).
    Flush,
}

/// A tiny HTTP/1.0 client for the admin API (bounded in time and size).
fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to the admin listener {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.take(64 << 20).read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn print_list(list: &[Envelope], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("Mail queue is empty");
        return Ok(());
    }
    for env in list {
        println!("{}", summary_line(env));
    }
    let bytes: u64 = list.iter().map(|e| e.size).sum();
    println!(
        "-- {} Kbytes in {} Requests.",
        bytes.div_ceil(1024),
        list.len()
    );
    Ok(())
}

pub fn cmd_queue(args: QueueArgs) -> Result<ExitCode> {
    match (&args.command, args.admin) {
        (QueueCommand::List, Some(admin)) => {
            let (status, body) = http(admin, "GET", "/api/queue")?;
            if status != 200 {
                bail!("admin API: {status} {body}");
            }
            let list: Vec<Envelope> = serde_json::from_str(&body)?;
            print_list(&list, args.json)?;
        }
        (QueueCommand::List, None) => {
            let mut list = inspect(&args.spool)
                .with_context(|| format!("reading {}", args.spool.display()))?;
            list.sort_by_key(|e| e.received_at);
            print_list(&list, args.json)?;
        }
        (QueueCommand::Show { id }, admin) => {
            let env = match admin {
                Some(a) => {
                    let (status, body) = http(a, "GET", &format!("/api/queue/{id}"))?;
                    if status != 200 {
                        bail!("{id}: {body}");
                    }
                    serde_json::from_str::<Envelope>(&body)?
                }
                None => inspect(&args.spool)?
                    .into_iter()
                    .find(|e| e.id.to_string() == *id)
                    .with_context(|| format!("{id}: not in the queue"))?,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&env)?);
            } else {
                println!("{}", summary_line(&env));
                if !env.headers.is_empty() {
                    print!("{}", env.headers.replace("\r\n", "\n"));
                }
            }
        }
        (cmd, Some(admin)) => {
            let path = match cmd {
                QueueCommand::Delete { id } => format!("/api/queue/{id}/delete"),
                QueueCommand::Retry { id } => format!("/api/queue/{id}/retry"),
                _ => "/api/queue/flush".to_string(),
            };
            let (status, body) = http(admin, "POST", &path)?;
            if status != 200 {
                bail!("{status}: {body}");
            }
            println!("{body}");
        }
        (cmd, None) => {
            // No server: open the spool ourselves (this fails if a server holds it).
            let (spool, _) = Spool::open(QueueConfig::new(&args.spool)).with_context(|| {
                format!(
                    "opening {} (if a server runs on it, pass --admin ADDR)",
                    args.spool.display()
                )
            })?;
            let parse = |id: &str| -> Result<QueueId> {
                id.parse().map_err(|e| anyhow::anyhow!("{id}: {e}"))
            };
            match cmd {
                QueueCommand::Delete { id } => {
                    if !spool.delete(&parse(id)?)? {
                        bail!("{id}: not in the queue");
                    }
                    println!("{id}: deleted");
                }
                QueueCommand::Retry { id } => {
                    if !spool.retry_now(&parse(id)?)? {
                        bail!("{id}: not in the queue");
                    }
                    println!("{id}: scheduled now (delivered when a server runs on the spool)");
                }
                _ => {
                    let n = spool.flush()?;
                    println!("{n} messages scheduled now");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
