//! `ringmail dkim keygen` and the dkimpy verifier of tests/common/dkimverify.rs: keys made by the
//! command sign mail that dkimpy verifies against the record the command printed.
//!
//! Needs `python3-dkim` and `python3-nacl` (SKIP otherwise, a failure with
//! `RINGMAIL_REQUIRE_ALL=1`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::dkimverify::{dkim_verify, dkimpy_available, zone_txt};
use common::{RINGMAIL, TempDir};
use ringmail_mx::dkim::{DkimKeySpec, DkimSigner};

/// Runs `ringmail dkim keygen ARGS` in `dir`; returns (success, stdout, stderr).
fn keygen(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(RINGMAIL)
        .current_dir(dir)
        .args(["dkim", "keygen"])
        .args(args)
        .output()
        .expect("run ringmail dkim keygen");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MESSAGE: &[u8] = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n\
Subject: keygen test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nHello.\r\n";

#[test]
fn keygen_command_keys_sign_and_verify() {
    let dir = TempDir::new("dkim-keygen");
    // Defaults: RSA 2048, ./<selector>._domainkey.<domain>.key.
    let (ok, rsa_line, err) = keygen(
        dir.path(),
        &["--domain", "Example.com", "--selector", "r2024"],
    );
    assert!(ok, "{err}");
    let rsa_key = dir.path().join("r2024._domainkey.example.com.key");
    let mode = std::fs::metadata(&rsa_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(rsa_line.starts_with("r2024._domainkey.example.com. IN TXT ( \"v=DKIM1; k=rsa; p="));
    assert_eq!(rsa_line.lines().count(), 1, "{rsa_line}");

    let ed_key = dir.path().join("ed.pem");
    let (ok, ed_line, err) = keygen(
        dir.path(),
        &[
            "--domain",
            "example.com",
            "--selector",
            "e2024",
            "--algo",
            "ed25519",
            "--out",
            ed_key.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(ed_line.starts_with("e2024._domainkey.example.com. IN TXT ( \"v=DKIM1; k=ed25519; p="));

    // An existing key is never overwritten.
    let before = std::fs::read(&rsa_key).unwrap();
    let (ok, out, err) = keygen(
        dir.path(),
        &["--domain", "example.com", "--selector", "r2024"],
    );
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&rsa_key).unwrap(), before);
    // Bad parameters are refused without writing anything.
    let (ok, _, err) = keygen(
        dir.path(),
        &[
            "--domain",
            "example.com",
            "--selector",
            "small",
            "--bits",
            "1024",
        ],
    );
    assert!(!ok && err.contains("1024"), "{err}");
    assert!(!dir.path().join("small._domainkey.example.com.key").exists());

    if !dkimpy_available() {
        return;
    }
    let signer = DkimSigner::load(&[
        DkimKeySpec {
            domain: "example.com".into(),
            selector: "r2024".into(),
            key_file: rsa_key,
        },
        DkimKeySpec {
            domain: "example.com".into(),
            selector: "e2024".into(),
            key_file: ed_key,
        },
    ])
    .unwrap();
    let records = vec![zone_txt(&rsa_line).unwrap(), zone_txt(&ed_line).unwrap()];
    assert_eq!(records[0].0, "r2024._domainkey.example.com");
    let message = [signer.sign(MESSAGE).unwrap().as_bytes(), MESSAGE].concat();
    assert_eq!(
        dkim_verify(&message, &records).unwrap(),
        [
            "d=example.com s=r2024 a=rsa-sha256 pass",
            "d=example.com s=e2024 a=ed25519-sha256 pass",
        ]
    );
}

#[test]
fn dkim_verify_reports_each_signature() {
    if !dkimpy_available() {
        return;
    }
    let dir = TempDir::new("dkim-verify");
    let key = dir.path().join("k.key");
    let line = ringmail_mx::dkim::keygen(
        ringmail_mx::dkim::DkimAlgo::Ed25519,
        0,
        "example.com",
        "s1",
        &key,
    )
    .unwrap();
    let records = vec![zone_txt(&line).unwrap()];
    let signer = DkimSigner::load(&[DkimKeySpec {
        domain: "example.com".into(),
        selector: "s1".into(),
        key_file: key,
    }])
    .unwrap();
    let message = [signer.sign(MESSAGE).unwrap().as_bytes(), MESSAGE].concat();

    // No signature: nothing to report.
    assert!(dkim_verify(MESSAGE, &records).unwrap().is_empty());
    // Good.
    assert_eq!(
        dkim_verify(&message, &records).unwrap(),
        ["d=example.com s=s1 a=ed25519-sha256 pass"]
    );
    // Altered body; no key published for the selector.
    let mut altered = message.clone();
    *altered.last_mut().unwrap() = b'!';
    let r = dkim_verify(&altered, &records).unwrap();
    assert!(
        r[0].starts_with("d=example.com s=s1 a=ed25519-sha256 fail"),
        "{r:?}"
    );
    let r = dkim_verify(&message, &[]).unwrap();
    assert!(
        r[0].starts_with("d=example.com s=s1 a=ed25519-sha256 fail"),
        "{r:?}"
    );
    // Record names match without case or a trailing dot.
    let upper = vec![(
        "S1._DOMAINKEY.EXAMPLE.COM.".to_string(),
        records[0].1.clone(),
    )];
    assert!(dkim_verify(&message, &upper).unwrap()[0].ends_with(" pass"));
    // The zone-line parser.
    assert_eq!(
        zone_txt("s._domainkey.a.example. IN TXT ( \"v=DKIM1; \" \"p=AB\" )"),
        Some(("s._domainkey.a.example".into(), "v=DKIM1; p=AB".into()))
    );
}
