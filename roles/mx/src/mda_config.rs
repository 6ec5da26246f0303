//! The MDA configuration file: the `[mda]` TOML schema for [`MdaConfig`] (the same toolkit and
//! all-errors-at-once reporting as `[mx]`, `[msa]` and `[mta]`).
//!
//! ```toml
//! [mda]
//! hostname = "mda-a1.example.com"       # required: LMTP greeting, IMAP greeting, file names
//! lmtp = ["10.0.0.20:24"]               # required: LMTP for our MX and MSA
//! imaps = ["0.0.0.0:993"]               # IMAP with implicit TLS
//! imap = ["0.0.0.0:143"]                # IMAP with STARTTLS
//! maildir = "/var/vmail"                # required: <maildir>/<domain>/<user>/Maildir
//! accounts = "sqlite:/var/lib/ringmail/accounts.db"  # required: users, aliases, quotas, logins
//! trusted_clients = ["10.0.0.0/24"]     # may deliver over LMTP (default: loopback)
//! trusted_proxies = ["10.0.0.1"]        # LBs whose PROXY headers the IMAP listeners take
//! program_timeout = "60s"
//! max_message_size = 68157440          # default 65 MiB: the MX/MSA limit + 1 MiB of headers
//! workers = 2                           # LMTP listener threads
//! imap_commands_per_second = 500        # per IMAP session, sustained (burst: 1000)
//! imap_login_timeout = "3m"             # log in within this long after connect, else BYE
//! imap_max_connections = 20000          # IMAP connections at once, in all
//! imap_max_connections_per_ip = 50      # per client address (after PROXY), else BYE
//! imap_max_userip_connections = 10      # logged-in sessions per user and client address
//! imap_max_auth_failures = 10           # per client address in 10 minutes, then logins refused
//! tls = { cert = "/etc/ringmail/imap.crt", key = "/etc/ringmail/imap.key" }  # absent: self-signed
//!
//! [mda.programs]                        # addresses delivered to a program (argv, no shell)
//! "lists@example.com" = ["/usr/local/bin/list-handler", "--list", "main"]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringmail_proxy_core::config::parse::{
    Ctx, DeTable, DeValue, check_keys, duration, integer, mismatch, required, set, string, table,
};
use ringmail_proxy_core::config::{ConfigErrors, load_file_with, load_str_with};

use crate::config::{accounts_url, addr_list, cidr_list, hostname_key, tls_files};
use crate::mda::MdaConfig;

pub fn load_file(path: &Path) -> Result<MdaConfig, ConfigErrors> {
    load_file_with(path, schema)
}

pub fn load_str(text: &str, file: &str) -> Result<MdaConfig, ConfigErrors> {
    load_str_with(text, file, schema)
}

const MDA: &[&str] = &[
    "hostname",
    "lmtp",
    "imap",
    "imaps",
    "maildir",
    "accounts",
    "trusted_clients",
    "trusted_proxies",
    "programs",
    "program_timeout",
    "max_message_size",
    "workers",
    "imap_commands_per_second",
    "imap_login_timeout",
    "imap_max_connections",
    "imap_max_connections_per_ip",
    "imap_max_userip_connections",
    "imap_max_auth_failures",
    "tls",
];

