//! `ringmail`: the one binary. Subcommands wire the library crates to the command line; no
//! protocol logic lives here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ringmail_dataplane::{Lb, Options};
use ringmail_proxy_core::balance::Algorithm;
use ringmail_proxy_core::config::{
    self, EngineChoice, Global, LbConfig, Listener, Pool, RelayMode,
};
use ringmail_proxy_core::health::CheckKind;
use ringmail_proxy_core::proxy_protocol::Version;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info, warn};

mod accounts;
mod announce;
mod deploy;
mod dkim;
mod hop;
mod lab;
mod mda;
mod msa;
mod mta;
mod mx;

#[derive(Parser)]
#[command(
    name = "ringmail",
    version,
    about = "Mail infrastructure the way large providers build it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The anycast TCP load balancer (HAProxy TCP mode replacement) for IMAPS and submission.
    Lb(LbArgs),
    /// All-in-one node on loopback with embedded defaults; prints how to try it.
    Up(Box<UpArgs>),
    /// The anycast glue alone: checks backends itself and announces the VIPs of `[announce]`
    /// (BGP or a kernel table for BIRD/FRR), for hosts that run another proxy.
    Announce(AnnounceArgs),
    /// The MX: inbound SMTP for our domains, sender checks, durable queue, relay to the MDA.
    Mx(mx::MxArgs),
    /// The MSA: authenticated submission (587 STARTTLS, 465 implicit TLS), relay to the MTA.
    Msa(msa::MsaArgs),
    /// The MTA: DKIM signing, MX resolution, delivery to the world with retries and bounces.
    Mta(mta::MtaArgs),
    /// The MDA: LMTP delivery into Maildir++ mailboxes (or to programs).
    Mda(mda::MdaArgs),
    /// Inspect and manage a role's queue (list, show, delete, retry, flush).
    Queue(mx::QueueArgs),
    /// Manage the account store: domains, accounts, passwords, aliases.
    Accounts(accounts::AccountsArgs),
    /// DKIM keys for the MTA's signer: `dkim keygen` writes a key and prints its DNS record.
    Dkim(dkim::DkimArgs),
    /// Render a deployment (DNS zones, nftables, BIRD/FRR, role configs, systemd units) from
    /// one topology file, and check the live DNS against it.
    Deploy(deploy::DeployArgs),
}

#[derive(Args)]
struct AnnounceArgs {
    /// TOML configuration with [announce] and the pools whose health decides it.
    #[arg(long)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    Auto,
    Uring,
    Epoll,
}

