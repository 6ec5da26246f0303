//! `ringmail deploy`: render a topology into zones, rulesets, BGP configs and units; check the
//! live DNS against it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ringmail_deploy::check::{self, Status};

#[derive(Args)]
pub struct DeployArgs {
    #[command(subcommand)]
    command: DeployCommand,
}

#[derive(Subcommand)]
enum DeployCommand {
    /// Write every file of the deployment under --out: dns/ (forward and reverse zones, an NSD
    /// include), hosts/<host>/ (nftables ruleset, ringmail config and systemd unit per role,
    /// BIRD/FRR config on LB hosts), routers/<router>/ (BIRD and FRR with ECMP).
    Render(RenderArgs),
    /// Query DNS and report, record by record, what is missing or differs from the topology;
    /// exit status 1 when anything does.
    Check(CheckArgs),
    /// Stand one site up for real from the rendered files, in network namespaces on this
    /// machine (root): its routers (BIRD), LBs (ringmail lb + BIRD), the first host of each mail
    /// role, its name server (NSD) and an Internet client and remote host; each host's ruleset
    /// loaded. Runs until Ctrl-C or SIGTERM, then tears everything down.
    Lab(crate::lab::LabArgs),
}

#[derive(Args)]
struct RenderArgs {
    /// The topology file (TOML; see deploy/examples/example.com.toml).
    #[arg(long)]
    topology: PathBuf,
    /// Output directory (created; existing files with the same names are replaced).
    #[arg(long, required_unless_present = "check")]
    out: Option<PathBuf>,
    /// Only validate the topology (every error at once) and list the files it would write.
    #[arg(long)]
    check: bool,
    /// Put every path the role configs and units name (/etc/ringmail, /var/lib/ringmail, the
    /// DKIM keys, a SQLite account store) under this directory, for a lab or a staging copy
    /// that runs unprivileged from one place.
    #[arg(long)]
    root: Option<PathBuf>,
}

#[derive(Args)]
struct CheckArgs {
    /// The topology file.
    #[arg(long)]
    topology: PathBuf,
    /// The DNS server to ask (IP:PORT, or IP for port 53) [default: the system resolver].
    #[arg(long)]
    resolver: Option<String>,
    /// Per-query timeout in seconds.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
    /// Print only what is wrong.
    #[arg(long, short)]
    quiet: bool,
}

pub fn cmd_deploy(args: DeployArgs) -> Result<ExitCode> {
    match args.command {
        DeployCommand::Render(a) => render(a),
        DeployCommand::Check(a) => check_dns(a),
        DeployCommand::Lab(a) => crate::lab::cmd_lab(a),
    }
}

fn load(path: &std::path::Path) -> Result<Option<ringmail_deploy::Topology>> {
    match ringmail_deploy::load_file(path) {
        Ok(t) => Ok(Some(t)),
        Err(errors) => {
            eprintln!("{errors}");
            Ok(None)
        }
    }
}

fn render(a: RenderArgs) -> Result<ExitCode> {
    let Some(t) = load(&a.topology)? else {
        return Ok(ExitCode::from(2));
    };
    let root = match a.root {
        Some(r) => {
            Some(std::path::absolute(&r).with_context(|| format!("--root {}", r.display()))?)
        }
        None => None,
    };
    let files = ringmail_deploy::render_with(&t, &ringmail_deploy::RenderOptions { root });
    match a.out {
        Some(out) if !a.check => {
            ringmail_deploy::write_tree(&out, &files)
                .with_context(|| format!("writing under {}", out.display()))?;
            eprintln!(
                "ringmail: wrote {} files under {} ({} hosts, {} domains)",
                files.len(),
                out.display(),
                t.hosts.len(),
                t.domains.len()
            );
        }
        _ => {
            eprintln!(
                "ringmail: {} is valid; it renders {} files:",
                a.topology.display(),
                files.len()
            );
            let mut out = std::io::stdout().lock();
            for f in &files {
                // A closed pipe (`| head`) ends the listing, quietly.
                if writeln!(out, "{}", f.path.display()).is_err() {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_dns(a: CheckArgs) -> Result<ExitCode> {
    let Some(t) = load(&a.topology)? else {
        return Ok(ExitCode::from(2));
    };
    let server = match &a.resolver {
        None => None,
        Some(s) => Some(match s.parse::<SocketAddr>() {
            Ok(sa) => sa,
            Err(_) => SocketAddr::new(
                s.parse()
                    .with_context(|| format!("--resolver {s}: not IP or IP:PORT"))?,
                53,
            ),
        }),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let found = rt.block_on(check::query_live(
        &t,
        server,
        Duration::from_secs(a.timeout.max(1)),
    ))?;
    let mut findings = check::compare(&t, &found);
    findings.extend(mta_keys(&t));
    let bad = findings.iter().filter(|f| f.status != Status::Ok).count();
    let mut out = std::io::stdout().lock();
    let shown = findings
        .iter()
        .filter(|f| !(a.quiet && f.status == Status::Ok));
    // A closed pipe (`| head`) ends the report, quietly; the exit status still tells.
    let _ = shown
        .into_iter()
        .try_for_each(|f| writeln!(out, "{f}"))
        .and_then(|()| {
            writeln!(
                out,
                "{} records checked: {} ok, {bad} missing or different",
                findings.len(),
                findings.len() - bad
            )
        });
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The MTA's own DKIM keys, where this host has them (run on an MTA host): the public half of
/// each private key file must be the topology's public key, which the DNS check compared with
/// the published record. Elsewhere the key files are absent and that is said, not failed.
fn mta_keys(t: &ringmail_deploy::Topology) -> Vec<check::Finding> {
    let mut out = Vec::new();
    for d in &t.domains {
        for k in &d.dkim {
            let name = format!("{}._domainkey.{}", k.selector, d.name);
            let path = k.private_key_path.display();
            let (status, detail) = match std::fs::read(&k.private_key_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!(
                        "note    {name}: the MTA's private key {path} is not on this host; the record was compared with the topology's public key"
                    );
                    continue;
                }
                Err(e) => (Status::Missing, format!("cannot read {path}: {e}")),
                Ok(pem) => match ringmail_mx::dkim::public_key_of_pem(&pem) {
                    Err(e) => (Status::Differs, format!("{path}: {e}")),
                    Ok((algo, p)) if p == k.public_key && algo.dns_name() == k.algorithm.tag() => {
                        (Status::Ok, format!("{path} is the published key"))
                    }
                    Ok(_) => (
                        Status::Differs,
                        format!(
                            "{path} is not the key the topology publishes: the MTA signs with a key receivers cannot verify"
                        ),
                    ),
                },
            };
            out.push(check::Finding {
                status,
                name,
                rtype: "KEY",
                purpose: "the MTA's private key",
                detail,
            });
        }
    }
    out
}
