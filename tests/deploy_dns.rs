//! `ringmail deploy render` then `ringmail deploy check`, against a real DNS server (NSD) loaded
//! with the rendered zones: no difference on the zones as rendered, and each alteration of a
//! record reported by name. The zones also pass BIND's `named-checkzone` (strict mode).
//!
//! Needs `nsd` and `named-checkzone` (Debian `nsd`, `bind9-utils`); skips with a message
//! without them, unless `RINGMAIL_REQUIRE_ALL=1`.

#[macro_use]
mod common;
#[path = "../roles/mailauth/tests/common/mod.rs"]
mod dnsfix;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const EXAMPLE: &str = "deploy/examples/example.com.toml";
const ZONES: [&str; 3] = [
    "example.com",
    "2.0.192.in-addr.arpa",
    "8.b.d.0.1.0.0.2.ip6.arpa",
];

fn render(out: &Path) {
    let st = Command::new(RINGMAIL)
        .args(["deploy", "render", "--topology", EXAMPLE, "--out"])
        .arg(out)
        .status()
        .expect("run ringmail deploy render");
    assert!(st.success(), "deploy render failed: {st}");
}

fn zone_files(out: &Path) -> Vec<(String, PathBuf)> {
    ZONES
        .iter()
        .map(|z| (z.to_string(), out.join(format!("dns/{z}.zone"))))
        .collect()
}

