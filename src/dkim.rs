//! `ringmail dkim`: DKIM key management for the MTA's signer.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ringmail_mx::dkim::{self, DkimAlgo};

#[derive(Args)]
pub struct DkimArgs {
    #[command(subcommand)]
    command: DkimCommand,
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Generate a signing key (PKCS#8 PEM, mode 0600; an existing file is never overwritten)
    /// and print the DNS TXT record to publish, as a zone-file line on standard output.
    Keygen(KeygenArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum AlgoArg {
    Rsa,
    Ed25519,
}

#[derive(Args)]
struct KeygenArgs {
    /// The signing domain (d=), e.g. example.com; it also signs mail of its subdomains that
    /// have no key of their own.
    #[arg(long)]
    domain: String,
    /// The selector (s=): the record is published at <SELECTOR>._domainkey.<DOMAIN>.
    #[arg(long)]
    selector: String,
    /// Key type. Not every receiver verifies ed25519-sha256: with an Ed25519 key, keep an RSA
    /// key for the domain too (the signer signs with both).
    #[arg(long, value_enum, default_value = "rsa")]
    algo: AlgoArg,
    /// RSA key size, 2048 to 4096 (ignored for ed25519).
    #[arg(long, default_value_t = dkim::RSA_DEFAULT_BITS)]
    bits: usize,
    /// Where to write the private key [default: ./<SELECTOR>._domainkey.<DOMAIN>.key].
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn cmd_dkim(args: DkimArgs) -> Result<ExitCode> {
    match args.command {
        DkimCommand::Keygen(k) => keygen(k),
    }
}

fn keygen(k: KeygenArgs) -> Result<ExitCode> {
    let algo = match k.algo {
        AlgoArg::Rsa => DkimAlgo::Rsa,
        AlgoArg::Ed25519 => DkimAlgo::Ed25519,
    };
    let out = k.out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}._domainkey.{}.key",
            k.selector.to_ascii_lowercase(),
            k.domain.trim_end_matches('.').to_ascii_lowercase()
        ))
    });
    let record = dkim::keygen(algo, k.bits, &k.domain, &k.selector, &out)
        .with_context(|| format!("generating a DKIM key for {}", k.domain))?;
    eprintln!(
        "ringmail: wrote the {} private key to {} (mode 0600); publish this record:",
        algo,
        out.display()
    );
    println!("{record}");
    Ok(ExitCode::SUCCESS)
}
