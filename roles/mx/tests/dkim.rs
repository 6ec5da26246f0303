//! DKIM signatures made by `ringmail_mx::dkim` verify with an independent implementation,
//! dkimpy, against the TXT records `keygen` produced (answered by a `dnsfunc`, no DNS), and
//! stop verifying when the message is altered.
//!
//! Needs `python3-dkim` and `python3-nacl`: without them each test prints `SKIP: … not
//! installed` and passes, unless `RINGMAIL_REQUIRE_ALL=1`, when it fails.

#[path = "../../../tests/common/dkimverify.rs"]
mod dkimverify;

use std::path::Path;

use dkimverify::{dkim_verify, dkimpy_available, zone_txt};
use ringmail_mx::dkim::{DkimAlgo, DkimKeySpec, DkimSigner, keygen};

/// Generates the keys, loads them, and returns the signer with the TXT records to serve.
fn signer(dir: &Path, keys: &[(DkimAlgo, &str, &str)]) -> (DkimSigner, Vec<(String, String)>) {
    let mut specs = Vec::new();
    let mut records = Vec::new();
    for (algo, domain, selector) in keys {
        let key_file = dir.join(format!("{selector}.{domain}.key"));
        let line = keygen(*algo, 2048, domain, selector, &key_file).unwrap();
        records.push(zone_txt(&line).unwrap_or_else(|| panic!("unparsable record {line}")));
        specs.push(DkimKeySpec {
            domain: domain.to_string(),
            selector: selector.to_string(),
            key_file,
        });
    }
    (DkimSigner::load(&specs).unwrap(), records)
}

const MESSAGE: &str = "Received: from client.example.net by mta.example.com; \
Mon, 1 Jan 2024 00:00:00 +0000\r\n\
From: \"Alice Example\" <alice@example.com>\r\n\
To: Bob <bob@example.org>,\r\n\tCarol <carol@example.org>\r\n\
Cc: dave@example.org\r\n\
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=   with   spaces\r\n\
Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\
Message-ID: <20240101000000.1@example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
List-Unsubscribe: <mailto:unsubscribe@example.com>\r\n\
List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\
\r\n\
Hello Bob,  \r\n\
\r\n\
trailing   whitespace and blank lines \t\r\n\
été (8-bit)\r\n\
\r\n\
\r\n";

/// Prepends the signature headers to the message.
fn signed(s: &DkimSigner, message: &[u8]) -> Vec<u8> {
    let headers = s.sign(message).unwrap();
    assert!(!headers.is_empty(), "not signed");
    [headers.as_bytes(), message].concat()
}

fn all_pass(results: &[String], n: usize) {
    assert_eq!(results.len(), n, "{results:?}");
    assert!(results.iter().all(|r| r.ends_with(" pass")), "{results:?}");
}

fn check(keys: &[(DkimAlgo, &str, &str)], expected: &[&str]) {
    if !dkimpy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (s, records) = signer(dir.path(), keys);
    let message = signed(&s, MESSAGE.as_bytes());
    let results = dkim_verify(&message, &records).unwrap();
    assert_eq!(results, expected);

    // Relaxed canonicalisation: header case and whitespace changes in transit are fine.
    let text = String::from_utf8(message.clone()).unwrap();
    let rewhitespaced = text
        .replace("Subject: =?utf-8", "SUBJECT:    =?utf-8")
        .replace("Hello Bob,  \r\n", "Hello Bob, \r\n");
    all_pass(
        &dkim_verify(rewhitespaced.as_bytes(), &records).unwrap(),
        keys.len(),
    );

    // An altered body, an altered signed header, an added second From: all fail.
    for altered in [
        text.replace("Hello Bob", "Hello Eve"),
        format!("{text}P.S. appended\r\n"),
        text.replace("Subject: =?utf-8?q?Gr=C3=BC", "Subject: =?utf-8?q?Gr=C3=BD"),
        text.replace("To: Bob", "To: Eve <eve@example.net>,\r\n Bob"),
        text.replace(
            "From: \"Alice",
            "From: mallory@example.net\r\nFrom: \"Alice",
        ),
        text.replace("Cc: dave", "Reply-To: mallory@example.net\r\nCc: dave"),
    ] {
        let results = dkim_verify(altered.as_bytes(), &records).unwrap();
        assert_eq!(results.len(), keys.len(), "{results:?}");
        assert!(
            results.iter().all(|r| r.contains(" fail")),
            "altered message verified: {results:?}"
        );
    }
    // Unsigned headers may be added (e.g. a Received: on the way).
    let received = format!("Received: from mx.example.org by mx2.example.org\r\n{text}");
    all_pass(
        &dkim_verify(received.as_bytes(), &records).unwrap(),
        keys.len(),
    );
}

#[test]
fn rsa_signature_verifies_with_dkimpy() {
    check(
        &[(DkimAlgo::Rsa, "example.com", "rsa2024")],
        &["d=example.com s=rsa2024 a=rsa-sha256 pass"],
    );
}

#[test]
fn ed25519_signature_verifies_with_dkimpy() {
    check(
        &[(DkimAlgo::Ed25519, "example.com", "ed2024")],
        &["d=example.com s=ed2024 a=ed25519-sha256 pass"],
    );
}

#[test]
fn rsa_and_ed25519_signatures_both_verify_with_dkimpy() {
    check(
        &[
            (DkimAlgo::Rsa, "example.com", "rsa2024"),
            (DkimAlgo::Ed25519, "example.com", "ed2024"),
        ],
        &[
            "d=example.com s=rsa2024 a=rsa-sha256 pass",
            "d=example.com s=ed2024 a=ed25519-sha256 pass",
        ],
    );
}

#[test]
fn parent_domain_and_odd_messages_verify_with_dkimpy() {
    if !dkimpy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (s, records) = signer(
        dir.path(),
        &[
            (DkimAlgo::Rsa, "example.com", "r"),
            (DkimAlgo::Ed25519, "example.com", "e"),
        ],
    );
    for message in [
        // A subdomain without a key of its own: d=example.com.
        &b"From: list@lists.example.com\r\nSubject: x\r\n\r\nbody\r\n"[..],
        // Header only, no blank line, no body.
        b"From: a@example.com\r\nSubject: header only\r\n",
        // Empty body.
        b"From: a@example.com\r\nSubject: empty body\r\n\r\n",
        // A body of blank lines only, and a folded From.
        b"From:\r\n  A <a@example.com>\r\nSubject: blank\r\n\r\n\r\n\r\n\r\n",
        // A body without a final line end.
        b"From: a@example.com\r\n\r\nno final CRLF",
        // A Date and To twice (each occurrence signed).
        b"From: a@example.com\r\nTo: x@example.org\r\nTo: y@example.org\r\nDate: 1\r\nDate: 2\r\n\r\nx\r\n",
    ] {
        let results = dkim_verify(&signed(&s, message), &records).unwrap();
        assert_eq!(
            results,
            [
                "d=example.com s=r a=rsa-sha256 pass",
                "d=example.com s=e a=ed25519-sha256 pass"
            ],
            "{:?}",
            String::from_utf8_lossy(message)
        );
    }
}
