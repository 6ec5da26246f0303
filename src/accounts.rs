//! `ringmail accounts`: manage the account store (like doveadm / postmap habits), against any
//! backend that is writable (SQLite, PostgreSQL); LDAP is read-only (lookups and `auth`).

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ringmail_accounts::{Accounts, AuthOutcome, PasswordScheme, scram};

#[derive(Args)]
pub struct AccountsArgs {
    /// The store: sqlite:PATH (created on first use), postgres://USER:PASS@HOST/DB, ldap://… .
    #[arg(long)]
    db: String,
    /// Machine-readable output for the list commands.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: AccountsCommand,
}

/// How a new password is stored.
#[derive(Args, Clone, Copy)]
pub struct SchemeArgs {
    /// argon2id (default: strongest against offline cracking; AUTH PLAIN/LOGIN only) or
    /// scram-sha-256 (Dovecot's {SCRAM-SHA-256}: also allows SASL SCRAM-SHA-256 logins, where
    /// the password is never sent, but is far cheaper to crack if the store leaks).
    #[arg(long, value_enum, default_value_t = SchemeName::Argon2id)]
    scheme: SchemeName,
    /// PBKDF2 iterations for scram-sha-256 (at least 4096, Dovecot's fixed count).
    #[arg(long, default_value_t = scram::DEFAULT_ITERATIONS)]
    scram_iterations: u32,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum SchemeName {
    Argon2id,
    #[value(name = "scram-sha-256")]
    ScramSha256,
}

impl SchemeArgs {
    fn scheme(self) -> PasswordScheme {
        match self.scheme {
            SchemeName::Argon2id => PasswordScheme::Argon2id,
            SchemeName::ScramSha256 => PasswordScheme::ScramSha256 {
                iterations: self.scram_iterations,
            },
        }
    }
}

#[derive(Subcommand)]
pub enum AccountsCommand {
    /// Domains we accept mail for.
    Domain {
        #[command(subcommand)]
        command: DomainCommand,
    },
    /// Add an account (USER@DOMAIN; the domain must exist).
    Add {
        address: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Mailbox quota in bytes.
        #[arg(long)]
        quota: Option<u64>,
        #[command(flatten)]
        scheme: SchemeArgs,
    },
    /// Remove an account (and its aliases).
    Del { address: String },
    /// Set a new password (from standard input).
    Passwd {
        address: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        scheme: SchemeArgs,
    },
    /// Disable an account (no login, no mail).
    Disable { address: String },
    /// Enable a disabled account.
    Enable { address: String },
    /// List accounts (of one domain).
    List { domain: Option<String> },
    /// Aliases: other addresses of an account.
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// Check a login (password from standard input); exit status 0 if it is accepted.
    Auth {
        address: String,
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
pub enum DomainCommand {
    Add { domain: String },
    Del { domain: String },
    List,
}

#[derive(Subcommand)]
pub enum AliasCommand {
    /// ALIAS receives mail for, and may be sent as by, TARGET.
    Add {
        alias: String,
        target: String,
    },
    Del {
        alias: String,
    },
    List {
        domain: Option<String>,
    },
}

fn read_password(flag: bool) -> Result<String> {
    if !flag {
        bail!(
            "pass the password on standard input with --password-stdin (never on the command line)"
        );
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password")?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

pub fn cmd_accounts(args: AccountsArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: AccountsArgs) -> Result<ExitCode> {
    let store = Accounts::open(&args.db)
        .await
        .with_context(|| format!("opening the account store {}", redact(&args.db)))?;
    match args.command {
        AccountsCommand::Domain { command } => match command {
            DomainCommand::Add { domain } => {
                store.domain_add(&domain).await?;
                println!("domain {domain} added");
            }
            DomainCommand::Del { domain } => {
                store.domain_del(&domain).await?;
                println!("domain {domain} removed");
            }
            DomainCommand::List => {
                let list = store.domain_list().await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    for d in list {
                        println!("{d}");
                    }
                }
            }
        },
        AccountsCommand::Add {
            address,
            password_stdin,
            quota,
            scheme,
        } => {
            let pw = read_password(password_stdin)?;
            store
                .account_add_with(&address, &pw, quota, scheme.scheme())
                .await?;
            println!("account {address} added");
        }
        AccountsCommand::Del { address } => {
            store.account_del(&address).await?;
            println!("account {address} removed");
        }
        AccountsCommand::Passwd {
            address,
            password_stdin,
            scheme,
        } => {
            let pw = read_password(password_stdin)?;
            store
                .set_password_with(&address, &pw, scheme.scheme())
                .await?;
            println!("password of {address} changed");
        }
        AccountsCommand::Disable { address } => {
            store.set_disabled(&address, true).await?;
            println!("account {address} disabled");
        }
        AccountsCommand::Enable { address } => {
            store.set_disabled(&address, false).await?;
            println!("account {address} enabled");
        }
        AccountsCommand::List { domain } => {
            let list = store.account_list(domain.as_deref()).await?;
            if args.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "address": a.address,
                            "aliases": a.aliases,
                            "quota_bytes": a.quota_bytes,
                            "disabled": a.disabled,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for a in list {
                    println!(
                        "{}{}{}",
                        a.address,
                        if a.disabled { " (disabled)" } else { "" },
                        if a.aliases.is_empty() {
                            String::new()
                        } else {
                            format!("  aliases: {}", a.aliases.join(", "))
                        }
                    );
                }
            }
        }
        AccountsCommand::Alias { command } => match command {
            AliasCommand::Add { alias, target } => {
                store.alias_add(&alias, &target).await?;
                println!("alias {alias} -> {target} added");
            }
            AliasCommand::Del { alias } => {
                store.alias_del(&alias).await?;
                println!("alias {alias} removed");
            }
            AliasCommand::List { domain } => {
                for (alias, target) in store.alias_list(domain.as_deref()).await? {
                    println!("{alias} -> {target}");
                }
            }
        },
        AccountsCommand::Auth {
            address,
            password_stdin,
        } => {
            let pw = read_password(password_stdin)?;
            return Ok(match store.authenticate(&address, &pw).await? {
                AuthOutcome::Ok(a) => {
                    println!("ok: {}", a.address);
                    ExitCode::SUCCESS
                }
                AuthOutcome::BadCredentials => {
                    println!("refused: bad credentials");
                    ExitCode::from(1)
                }
                AuthOutcome::Disabled => {
                    println!("refused: account disabled");
                    ExitCode::from(1)
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The store URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => {
            // bind_password=… in an LDAP query string.
            match url.find("bind_password=") {
                Some(i) => {
                    let end = url[i..].find('&').map_or(url.len(), |e| i + e);
                    format!("{}bind_password=***{}", &url[..i], &url[end..])
                }
                None => url.to_string(),
            }
        }
    }
}