/// Runs `deploy check` against `dns`; returns (exit code, stdout).
fn check(dns: &dnsfix::DnsServer) -> (i32, String) {
    let out = Command::new(RINGMAIL)
        .args(["deploy", "check", "--topology", EXAMPLE, "--resolver"])
        .arg(dns.addr().to_string())
        .output()
        .expect("run ringmail deploy check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        format!("{stdout}\n{stderr}"),
    )
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn rendered_zones_pass_named_checkzone() {
    skip_unless!(if dnsfix::tools_available(&["named-checkzone"]) {
        Ok(())
    } else {
        Err("named-checkzone not installed (Debian bind9-utils)".to_string())
    });
    let dir = TempDir::new("deploy-zones");
    render(dir.path());
    for (origin, file) in zone_files(dir.path()) {
        // -k/-n fail: bad owner names and NS/MX targets are errors; -i full: every integrity
        // check (in-zone MX and NS targets have addresses, glue present).
        let out = Command::new("named-checkzone")
            .args(["-k", "fail", "-n", "fail", "-i", "full", &origin])
            .arg(&file)
            .output()
            .expect("run named-checkzone");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("OK"),
            "named-checkzone {origin}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn deploy_check_finds_no_difference_then_reports_each_alteration() {
    skip_unless!(if dnsfix::tools_available(&["nsd"]) {
        Ok(())
    } else {
        Err("nsd not installed".to_string())
    });
    let dir = TempDir::new("deploy-check");
    render(dir.path());
    let files = zone_files(dir.path());

    {
        let dns = dnsfix::DnsServer::start_files(&files);
        let (code, out) = check(&dns);
        assert_eq!(code, 0, "deploy check on the rendered zones:\n{out}");
        assert!(out.contains(" 0 missing or different"), "{out}");
        // Every kind of record was really checked, not skipped.
        for want in [
            "ok      example.com MX",
            "ok      _spf.example.com TXT",
            "ok      a._spf.example.com TXT",
            "ok      202401._domainkey.example.com TXT",
            "ok      _dmarc.example.com TXT",
            "ok      example.com._report._dmarc.example.com TXT",
            "ok      28.2.0.192.in-addr.arpa PTR",
            "ok      mta-b2.example.com (2001:db8:b::45) FCrDNS",
            "ok      imap.example.com AAAA",
        ] {
            assert!(out.contains(want), "`{want}` missing from:\n{out}");
        }
    }

    // Alter the live zones the way operators get them wrong, then check again.
    let fwd = &files[0].1;
    let rev4 = &files[1].1;
    let rev6 = &files[2].1;
    edit(
        fwd,
        "@ IN MX 10 mx-b2.example.com.",
        "@ IN MX 20 mx-b2.example.com.",
    );
    edit(
        fwd,
        "b._spf IN TXT \"v=spf1 ip4:192.0.2.44",
        "b._spf IN TXT \"v=spf1 ip4:192.0.2.99",
    );
    edit(
        fwd,
        "202401._domainkey IN TXT ( \"v=DKIM1; h=sha256; k=rsa; p=MIIB",
        "202401._domainkey IN TXT ( \"v=DKIM1; h=sha256; k=rsa; p=XIIB",
    );
    edit(
        fwd,
        "p=reject;sp=reject;np=reject",
        "p=none;sp=reject;np=reject",
    );
    edit(fwd, "mta-a2 IN A 192.0.2.29", "mta-a2 IN A 192.0.2.99");
    edit(
        fwd,
        "mta-b1 IN TXT \"v=spf1 a aaaa -all\"",
        "mta-b1 IN TXT \"v=spf1 a aaaa -all\"\nmta-b1 IN TXT \"v=spf1 a -all\"",
    );
    edit(rev4, "45 IN PTR mta-b2.example.com.\n", "");
    let text = std::fs::read_to_string(rev6).unwrap();
    let line = text
        .lines()
        .find(|l| l.ends_with("PTR mta-a1.example.com."))
        .expect("mta-a1 IPv6 PTR")
        .to_string();
    edit(
        rev6,
        &line,
        &line.replace("mta-a1.example.com.", "mx-a1.example.com."),
    );

    let dns = dnsfix::DnsServer::start_files(&files);
    let (code, out) = check(&dns);
    assert_eq!(
        code, 1,
        "deploy check must fail on the altered zones:\n{out}"
    );
    for want in [
        "DIFFERS example.com MX",
        "DIFFERS b._spf.example.com TXT",
        "DIFFERS 202401._domainkey.example.com TXT",
        "DIFFERS _dmarc.example.com TXT",
        "DIFFERS mta-a2.example.com A",
        // mta-a2's PTR still points to it, but its A record no longer points back.
        "DIFFERS mta-a2.example.com (192.0.2.29) FCrDNS",
        "DIFFERS mta-b1.example.com TXT",
        "MISSING 45.2.0.192.in-addr.arpa PTR",
        "MISSING mta-b2.example.com (192.0.2.45) FCrDNS",
        "DIFFERS mta-a1.example.com (2001:db8:a::28) FCrDNS",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    let bad = out
        .lines()
        .filter(|l| l.starts_with("DIFFERS") || l.starts_with("MISSING"))
        .count();
    // The alterations above, the PTR of mta-a1's IPv6 address, and nothing else.
    assert_eq!(bad, 11, "unexpected findings:\n{out}");
}

/// Run on an MTA host, `deploy check` also reads the MTA's DKIM private key: it must be the key
/// the topology (and so the DNS) publishes.
#[test]
fn deploy_check_compares_the_mtas_private_key() {
    skip_unless!(if dnsfix::tools_available(&["nsd", "openssl"]) {
        Ok(())
    } else {
        Err("nsd or openssl not installed".to_string())
    });
    let dir = TempDir::new("deploy-key");
    let key = dir.path().join("mta.key");
    let other = dir.path().join("other.key");
    for k in [&key, &other] {
        let st = Command::new(RINGMAIL)
            .args([
                "dkim",
                "keygen",
                "--domain",
                "example.com",
                "--selector",
                "202401",
                "--out",
            ])
            .arg(k)
            .output()
            .expect("ringmail dkim keygen");
        assert!(st.status.success(), "{st:?}");
    }
    let public = dir.path().join("mta.pub");
    let st = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(EXAMPLE)
        .unwrap()
        .replace(
            "public_key = \"keys/202401._domainkey.example.com.pub\"",
            &format!("public_key = \"{}\"", public.display()),
        )
        .replace(
            "private_key = \"/etc/ringmail/dkim/202401._domainkey.example.com.key\"",
            &format!("private_key = \"{}\"", key.display()),
        );
    let topology = dir.write("topology.toml", &text);
    let out = dir.path().join("out");
    let st = Command::new(RINGMAIL)
        .args(["deploy", "render", "--topology"])
        .arg(&topology)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let dns = dnsfix::DnsServer::start_files(&zone_files(&out));
    let run = || {
        let o = Command::new(RINGMAIL)
            .args(["deploy", "check", "--quiet", "--topology"])
            .arg(&topology)
            .arg("--resolver")
            .arg(dns.addr().to_string())
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, text) = run();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(" 0 missing or different"), "{text}");
    // The MTA's key replaced by another: the record no longer matches what it signs with.
    std::fs::copy(&other, &key).unwrap();
    let (code, text) = run();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("DIFFERS 202401._domainkey.example.com KEY")
            && text.contains("is not the key the topology publishes"),
        "{text}"
    );
}