fn schema(ctx: &mut Ctx<'_>, root: &DeTable<'_>) -> Option<MdaConfig> {
    check_keys(ctx, root, &["mda"], "the top level");
    let Some(v) = root.get("mda") else {
        ctx.error(0..0, "no [mda] section");
        return None;
    };
    let t = table(ctx, v, "mda")?;
    check_keys(ctx, t, MDA, "[mda]");
    let mut ok = true;
    let hostname = hostname_key(ctx, v, t, "mda");
    let lmtp = required(ctx, v, t, "lmtp", "mda").and_then(|x| addr_list(ctx, x, "mda.lmtp"));
    let maildir = required(ctx, v, t, "maildir", "mda")
        .and_then(|s| string(ctx, s, "mda.maildir"))
        .map(PathBuf::from);
    let accounts =
        required(ctx, v, t, "accounts", "mda").and_then(|x| accounts_url(ctx, x, "mda.accounts"));
    ok &= hostname.is_some() && lmtp.is_some() && maildir.is_some() && accounts.is_some();
    let mut c = MdaConfig::quick(
        hostname.unwrap_or_default(),
        lmtp.unwrap_or_default(),
        maildir.unwrap_or_default(),
        accounts.unwrap_or_default(),
    );
    for (key, field) in [("imap", &mut c.imap), ("imaps", &mut c.imaps)] {
        if let Some(x) = t.get(key) {
            match addr_list(ctx, x, &format!("mda.{key}")) {
                Some(a) => *field = a,
                None => ok = false,
            }
        }
    }
    for (key, field) in [
        ("trusted_clients", &mut c.trusted_clients),
        ("trusted_proxies", &mut c.trusted_proxies),
    ] {
        if let Some(x) = t.get(key) {
            match cidr_list(ctx, x, &format!("mda.{key}")) {
                Some(a) => *field = a,
                None => ok = false,
            }
        }
    }
    if let Some(x) = t.get("programs") {
        match table(ctx, x, "mda.programs") {
            Some(pt) => {
                for (k, item) in pt.iter() {
                    let address = k.get_ref().to_ascii_lowercase();
                    let argv = match item.get_ref() {
                        DeValue::Array(parts) => {
                            let mut argv = Vec::new();
                            for p in parts.iter() {
                                match string(ctx, p, "mda.programs") {
                                    Some(s) => argv.push(s.to_string()),
                                    None => ok = false,
                                }
                            }
                            argv
                        }
                        _ => {
                            mismatch(ctx, item, "mda.programs", "an array of strings (argv)");
                            ok = false;
                            continue;
                        }
                    };
                    if !address.contains('@') {
                        ctx.error(
                            item.span(),
                            format!("`mda.programs`: {address:?} is not an address"),
                        );
                        ok = false;
                    } else if argv.first().is_none_or(|p| !p.starts_with('/')) {
                        ctx.error(
                            item.span(),
                            format!(
                                "`mda.programs.\"{address}\"`: the command must start with an absolute path"
                            ),
                        );
                        ok = false;
                    } else {
                        c.programs.insert(address, argv);
                    }
                }
            }
            None => ok = false,
        }
    }
    if let Some(x) = t.get("program_timeout") {
        match duration(ctx, x, "mda.program_timeout", false) {
            Some(d) => c.program_timeout = d.max(Duration::from_secs(1)),
            None => ok = false,
        }
    }
    ok &= set(
        &mut c.max_message_size,
        t.get("max_message_size")
            .map(|x| integer(ctx, x, "mda.max_message_size", 1024, 1 << 40)),
    );
    if let Some(w) = t.get("workers") {
        match integer(ctx, w, "mda.workers", 1, 4096) {
            Some(n) => c.workers = usize::try_from(n).ok(),
            None => ok = false,
        }
    }
    if let Some(r) = t.get("imap_commands_per_second") {
        match integer(ctx, r, "mda.imap_commands_per_second", 1, 1_000_000) {
            Some(n) => c.imap_commands_per_second = u32::try_from(n).ok(),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("imap_login_timeout") {
        match duration(ctx, x, "mda.imap_login_timeout", false) {
            Some(d) => c.imap_limits.login_timeout = d,
            None => ok = false,
        }
    }
    let l = &mut c.imap_limits;
    for (key, field, max) in [
        ("imap_max_connections", &mut l.max_connections, 10_000_000),
        (
            "imap_max_connections_per_ip",
            &mut l.max_connections_per_ip,
            1_000_000,
        ),
        (
            "imap_max_userip_connections",
            &mut l.max_userip_connections,
            1_000_000,
        ),
    ] {
        if let Some(x) = t.get(key) {
            match integer(ctx, x, &format!("mda.{key}"), 1, max) {
                Some(n) => *field = usize::try_from(n).unwrap_or(usize::MAX),
                None => ok = false,
            }
        }
    }
    if let Some(x) = t.get("imap_max_auth_failures") {
        match integer(ctx, x, "mda.imap_max_auth_failures", 1, 1_000_000) {
            Some(n) => l.max_auth_failures = u32::try_from(n).unwrap_or(u32::MAX),
            None => ok = false,
        }
    }
    if let Some(x) = t.get("tls") {
        match tls_files(ctx, x, "mda") {
            Some(f) => c.tls = Some(f),
            None => ok = false,
        }
    }
    ok.then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_reports_every_error() {
        let c = load_str(
            r#"[mda]
hostname = "mda-a1.example.com"
lmtp = ["127.0.0.1:24"]
imaps = ["127.0.0.1:993"]
maildir = "/var/vmail"
accounts = "sqlite:/tmp/a.db"
trusted_proxies = ["10.0.0.1"]
imap_login_timeout = "30s"
imap_max_connections_per_ip = 7
imap_max_userip_connections = 3
imap_max_auth_failures = 5

[mda.programs]
"Lists@example.com" = ["/usr/bin/true", "x"]
"#,
            "mda.toml",
        )
        .unwrap();
        assert_eq!(c.imaps.len(), 1);
        assert_eq!(c.imap_limits.login_timeout, Duration::from_secs(30));
        assert_eq!(c.imap_limits.max_connections_per_ip, 7);
        assert_eq!(c.imap_limits.max_userip_connections, 3);
        assert_eq!(c.imap_limits.max_auth_failures, 5);
        assert_eq!(c.programs["lists@example.com"], ["/usr/bin/true", "x"]);
        let e = load_str(
            "[mda]\nhostname = \"x\"\nlmtp = []\nmaildir = \"/m\"\naccounts = \"mysql:x\"\ncolour = 1\n[mda.programs]\n\"a@b\" = [\"relative\"]\n",
            "mda.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "mda.toml:2:",
            "mda.toml:3:",
            "mda.toml:5:",
            "mda.toml:6:",
            "mda.toml:8:",
            "colour",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }
}
