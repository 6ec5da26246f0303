//! `{SCRAM-SHA-256}` secrets against Dovecot's own implementation (`doveadm pw`, from
//! dovecot-core): ours verify in Dovecot, Dovecot's verify here. Skipped, with a message, when
//! `doveadm` is not installed (CI installs dovecot-core).

use std::process::Command;

use ringmail_accounts::{password, scram};

fn doveadm() -> Option<&'static str> {
    for p in ["/usr/bin/doveadm", "/usr/sbin/doveadm"] {
        if std::path::Path::new(p).exists() {
            return Some(p);
        }
    }
    eprintln!("SKIPPED: doveadm not installed (apt-get install dovecot-core)");
    None
}

/// `doveadm pw -t HASH -p PASSWORD`: true if Dovecot says "(verified)".
fn dovecot_verifies(bin: &str, hash: &str, pw: &str) -> bool {
    let out = Command::new(bin)
        .args(["pw", "-t", hash, "-p", pw])
        .output()
        .expect("run doveadm");
    let verified = String::from_utf8_lossy(&out.stdout).contains("(verified)");
    assert_eq!(verified, out.status.success(), "{out:?}");
    verified
}

fn dovecot_hash(bin: &str, pw: &str) -> String {
    let out = Command::new(bin)
        .args(["pw", "-s", "SCRAM-SHA-256", "-p", pw])
        .output()
        .expect("run doveadm");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

const PASSWORDS: &[&str] = &[
    "correct horse",
    "pässword",
    "x",
    "a,b=c \"quoted\" {braces}",
];

#[test]
fn ringmail_secrets_verify_in_dovecot() {
    let Some(bin) = doveadm() else { return };
    for pw in PASSWORDS {
        for iterations in [scram::DEFAULT_ITERATIONS, 10_000] {
            let h = scram::hash(pw, iterations);
            assert!(dovecot_verifies(bin, &h, pw), "{h} / {pw}");
            assert!(!dovecot_verifies(bin, &h, &format!("{pw}!")), "{h}");
            // And here, through the scheme table.
            assert!(password::verify(&h, pw));
        }
    }
}

#[test]
fn dovecot_secrets_verify_in_ringmail() {
    let Some(bin) = doveadm() else { return };
    for pw in PASSWORDS.iter().chain(&["\u{FB01}x"]) {
        let h = dovecot_hash(bin, pw);
        assert!(h.starts_with("{SCRAM-SHA-256}4096,"), "{h}");
        assert!(password::is_supported(&h), "{h}");
        assert!(password::verify(&h, pw), "{h} / {pw}");
        assert!(!password::verify(&h, &format!("{pw}!")), "{h}");
        assert!(!password::verify(&h, ""), "{h}");
        let secret = scram::from_stored(&h).expect("parses");
        assert_eq!(secret.encode(), h);
    }
    // Dovecot hashes the password bytes as they are, and so do we: the ligature is not "fix".
    let h = dovecot_hash(bin, "\u{FB01}x");
    assert!(!password::verify(&h, "fix"));
}
