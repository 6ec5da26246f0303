//! Quick-mode flags for the security of the hop to `--relay` (shared by `ringmail mx`, `msa`
//! and `mta`): the TLS policy and AUTH credentials of [`ringmail_mx::hop`].

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::{Args, ValueEnum};
use ringmail_mx::hop::{HopAuth, HopSecurity, TlsLevel};

#[derive(Clone, Copy, ValueEnum)]
pub enum TlsLevelArg {
    /// Plaintext: the next hop trusts our address.
    None,
    /// STARTTLS when offered, any certificate; plaintext after a failed handshake.
    May,
    /// STARTTLS required, certificate verified (see --relay-ca, --relay-tls-no-verify).
    Encrypt,
}

#[derive(Args)]
pub struct HopArgs {
    /// Quick mode: TLS policy to the --relay next hop.
    #[arg(long, value_enum)]
    pub relay_tls: Option<TlsLevelArg>,
    /// Quick mode, with --relay-tls encrypt: the only CA (PEM) the next hop's certificate is
    /// verified against (default: the system roots).
    #[arg(long)]
    pub relay_ca: Option<PathBuf>,
    /// Quick mode, with --relay-tls encrypt: the name the certificate must carry (default: the
    /// next hop's IP address).
    #[arg(long)]
    pub relay_tls_name: Option<String>,
    /// Quick mode, with --relay-tls encrypt: encrypt without checking the certificate.
    #[arg(long)]
    pub relay_tls_no_verify: bool,
    /// Quick mode: AUTH PLAIN to the next hop as this user (needs --relay-tls encrypt).
    #[arg(long, requires = "relay_password_file")]
    pub relay_auth_user: Option<String>,
    /// Quick mode: file whose first line is the --relay-auth-user password.
    #[arg(long, requires = "relay_auth_user")]
    pub relay_password_file: Option<PathBuf>,
}

impl HopArgs {
    /// The hop security from the flags, starting from the role's `default`.
    pub fn security(&self, default: HopSecurity) -> Result<HopSecurity> {
        let mut s = default;
        if let Some(level) = self.relay_tls {
            s.tls.level = match level {
                TlsLevelArg::None => TlsLevel::None,
                TlsLevelArg::May => TlsLevel::May,
                TlsLevelArg::Encrypt => TlsLevel::Encrypt,
            };
        }
        s.tls.ca = self.relay_ca.clone();
        s.tls.name = self.relay_tls_name.clone();
        s.tls.verify = !self.relay_tls_no_verify;
        if let (Some(user), Some(file)) = (&self.relay_auth_user, &self.relay_password_file) {
            s.auth =
                Some(HopAuth::load(user, file).map_err(|e| anyhow!("--relay-password-file: {e}"))?);
        }
        s.check()
            .map_err(|e| anyhow!("--relay-tls/--relay-auth-user: {e}"))?;
        Ok(s)
    }
}