#[derive(Clone, Copy, ValueEnum)]
enum RelayArg {
    Buffered,
    Splice,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProxyArg {
    V1,
    V2,
}

#[derive(Clone, Copy, ValueEnum)]
enum BalanceArg {
    Leastconn,
    Roundrobin,
    Weighted,
    Source,
}

#[derive(Clone, Copy, ValueEnum)]
enum HealthArg {
    Tcp,
    Smtp,
    SmtpStarttls,
    Imap,
    Tls,
}

#[derive(Args)]
struct LbArgs {
    /// TOML configuration file (several listeners and pools). Without it, quick mode.
    #[arg(long, conflicts_with_all = ["listen", "backend"])]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Quick mode: address to listen on.
    #[arg(long, required_unless_present = "config")]
    listen: Option<SocketAddr>,
    /// Quick mode: a backend address (repeatable).
    #[arg(long, required_unless_present = "config")]
    backend: Vec<SocketAddr>,
    #[command(flatten)]
    quick: QuickArgs,
}

/// Settings of quick mode (and overrides of `up`).
#[derive(Args, Clone)]
struct QuickArgs {
    /// Send a PROXY protocol header to backends.
    #[arg(long, value_enum)]
    proxy_protocol: Option<ProxyArg>,
    /// I/O engine: io_uring, epoll, or io_uring with epoll fallback.
    #[arg(long, value_enum)]
    engine: Option<EngineArg>,
    /// Relay mode: user-space buffers (provided buffer ring) or splice(2) through pipes.
    #[arg(long, value_enum)]
    relay: Option<RelayArg>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Admin listener for /metrics and the backend API.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Balancing algorithm.
    #[arg(long, value_enum, default_value = "leastconn")]
    balance: BalanceArg,
    /// Health check kind.
    #[arg(long, value_enum)]
    health: Option<HealthArg>,
    /// Interval between health checks (e.g. 500ms, 2s).
    #[arg(long, value_parser = parse_duration)]
    health_interval: Option<Duration>,
    /// Consecutive successes to bring a backend back.
    #[arg(long)]
    rise: Option<u32>,
    /// Consecutive failures to take a backend out.
    #[arg(long)]
    fall: Option<u32>,
    /// On SIGTERM, how long established connections may continue.
    #[arg(long, value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// Global connection limit.
    #[arg(long)]
    maxconn: Option<u32>,
}

#[derive(Args)]
struct UpArgs {
    /// Backends behind the load balancer. Default: the MSA started by `up` (its STARTTLS port,
    /// with PROXY v2).
    #[arg(long)]
    backend: Vec<SocketAddr>,
    /// Where the load balancer listens.
    #[arg(long, default_value = "127.0.0.1:10587")]
    listen: SocketAddr,
    /// Admin listener of the load balancer.
    #[arg(long, default_value = "127.0.0.1:9100")]
    admin: SocketAddr,
    /// Where the MX listens.
    #[arg(long, default_value = "127.0.0.1:2525")]
    mx_listen: SocketAddr,
    /// The MX's admin listener (metrics, queue API).
    #[arg(long, default_value = "127.0.0.1:9110")]
    mx_admin: SocketAddr,
    /// The domain the MX accepts mail for.
    #[arg(long, default_value = "example.test")]
    domain: String,
    /// Where accepted mail is relayed (the MDA's LMTP port once it exists). Until something
    /// listens there, mail stays queued: see `ringmail queue`.
    #[arg(long, default_value = "127.0.0.1:10024")]
    mx_relay: SocketAddr,
    /// Where the MSA listens with STARTTLS (submission, behind the LB).
    #[arg(long, default_value = "127.0.0.1:10588")]
    msa_listen: SocketAddr,
    /// Where the MSA listens with implicit TLS (submissions).
    #[arg(long, default_value = "127.0.0.1:10465")]
    msa_listen_tls: SocketAddr,
    /// The MSA's admin listener (metrics, queue API).
    #[arg(long, default_value = "127.0.0.1:9111")]
    msa_admin: SocketAddr,
    /// The MTA's listener (the MSA relays mail for other domains to it, the MX its bounces).
    #[arg(long, default_value = "127.0.0.1:10025")]
    mta_listen: SocketAddr,
    /// The MTA's admin listener.
    #[arg(long, default_value = "127.0.0.1:9112")]
    mta_admin: SocketAddr,
    /// The MTA's DNS server for MX lookups (default: /etc/resolv.conf).
    #[arg(long)]
    mta_resolver: Option<SocketAddr>,
    /// The port the MTA delivers to on remote MX hosts (default 25; labs may change it).
    #[arg(long, default_value_t = 25)]
    mta_remote_port: u16,
    /// The MDA's IMAP listeners: STARTTLS and implicit TLS.
    #[arg(long, default_value = "127.0.0.1:10143")]
    imap_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:11993")]
    imaps_listen: SocketAddr,
    /// The load balancer's IMAPS listener (TCP passthrough to the MDA's implicit TLS port).
    #[arg(long, default_value = "127.0.0.1:10993")]
    lb_imaps: SocketAddr,
    /// Data directory: the spools (DATA/mx-spool, DATA/msa-spool, DATA/mta-spool), the
    /// Maildirs (DATA/mail), the account store DATA/accounts.db, TLS and DKIM keys.
    #[arg(long, default_value = ".ringmail")]
    data: PathBuf,
}

/// The demo login of `ringmail up`, created with the account store on first run.
const UP_USER: &str = "alice";
const UP_PASSWORD: &str = "alice-password";
const UP_USER2: &str = "bob";
const UP_PASSWORD2: &str = "bob-password";

/// Creates the account store of `up` unless it exists: `domain`, the demo accounts
/// `alice@domain` and `bob@domain`, and the role addresses `postmaster@` (RFC 5321 section
/// 4.5.1) and `abuse@` as aliases of alice, so that mail to them is delivered, not bounced.
fn seed_up_accounts(db: &Path, domain: &str) -> Result<String> {
    let url = format!("sqlite:{}", db.display());
    if db.exists() {
        return Ok(url);
    }
    if let Some(dir) = db.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = ringmail_accounts::Accounts::open(&url).await?;
        store.domain_add(domain).await?;
        store
            .account_add(&format!("{UP_USER}@{domain}"), UP_PASSWORD, None)
            .await?;
        store
            .account_add(&format!("{UP_USER2}@{domain}"), UP_PASSWORD2, None)
            .await?;
        for role in ["postmaster", "abuse"] {
            store
                .alias_add(&format!("{role}@{domain}"), &format!("{UP_USER}@{domain}"))
                .await?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .with_context(|| format!("seeding the account store {}", db.display()))?;
    Ok(url)
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, e.g. 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

/// Where log lines go: standard error, written without `std::io::Stderr`'s process-wide lock.
/// Each line is formatted first and then written with one `write(2)` (a whole line at a time,
/// which the kernel keeps together on a file opened for appending and on a pipe up to 4 KiB),
/// so sessions on several cores logging at once do not queue on a mutex for each other's
/// system calls. Falls back to the locked handle if the descriptor cannot be duplicated.
fn log_writer() -> tracing_subscriber::fmt::writer::BoxMakeWriter {
    use std::os::fd::AsFd;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Arc::new(
            std::fs::File::from(fd),
        )),
        Err(_) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(log_writer())
        // Colour codes only for a terminal: a log file or journal gets plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lb(args) => cmd_lb(args),
        Command::Up(args) => cmd_up(*args),
        Command::Announce(args) => cmd_announce(args),
        Command::Mx(args) => mx::cmd_mx(args),
        Command::Queue(args) => mx::cmd_queue(args),
        Command::Msa(args) => msa::cmd_msa(args),
        Command::Mta(args) => mta::cmd_mta(args),
        Command::Mda(args) => mda::cmd_mda(args),
        Command::Accounts(args) => accounts::cmd_accounts(args),
        Command::Dkim(args) => dkim::cmd_dkim(args),
        Command::Deploy(args) => deploy::cmd_deploy(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringmail: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(path: &Path) -> Result<LbConfig, String> {
    config::load_file(path).map_err(|e| e.to_string())
}

fn quick_config(listen: SocketAddr, backends: Vec<SocketAddr>, q: &QuickArgs) -> LbConfig {
    let mut pool = Pool::quick("default", backends);
    pool.algorithm = match q.balance {
        BalanceArg::Leastconn => Algorithm::LeastConn,
        BalanceArg::Roundrobin => Algorithm::RoundRobin,
        BalanceArg::Weighted => Algorithm::Weighted,
        BalanceArg::Source => Algorithm::SourceHash,
    };
    pool.proxy_protocol = q.proxy_protocol.map(|p| match p {
        ProxyArg::V1 => Version::V1,
        ProxyArg::V2 => Version::V2,
    });
    if let Some(h) = q.health {
        pool.health.kind = match h {
            HealthArg::Tcp => CheckKind::Tcp,
            HealthArg::Smtp => CheckKind::Smtp,
            HealthArg::SmtpStarttls => CheckKind::SmtpStarttls,
            HealthArg::Imap => CheckKind::Imap,
            HealthArg::Tls => CheckKind::Tls,
        };
    }
    if let Some(i) = q.health_interval {
        pool.health.interval = i;
        pool.health.timeout = pool
            .health
            .timeout
            .min(i.mul_f32(0.8).max(Duration::from_millis(50)));
    }
    if let Some(r) = q.rise {
        pool.health.rise = r.max(1);
    }
    if let Some(f) = q.fall {
        pool.health.fall = f.max(1);
    }
    let mut global = Global {
        admin: q.admin,
        workers: q.workers,
        ..Global::default()
    };
    if let Some(e) = q.engine {
        global.engine = match e {
            EngineArg::Auto => EngineChoice::Auto,
            EngineArg::Uring => EngineChoice::Uring,
            EngineArg::Epoll => EngineChoice::Epoll,
        };
    }
    if let Some(r) = q.relay {
        global.relay = match r {
            RelayArg::Buffered => RelayMode::Buffered,
            RelayArg::Splice => RelayMode::Splice,
        };
    }
    if let Some(d) = q.drain_timeout {
        global.drain_timeout = d;
    }
    if let Some(m) = q.maxconn {
        global.maxconn = m.max(1);
    }
    LbConfig {
        global,
        listeners: vec![Listener {
            name: "default".into(),
            bind: listen,
            pool: 0,
        }],
        pools: vec![pool],
        announce: None,
    }
}

fn cmd_lb(args: LbArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(path) => match load_config(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => {
            let listen = args
                .listen
                .context("--listen is required without --config")?;
            if args.backend.is_empty() {
                bail!("at least one --backend is required without --config");
            }
            quick_config(listen, args.backend.clone(), &args.quick)
        }
    };
    if args.check {
        println!(
            "{}: ok ({})",
            args.config
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            describe(&config)
        );
        return Ok(ExitCode::SUCCESS);
    }
    if config.listeners.is_empty() {
        eprintln!(
            "{}: no [[listener]]: the load balancer needs at least one (a file with only [announce] is for `ringmail announce`)",
            args.config
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        return Ok(ExitCode::from(2));
    }
    run_lb(config, args.config, |_| {})
}

/// Runs the load balancer until SIGTERM/SIGINT (drain) ; SIGHUP reloads `config_path`.
fn run_lb(
    config: LbConfig,
    config_path: Option<PathBuf>,
    started: impl FnOnce(&Lb),
) -> Result<ExitCode> {
    // Handlers go in before any worker starts, so a SIGTERM during start-up is not lost.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let mut drain_timeout = config.global.drain_timeout;
    let announce_cfg = config.announce.clone();
    let startup_config = config.clone();
    let mut lb = Lb::start(config, Options::default()).context("starting the load balancer")?;
    // Kept open until exit: the kernel-table routes go through it (see announce::route_device).
    let mut route_tun = None;
    // The anycast glue starts after the workers (listeners use IP_FREEBIND, so the VIPs need not
    // be on lo yet) and announces nothing before the pools behind a VIP pass their checks.
    let glue = match &announce_cfg {
        Some(a) => {
            let liveness = lb.liveness();
            let health =
                announce::health_from_view(&startup_config, a, lb.admin_view(), move || {
                    liveness.serving()
                });
            let (tun, device) = announce::route_device(a);
            route_tun = tun;
            let glue = Arc::new(
                ringmail_bgp_glue::glue::Glue::start(a, health, device)
                    .context("starting the announcer")?,
            );
            lb.admin_view()
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .extensions
                .push(Arc::new(announce::GlueAdmin(Arc::clone(&glue))));
            Some(glue)
        }
        None => None,
    };
    started(&lb);
    for sig in signals.forever() {
        match sig {
            SIGHUP => match &config_path {
                Some(path) => match load_config(path) {
                    Ok(new) => {
                        if new.announce != announce_cfg {
                            warn!("changes to [announce] take effect at the next restart");
                        }
                        let new_drain = new.global.drain_timeout;
                        match lb.reload(new) {
                            Ok(()) => drain_timeout = new_drain,
                            Err(e) => error!(
                                error = %e,
                                "reload failed; the previous configuration stays in force"
                            ),
                        }
                    }
                    Err(e) => {
                        error!("reload refused, configuration invalid:\n{e}");
                    }
                },
                None => warn!("SIGHUP: quick mode has no configuration file to reload"),
            },
            _ => {
                info!(signal = sig, "stopping");
                break;
            }
        }
    }
    if let Some(glue) = &glue {
        // GRACEFUL_SHUTDOWN, the graceful wait, the withdrawal on the wire; the proxy keeps
        // accepting meanwhile, since routers still send new flows until they converge.
        let wait = announce_cfg
            .as_ref()
            .map_or(Duration::ZERO, |a| a.graceful_wait);
        glue.drain(wait + Duration::from_secs(10));
    }
    lb.drain_and_wait(drain_timeout);
    if let Some(glue) = glue {
        // Cease to the neighbours; the loopback VIPs go last, after established connections.
        glue.stop();
    }
    drop(route_tun);
    Ok(ExitCode::SUCCESS)
}

fn cmd_announce(args: AnnounceArgs) -> Result<ExitCode> {
    let config = match load_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    if config.announce.is_none() {
        eprintln!(
            "{}: no [announce] section; `ringmail announce` needs VIPs and how to announce them",
            args.config.display()
        );
        return Ok(ExitCode::from(2));
    }
    if args.check {
        println!("{}: ok ({})", args.config.display(), describe(&config));
        return Ok(ExitCode::SUCCESS);
    }
    announce::cmd_announce(config, args.config)
}

/// One line about what a configuration holds, for `--check`.
fn describe(config: &LbConfig) -> String {
    let mut s = format!(
        "{} listeners, {} pools",
        config.listeners.len(),
        config.pools.len()
    );
    if let Some(a) = &config.announce {
        let mode = match &a.mode {
            config::AnnounceMode::Bgp(b) => format!("BGP to {} neighbours", b.neighbors.len()),
            config::AnnounceMode::KernelTable { table } => format!("kernel table {table}"),
        };
        s.push_str(&format!(", {} VIPs announced by {mode}", a.vips.len()));
        if let Some(h) = &a.handoff {
            s.push_str(&format!(
                ", flows handed off to {} peers on {}",
                h.peers.len(),
                h.device
            ));
        }
    }
    s
}

fn cmd_up(args: UpArgs) -> Result<ExitCode> {
    // The account store first: the MDA and the MSA use it.
    let accounts_url = seed_up_accounts(&args.data.join("accounts.db"), &args.domain)?;
    // The MDA: LMTP from the MX into Maildirs under DATA/mail.
    let maildir = args.data.join("mail");
    let mut mda_cfg = ringmail_mx::mda::MdaConfig::quick(
        "mda.example.test".to_string(),
        vec![args.mx_relay],
        maildir.clone(),
        accounts_url.clone(),
    );
    mda_cfg.imap = vec![args.imap_listen];
    mda_cfg.imaps = vec![args.imaps_listen];
    let mda_server = mda::start(mda_cfg)?;
    let spool = args.data.join("mx-spool");
    let mx_admin = args.mx_admin;
    let mut mx_cfg = ringmail_mx::config::MxConfig::quick(
        "mx.example.test".to_string(),
        args.mx_listen,
        vec![args.domain.clone()],
        spool.clone(),
        ringmail_mx::config::Relay::new(
            vec![args.mx_relay],
            ringmail_mx::config::RelayProtocol::Lmtp,
        ),
    );
    mx_cfg.admin = Some(mx_admin);
    // Unknown recipients are refused at RCPT (no bounce to a forgeable sender: backscatter),
    // and the MX's own bounces (a recipient the MDA refuses after all) go out through the
    // MTA, not to the MDA's LMTP port.
    mx_cfg.accounts = Some(accounts_url.clone());
    mx_cfg.relay.bounce_next_hop = Some(vec![args.mta_listen]);
    mx_cfg.relay.retry_min = Duration::from_secs(30);
    mx_cfg.relay.retry_max = Duration::from_secs(300);
    let mx_server = mx::start_for_up(mx_cfg)?;

    // The MTA: outbound mail, DKIM-signed with a key made on first start.
    let (dkim, dkim_record) = up_dkim_key(&args.data, &args.domain)?;
    let mut mta_cfg = ringmail_mx::mta_config::MtaConfig::quick(
        "mta.example.test".to_string(),
        vec![args.mta_listen],
        args.data.join("mta-spool"),
    );
    mta_cfg.admin = Some(args.mta_admin);
    mta_cfg.resolver = args.mta_resolver;
    mta_cfg.remote_port = args.mta_remote_port;
    mta_cfg.dkim = vec![dkim];
    mta_cfg.retry_min = Duration::from_secs(60);
    mta_cfg.retry_max = Duration::from_secs(900);
    // Mail for our own domain (bounces to local senders among it) goes to our MX, never by an
    // MX lookup: the domain may be a made-up one (example.test) no resolver knows.
    mta_cfg
        .transport
        .insert(args.domain.to_ascii_lowercase(), vec![args.mx_listen]);
    let mta_server = mta::start(mta_cfg)?;

    // The MSA: mail for our domain goes to the MX, everything else to the MTA.
    let msa_spool = args.data.join("msa-spool");
    let mut msa_cfg = ringmail_mx::msa_config::MsaConfig::quick(
        "smtp.example.test".to_string(),
        vec![args.msa_listen],
        vec![args.msa_listen_tls],
        accounts_url,
        msa_spool,
        vec![args.mta_listen],
    )
    .with_local_relay(vec![args.mx_listen]);
    msa_cfg.admin = Some(args.msa_admin);
    msa_cfg.retry_min = Duration::from_secs(30);
    msa_cfg.retry_max = Duration::from_secs(300);
    msa_cfg.trusted_proxies = vec![ringmail_mx::config::Cidr {
        addr: args.listen.ip(),
        prefix: if args.listen.is_ipv4() { 32 } else { 128 },
    }];
    let msa_server = msa::start(msa_cfg)?;

    // The MSA requires a PROXY header from the LB; the LB's checks send a LOCAL one, so they
    // can do the whole SMTP + STARTTLS dialogue.
    let (backends, health, proxy) = if args.backend.is_empty() {
        (
            vec![args.msa_listen],
            Some(HealthArg::SmtpStarttls),
            Some(ProxyArg::V2),
        )
    } else {
        (args.backend.clone(), Some(HealthArg::Tcp), None)
    };
    let quick = QuickArgs {
        proxy_protocol: proxy,
        engine: None,
        relay: None,
        workers: None,
        admin: Some(args.admin),
        balance: BalanceArg::Leastconn,
        health,
        health_interval: Some(Duration::from_secs(2)),
        rise: None,
        fall: None,
        drain_timeout: Some(Duration::from_secs(10)),
        maxconn: None,
    };
    let mut config = quick_config(args.listen, backends.clone(), &quick);
    if args.backend.is_empty() {
        // IMAPS through the LB: TCP passthrough to the MDA's implicit TLS port, checked with a
        // TLS handshake.
        let mut pool = Pool::quick("imaps", vec![args.imaps_listen]);
        pool.algorithm = Algorithm::LeastConn;
        pool.health.kind = CheckKind::Tls;
        pool.health.interval = Duration::from_secs(2);
        pool.health.timeout = pool.health.timeout.min(Duration::from_millis(1600));
        config.pools.push(pool);
        config.listeners.push(Listener {
            name: "imaps".into(),
            bind: args.lb_imaps,
            pool: config.pools.len() - 1,
        });
    }
    let listen = args.listen;
    let admin = args.admin;
    let mxl = args.mx_listen;
    let domain = args.domain.clone();
    let relay = args.mx_relay;
    let spool_shown = spool.display().to_string();
    let maildir_shown = maildir.display().to_string();
    let (msal, msat, msa_admin) = (args.msa_listen, args.msa_listen_tls, args.msa_admin);
    let (mtal, mta_admin) = (args.mta_listen, args.mta_admin);
    let (imapl, imapsl, lbi) = (args.imap_listen, args.imaps_listen, args.lb_imaps);
    let user2 = format!("{UP_USER2}@{domain}");
    let mta_spool = args.data.join("mta-spool").display().to_string();
    let user = format!("{UP_USER}@{domain}");
    let result = run_lb(config, None, move |lb| {
        let list = backends
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "\nringmail up: all-in-one node on loopback\
             \n\n  started  MX              {mxl}  for @{domain}, spool {spool_shown}, admin http://{mx_admin}/metrics\
             \n  started  MDA (LMTP)      {relay}  delivers into {maildir_shown}/<domain>/<user>/Maildir (Dovecot's layout)\
             \n  started  IMAP            {imapl} (STARTTLS), {imapsl} (implicit TLS); through the LB at {lbi}\
             \n  started  MSA             {msal} (STARTTLS), {msat} (implicit TLS), admin http://{msa_admin}/metrics\
             \n           login {user} / {UP_PASSWORD}; @{domain} goes to the MX at {mxl}, the rest to the MTA\
             \n  started  MTA             {mtal}  delivers to the recipients' MX hosts (@{domain}, bounces too: to the MX at {mxl}), spool {mta_spool}, admin http://{mta_admin}/metrics\
             \n           DKIM-signs mail from @{domain}; publish: {dkim_record}\
             \n  started  load balancer   {listen} -> [{list}]  (PROXY v2, engine: {engine})\
             \n  started  admin listener  http://{admin}/metrics\
             \n  deploy   a whole site from one topology: ringmail deploy render --topology deploy/examples/example.com.toml --out site/\
             \n\nTry it:\
             \n  swaks --server {ip} --port {port} --tls --auth LOGIN --auth-user {user} --auth-password {UP_PASSWORD} --from {user} --to bob@{domain}\
             \n  curl --url smtps://{tip}:{tport} --ssl-reqd -k --crlf --mail-from {user} --mail-rcpt bob@{domain} -u {user}:{UP_PASSWORD} -T message.txt   # message.txt: From: {user}, a blank line, text\
             \n  python3 -c \"import smtplib, ssl; c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE; s=smtplib.SMTP('{ip}', {port}); s.starttls(context=c); s.login('{user}', '{UP_PASSWORD}'); s.sendmail('{user}', ['bob@{domain}'], 'From: {user}\\r\\nTo: bob@{domain}\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n'); s.quit()\"\
             \n  python3 -c \"import imaplib, ssl; c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE; m=imaplib.IMAP4_SSL('{lbip}', {lbport}, ssl_context=c); m.login('{user2}', '{UP_PASSWORD2}'); m.select('INBOX'); print(m.fetch('1:*', '(BODY[HEADER.FIELDS (SUBJECT FROM)])')); m.logout()\"\
             \n  curl -k --url 'imaps://{lbip}:{lbport}/INBOX;UID=1' -u {user2}:{UP_PASSWORD2}\
             \n  ringmail queue --spool {spool_shown} --admin {mx_admin} list\
             \n  ringmail queue --spool {mta_spool} --admin {mta_admin} list\
             \n  curl -s http://{msa_admin}/metrics | grep ringmail_msa_auth_total\
             \n  curl -s http://{mx_admin}/metrics | grep ringmail_mx_messages_accepted_total\
             \n  curl -s http://{admin}/api/backends; echo\
             \n\nStop with Ctrl-C (connections in flight are drained first).\n",
            engine = lb.engine().label(),
            ip = listen.ip(),
            port = listen.port(),
            tip = msat.ip(),
            tport = msat.port(),
            lbip = lbi.ip(),
            lbport = lbi.port(),
        );
    });
    msa_server.stop();
    mta_server.stop();
    mx_server.stop();
    mda_server.stop();
    result
}

/// The DKIM key of `up` (Ed25519, made on first start) and the TXT record to publish for it.
fn up_dkim_key(data: &Path, domain: &str) -> Result<(ringmail_mx::dkim::DkimKeySpec, String)> {
    use ringmail_mx::dkim;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let path = data.join(format!("dkim-up.{domain}.key"));
    let selector = "up";
    // The record is kept beside the key, to print it again on later starts.
    let record_file = data.join(format!("dkim-up.{domain}.txt"));
    let record = if path.exists() {
        std::fs::read_to_string(&record_file)
            .with_context(|| format!("reading {}", record_file.display()))?
            .trim()
            .to_string()
    } else {
        let r = dkim::keygen(dkim::DkimAlgo::Ed25519, 0, domain, selector, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(&record_file, format!("{r}\n"))
            .with_context(|| format!("writing {}", record_file.display()))?;
        r
    };
    Ok((
        dkim::DkimKeySpec {
            domain: domain.to_string(),
            selector: selector.to_string(),
            key_file: path,
        },
        record,
    ))
}
